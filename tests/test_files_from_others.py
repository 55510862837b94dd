"""Files from others and what runs leave behind: a weights file never runs code (a crafted
TorchScript archive or pickle is read as data or refused, nothing of it runs), a genuine
TorchScript archive still loads; training replaces no file it did not write (save_path,
metrics), lock and log files are never written through a symbolic link, `name:` cannot lead
out of results_dir; stale temporaries of killed writers are removed by the next write of the
same file (a live writer's are kept); two updates of one gallery index never run at once."""
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from typing import Tuple

import open_clip
import pytest
import torch
from torch import nn

from conftest import ROOT, write_config
from handreid.core.atomic_files import atomic_write
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from handreid.methods.stage1 import Stage1
from handreid.model.backbone import build_model
from handreid.train.checkpointing import resume_path
from handreid.train.entry import train_main
from handreid.train.run_log import metrics_path

EVAL_CONFIG = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"


def tiny(**overrides):
    return load_config(None, [("model", "tiny"), *overrides.items()])


# ---------------------------------------------------------------- weights files run no code

class WritesOnLoad(nn.Module):
    """A module whose TorchScript __setstate__ writes '!!!!' into a file named by its state:
    torch.jit.load runs it."""

    def __init__(self, target: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.target = target

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool, str]:
        return (self.weight, self.training, self.target)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool, str]) -> None:
        written = torch.from_file(state[2], shared=True, size=4, dtype=torch.uint8).fill_(33)
        self.weight = state[0] + 0 * written.sum()
        self.training = state[1]
        self.target = state[2]

    def forward(self, x):
        return x


class OpensOnUnpickle:
    """Unpickling it opens (creates) a file: what a pickle's __reduce__ can make run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_crafted_torchscript_archive_runs_nothing_and_is_refused(tmp_path):
    from experiments import index_gallery
    marker = tmp_path / "written_by_the_archive"
    archive = tmp_path / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(WritesOnLoad(str(marker))), str(archive))
    with pytest.raises(UserError, match=rf"^pretrained: {archive} is a TorchScript archive "
                                        r"that holds more than weights \(.*own __getstate__/"
                                        r"__setstate__ code\); nothing of it was run. Use "
                                        r"open_clip_model.safetensors or open_clip_pytorch_model"
                                        r".bin from the hf-hub repo "
                                        r"timm/vit_base_patch16_clip_224.openai"):
        build_model(load_config(None, [("model", "vitb16"), ("pretrained", str(archive))]))
    with pytest.raises(UserError, match="is a TorchScript archive that holds more than"):
        index_gallery.main(["--config", str(EVAL_CONFIG), "--set", f"pretrained={archive}",
                            "--gallery", str(tmp_path), "--index", str(tmp_path / "i.npz")])
    assert not marker.exists()
    torch.jit.load(str(archive))  # what the archive does when its code runs
    assert marker.read_bytes() == b"!!!!"


def test_a_torchscript_archive_whose_data_calls_a_function_is_refused(tmp_path):
    marker = tmp_path / "opened_by_the_archive"
    archive = tmp_path / "crafted.pt"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("crafted/data.pkl", pickle.dumps(OpensOnUnpickle(str(marker)), protocol=2))
        out.writestr("crafted/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(UserError, match=r"holds more than weights \(its data names "
                                        r"(builtins|io)\.open, which is not a weight\)"):
        build_model(tiny(pretrained=str(archive)))
    assert not marker.exists()


def test_a_pickle_that_runs_code_is_refused_as_weights(tmp_path):
    marker = tmp_path / "opened_by_the_pickle"
    weights = tmp_path / "weights.pth"
    torch.save({"visual.proj": OpensOnUnpickle(str(marker))}, weights)
    with pytest.raises(UserError, match=rf"cannot load {weights} into handid_tiny "
                                        r"\(UnpicklingError"):
        build_model(tiny(pretrained=str(weights)))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_genuine_torchscript_archive_loads_every_tensor_without_torch_jit(tmp_path,
                                                                          monkeypatch):
    source = open_clip.create_model("handid_tiny")
    attn_mask = source.attn_mask
    delattr(source, "attn_mask")  # OpenAI's archives keep the mask as a plain attribute
    source.attn_mask = attn_mask
    archive = tmp_path / "tiny-openai.pt"
    torch.jit.save(torch.jit.script(source.half()), str(archive))
    monkeypatch.setattr(torch.jit, "load", None)  # any call would fail
    loaded, _ = build_model(tiny(pretrained=str(archive)))
    expected = source.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), \
            name


# ---------------------------------------------------------------- training replaces only its own

def train(config_file, *args):
    return train_main(Stage1, "", ["--config", str(config_file), *args])


@pytest.fixture
def one_epoch(make_config, tmp_path):
    """(config, its file): one Stage-1 epoch of the tiny model."""
    config = make_config(batch_size=8, epochs=1, warmup_epochs=0)
    return config, write_config(config, tmp_path / "run.yml")


@pytest.mark.parametrize("found", ["document", "checkpoint without resume state"])
def test_training_refuses_to_replace_a_file_at_save_path_it_did_not_write(
        one_epoch, found, tiny_checkpoint, tmp_path):
    config, config_file = one_epoch
    save_path = tmp_path / "model.pth"
    if found == "document":
        save_path.write_bytes(b"a colleague's notes")
    else:
        tiny_checkpoint(config, save_path)
    before = save_path.read_bytes()
    with pytest.raises(UserError, match=rf"^{save_path} exists without the resume state "
                                        rf"{resume_path(config)} a run leaves beside its "
                                        r"checkpoint .*; pass --overwrite to replace it, or set "
                                        r"another save_path$"):
        train(config_file)
    assert save_path.read_bytes() == before and not resume_path(config).exists()
    assert not os.path.exists(config["log_path"])  # refused before anything was written


def test_training_refuses_a_foreign_metrics_file_and_overwrite_replaces_it(one_epoch):
    config, config_file = one_epoch
    metrics = metrics_path(config)
    metrics.parent.mkdir(parents=True)
    metrics.write_text("epoch,accuracy\n1,0.5\n")  # someone's own table under that name
    with pytest.raises(UserError, match=rf"^{metrics} exists and is not the metrics file of a "
                                        r"training run; move it away, set another log_path, or "
                                        r"pass --overwrite to replace it$"):
        train(config_file)
    assert metrics.read_text() == "epoch,accuracy\n1,0.5\n"
    assert not os.path.exists(config["save_path"])
    train(config_file, "--overwrite")
    assert metrics.read_text().startswith('{"epoch": 1')


@pytest.mark.parametrize("planted", ["lock", "log"])
def test_a_symbolic_link_at_the_lock_or_the_log_is_not_written_through(one_epoch, planted,
                                                                       tmp_path):
    config, config_file = one_epoch
    victim = tmp_path / "victim.txt"
    victim.write_text("must stay as it is\n")
    link = {"lock": tmp_path / "model.pth.lock", "log": tmp_path / "logs/train.log"}[planted]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)
    fix = {"lock": "set another save_path", "log": "set another log_path"}[planted]
    with pytest.raises(UserError, match=rf"^{link} is a symbolic link \(to {victim}\); the "
                                        rf"toolkit does not write through links: remove it, "
                                        rf"or {fix}$"):
        train(config_file)
    assert victim.read_text() == "must stay as it is\n"


@pytest.mark.parametrize("name", ["../../outside", "sub/dir", "..", "a\\b"])
def test_a_name_that_leads_out_of_results_dir_is_refused(name, prepared_11k, tmp_path):
    from experiments import run_eval_clip
    results = tmp_path / "deep/results"
    with pytest.raises(ConfigError, match=r"'name' .* is not a file name \(it would lead out "
                                          r"of results_dir\); use a name without '/' or '\\'"):
        run_eval_clip.main(["--config", str(EVAL_CONFIG), "--set", f"name={name}",
                            "--set", f"results_dir={results}", "--set", "num_splits=1",
                            "--set", f"data_dir={prepared_11k}", "--set", "plots=false"])
    assert not any(tmp_path.rglob("*"))


# ---------------------------------------------------------------- left behind

WRITER = """
import sys, time
from handreid.core.atomic_files import atomic_write
def slow(handle):
    handle.write(b"partial")
    handle.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], slow)
