"""One rule for exit codes (docs/config.md): 2 the command or config is wrong, 1 what it names
cannot be used, 130 interrupted; Ctrl-C while a script's modules load is one line too."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from experiments import run_eval_clip
from handreid.core.errors import run_cli

BASELINE = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"


def exit_code(main, capsys):
    """(exit code, stderr) of main() run as the scripts run it (run_cli)."""
    with pytest.raises(SystemExit) as exited:
        run_cli(main)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, code, words", [
    (["--set", "lrr=1"], 2, "unknown key 'lrr' (did you mean 'lr'?)"),
    (["--set", "flip=sideways"], 2, "flip"),
    (["--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--set", "data_dir=/nonexistent/data"], 1, "dataset split not found"),
], ids=["unknown key", "bad value", "bad argument", "missing data"])
def test_the_command_is_wrong_2_what_it_names_is_unusable_1(args, code, words, tmp_path,
                                                           capsys):
    sets = ["--set", f"results_dir={tmp_path}"]
    got, err = exit_code(lambda: run_eval_clip.main(["--config", str(BASELINE), *sets, *args]),
                         capsys)
    assert got == code and "Traceback" not in err
    line, = err.strip().splitlines()
    assert line.startswith("error: ") and words in line, line


def loading_torch(pid):
    """Whether the process maps torch's library: its heavy imports are under way."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return "libtorch" in maps.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("script", ["experiments/train_stage1_frozen_text.py",
                                    "experiments/run_eval_clip.py"])
def test_ctrl_c_while_the_modules_load_is_one_line_and_exit_130(script):
    # The train script imports torch at module level, before run_cli; evaluation inside it.
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "--config", str(BASELINE)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not loading_torch(proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "torch never loaded"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip() == "interrupted", err[-2000:]
