"""Train any method: the one that the config's `method:` names, a built-in method (stage1,
clipreid, clip_handid) or the path of a .py file defining a Method subclass (docs/engine.md).

The best epoch by the `selection` signal on val/ is saved to save_path, with every extra
module of the method and the retrieval feature that evaluation uses.

    python experiments/train.py --config configs/demo/train_tiny_11k_dorsal_r.yml
    torchrun --nproc_per_node=4 experiments/train.py --config <train config>

Re-running the same command after Ctrl-C, SIGTERM or a crash resumes after the last saved
epoch; a finished run is refused unless --overwrite. Outputs: see docs/engine.md. Each
built-in method also has its own script (train_stage1_frozen_text.py,
train_stage2_clipreid.py, train_clip_handid.py), which refuses a config of another method.
"""

from handreid.core.startup import start

start()

from handreid.core.errors import run_cli
from handreid.train.entry import train_main

if __name__ == "__main__":
    run_cli(lambda: train_main(None, __doc__))
