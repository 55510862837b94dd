"""Shared fixtures and helpers: a small synthetic raw 11k / HD dataset made by the project's own
script, prepared by the project's own prepare scripts, configs pointing at them, a tiny
checkpoint, and what tests of training runs compare.

torch and the package's torch modules are imported inside the fixtures and helpers that use
them: the tests that only read the source run without torch (test_import_graph.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from handreid.core.startup import start

start()  # as the entry scripts do: tests run their main() in this process
signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest handles Ctrl-C itself

import pytest
import yaml

from handreid.core.config_files import load_config

ROOT = Path(__file__).resolve().parents[1]
# The scripts this suite runs import this checkout's modules, whichever checkout an editable
# install of the environment points at (pytest itself imports them from here: pytest.ini).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
DEMO_TRAIN_CONFIG = ROOT / "configs/demo/train_tiny_11k_dorsal_r.yml"


def run_script(script, *args, cwd=ROOT, check=True, timeout=600, env=None):
    """Run a repo script with this interpreter; returns CompletedProcess (text output)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def results_json(results_dir, config_path, sets):
    """The results JSON run_eval_clip writes for `config_path` with `--set` arguments `sets`
    (["--set", "key=value", ...]): named after the resolved config's name and variant."""
    config = load_config(config_path, [value for value in sets if value != "--set"])
    return Path(results_dir) / f"{config['name']}_{config['variant']}.json"


def make_synthetic(tmp_path_factory, raw_format):
    """A small synthetic raw dataset (few subjects, 160x120 images) in 11k or HD format."""
    out = tmp_path_factory.mktemp(f"raw_{raw_format}")
    run_script("datasets/make_synthetic_hands.py", "--format", raw_format, "--out", out,
               "--seed", "0", "--subjects", "24", "--images-per-aspect", "5",
               "--width", "160", "--height", "120")
    return out


def prepare(tmp_path_factory, script, raw):
    """data_dir of `raw` prepared by `script` with 3 splits."""
    out = tmp_path_factory.mktemp("prepared")
    run_script(script, "--raw", raw, "--out", out, "--num-splits", "3")
    return out


@pytest.fixture(scope="session")
def synthetic_11k_raw(tmp_path_factory):
    """Raw 11k format: HandInfo.csv + Hands/."""
    return make_synthetic(tmp_path_factory, "11k")


@pytest.fixture(scope="session")
def prepared_11k(synthetic_11k_raw, tmp_path_factory):
    """data_dir of the prepared synthetic 11k (train_val_test_split_<aspect>/ inside)."""
    return prepare(tmp_path_factory, "datasets/prepare_11k.py", synthetic_11k_raw)


@pytest.fixture(scope="session")
def synthetic_hd_raw(tmp_path_factory):
    """Raw HD format: Original Images/1-501 and 502-712."""
    return make_synthetic(tmp_path_factory, "hd")


@pytest.fixture(scope="session")
def prepared_hd(synthetic_hd_raw, tmp_path_factory):
    return prepare(tmp_path_factory, "datasets/prepare_hd.py", synthetic_hd_raw)


@pytest.fixture
def make_config(prepared_11k, tmp_path):
    """make_config(**overrides) -> a resolved demo train config on the synthetic 11k data,
    writing checkpoints, logs and results under this test's tmp_path."""
    def make(**overrides):
        values = {"data_dir": str(prepared_11k), "save_path": str(tmp_path / "model.pth"),
                  "log_path": str(tmp_path / "logs/train.log"),
                  "results_dir": str(tmp_path / "results"), "num_workers": 0,
                  "num_splits": 3, "epochs": 2, "warmup_epochs": 1}
        values.update(overrides)
        return load_config(DEMO_TRAIN_CONFIG, list(values.items()))
    return make


