"""What a run tells its user while it runs: the CPU wait policy, schedule warnings, the
curves and the TensorBoard events (run_log.py)."""
import ast
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DEMO_TRAIN_CONFIG, ROOT

TRAIN = ROOT / "experiments/train_stage1_frozen_text.py"


def train(data_dir, tmp_path, *sets, env=None, check=True):
    args = {"data_dir": data_dir, "save_path": tmp_path / "m.pth",
            "log_path": tmp_path / "logs/run.log", "num_workers": 0, "epochs": 2,
            "warmup_epochs": 1, "save_every": 1}
    args.update(dict(s.split("=", 1) for s in sets))
    command = [sys.executable, str(TRAIN), "--config", str(DEMO_TRAIN_CONFIG)]
    for key, value in args.items():
        command += ["--set", f"{key}={value}"]
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environment.update(env or {})
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment,
                          timeout=300)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


def test_an_unwritable_save_path_fails_before_any_image_is_read(prepared_11k, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    proc = train(prepared_11k, tmp_path, f"save_path={tmp_path / 'a_file/m.pth'}",
                 check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write {tmp_path / 'a_file/m.pth'}")
    assert "caching images" not in proc.stderr and "starting from scratch" not in proc.stderr


def test_a_cpu_run_waits_passively_writes_tensorboard_and_warns_of_a_long_warmup(
        prepared_11k, tmp_path):
    proc = train(prepared_11k, tmp_path, "warmup_epochs=2")
    assert "OMP_WAIT_POLICY PASSIVE" in proc.stderr
    assert "warmup of 2 epochs >= the 2 training epochs" in proc.stderr
    events = EventAccumulator(str(tmp_path / "logs/run_tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("loss/total", "loss/ce", "lr", "speed/images_per_s", "val/loss"):
        assert tag in tags, tags
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    assert (tmp_path / "logs/run_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_a_wait_policy_the_user_set_is_kept_and_tensorboard_can_be_off(prepared_11k, tmp_path):
    proc = train(prepared_11k, tmp_path, "epochs=1", "warmup_epochs=0", "tensorboard=false",
                 env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert "OMP_WAIT_POLICY ACTIVE" in proc.stderr
    assert "warmup of" not in proc.stderr
    assert not (tmp_path / "logs/run_tensorboard").exists()


def entry_scripts():
    """The project's files run as scripts: those with an `if __name__ == "__main__":` block."""
    files = [p for folder in (".", "experiments", "datasets", "benchmarks")
             for p in (ROOT / folder).glob("*.py")]
    return [p for p in files if any(
        isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
        for node in ast.parse(p.read_text()).body)]


def imported_modules(node):
    """Dotted names of the modules an import statement anywhere inside `node` loads."""
    return [alias.name for inner in ast.walk(node) if isinstance(inner, ast.Import)
            for alias in inner.names] + [
        inner.module for inner in ast.walk(node)
        if isinstance(inner, ast.ImportFrom) and inner.module and not inner.level]


def calls_start(node):
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) \
        and ast.unparse(node.value.func) == "start"


def test_every_entry_script_calls_start_before_anything_can_load_torch():
    # libgomp reads OMP_WAIT_POLICY once, when torch loads: start() has to come first.
    scripts = entry_scripts()
    assert {"run_eval_clip.py", "run_all_finetuned_stage1.py", "prepare_11k.py",
            "bench_metrics.py", "gpu_check.py"} <= {p.name for p in scripts}
    for script in scripts:
        body = ast.parse(script.read_text()).body
        started = next((n for n, node in enumerate(body) if calls_start(node)), None)
        assert started is not None, f"{script.name} does not call start()"
        for node in body[:started]:
            for module in imported_modules(node):
                assert module.split(".")[0] in sys.stdlib_module_names \
                    or module == "handreid.core.startup", f"{script.name} imports {module} " \
                    "before start()"


def test_importing_any_module_of_the_package_changes_no_environment_variable():
    # Process settings are start()'s alone: a library user's process stays as it was. The
    # third-party modules the package imports at its top level are loaded first, so that only
    # the package's own effects are compared.
    files = sorted((ROOT / "handreid").rglob("*.py"))
    third_party = sorted({module for path in files for node in ast.parse(path.read_text()).body
                          for module in imported_modules(node)
                          if module.split(".")[0] not in sys.stdlib_module_names
                          and module.split(".")[0] != "handreid"})
    code = ("import importlib, os, pkgutil, sys\n"
            "for name in sys.argv[1:]: importlib.import_module(name)\n"
            "before = dict(os.environ)\n"
            "import handreid\n"
            "names = [m.name for m in pkgutil.walk_packages(handreid.__path__, 'handreid.')]\n"
            "for name in names: importlib.import_module(name)\n"
            "print(len(names) + 1, sorted(k for k in {*before, *os.environ}\n"
            "                             if before.get(k) != os.environ.get(k)))\n")
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code, *third_party], cwd=ROOT,
                          capture_output=True, text=True, env=environment, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(len(files)), "[]"]


def test_an_override_of_what_the_run_is_gets_its_own_names():
    from handreid.core.config_files import load_config
    for config in ("configs/finetuning_stage1_frozen_text/train_vitb16_hd.yml",
                   "configs/finetuning_stage2_clipreid/train_vitb16_11k_dorsal_r.yml"):
        own = load_config(ROOT / config)
        tiny = load_config(ROOT / config, ["model=tiny"])
        assert tiny["save_path"] != own["save_path"] and tiny["log_path"] != own["log_path"]
        assert tiny["name"] != own["name"]
        # the eval twin of the same override finds the same checkpoint
        twin = load_config(ROOT / config.replace("/train_", "/eval_"), ["model=tiny"])
        assert twin["save_path"] == tiny["save_path"]
        explicit = load_config(ROOT / config, ["model=tiny", "save_path=x.pth"])
        assert explicit["save_path"] == "x.pth"
    hd = "configs/finetuning_stage1_frozen_text/train_vitb16_hd.yml"
    mine = load_config(ROOT / hd, ["dataset=folder", "data_dir=datasets/my_hands"])
    assert mine["save_path"] != load_config(ROOT / hd)["save_path"]


def test_an_evaluation_imports_lir_and_scikit_learn_only_when_it_computes_ratios():
    # Importing them took about 1 s of every evaluation's start (issue: 58% of a small
    # protocol's wall time went to imports).
    code = ("import sys; import handreid.evaluation.evaluate, run_all_finetuned_stage1; "
            "print(sorted({'lir', 'sklearn'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
