"""Stage 2 (CLIP-ReID for hands): learn one text prompt per training identity, then fine-tune
the CLIP image encoder with identity, triplet and image-to-text losses.

Phase 1 (prompt_epochs) learns the prompts against the frozen encoders; phase 2 (epochs)
trains the image encoder and two BNNeck heads; the best phase-2 epoch by the `selection`
signal on val/ is saved to save_path, with the learned prompts and the retrieval feature.

    python experiments/train_stage2_clipreid.py --config configs/finetuning_stage2_clipreid/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage2_clipreid.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch, in either phase; a finished run is refused unless --overwrite. Outputs: see engine.py;
the method: finetune_trainer_stage2.py.
"""
# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
from config import load_config
from errors import run_cli
import make_model
from engine import check_method, report, run_training, training_parser
from finetune_trainer_stage2 import ClipReid, check_config


def build_method(config, identity_names, num_classes):
    clip_model, _ = make_model.build_model(config)
    return ClipReid(config, clip_model, identity_names)


def main(argv=None):
    args = training_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.config, args.overrides)
    check_method(config, ClipReid.name)
    check_config(config)
    report(run_training(build_method, config, args.overwrite))
    return 0


if __name__ == "__main__":
    run_cli(main)
