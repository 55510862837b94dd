"""Stage 2 (CLIP-ReID for hands): learn one text prompt per training identity, then fine-tune
the CLIP image encoder with identity, triplet and image-to-text losses.

Phase 1 (prompt_epochs) learns the prompts against the frozen encoders; phase 2 (epochs)
trains the image encoder and two BNNeck heads; the best phase-2 epoch by the `selection`
signal on val/ is saved to save_path, with the learned prompts and the retrieval feature.

    python experiments/train_stage2_clipreid.py --config configs/finetuning_stage2_clipreid/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage2_clipreid.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch, in either phase; a finished run is refused unless --overwrite. Outputs: see
docs/engine.md; the method: handreid/methods/clipreid.py. This script trains clipreid configs
only; experiments/train.py trains any method.
"""

from handreid.core.startup import start

start()

from handreid.core.errors import run_cli
from handreid.train.entry import train_main
from handreid.methods.clipreid import ClipReid

if __name__ == "__main__":
    run_cli(lambda: train_main(ClipReid, __doc__))
