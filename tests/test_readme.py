"""README stays true: every config key is documented with its default, and every command in
its shell blocks names a script that runs (--help), configs that load and make targets that
exist. The demo and the other tests run the same commands on synthetic data."""
import re
import shlex

import pytest

from config import SCHEMA, load_config
from conftest import ROOT, run_script

README = (ROOT / "README.md").read_text()


def shell_lines():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_every_config_key_is_documented_with_its_default():
    for key, spec in SCHEMA.items():
        default = spec["default"]
        shown = "derived" if default is None else (
            str(default).lower() if isinstance(default, bool) else str(default))
        assert f"| `{key}` | `{shown}` |" in README, key


def test_shell_commands_name_real_scripts_configs_and_targets():
    makefile = (ROOT / "Makefile").read_text()
    scripts = set()
    for line in shell_lines():
        words = shlex.split(line.replace("$", ""))
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, flags=re.M), line
            continue
        if words[0] == "python3" or "pip" in line:
            continue
        script = next(w for w in words if w.endswith(".py"))
        assert (ROOT / script).is_file(), line
        scripts.add(script)
        if "--config" in words:
            load_config(ROOT / words[words.index("--config") + 1])
    assert len(scripts) >= 6
    for script in sorted(scripts):
        proc = run_script(script, "--help")
        assert "usage:" in proc.stdout, script


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/eval_*.yml")))
def test_each_eval_config_has_a_train_config_or_is_a_baseline(path):
    config = load_config(path)
    if config["variant"] == "finetuned":
        train = load_config(path.with_name(path.name.replace("eval_", "train_", 1)))
        assert train["save_path"] == config["save_path"]
