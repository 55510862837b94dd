"""The named Stage-1 recipe configs (the specification's example, CLIP-FH's released config):
every one loads, pairs with an eval config on its own checkpoint, and a sample of each model
family, moved onto the tiny model and synthetic data, trains one epoch and evaluates."""
import json

import pytest

from handreid.core.config_files import load_config
from conftest import ROOT
from experiments import run_eval_clip
from handreid.methods.stage1 import Stage1
from handreid.train.entry import train_main


def train(argv):
    """The Stage1 train script's main()."""
    return train_main(Stage1, '', argv)


FOLDER = ROOT / "configs/finetuning_stage1_frozen_text"
RECIPES = {"seed": {"epochs": 10, "lr": 1e-4, "batch_size": 64, "early_stop_patience": 0},
           "clipfh": {"epochs": 10, "lr": 1e-5, "batch_size": 32, "early_stop_patience": 3}}
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_recipe_config_loads_and_its_eval_config_finds_its_own_checkpoint():
    save_paths = set()
    for model in ("vitb16", "rn50"):
        for data in ("11k_dorsal_r", "11k_dorsal_l", "11k_palmar_r", "11k_palmar_l", "hd"):
            default = load_config(FOLDER / f"train_{model}_{data}.yml")
            save_paths.add(default["save_path"])
            for recipe, values in RECIPES.items():
                config = load_config(FOLDER / f"train_{model}_{data}_{recipe}.yml")
                assert {k: config[k] for k in values} == values
                assert config["label_smoothing"] == 0.0 and config["head_lr_mult"] == 1.0
                assert (config["model"], config["dataset"]) == (default["model"],
                                                                default["dataset"])
                evaluated = load_config(FOLDER / f"eval_{model}_{data}_{recipe}.yml")
                assert evaluated["save_path"] == config["save_path"]
                assert evaluated["name"] == config["name"]
                save_paths.add(config["save_path"])
    assert len(save_paths) == 30  # no recipe writes over another's or a default checkpoint


@pytest.mark.parametrize("stem, data", [("vitb16_11k_dorsal_r_seed", "11k"),
                                        ("rn50_hd_clipfh", "hd")])
def test_a_recipe_trains_one_epoch_on_the_tiny_model_and_evaluates(
        stem, data, prepared_11k, prepared_hd, tmp_path):
    overrides = ["model=tiny", "pretrained=none", "epochs=1", "batch_size=8", "num_workers=0",
                 f"data_dir={prepared_11k if data == '11k' else prepared_hd}",
                 f"save_path={tmp_path / 'model.pth'}", f"log_path={tmp_path / 'train.log'}",
                 f"results_dir={tmp_path / 'results'}", "num_splits=2"]
    sets = [arg for value in overrides for arg in ("--set", value)]
    train(["--config", str(FOLDER / f"train_{stem}.yml"), *sets])
    assert (tmp_path / "model.pth").is_file()
    run_eval_clip.main(["--config", str(FOLDER / f"eval_{stem}.yml"), *sets])
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert len(results) == 1 and results[0]["num_splits"] == 2
    assert results[0]["checkpoint"]["epoch"] == 1 and 0 < results[0]["mean"]["mAP"] <= 100
