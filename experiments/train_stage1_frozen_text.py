"""Stage 1 fine-tuning of the CLIP image encoder and an identity head, text tower frozen.

The image encoder and a linear identity head learn train/ with cross-entropy; the best epoch
by val/ accuracy is saved to save_path.

    python experiments/train_stage1_frozen_text.py --config configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage1_frozen_text.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last finished
epoch; a finished run is refused unless --overwrite. Outputs: see finetune_trainer_stage1.py.
Several nodes: torchrun --nnodes=N ... with save_path on a disk that every node sees.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import build_dataloader  # noqa: E402
import make_model  # noqa: E402
from config import load_config, make_parser, run_cli  # noqa: E402
from finetune_trainer_stage1 import (FinetuneTrainerStage1, init_distributed,  # noqa: E402
                                     read_resume_state, resolve_precision, seed_everything)


def main(argv=None, default_config=None):
    parser = make_parser(__doc__.splitlines()[0], default_config)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch even if save_path holds a finished or "
                             "unfinished run (its files are replaced as the new run writes)")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    device = init_distributed(config)
    if device.type == "cuda":
        # Inputs have one fixed size: let cuDNN pick its fastest convolution kernels (RN50).
        torch.backends.cudnn.benchmark = True
    try:
        # Refuse a bad amp, a finished run or a mismatched resume state before loading data.
        resolve_precision(config["amp"], device)
        read_resume_state(config, args.overwrite)
        seed_everything(config["seed"])
        train_loader, val_loader, num_classes = build_dataloader.get_train_val_loaders(config)
        clip_model, classifier = make_model.build_model(config, num_classes)
        trainer = FinetuneTrainerStage1(clip_model, classifier, train_loader, config, device,
                                        val_loader, overwrite=args.overwrite)
        summary = trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        best = summary["best_val_accuracy"]
        print(f"checkpoint (epoch {summary['best_epoch']}, val accuracy "
              f"{'n/a' if best is None else f'{best:.2f}%'}): {summary['save_path']}")
        print(f"log: {summary['log_path']}\nmetrics: {summary['metrics_path']}\n"
              f"curve: {summary['curve_path']}\nfinished-run record: {summary['resume_path']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
