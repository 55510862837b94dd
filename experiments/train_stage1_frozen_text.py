"""Stage 1 fine-tuning of the CLIP image encoder and an identity head, text tower frozen.

The image encoder and a linear identity head learn train/ with cross-entropy (plus an
optional triplet loss); the best epoch by the `selection` signal on val/ is saved to save_path.

    python experiments/train_stage1_frozen_text.py --config configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage1_frozen_text.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see engine.py.
Several nodes: torchrun --nnodes=N ... with save_path on a disk that every node sees.
"""
# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
from config import load_config
from errors import run_cli
import make_model
from engine import check_method, report, run_training, training_parser
from finetune_trainer_stage1 import Stage1


def build_method(config, identity_names, num_classes):
    clip_model, classifier = make_model.build_model(config, num_classes)
    return Stage1(config, clip_model, identity_names, classifier)


def main(argv=None, default_config=None):
    args = training_parser(__doc__.splitlines()[0], default_config).parse_args(argv)
    config = load_config(args.config, args.overrides)
    check_method(config, Stage1.name)
    report(run_training(build_method, config, args.overwrite))
    return 0


if __name__ == "__main__":
    run_cli(main)
