"""Config files: YAML loading with validation and `--set` overrides, the derived paths, and the
argument parser every script shares (--config, --set; its errors are ConfigErrors).

All experiments read one flat dict. Keys, types, defaults and allowed values live in
schema.SCHEMA; docs/config.md documents them. A bad key, type or value raises ConfigError
(exit code 2).
"""
import argparse
import os
from pathlib import Path

import yaml

from handreid.core.errors import ConfigError
from handreid.core.schema import SCHEMA, check_value, suggest

# CPU runs: OpenMP worker threads that spin while they wait take the cores from everything
# else on a busy machine (a 2-core CPU run was 4x slower). libgomp reads this when torch
# loads, so every entry point imports config before torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# data_dir of each dataset when the config leaves it out (the prepare scripts' --out default)
DEFAULT_DATA_DIRS = {"11k": "datasets/11khands", "hd": "datasets/HD", "folder": "datasets/folder"}
PREPARE_SCRIPTS = {"11k": "prepare_11k.py", "hd": "prepare_hd.py", "folder": "prepare_folder.py"}


def parse_override(text):
    """'key=value' -> (key, value), the value parsed as YAML ('1e-5' -> float, 'true' -> bool)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    kind = SCHEMA.get(key, {}).get("type")
    # YAML reads '1e-5' as a string; numbers written that way are common in lr overrides.
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is str and value is not None and not isinstance(value, str):
        value = raw.strip()
    return key, value


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- `key=value` overrides; validated, derived paths filled in."""
    config = {key: spec["default"] for key, spec in SCHEMA.items()}
    sources = []
    if path is not None:
        sources.append((str(path), _read_yaml(path).items()))
    sources.append(("--set", [parse_override(o) if isinstance(o, str) else o for o in overrides]))
    for where, items in sources:
        for key, value in items:
            if key not in SCHEMA:
                raise ConfigError(f"{where}: unknown key '{key}'{suggest(key)}")
            config[key] = check_value(key, value, where)
    _rename_overridden_run(config, dict(sources[0][1]) if path is not None else {},
                           {key for key, _ in sources[-1][1]})
    if config["name"] is None:
        config["name"] = Path(path).stem if path is not None else "experiment"
    if config["data_dir"] is None:
        config["data_dir"] = DEFAULT_DATA_DIRS[config["dataset"]]
    if config["save_path"] is None:
        config["save_path"] = f"saved_models/{config['name']}.pth"
    if config["log_path"] is None:
        config["log_path"] = f"logs/{config['name']}.log"
    return config


# Keys that say which run a config is: a --set that changes one makes another run.
RUN_IDENTITY_KEYS = ("method", "model", "dataset", "data_dir", "aspect")


def _rename_overridden_run(config, from_file, set_keys):
    """A --set of a RUN_IDENTITY_KEYS key makes another run than the file's: its name,
    save_path and log_path (where the file names them and --set does not) get a suffix saying
    what changed, so it never shares (or is refused as) the file's own run. The same --set on
    the train and the eval config gives both the same names."""
    changed = [key for key in RUN_IDENTITY_KEYS
               if key in set_keys and config[key] != from_file.get(key, SCHEMA[key]["default"])]
    if not changed:
        return
    def slug(value):  # a data_dir counts by its folder name
        return "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(str(value)).name)
    suffix = "__" + "_".join(f"{key}-{slug(config[key])}" for key in changed)
    for key in ("name", "save_path", "log_path"):
        if key in set_keys or key not in from_file or config[key] is None:
            continue
        value = Path(config[key])
        config[key] = str(value.with_name(value.stem + suffix + value.suffix)) \
            if key != "name" else config[key] + suffix


def dataset_dir(config):
    """The prepared split folder the loaders read for this dataset (and 11k aspect)."""
    root = Path(config["data_dir"])
    if config["dataset"] == "11k":
        return root / f"train_val_test_split_{config['aspect']}"
    return root / "train_val_test_split"


def prepare_command(config):
    """The command that creates dataset_dir(config), quoted in missing-data errors."""
    raw = "<root of your <root>/<identity>/<images> tree>" if config["dataset"] == "folder" \
        else "<raw dataset folder>"
    return (f"python datasets/{PREPARE_SCRIPTS[config['dataset']]} --raw {raw} "
            f"--out {config['data_dir']}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors: one line, exit code 2, under run_cli."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def make_parser(description, default_config=None):
    """An argument parser with --config and repeatable --set key=value."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML config file" + (f" (default: {default_config})"
                                                   if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key; repeatable")
    return parser
