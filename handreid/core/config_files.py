"""Config files: YAML loading with validation and `--set` overrides, the derived paths, and the
argument parser every script shares (--config, --set; its errors are ConfigErrors).

All experiments read one flat dict. Keys, types, defaults and allowed values live in
schema.SCHEMA and in the methods' files (registry.config_keys); docs/config.md documents them.
A bad key, type or value raises ConfigError (exit code 2).
"""
import argparse
import hashlib
import json
from pathlib import Path

import yaml

from handreid.core import registry
from handreid.core.errors import ConfigError
from handreid.core.schema import SCHEMA, check_value, suggest

# data_dir of each dataset when the config leaves it out (the prepare scripts' --out default)
DEFAULT_DATA_DIRS = {"11k": "datasets/11khands", "hd": "datasets/HD", "folder": "datasets/folder"}
PREPARE_SCRIPTS = {"11k": "prepare_11k.py", "hd": "prepare_hd.py", "folder": "prepare_folder.py"}


def parse_override(text, keys=None):
    """'key=value' -> (key, value), the value parsed as YAML ('1e-5' -> float, 'true' -> bool)
    and read as its key in `keys` (default: registry.config_keys())."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    kind = (keys or registry.config_keys()).get(key, {}).get("type")
    # YAML reads '1e-5' as a string; numbers written that way are common in lr overrides.
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is str and value is not None and not isinstance(value, str):
        value = raw.strip()
    return key, value


# A config is a few KB of keys. Files from others are read within these limits: a larger
# file is no config (a 34 MB one took minutes to parse), and aliases that expand a small file
# into a huge value (a "billion laughs" of nested anchors) are refused before the value is
# built or printed.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


class AliasBombError(yaml.YAMLError):
    """A document whose aliases expand it past MAX_CONFIG_NODES values."""


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping of a YAML file (line numbers from 1)."""

    def __init__(self, key, first, again):
        super().__init__(f"key '{key}' is given twice (lines {first} and {again})")
        self.key, self.first, self.again = key, first, again


class ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load's loader with two refusals: a document whose nodes, every alias expanded,
    number more than MAX_CONFIG_NODES (counted while composing, before constructing), and a key
    given twice in one mapping (PyYAML would keep the last value silently, and the user edited
    the other)."""

    def compose_document(self):
        self.expanded = {}  # id(node) -> its node count with aliases expanded
        return super().compose_document()

    def compose_node(self, parent, index):
        node = super().compose_node(parent, index)
        if id(node) not in self.expanded:  # an alias returns its anchor's node, counted
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [part for pair in node.value for part in pair] \
                if isinstance(node, yaml.MappingNode) else []
            # get: a recursive alias points at a node still being composed
            count = 1 + sum(self.expanded.get(id(child), 1) for child in children)
            if count > MAX_CONFIG_NODES:
                raise AliasBombError(f"aliases expand it past {MAX_CONFIG_NODES} values")
            self.expanded[id(node)] = count
        return node

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise DuplicateKeyError(key, lines[key], line)
                lines[key] = line
            except TypeError:  # an unhashable key: SafeLoader refuses it below
                continue
        return super().construct_mapping(node, deep)


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size / 2 ** 20:.1f} MiB, no config file (at most "
                          f"{MAX_CONFIG_BYTES // 2 ** 20} MiB); pass the YAML config to --config")
    try:
        data = yaml.load(path.read_text(), Loader=ConfigLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}; keep one of them") from None
    except AliasBombError as err:
        raise ConfigError(f"{path}: {err}; a config needs no such anchors: write the "
                          f"values out") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def read_chain(path):
    """[(file, its keys)] of a config file and the files it inherits from through `base:` (a
    path relative to the file that names it), the farthest base first."""
    chain, path = [], Path(path)
    while True:
        data = _read_yaml(path)
        chain.insert(0, (path, data))
        base = data.pop("base", None)
        if base is None:
            return chain
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: 'base' must be the path of another config file, "
                              f"relative to {path.name}")
        base_path = path.parent / base
        if not base_path.is_file():
            raise ConfigError(f"{path}: base file not found: {base_path} (base: is a path "
                              f"relative to the folder of {path.name})")
        seen = [file.resolve() for file, _ in chain]
        if base_path.resolve() in seen:
            loop = [str(file) for file, _ in reversed(chain)] + [str(base_path)]
            raise ConfigError(f"{path}: the base: chain is a loop ({' -> '.join(loop)}); "
                              "remove one of these base: lines")
        path = base_path


def resolve_config(path=None, overrides=()):
    """(config, origins): defaults <- the base: chain of the YAML file, farthest first <- the
    file <- `key=value` overrides, validated, derived paths filled in; origins names, per key,
    the file or `--set` its value came from ("default" or "derived" otherwise)."""
    chain = read_chain(path) if path is not None else []
    # The method is loaded before anything is validated: its own keys become known.
    keys = registry.config_keys(_named_method(chain, overrides))
    config = {key: spec["default"] for key, spec in keys.items()}
    origins = dict.fromkeys(config, "default")
    set_items = [parse_override(o, keys) if isinstance(o, str) else o for o in overrides]
    sources = [(str(file), data.items()) for file, data in chain] + [("--set", set_items)]
    for where, items in sources:
        for key, value in items:
            if key not in keys:
                raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, keys)}")
            config[key] = check_value(key, value, where, keys)
            origins[key] = where
    from_files = {key: value for _, data in chain for key, value in data.items()}
    set_keys = {key for key, _ in set_items}
    _rename_overridden_run(config, from_files, set_keys, keys)
    if "save_path" in set_keys and "log_path" not in set_keys:
        config["log_path"] = None  # a file's log_path belongs to the file's save_path
    derived = {"name": lambda: Path(path).stem if path is not None else "experiment",
               "data_dir": lambda: DEFAULT_DATA_DIRS[config["dataset"]],
               "save_path": lambda: f"saved_models/{config['name']}.pth",
               "log_path": lambda: log_path_of(config["save_path"])}
    for key, value in derived.items():
        if config[key] is None:
            config[key], origins[key] = value(), "derived"
    return config, origins


def log_path_of(save_path):
    """log_path when a config leaves it out (or --set gives another save_path): it follows
    save_path, so two runs that differ only in save_path never share a log:
    saved_models/<folders>/<stem>.pth -> logs/<folders>/<stem>.log; a checkpoint elsewhere
    gets <stem>.log beside it (a path under logs/ could not tell two such places apart)."""
    path = Path(save_path)
    if not path.is_absolute() and path.parts[:1] == ("saved_models",) and len(path.parts) > 1:
        return str(Path("logs", *path.parts[1:]).with_suffix(".log"))
    log = path.with_suffix(".log")
    return str(log if log != path else path.with_name(path.name + ".log"))


def _named_method(chain, overrides):
    """The `method:` a config names last (its file chain, then --set), before validation."""
    named = [data["method"] for _, data in chain if "method" in data]
    # only the method's own spec is needed to read its override (the others are read later)
    method_only = {"method": SCHEMA["method"]}
    named += [value for key, value in (parse_override(o, method_only) if isinstance(o, str)
                                       else o for o in overrides) if key == "method"]
    return named[-1] if named else None


def load_config(path=None, overrides=()):
    """The resolved config of a YAML file (and its bases) with `key=value` overrides."""
    return resolve_config(path, overrides)[0]


def config_text(config, origins):
    """The resolved config as YAML, each key with the file or --set it came from."""
    width = max(map(len, config))
    return "\n".join(f"{key + ':':<{width + 1}} {json.dumps(value)}  # {origins[key]}"
                      for key, value in config.items())


def config_from_args(args):
    """The config of a parsed command line (--config, --set); with --print-config it prints
    the resolved config with each key's origin and the script stops there (exit code 0)."""
    config, origins = resolve_config(args.config, args.overrides)
    if getattr(args, "print_config", False):
        print(config_text(config, origins))
        raise SystemExit(0)
    return config


# Keys that say which run a config is: a --set that changes one makes another run.
RUN_IDENTITY_KEYS = ("method", "model", "dataset", "data_dir", "aspect")


def _rename_overridden_run(config, from_file, set_keys, keys):
    """A --set of a RUN_IDENTITY_KEYS key makes another run than the file's: its name,
    save_path and log_path (where the file names them and --set does not) get a suffix saying
    what changed, so it never shares (or is refused as) the file's own run; a data_dir counts
    by its folder name and a short hash of its resolved path. The same --set on the train and
    the eval config gives both the same names."""
    changed = [key for key in RUN_IDENTITY_KEYS
               if key in set_keys and config[key] != from_file.get(key, keys[key]["default"])]
    if not changed:
        return
    def slug(key, value):
        text = "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(str(value)).name)
        if key == "data_dir":  # two folders of one name (/a/mini, /b/mini) are other data
            text += "-" + hashlib.sha256(str(Path(value).resolve()).encode()).hexdigest()[:8]
        return text
    suffix = "__" + "_".join(f"{key}-{slug(key, config[key])}" for key in changed)
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
    """An argument parser with --config, repeatable --set key=value and --print-config (read
    the result with config_from_args)."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML config file" + (f" (default: {default_config})"
                                                   if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key; repeatable")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, each key with the file or --set it "
                             "came from, and stop")
    return parser
