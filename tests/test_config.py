"""Config schema: defaults, validation errors (one line, exit code 2), --set overrides."""
import pytest

from handreid.core.config_files import dataset_dir, load_config, make_parser, parse_override
from handreid.core.registry import config_keys
from handreid.core.errors import ConfigError
from conftest import ROOT, run_script


def write(tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(text)
    return path


def test_defaults_and_derived_paths(tmp_path):
    config = load_config(write(tmp_path, "model: rn50\n"))
    assert set(config) == set(config_keys())
    assert config["model"] == "rn50" and config["epochs"] == config_keys()["epochs"]["default"]
    assert config["name"] == "c"
    assert config["save_path"] == "saved_models/c.pth" and config["log_path"] == "logs/c.log"
    assert str(dataset_dir(config)) == "datasets/11khands/train_val_test_split_dorsal_r"
    hd = load_config(write(tmp_path, "dataset: hd\n"))
    assert str(dataset_dir(hd)) == "datasets/HD/train_val_test_split"


def test_every_shipped_config_is_valid():
    configs = sorted(ROOT.glob("configs/**/*.yml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate'"),
    ("epoch: 3\n", "did you mean 'epochs'"),
    ("epochs: three\n", "'epochs' must be int"),
    ("lr: true\n", "'lr' must be float"),
    ("aspect: dorsal_x\n", "'aspect' must be one of dorsal_r"),
    ("dataset: 12k\n", "'dataset' must be one of 11k, hd"),
    ("batch_size: 0\n", "'batch_size' must be >= 1"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_file(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(write(tmp_path, text))


def test_overrides_parse_types(tmp_path):
    config = load_config(write(tmp_path, "lr: 0.1\n"),
                         ["lr=1e-5", "epochs=3", "cache_images=false", "lr_steps=[10, 20]",
                          "name=123", "pretrained=none"])
    assert config["lr"] == 1e-5 and config["epochs"] == 3 and config["cache_images"] is False
    assert config["lr_steps"] == [10, 20] and config["name"] == "123"
    assert config["pretrained"] == "none"


@pytest.mark.parametrize("override, message", [
    ("lr", "expected key=value"),
    ("lrr=1", "unknown key 'lrr'"),
    ("epochs=1.5", "'epochs' must be int"),
    ("amp=fp8", "'amp' must be one of"),
])
def test_bad_override(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yml")


def test_parser_errors_are_config_errors():
    with pytest.raises(ConfigError, match="--config"):
        make_parser("x").parse_args([])


def test_parse_override_keeps_strings():
    assert parse_override("data_dir=/tmp/a b") == ("data_dir", "/tmp/a b")


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "epochz: 3\n")
    proc = run_script("experiments/run_eval_clip.py", "--config", bad, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "did you mean 'epochs'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- base: inheritance

def test_every_shipped_config_resolves_to_the_settings_it_had_before_inheritance():
    # The table was written by the flat configs before they became bases and small files.
    import json
    expected = json.loads((ROOT / "tests/fixtures/shipped_configs_resolved.json").read_text())
    shipped = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/**/*.yml"))
    assert sorted(set(expected) - set(shipped)) == [], "a shipped config was removed"
    for path in shipped:
        if path in expected:
            assert load_config(ROOT / path) == expected[path], path


def test_a_child_inherits_its_base_chain_and_wins(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/root.yml").write_text("epochs: 7\nlr: 0.5\nmodel: rn50\n")
    (tmp_path / "recipes/method.yml").write_text("base: root.yml\nlr: 0.25\nseed: 3\n")
    child = write(tmp_path, "base: recipes/method.yml\nseed: 4\n")
    config = load_config(child, ["epochs=9"])
    assert (config["epochs"], config["lr"], config["model"], config["seed"]) == (9, 0.25,
                                                                                  "rn50", 4)
    assert config["name"] == "c"  # the child's stem, not a base's


def test_a_base_that_runs_a_different_run_names_it_after_the_child(tmp_path):
    (tmp_path / "base.yml").write_text("save_path: saved_models/x.pth\n")
    child = write(tmp_path, "base: base.yml\n")
    assert load_config(child, ["aspect=palmar_l"])["save_path"] == \
        "saved_models/x__aspect-palmar-l.pth"


@pytest.mark.parametrize("files, message", [
    ({"c.yml": "base: missing.yml\n"}, "c.yml: base file not found: .*missing.yml"),
    ({"c.yml": "base: a.yml\n", "a.yml": "base: c.yml\n"},
     r"the base: chain is a loop \(.*c.yml -> .*a.yml -> .*c.yml\)"),
    ({"c.yml": "base: c.yml\n"}, "the base: chain is a loop"),
    ({"c.yml": "base: [a.yml]\n"}, "'base' must be the path of another config file"),
    ({"c.yml": "base: a.yml\n", "a.yml": "lerning_rate: 1\n"}, "a.yml: unknown key"),
])
def test_a_bad_base_is_one_error_naming_the_files(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "c.yml")


def test_print_config_names_where_each_value_came_from(tmp_path):
    (tmp_path / "base.yml").write_text("epochs: 7\nlr: 0.5\n")
    child = write(tmp_path, "base: base.yml\nlr: 0.25\n")
    proc = run_script("experiments/run_eval_clip.py", "--config", child, "--set", "seed=5",
                      "--print-config")
    lines = {line.split(":")[0]: line for line in proc.stdout.splitlines()}
    assert lines["epochs"].endswith(f"7  # {tmp_path / 'base.yml'}")
    assert lines["lr"].endswith(f"0.25  # {child}")
    assert lines["seed"].endswith("5  # --set")
    assert lines["amp"].endswith('"auto"  # default')
    assert lines["name"].endswith('"c"  # derived')
    assert set(lines) == set(config_keys())
    assert "evaluating" not in proc.stdout and proc.stderr == ""
