"""The training engine with a method that is not Stage 1 (two phases, pk batches, triplet
loss), the identity-balanced sampler, the run lock, failed writes, the checkpoint I/O budget
and the refusals of bad settings and foreign checkpoints."""
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from handreid.evaluation import protocol
from handreid.checkpoint import model_checkpoint
from handreid.model import backbone
from handreid.data.loaders import IdentityBatchSampler, get_train_val_loaders, set_loader_epoch
from handreid.core.errors import ConfigError, UserError
from handreid.core.atomic_files import atomic_write
from conftest import ONE_THREAD, ROOT, run_script, write_config
from handreid.train.engine import Engine
from handreid.methods.stage1 import Stage1
from handreid.train.run_log import metrics_path
from handreid.train.checkpointing import resume_path
from handreid.model.losses import batch_hard_triplet
from handreid.core.runtime import check_not_running, run_lock, seed_everything
from toy_method import HeadThenAll, toy_engine

TRAIN = "experiments/train_stage1_frozen_text.py"
EVAL = "experiments/run_eval_clip.py"
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- a new method (toy_method.py)

@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 3], ids=["at-the-phase-boundary", "inside-phase-2"])
def test_a_new_method_trains_resumes_exactly_and_evaluates(make_config, tmp_path, stop_at):
    settings = {"method": "toy_head_then_all", "sampler": "pk", "num_instances": 2,
                "batch_size": 8, "triplet_weight": 1.0, "epochs": 2, "lr": 1e-3,
                "selection": "val_map", "save_every": 1}
    reference = make_config(save_path=str(tmp_path / "ref/model.pth"),
                            log_path=str(tmp_path / "ref/train.log"), **settings)
    toy_engine(reference).train()

    config = make_config(**settings)
    # Ctrl-C before phase 2's first or second epoch (3 epochs in all): resumable after the
    # last finished epoch.
    with pytest.raises(KeyboardInterrupt):
        toy_engine(config, stop_at=stop_at).train()
    assert torch.load(resume_path(config), weights_only=True)["epoch"] == stop_at - 1
    summary = toy_engine(config).train()

    rows = summary["history"]
    assert [(r["epoch"], r["phase"]) for r in rows] == [(1, "head"), (2, "all"), (3, "all")]
    assert {"loss_ce", "loss_triplet"} <= rows[-1].keys() and rows[0]["val_map"] is None
    assert all(r["val_map"] is not None for r in rows[1:])
    reference_rows = [json.loads(line) for line in metrics_path(reference).read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"], r["val_map"]) for r in rows] == \
        [(r["epoch"], r["train_loss"], r["val_map"]) for r in reference_rows]
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert ours["method"] == "toy_head_then_all" and ours["selection"]["metric"] == "val_map"
    assert ours["epoch"] == theirs["epoch"] and ours["epoch"] >= 2
    for part in ("clip_state_dict",):
        assert all(torch.equal(ours[part][k], theirs[part][k]) for k in ours[part])
    assert all(torch.equal(ours["modules"]["neck"][k], theirs["modules"]["neck"][k])
               for k in ours["modules"]["neck"])

    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert ckpt["feature"] == {"kind": "bn", "module": "neck"}
    report = protocol.evaluate(model, config, torch.device("cpu")).report
    assert 0 < report["mean"]["mAP"] <= 100 and report["num_splits"] == 3


class HeadOnly(HeadThenAll):
    """The toy method's first phase alone."""
    name = "toy_head_only"

    def phases(self):
        return super().phases()[:1]


def test_phase_one_trains_the_head_only(make_config):
    config = make_config(method="toy_head_then_all", epochs=1, batch_size=8, lr=1e-3)
    seed_everything(config["seed"])
    train_loader, val_loader, _ = get_train_val_loaders(config)
    method = HeadOnly.build(config, train_loader.dataset.classes)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    Engine(method, train_loader, config, "cpu", val_loader).train()
    after = method.model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])}
    assert changed == {"extras"}


# ---------------------------------------------------------------- pk batches and triplet loss

def test_pk_batches_hold_p_identities_of_k_images_and_cover_the_epoch(make_config):
    config = make_config(sampler="pk", batch_size=8, num_instances=2)
    loader, _, _ = get_train_val_loaders(config)
    targets = loader.dataset.targets
    set_loader_epoch(loader, 1)
    batches = list(loader.batch_sampler)
    assert len(batches) == len(loader)
    for batch in batches:
        labels = [targets[i] for i in batch]
        assert len(batch) == 8 and len(set(labels)) == 4
        assert all(labels.count(label) == 2 for label in set(labels))
    drawn = {i for batch in batches for i in batch}
    assert len(drawn) >= 0.8 * len(targets)
    set_loader_epoch(loader, 1)
    assert list(loader.batch_sampler) == batches
    set_loader_epoch(loader, 2)
    assert list(loader.batch_sampler) != batches


