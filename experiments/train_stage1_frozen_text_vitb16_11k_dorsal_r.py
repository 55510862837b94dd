"""Stage 1 fine-tuning of ViT-B/16 on 11k dorsal right: train_stage1_frozen_text.py with
configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml as the default --config."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from config import load_config  # noqa: F401  (first: OMP_WAIT_POLICY before torch)
from errors import run_cli
from experiments.train_stage1_frozen_text import main

DEFAULT_CONFIG = ROOT / "configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml"

if __name__ == "__main__":
    run_cli(lambda: main(default_config=str(DEFAULT_CONFIG)))
