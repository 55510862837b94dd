"""Faults and files from others (issue 34, items 3-6): a broken model never looks good (NaN
features refused by every command, a collapsed model or one training identity flagged),
results.csv survives a full disk, killing run_all ends its trainer, and input that would eat
memory or crash (YAML bombs, huge configs, crafted module specs and index structures,
decompression bombs) is refused with one line naming the file."""
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from handreid.core.config_files import load_config
from handreid.core.errors import run_cli
from conftest import ONE_THREAD, ROOT, write_experiment
from experiments import (calibrate, compare_photos, extract_features, index_gallery,
                         run_eval_clip, search)

EVAL_CONFIG = "configs/demo/eval_tiny_11k_dorsal_r.yml"


def cli(module, capsys, *args):
    """An entry script's main() under run_cli, in this process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: module.main([str(a) for a in args]))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def one_line_error(result, *words):
    code, out, err = result
    assert code not in (0, None), out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def eval_sets(make_config, tiny_checkpoint, tmp_path):
    """--set arguments of the demo eval config on a tiny checkpoint in tmp_path."""
    config = make_config()
    tiny_checkpoint(config, tmp_path / "model.pth")
    values = {"data_dir": config["data_dir"], "save_path": tmp_path / "model.pth",
              "results_dir": tmp_path / "results", "num_workers": 0, "num_splits": 1,
              "plots": "false"}
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def some_images(prepared_11k, tmp_path):
    """Two images of one person, copied into tmp_path/gallery/<person>."""
    person = sorted((prepared_11k / "train_val_test_split_dorsal_r/query0").iterdir())[0]
    image_a, image_b = sorted(person.iterdir())[:2]
    gallery = tmp_path / "gallery" / person.name
    gallery.mkdir(parents=True)
    shutil.copy(image_b, gallery / image_b.name)
    return image_a, image_b, tmp_path / "gallery"


# ------------------------------------------------------------ item 3: a broken model

def test_non_finite_features_are_refused_by_every_command(eval_sets, prepared_11k, tmp_path,
                                                          capsys):
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    for name, tensor in ckpt["clip_state_dict"].items():
        if name.startswith("visual.") and tensor.is_floating_point():
            tensor.fill_(float("nan"))  # a diverged training
    torch.save(ckpt, tmp_path / "model.pth")
    image_a, image_b, gallery = some_images(prepared_11k, tmp_path)
    base = ("--config", EVAL_CONFIG, *eval_sets)
    for module, args in [
            (run_eval_clip, ()),
            (extract_features, ("--images", gallery, "--out", tmp_path / "f.npz")),
            (search, ("--gallery", gallery, "--query", image_a, "--out", tmp_path / "s")),
            (compare_photos, (image_a, image_b, "--no-lr")),
            (calibrate, ()),
            (index_gallery, ("--gallery", gallery, "--index", tmp_path / "i.npz"))]:
        one_line_error(cli(module, capsys, *base, *args), "features are not finite",
                       "broken")
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "i.npz").exists()
    assert not (tmp_path / "results/results.csv").exists()


def test_a_features_file_with_nan_is_refused(eval_sets, prepared_11k, tmp_path, capsys):
    image_a, _, gallery = some_images(prepared_11k, tmp_path)
    base = ("--config", EVAL_CONFIG, *eval_sets)
    cli(extract_features, capsys, *base, "--images", gallery, "--out", tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz", allow_pickle=False) as data:
        arrays = dict(data)
    arrays["features"][0] = np.nan  # a file made elsewhere by a broken model
    np.savez(tmp_path / "f.npz", **arrays)
    one_line_error(cli(search, capsys, *base, "--gallery", tmp_path / "f.npz", "--query",
                       image_a), "features are not finite", "f.npz")


def test_a_collapsed_model_is_flagged_and_its_ties_rule_recorded(eval_sets, tmp_path,
                                                                  capsys):
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    ckpt["clip_state_dict"]["visual.ln_post.weight"].zero_()  # the same output for any image
    ckpt["clip_state_dict"]["visual.ln_post.bias"].fill_(1.0)
    torch.save(ckpt, tmp_path / "model.pth")
    base = ("--config", EVAL_CONFIG, *eval_sets)
    code, _, err = cli(run_eval_clip, capsys, *base)
    assert code == 0, err
    assert "warning: the model gives (nearly) the same feature to every image" in err
    code, _, err = cli(run_eval_clip, capsys, *base, "--set", "ties=gallery_order",
                       "--set", "name=ordered")
    assert code == 0, err
    files = sorted((tmp_path / "results").glob("*.json"),
                   key=lambda path: not path.name.startswith("ordered"))
    ordered, expected = (json.loads(path.read_text()) for path in files)
    assert (expected["ties"], ordered["ties"]) == ("expected", "gallery_order")
    assert expected["warnings"] == ordered["warnings"] and len(expected["warnings"]) == 1
    # Chance under the expected rule: no query's true matches stand out of the ties.
    split = expected["per_split"][0]
    assert split["rank1"] < 100 * 2 / split["num_gallery_identities"] + 10


def test_one_training_identity_is_flagged_in_the_output_and_the_table(
        make_config, prepared_11k, tmp_path, capsys):
    import run_all_finetuned_stage1
    from handreid.data.loaders import list_split
    from handreid.methods.stage1 import Stage1
    from handreid.model import backbone

    config = make_config()
    first = sorted({name for _, name in list_split(config, "train")})[:1]
    Stage1(config, backbone.build_model(config)[0], first).save_checkpoint(
        tmp_path / "tiny.pth", epoch=1, selection={"metric": "val_loss", "value": 0.0})
    write_experiment(tmp_path, prepared_11k)
    code = run_all_finetuned_stage1.main([
        "--configs", str(tmp_path / "eval_tiny.yml"), "--set", "num_splits=1", "--set",
        f"results_dir={tmp_path / 'results'}", "--out", str(tmp_path / "summary")])
    assert code == 0
    out = capsys.readouterr()
    assert "was trained on one identity" in out.err, out.out[-3000:]
    table = (tmp_path / "summary.md").read_text()
    assert "eval_tiny.yml (warning) |" in table and "was trained on one identity" in table
    with open(tmp_path / "summary.csv", newline="") as handle:
        assert "one identity" in next(csv.DictReader(handle))["warnings"]


# ------------------------------------------------------------ item 4: a full disk

def baseline_eval(data_dir, results, *extra, limit=None):
    """run_eval_clip.py on the tiny baseline in a subprocess; with `limit`, no file it writes
    may grow past `limit` bytes (RLIMIT_FSIZE: a write past it fails with EFBIG, as a full
    disk fails one with ENOSPC)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    command = [sys.executable, str(ROOT / "experiments/run_eval_clip.py"), "--config",
               "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml", "--set",
               f"data_dir={data_dir}", "--set", f"results_dir={results}", "--set",
               "num_splits=1", "--set", "plots=false", "--set", "num_workers=0", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD,
                          timeout=300, preexec_fn=limited if limit else None)