def test_pk_ranks_get_disjoint_identities_and_small_identities_repeat():
    targets = [0] * 1 + [1] * 3 + [2] * 6 + [3] * 5 + [4] * 4 + [5] * 7 + [6] * 2 + [7] * 8
    ranks = [IdentityBatchSampler(targets, 6, 3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert len(ranks[0]) == len(ranks[1])
    for batch0, batch1 in zip(*ranks):
        ids0, ids1 = {targets[i] for i in batch0}, {targets[i] for i in batch1}
        assert len(ids0) == len(ids1) == 2 and not ids0 & ids1
    lone = [b for sampler in ranks for b in sampler if targets[b[0]] == 0 or 0 in
            {targets[i] for i in b}]
    assert all([targets[i] for i in b].count(0) in (0, 3) for b in lone)


def test_batch_hard_triplet_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 5, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4])  # identity 4 has no positive
    distances = torch.cdist(features, features)
    expected = []
    for a in range(12):
        positives = [distances[a, p] for p in range(12) if p != a and labels[p] == labels[a]]
        negatives = [distances[a, n] for n in range(12) if labels[n] != labels[a]]
        if positives:
            expected.append((max(positives), min(negatives)))
    hard = torch.tensor([p - n for p, n in expected])
    assert batch_hard_triplet(features, labels, 0.3) == pytest.approx(
        torch.relu(hard + 0.3).mean().item(), rel=1e-5)
    assert batch_hard_triplet(features, labels, soft_margin=True) == pytest.approx(
        F.softplus(hard).mean().item(), rel=1e-5)
    features.requires_grad_(True)
    batch_hard_triplet(features, labels).backward()
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("k", [0, 9, 3])
def test_num_instances_that_cannot_make_pk_batches_is_refused(make_config, k):
    with pytest.raises(ConfigError, match=f"num_instances: {k} must be at least 1 and divide "
                                          f"batch_size \\(8\\) into whole identities"):
        get_train_val_loaders(make_config(sampler="pk", batch_size=8, num_instances=k))