"""


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_the_next_write_removes_temporaries_of_killed_writers_only(tmp_path):
    target = tmp_path / "model.pth"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        [live] = temporaries(tmp_path)
        old = time.time() - 3600  # as if an hour had passed since each was written
        others = [".model.pth.notours.tmp", "model.pth.abcdefgh.tmp",
                  ".model.resume.pth.abcdefgh.tmp"]  # not atomic_write's temporaries of it
        for name in others:
            (tmp_path / name).write_bytes(b"someone else's")
        for name in [live] + others:
            os.utime(tmp_path / name, (old, old))
        atomic_write(target, lambda handle: handle.write(b"one"))
        assert temporaries(tmp_path) == sorted([live] + others)  # its writer still runs
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        atomic_write(target, lambda handle: handle.write(b"two"))
        assert temporaries(tmp_path) == sorted(others) and target.read_bytes() == b"two"
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=60)


def test_two_updates_of_one_gallery_index_never_run_at_once(synthetic_11k_raw, tmp_path):
    from experiments import index_gallery
    gallery = tmp_path / "gallery"
    for n, image in enumerate(sorted((synthetic_11k_raw / "Hands").glob("*.jpg"))[:4]):
        (gallery / f"id{n % 2}").mkdir(parents=True, exist_ok=True)
        (gallery / f"id{n % 2}" / image.name).write_bytes(image.read_bytes())
    index = tmp_path / "gallery.npz"
    lock = tmp_path / "gallery.npz.lock"
    first = subprocess.Popen([sys.executable, str(ROOT / "experiments/index_gallery.py"),
                              "--config", str(EVAL_CONFIG), "--gallery", str(gallery),
                              "--index", str(index)], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().startswith(f"pid {first.pid} ")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # it holds the lock, mid-update
        with pytest.raises(UserError, match=rf"^{index} is being updated by pid {first.pid} "
                                            r"on .*; wait for it to finish or stop it, or "
                                            r"choose another --index$"):
            index_gallery.main(["--config", str(EVAL_CONFIG), "--gallery", str(gallery),
                                "--index", str(index)])
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert "4 images of 2 identities" in out
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=60)
