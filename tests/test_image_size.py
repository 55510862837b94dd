"""image_size as [height, width] (CLIP-ReID's 256x128 person crops), and the position
embedding resized as CLIP-ReID resizes it (bilinear) or as open_clip does (bicubic)."""
import pytest
import torch
import torch.nn.functional as F

from handreid.model import backbone
from handreid.data.loaders import get_train_val_loaders
from handreid.core.config_files import load_config
from conftest import run_script, write_config
from handreid.core.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_image_size_takes_a_side_or_height_and_width(tmp_path):
    for value, expected in (("[64, 32]", [64, 32]), ("[48, 48]", 48), ("40", 40)):
        assert load_config(None, [f"image_size={value}"])["image_size"] == expected
    for value, problem in (("[64, 32, 3]", "a side in pixels or [height, width]"),
                           ("[64, 4]", "must be >= 8 pixels"), ("big", "a side in pixels")):
        with pytest.raises(ConfigError, match=problem.replace("[", r"\[")):
            load_config(None, [f"image_size={value}"])


@pytest.mark.slow
def test_a_non_square_input_trains_and_evaluates_on_a_vit(make_config, tmp_path):
    config = make_config(image_size=[64, 32], epochs=1, batch_size=8, aug_pad=4,
                         aug_random_erasing=0.5)
    train_loader, _, _ = get_train_val_loaders(config)
    images, _ = next(iter(train_loader))
    assert images.shape[-2:] == (64, 32)
    config_file = write_config(config, tmp_path / "run.yml")
    run_script("experiments/train_stage1_frozen_text.py", "--config", config_file)
    ckpt = torch.load(config["save_path"], weights_only=True)
    assert backbone.image_hw(ckpt["image_size"]) == (64, 32)
    out = run_script("experiments/run_eval_clip.py", "--config", config_file, "--set",
                     "num_splits=2").stdout
    assert "mAP" in out
    wrong = run_script("experiments/run_eval_clip.py", "--config", config_file, "--set",
                       "image_size=64", check=False)
    assert wrong.returncode == 1
    assert "was trained at image_size [64, 32]" in wrong.stderr.strip().splitlines()[-1]


def test_a_resnet_refuses_a_non_square_input_in_one_line(make_config, tmp_path):
    config_file = write_config(make_config(model="RN50:none", image_size=[256, 128]),
                               tmp_path / "rn.yml")
    proc = run_script("experiments/train_stage1_frozen_text.py", "--config", config_file,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a ResNet, which takes square inputs here" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_position_embedding_is_resized_by_the_chosen_rule(make_config, tmp_path,
                                                               interpolation):
    native, _ = backbone.build_model(make_config())
    weights = tmp_path / "tiny.pt"
    torch.save(native.state_dict(), weights)
    resized, _ = backbone.build_model(make_config(pretrained=str(weights),
                                                    image_size=[64, 32],
                                                    pos_embed_interpolation=interpolation))
    old = native.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)   # 64 / patch 8
    # CLIP-ReID's rule: the class token kept, the grid bilinearly resized to (H/8, W/8).
    bilinear = F.interpolate(grid, size=(8, 4), mode="bilinear")
    expected = torch.cat([old[:1], bilinear.permute(0, 2, 3, 1).reshape(32, -1)])
    new = resized.visual.positional_embedding.detach()
    assert new.shape == expected.shape
    assert torch.allclose(new, expected, atol=1e-6) == (interpolation == "bilinear")
    assert torch.equal(new[0], old[0])
    assert torch.equal(resized.visual.conv1.weight, native.visual.conv1.weight)
