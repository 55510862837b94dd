"""CLIP-HandID (one stage): fine-tune the CLIP image encoder with two BNNeck identity heads and
a supervised image-text contrastive loss against a prompt whose placeholder word each image's
inversion network fills; the text tower stays frozen.

The best epoch by the `selection` signal on val/ is saved to save_path, with the inversion
network and the retrieval feature (both BN features concatenated).

    python experiments/train_clip_handid.py --config configs/finetuning_clip_handid/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_clip_handid.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see docs/engine.md; the
method: handreid/methods/clip_handid.py. This script trains clip_handid configs only;
experiments/train.py trains any method.
"""

from handreid.core.startup import start

start()

from handreid.core.errors import run_cli
from handreid.train.entry import train_main
from handreid.methods.clip_handid import ClipHandId

if __name__ == "__main__":
    run_cli(lambda: train_main(ClipHandId, __doc__))
