"""Stage 1 fine-tuning of ViT-B/16 on 11k dorsal right: train_stage1_frozen_text.py with
configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml as the default --config."""
from pathlib import Path

# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
import config  # noqa: F401
from errors import run_cli
from train_entry import train_main
from finetune_trainer_stage1 import Stage1

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml"

if __name__ == "__main__":
    run_cli(lambda: train_main(Stage1, __doc__, default_config=str(DEFAULT_CONFIG)))