def test_bad_num_instances_from_the_command_line_is_one_line_exit_2(make_config, tmp_path):
    config = make_config(sampler="pk", batch_size=8, num_instances=0)
    proc = run_script(TRAIN, "--config", write_config(config, tmp_path / "c.yml"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: num_instances: 0 must be at least 1 and divide batch_size")


def test_pk_with_more_identities_per_batch_than_train_has_is_refused(make_config):
    with pytest.raises(ConfigError, match=r"pk needs 32 distinct identities per step .* but "
                                          r"train/ has 13; lower batch_size"):
        get_train_val_loaders(make_config(sampler="pk", batch_size=64, num_instances=2))


# ---------------------------------------------------------------- one run per checkpoint

@pytest.mark.slow
def test_second_run_of_the_same_checkpoint_is_refused_and_kill_leaves_no_stale_lock(
        make_config, tmp_path):
    config = make_config(batch_size=4, epochs=500, save_every=2, save_every_minutes=0)
    config_file = write_config(config, tmp_path / "run.yml")
    first = subprocess.Popen([sys.executable, str(ROOT / TRAIN), "--config", config_file],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 120
        while not (metrics_path(config).exists()
                   and len(metrics_path(config).read_text().splitlines()) >= 3):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = run_script(TRAIN, "--config", config_file, check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(
            f"error: {config['save_path']} is being trained by pid {first.pid} on ")
        runner = run_script("run_all_finetuned_stage1.py", "--configs", config_file, "--train",
                            "--out", tmp_path / "summary", check=False)
        assert runner.returncode == 1 and f"pid {first.pid}" in runner.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # kill -9 loses at most save_every epochs: the state of epoch 2 or later survives, and
    # the lock died with the process.
    saved = torch.load(resume_path(config), weights_only=True)["epoch"]
    assert saved >= 2 and saved % 2 == 0
    check_not_running(config["save_path"])
    with run_lock(config["save_path"]):
        pass


# ---------------------------------------------------------------- failed writes

def limited_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"complete earlier checkpoint")
    code = ("import torch, sys; from handreid.core.atomic_files import atomic_write; from handreid.core.errors import run_cli;"
            f"run_cli(lambda: atomic_write({str(target)!r}, lambda f: torch.save("
            "torch.zeros(1_000_000), f)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, preexec_fn=limited_file_size(100_000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {target}: File too large (")
    assert "GiB free on" in line and "the previous complete file, if any, is intact" in line
    assert target.read_bytes() == b"complete earlier checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


@pytest.mark.slow
def test_training_into_a_full_disk_stops_with_one_line_and_resumes_later(make_config,
                                                                        tmp_path):
    config = make_config(batch_size=8, epochs=2, save_every=1)
    config_file = write_config(config, tmp_path / "run.yml")
    proc = subprocess.run([sys.executable, str(ROOT / TRAIN), "--config", config_file],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ONE_THREAD, preexec_fn=limited_file_size(2_000_000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write {config['save_path']}: File too large")
    assert not Path(config["save_path"]).exists()
    run_script(TRAIN, "--config", config_file)
    assert torch.load(config["save_path"], weights_only=True)["epoch"] in (1, 2)


def test_preparing_a_dataset_onto_a_full_disk_is_one_line(synthetic_11k_raw, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, str(ROOT / "datasets/prepare_11k.py"), "--raw",
                           str(synthetic_11k_raw), "--out", str(out), "--copy",
                           "--num-splits", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=limited_file_size(1000))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {out}/")
    assert not any(path.is_file() for path in out.rglob("*"))  # nothing written half


def test_a_missing_or_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot write .*file/sub/model.pth: Not a directory"):
        atomic_write(blocker / "sub" / "model.pth", lambda f: f.write(b"x"))


# ---------------------------------------------------------------- checkpoint cost

def written_bytes():
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.slow
def test_a_20_epoch_run_writes_at_most_6x_its_checkpoint(make_config):
    config = make_config(batch_size=16, epochs=20, num_splits=1)
    seed_everything(config["seed"])
    train_loader, val_loader, num_classes = get_train_val_loaders(config)
    from finetune_trainer_stage1 import FinetuneTrainerStage1
    clip_model, classifier = backbone.build_model(config, num_classes)
    trainer = FinetuneTrainerStage1(clip_model, classifier, train_loader, config, "cpu",
                                    val_loader)
    before = written_bytes()
    trainer.train()
    total = written_bytes() - before
    size = Path(config["save_path"]).stat().st_size
    assert total <= 6 * size, (total, size, total / size)


# ---------------------------------------------------------------- foreign checkpoints

@pytest.mark.slow
def test_unknown_method_and_missing_module_are_one_line_errors(make_config, tmp_path):
    config = make_config()
    names = [str(i) for i in range(13)]
    stage1 = Stage1(config, backbone.build_model(config)[0], names)
    path = tmp_path / "model.pth"
    model_checkpoint.save_checkpoint(path, stage1.model, config, names, epoch=1,
                                     method="someone_elses", module_specs=stage1.module_specs())
    config_file = write_config(make_config(save_path=str(path)), tmp_path / "eval.yml")
    proc = run_script(EVAL, "--config", config_file, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {path} was written by the training method 'someone_elses', which this code "
        f"does not know")

    ckpt = torch.load(path, weights_only=True)
    ckpt["method"] = "stage1"
    del ckpt["modules"]["classifier"]
    torch.save(ckpt, path)
    proc = run_script(EVAL, "--config", config_file, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {path} is a stage1 checkpoint without its module 'classifier'; it is "
        f"incomplete: retrain it (python experiments/train_stage1_frozen_text.py --config "
        f"<train config>)")


def test_a_first_release_checkpoint_still_loads(make_config, tmp_path):
    config = make_config(head="bnneck")
    clip_model, classifier = backbone.build_model(config, num_classes=3)
    classifier(clip_model.encode_image(torch.randn(8, 3, 64, 64)))  # BN running statistics
    legacy = {"format": "clip-handid-stage1", "format_version": 1, "config": dict(config),
              "backbone": "handid_tiny/none", "quick_gelu": False, "image_size": 64,
              "embed_dim": 64, "clip_state_dict": clip_model.state_dict(),
              "classifier_state_dict": classifier.state_dict(), "head": "bnneck",
              "identity_names": ["a", "b", "c"], "epoch": 7, "val_accuracy": 50.0}
    path = tmp_path / "old.pth"
    torch.save(legacy, path)
    model, ckpt = model_checkpoint.load_checkpoint(path, config)
    assert ckpt["method"] == "stage1" and ckpt["selection"]["val_accuracy"] == 50.0
    images = torch.randn(4, 3, 64, 64)
    expected = backbone.HandIdModel(clip_model, {"classifier": classifier},
                                    {"kind": "bn", "module": "classifier"}).eval().features(images)
    assert torch.equal(model.eval().features(images), expected)
