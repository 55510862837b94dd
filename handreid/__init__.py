"""handreid: CLIP fine-tuning for hand-based person identification.

The folders are the layers, bottom to top; a module imports its own folder, the folders of
its own rank and those below, never upward (tests/test_import_graph.py):

    core/                                  errors, runtime, atomic files, config keys and files,
                                           the method registry, the start-up call
    model/ data/ metrics/ checkpoint/      the network, images to batches, numbers from
                                           similarities, the checkpoint format
    train/ methods/ evaluation/ casework/ search/
                                           the engine, one file per method, the protocol and
                                           its report, likelihood ratios, gallery search

Evaluation never imports train/. Entry scripts (experiments/, datasets/, benchmarks/,
run_all_finetuned_stage1.py) sit on top.
"""
