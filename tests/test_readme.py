"""The README and docs/ stay true: every config key is documented in docs/config.md with its
default (and no row names a key that does not exist), every command in their shell blocks
names a script that runs (--help), configs that load and make targets that exist, and every
relative link points at a file and heading that exist. The demo and the other tests run the
same commands on synthetic data."""
import json
import re
import shlex
import subprocess
import sys

import pytest

from handreid.core.config_files import load_config
from handreid.core.registry import config_keys
from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = {path.resolve(): path.read_text() for path in [README, *DOCS]}
KEY_TABLE = ROOT / "docs" / "config.md"
KEY_ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|", flags=re.M)


def shell_lines():
    blocks = [block for text in PAGES.values()
              for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def shown_default(spec):
    default = spec["default"]
    return "derived" if default is None else (
        str(default).lower() if isinstance(default, bool) else str(default))


def test_every_config_key_is_documented_with_its_default():
    # The general keys and every built-in method's own keys (declared in its file).
    text = KEY_TABLE.read_text()
    for key, spec in config_keys().items():
        assert f"| `{key}` | `{shown_default(spec)}` |" in text, key


def test_the_key_table_names_no_stale_key_and_each_key_once():
    rows = [key for key, _ in KEY_ROW.findall(KEY_TABLE.read_text())]
    assert sorted(rows) == sorted(config_keys())


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
    # Every script's --help, run as __main__ in one process: the heavy imports (torch,
    # open_clip) are paid once, not once per script.
    runner = ("import contextlib, io, json, os, runpy, sys\n"
              "helps, path = {}, list(sys.path)\n"
              "for script in sys.argv[1:]:\n"
              "    sys.argv, out = [script, '--help'], io.StringIO()\n"
              "    sys.path[:] = [os.path.dirname(os.path.abspath(script))] + path\n"
              "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
              "        runpy.run_path(script, run_name='__main__')\n"
              "    helps[script] = out.getvalue()\n"
              "print(json.dumps(helps))\n")
    proc = subprocess.run([sys.executable, "-c", runner, *sorted(scripts)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    for script in sorted(scripts):
        assert "usage:" in helps[script], script


def anchor(heading):
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_point_at_existing_files_and_headings():
    anchors = {path: {anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
               for path, text in PAGES.items()}
    for path, text in PAGES.items():
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, fragment = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.name}: {target}"
            if fragment and linked.suffix == ".md":
                assert fragment in anchors[linked], f"{path.name}: {target}"


def test_the_documentation_stands_on_its_own():
    for path, text in PAGES.items():
        assert "DESIGN.md" not in text and "../shared" not in text, path.name


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/eval_*.yml")))
def test_each_eval_config_has_a_train_config_or_is_a_baseline(path):
    config = load_config(path)
    if config["variant"] == "finetuned":
        train = load_config(path.with_name(path.name.replace("eval_", "train_", 1)))
        assert train["save_path"] == config["save_path"]