# One thread in training subprocesses: the tiny model gains nothing from more, 2-core CI
# machines run a training subprocess beside pytest, and bit-identical comparisons need equal
# thread counts.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """This test's torch ops on one thread (bit-identical comparisons between runs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_checkpoint():
    """tiny_checkpoint(config, path, **changes): save a tiny model trained on `config` (with
    `changes`) at `path`, as if training had stopped at epoch 4 with val accuracy 0.625."""
    import torch

    from handreid.data.loaders import list_split
    from handreid.methods.stage1 import Stage1
    from handreid.model import backbone

    def save(config, path, **changes):
        config = dict(config, **changes)
        names = sorted({name for _, name in list_split(config, "train")})
        torch.manual_seed(1)
        Stage1(config, backbone.build_model(config)[0], names).save_checkpoint(
            path, epoch=4, selection={"metric": "val_accuracy", "value": 0.625,
                                      "val_accuracy": 0.625})
    return save


def build(config):
    """(clip_model, classifier, train_loader, val_loader) of a Stage-1 run, as the entry
    script builds them."""
    from handreid.core.runtime import seed_everything
    from handreid.data.loaders import get_train_val_loaders
    from handreid.model import backbone

    seed_everything(config["seed"])
    train_loader, val_loader, num_classes = get_train_val_loaders(config)
    clip_model, classifier = backbone.build_model(config, num_classes)
    return clip_model, classifier, train_loader, val_loader


def clone(state):
    """A detached copy of a state dict (the model's state at this moment)."""
    return {k: v.detach().clone() for k, v in state.items()}


def changed(before, after, prefix):
    """The keys under `prefix` whose tensors differ between two state dicts; asserts the prefix
    names some key (a typo would make "nothing changed" pass)."""
    import torch

    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return {k for k in keys if not torch.equal(before[k], after[k])}


def learned(config):
    """What must be identical between two runs of `config` (timings are not): per epoch of its
    metrics file, (epoch, phase, train loss, val loss, lr)."""
    from handreid.train.run_log import metrics_path

    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    return [(r["epoch"], r["phase"], r["train_loss"], r["val_loss"], r["lr"]) for r in rows]


def metric_lines(config):
    """Epochs written to `config`'s metrics file so far (0 before the first)."""
    from handreid.train.run_log import metrics_path

    path = metrics_path(config)
    return len(path.read_text().splitlines()) if path.exists() else 0


def write_experiment(folder, data_dir):
    """In `folder`: a fine-tuned eval config of the tiny model with its train config, and a
    baseline eval config (run_all's input)."""
    common = f"model: tiny\ndata_dir: {data_dir}\nnum_workers: 0\nplots: false\n"
    save = f"save_path: {folder / 'tiny.pth'}\n"
    (folder / "eval_tiny.yml").write_text(f"name: tiny\nvariant: finetuned\n{common}{save}")
    (folder / "train_tiny.yml").write_text(
        f"name: tiny\n{common}{save}log_path: {folder / 'logs/train.log'}\nbatch_size: 16\n"
        f"lr: 1.0e-3\nhead_lr_mult: 1.0\nwarmup_epochs: 0\n")
    (folder / "eval_baseline_tiny.yml").write_text(f"name: baseline_tiny\nvariant: baseline\n"
                                                   f"{common}")


def run_torchrun(script, config_file, processes=2):
    """`script --config config_file` under torchrun with `processes` gloo processes (CPU),
    one thread each; returns the CompletedProcess after checking it succeeded."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(ROOT / script), "--config", config_file]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_when(script, config_file, condition, what):
    """Start `script --config config_file` (training) in a subprocess, SIGKILL it as soon as
    `condition()` holds."""
    proc = subprocess.Popen([sys.executable, str(ROOT / script), "--config", config_file],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)


def write_config(config, path):
    """Write a resolved config as YAML; -> its path as a string."""
    path.write_text(yaml.safe_dump(dict(config)))
    return str(path)


class InterruptedLoader:
    """A train loader whose iteration in its `epoch`-th epoch raises KeyboardInterrupt
    (Ctrl-C before the epoch's first step)."""

    def __init__(self, loader, epoch):
        self.loader, self.epoch, self.started = loader, epoch, 0

    def __iter__(self):
        self.started += 1
        if self.started == self.epoch:
            raise KeyboardInterrupt
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)
