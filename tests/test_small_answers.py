"""What a user is told in small corners (issue 29, item 10): a duplicate config key is refused,
the prepare scripts name the formats they read and notice images unzipped beside
HandInfo.csv, the ONNX metadata names the decode the features use, the summary legend says
why mINP equals mAP, and a warmup as long as training is described as it happens."""
import json
import shutil

import pytest

import run_all_finetuned_stage1
from conftest import ROOT, run_script
from experiments import export_onnx, run_eval_clip
from handreid.core.errors import ConfigError
from handreid.methods.base import Phase, schedule_warnings

BASELINE_CONFIG = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"


def test_a_key_given_twice_in_a_config_file_is_refused_with_both_lines(tmp_path):
    config = tmp_path / "twice.yml"
    config.write_text(f"base: {BASELINE_CONFIG}\nlr: 1.0e-3\nepochs: 3\nlr: 2.0e-3\n")
    with pytest.raises(ConfigError) as caught:
        run_eval_clip.main(["--config", str(config)])
    assert str(caught.value) == (f"{config}: key 'lr' is given twice (lines 2 and 4); keep one "
                                 f"of them")


def test_images_beside_handinfo_without_hands_are_noticed(synthetic_11k_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(synthetic_11k_raw / "HandInfo.csv", raw)
    for image in sorted((synthetic_11k_raw / "Hands").glob("*.jpg"))[:3]:
        shutil.copy(image, raw)  # Hands.zip unzipped without its folder
    proc = run_script("datasets/prepare_11k.py", "--raw", raw, "--out", tmp_path / "out",
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {raw / 'Hands'} not found, but {raw} holds 3 images "
                           f"beside HandInfo.csv"), line
    assert f"move them into {raw / 'Hands'}/" in line


def test_prepare_folder_names_every_format_it_reads(synthetic_11k_raw, tmp_path):
    images = sorted((synthetic_11k_raw / "Hands").glob("*.jpg"))
    for number, identity in enumerate(("a", "b", "c")):
        (tmp_path / "raw" / identity).mkdir(parents=True)
        for image in images[3 * number:3 * number + 3]:
            shutil.copy(image, tmp_path / "raw" / identity)
    (tmp_path / "raw/a/notes.txt").write_text("not an image")
    proc = run_script("datasets/prepare_folder.py", "--raw", tmp_path / "raw", "--out",
                      tmp_path / "out", "--num-splits", "1")
    assert ("skipped 1 files that are not images (jpg, jpeg, png, bmp, webp, tif, tiff): "
            "a/notes.txt") in proc.stderr


@pytest.mark.parametrize("cache_images,decode", [(True, "draft('RGB', (W, H))"),
                                                 (False, "decoded in full")])
def test_onnx_metadata_names_the_decode_the_features_use(cache_images, decode, tmp_path,
                                                         capsys):
    import onnx

    out = tmp_path / "model.onnx"
    export_onnx.main(["--config", str(BASELINE_CONFIG), "--set", f"cache_images={cache_images}",
                      "--out", str(out)])
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert decode in props["input"] and "squash-resized" not in props["input"]
    assert json.loads(props["preprocessing"])["draft_decode"] is cache_images


def test_the_summary_legend_says_why_minp_equals_map(prepared_11k, tmp_path, capsys):
    out = tmp_path / "summary"
    run_all_finetuned_stage1.main(["--configs", str(BASELINE_CONFIG), "--out", str(out),
                                   "--set", f"data_dir={prepared_11k}", "--set", "num_splits=1",
                                   "--set", f"results_dir={tmp_path / 'results'}",
                                   "--set", "plots=false"])
    legend = out.with_suffix(".md").read_text()
    assert "mINP (in the results files) equals mAP when each gallery holds one image per " \
           "identity" in legend


def test_a_warmup_as_long_as_training_says_what_the_lr_does():
    equal, = schedule_warnings([Phase(name="main", epochs=2, warmup_epochs=2)])
    assert equal.startswith("warmup of 2 epochs >= the 2 training epochs: the lr reaches its "
                            "set value only at the last step and never decays")
    assert "never reaches" not in equal
    longer, = schedule_warnings([Phase(name="main", epochs=2, warmup_epochs=4)])
    assert "the lr never reaches its set value (it peaks at 0.5 x lr)" in longer


def test_a_pk_batch_larger_than_the_data_names_the_batch_size_that_fits(make_config):
    from handreid.data.loaders import get_train_val_loaders

    # The Stage-2 recipes' batch (16 identities x 4) on 13 training identities: refused, as
    # the batch is part of the recipe, with the batch size that fits them.
    with pytest.raises(ConfigError, match=r"pk needs 16 distinct identities per step .* but "
                                          r"train/ has 13; lower batch_size \(e\.g\. --set "
                                          r"batch_size=52\) or raise num_instances"):
        get_train_val_loaders(make_config(sampler="pk", batch_size=64, num_instances=4))
