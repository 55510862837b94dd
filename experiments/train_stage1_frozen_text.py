"""Stage 1 fine-tuning of the CLIP image encoder and an identity head, text tower frozen.

The image encoder and a linear identity head learn train/ with cross-entropy (plus an
optional triplet loss); the best epoch by the `selection` signal on val/ is saved to save_path.

    python experiments/train_stage1_frozen_text.py --config configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage1_frozen_text.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see engine.py.
Several nodes: torchrun --nnodes=N ... with save_path on a disk that every node sees.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import make_model  # noqa: E402
from config import load_config, make_parser, run_cli  # noqa: E402
from engine import run_training  # noqa: E402
from finetune_trainer_stage1 import Stage1  # noqa: E402


def build_method(config, identity_names, num_classes):
    clip_model, classifier = make_model.build_model(config, num_classes)
    return Stage1(config, clip_model, identity_names, classifier)


def training_parser(description, default_config=None):
    """--config, --set and --overwrite, as every train script takes them."""
    parser = make_parser(description, default_config)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch even if save_path holds a finished or "
                             "unfinished run (its files are replaced as the new run writes)")
    return parser


def report(summary):
    """Rank 0 prints where the run's files are."""
    if not summary["is_main"]:
        return
    value = summary["best_value"]
    best = (f"epoch {summary['best_epoch']}" + ("" if value is None else
                                                 f", {summary['selection']} {value:.4g}"))
    print(f"checkpoint ({best}): {summary['save_path']}")
    print(f"log: {summary['log_path']}\nmetrics: {summary['metrics_path']}\n"
          f"curve: {summary['curve_path']}\nresume state / finished-run record: "
          f"{summary['resume_path']}")


def main(argv=None, default_config=None):
    args = training_parser(__doc__.splitlines()[0], default_config).parse_args(argv)
    config = load_config(args.config, args.overrides)
    report(run_training(build_method, config, args.overwrite))
    return 0


if __name__ == "__main__":
    run_cli(main)
