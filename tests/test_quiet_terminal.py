"""What the demo's terminal shows (issue 29, item 9): run_all --train trains and evaluates
with the resolved config in the run's log file only, and the final table stands out."""
from pathlib import Path

import pytest

import run_all_finetuned_stage1
from conftest import ROOT

pytestmark = pytest.mark.slow  # end to end (make test-slow)
EVAL_CONFIG = ROOT / "configs/demo/eval_tiny_11k_dorsal_r.yml"


def test_the_resolved_config_goes_to_the_log_and_the_table_stands_out(prepared_11k, tmp_path,
                                                                      capfd):
    log = tmp_path / "logs/train.log"
    values = {"data_dir": prepared_11k, "save_path": tmp_path / "m.pth", "log_path": log,
              "results_dir": tmp_path / "results", "epochs": 1, "warmup_epochs": 0,
              "num_splits": 1, "plots": False, "tensorboard": False}
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    run_all_finetuned_stage1.main(["--train", "--configs", str(EVAL_CONFIG), "--out",
                                   str(tmp_path / "summary"), *sets])
    out, err = capfd.readouterr()  # the training child's output too
    assert "resolved config:" not in out + err
    assert f"log: {log} (with the resolved config)" in err
    assert "resolved config:\n" in Path(log).read_text()
    banner = out.index("=" * 32 + " the table " + "=" * 32)
    assert out.index("| config | method |") > banner
