"""CLIP-HandID (one stage): fine-tune the CLIP image encoder with two BNNeck identity heads and
a supervised image-text contrastive loss against a prompt whose placeholder word each image's
inversion network fills; the text tower stays frozen.

The best epoch by the `selection` signal on val/ is saved to save_path, with the inversion
network and the retrieval feature (both BN features concatenated).

    python experiments/train_clip_handid.py --config configs/finetuning_clip_handid/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_clip_handid.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see engine.py; the method:
finetune_trainer_clip_handid.py.
"""
# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
from config import load_config
from errors import run_cli
import make_model
from engine import check_method, report, run_training, training_parser
from finetune_trainer_clip_handid import ClipHandId, check_config


def build_method(config, identity_names, num_classes):
    clip_model, _ = make_model.build_model(config)
    return ClipHandId(config, clip_model, identity_names)


def main(argv=None):
    args = training_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = load_config(args.config, args.overrides)
    check_method(config, ClipHandId.name)
    check_config(config)
    report(run_training(build_method, config, args.overwrite))
    return 0


if __name__ == "__main__":
    run_cli(main)
