"""Stage 1 fine-tuning of the CLIP image encoder and an identity head, text tower frozen.

The image encoder and a linear identity head learn train/ with cross-entropy (plus an
optional triplet loss); the best epoch by the `selection` signal on val/ is saved to save_path.

    python experiments/train_stage1_frozen_text.py --config configs/finetuning_stage1_frozen_text/train_vitb16_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train_stage1_frozen_text.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see docs/engine.md;
the method: handreid/methods/stage1.py. This script trains stage1 configs only;
experiments/train.py trains any method.
Several nodes: torchrun --nnodes=N ... with save_path on a disk that every node sees.
"""

from handreid.core.startup import start

start()

from handreid.core.errors import run_cli
from handreid.train.entry import train_main
from handreid.methods.stage1 import Stage1

if __name__ == "__main__":
    run_cli(lambda: train_main(Stage1, __doc__))
