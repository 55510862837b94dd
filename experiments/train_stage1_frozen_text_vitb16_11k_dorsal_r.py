"""Stage 1 fine-tuning of ViT-B/16 on 11k dorsal right: train_stage1_frozen_text.py with
configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml as the default --config."""
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.errors import run_cli
from handreid.train.entry import train_main
from handreid.methods.stage1 import Stage1

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml"

if __name__ == "__main__":
    run_cli(lambda: train_main(Stage1, __doc__, default_config=str(DEFAULT_CONFIG)))