def error_lines(proc):
    """The one error line of a script run in a subprocess (open_clip logs a line of its own
    for the random-initialised tiny model)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING:root")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines


@pytest.mark.slow
def test_a_full_disk_leaves_results_csv_whole_and_names_its_disk(prepared_11k, tmp_path):
    results = tmp_path / "results"
    assert baseline_eval(prepared_11k, results).returncode == 0
    table = results / "results.csv"
    header, row = table.read_text().splitlines()[:2]
    table.write_text("\r\n".join([header] + [row] * 300) + "\r\n")  # earlier evaluations
    before = table.read_bytes()
    proc = baseline_eval(prepared_11k, results, limit=len(before) + 200)  # no room for a row
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert f"cannot write {table}" in lines[0] and f"free on {results}" in lines[0], lines[0]
    assert table.read_bytes() == before  # no half row
    assert baseline_eval(prepared_11k, results).returncode == 0  # the next one adds its row
    with open(table, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 302 and {len(r) for r in rows} == {len(rows[0])}


@pytest.mark.slow
def test_a_cut_row_of_older_code_is_kept_aside_and_left_out(prepared_11k, tmp_path):
    results = tmp_path / "results"
    assert baseline_eval(prepared_11k, results).returncode == 0
    table = results / "results.csv"
    text = table.read_text()
    table.write_text(text + text.splitlines()[1][:150])  # an append cut by a full disk
    proc = baseline_eval(prepared_11k, results)
    assert proc.returncode == 0 and "held 1 cut rows; kept it as" in proc.stdout
    with open(table, newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 3 and {len(r) for r in rows} == {len(rows[0])}
    assert len(list(results.glob("results.*.csv"))) == 1  # the file as it was


# ------------------------------------------------------------ item 5: kill -9 of run_all

def children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
@pytest.mark.slow
def test_kill_9_of_run_all_ends_its_trainer_and_the_rerun_resumes(prepared_11k, tmp_path):
    write_experiment(tmp_path, prepared_11k)
    command = [sys.executable, str(ROOT / "run_all_finetuned_stage1.py"), "--configs",
               str(tmp_path / "eval_tiny.yml"), "--train", "--set", "num_splits=1", "--set",
               "epochs=3", "--set", "save_every=1", "--set",
               f"results_dir={tmp_path / 'results'}", "--out", str(tmp_path / "summary")]
    with open(tmp_path / "first.out", "w") as log:
        runner = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=ONE_THREAD, start_new_session=True)
    metrics = tmp_path / "logs/train_metrics.jsonl"
    deadline = time.monotonic() + 240
    while not metrics.is_file() or not metrics.read_text().strip():
        assert runner.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "first.out").read_text()[-2000:]
        time.sleep(0.05)
    trainer, = children(runner.pid)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner's group: the trainer has its own
    runner.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{trainer}") and \
            open(f"/proc/{trainer}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the trainer outlived run_all"
        time.sleep(0.05)
    state = torch.load(tmp_path / "tiny.resume.pth", weights_only=True)
    assert not state["finished"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resuming after epoch {state['epoch']}" in proc.stdout + proc.stderr
    assert torch.load(tmp_path / "tiny.pth", weights_only=True)["epoch"] == 3


# ------------------------------------------------------------ item 6: input that eats memory

def test_a_yaml_bomb_and_a_huge_config_are_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yml"  # a "billion laughs": 9^10 strings from 500 bytes
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb.write_text("\n".join(lines + ["model: *a9"]) + "\n")
    started = time.perf_counter()
    one_line_error(cli(run_eval_clip, capsys, "--config", bomb), str(bomb),
                   "aliases expand it past 100000 values")
    huge = tmp_path / "huge.yml"
    huge.write_text("model: tiny\n" + "# padding\n" * 200_000)
    one_line_error(cli(run_eval_clip, capsys, "--config", huge), str(huge), "no config file")
    assert time.perf_counter() - started < 5
    anchors = tmp_path / "anchors.yml"  # an ordinary anchor still works
    anchors.write_text("model: &m tiny\nname: *m\n")
    assert load_config(anchors)["name"] == "tiny"


@pytest.mark.parametrize("spec,message", [
    ({"kind": "linear", "dim": 512, "num_classes": 2 ** 22}, "ask for"),  # 2e9 weights
    ({"kind": "linear", "dim": 10 ** 12, "num_classes": 3}, "is not a size"),
    ({"kind": "linear", "dim": 512, "num_classes": [3]}, "is not a size"),
    ({"kind": "linear", "dim": "512", "num_classes": 3}, "cannot be built from its spec"),
    ({"kind": "linear", "dim": 512, "classes": 3}, "cannot be built from its spec"),
    ("linear", "not a {'kind': ...} mapping"),
])
def test_crafted_module_specs_are_refused_before_building(eval_sets, tmp_path, capsys, spec,
                                                          message):
    ckpt = torch.load(tmp_path / "model.pth", weights_only=True)
    ckpt["module_specs"]["classifier"] = spec
    torch.save(ckpt, tmp_path / "model.pth")
    one_line_error(cli(run_eval_clip, capsys, "--config", EVAL_CONFIG, *eval_sets),
                   str(tmp_path / "model.pth"), message)


def crafted_index(path, **changes):
    """Rewrite the index file `path` with some of its arrays (or its meta) changed."""
    with np.load(path, allow_pickle=False) as data:
        arrays = dict(data)
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes.pop("meta", {}))
    arrays.update(meta=np.array(json.dumps(meta)), **changes)
    np.savez(path, **arrays)


def test_crafted_index_structures_are_refused_on_load(eval_sets, prepared_11k, tmp_path,
                                                      capsys):
    faiss = pytest.importorskip("faiss")
    image_a, _, gallery = some_images(prepared_11k, tmp_path)
    base = ("--config", EVAL_CONFIG, *eval_sets)
    index = tmp_path / "i.npz"
    assert cli(index_gallery, capsys, *base, "--gallery", gallery, "--index", index)[0] == 0
    good = index.read_bytes()
    dim = np.load(index)["features"].shape[1]
    other = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    other.add(np.eye(3, dim, dtype=np.float32))  # 3 entries: ids past the gallery's 1
    hnsw = {"kind": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 16}
    for changes, message in [
            ({"meta": {"faiss": hnsw}, "faiss_index": faiss.serialize_index(other)},
             "is not the hnsw index of its 1 x"),
            ({"meta": {"faiss": hnsw}, "faiss_index": np.frombuffer(b"IHNf" * 64, np.uint8)},
             "its faiss structure does not load"),
            ({"meta": {"faiss": {**hnsw, "ef_search": 10 ** 12}}}, "efSearch"),
            ({"meta": {"faiss": {"kind": "ivf", "nlist": 5, "nprobe": 9}}}, "nlist 5"),
            ({"meta": {"faiss": "flat"}}, "faiss kind"),
            ({"stats": np.zeros((4, 3), np.int64)}, "of different lengths"),
            ({"features": np.full((1, dim), np.nan, np.float32)}, "not finite")]:
        index.write_bytes(good)
        crafted_index(index, **changes)
        one_line_error(cli(search, capsys, *base, "--index", index, "--query", image_a),
                       str(index), message)


def test_a_decompression_bomb_in_a_prepared_split_is_named(prepared_11k, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared_11k, data, symlinks=True)
    query = data / "train_val_test_split_dorsal_r/query0"
    victim = sorted(p for person in sorted(query.iterdir()) for p in person.iterdir())[0]
    victim.unlink()
    Image.new("L", (12000, 12000)).save(victim, format="PNG")  # 144 MP in 140 KB
    proc = baseline_eval(data, tmp_path / "results")
    lines = error_lines(proc)
    assert proc.returncode == 1
    assert f"cannot read image {victim}" in lines[0] and "144000000 pixels" in lines[0]
