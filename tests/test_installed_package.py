"""What installing the project puts on an interpreter's path: the package and the three modules
the documents name, nothing generic. Checked with find_spec in a clean process started outside
the checkout (nothing is imported, so this runs without torch)."""
import json
import os
import subprocess
import sys

INSTALLED = ("handreid", "handreid.train.engine", "build_dataloader", "make_model",
             "finetune_trainer_stage1")
# Names the flat layout used to put on every interpreter's path, and the checkout's folders.
NOT_INSTALLED = ("config", "engine", "errors", "evaluation", "method", "losses", "runtime",
                 "selection", "checkpointing", "reid_metrics", "experiments",
                 "datasets.prepare_11k", "benchmarks", "tests", "run_all_finetuned_stage1")


def test_installing_the_project_adds_the_package_and_the_documents_modules_only(tmp_path):
    code = ("import importlib.util, json, sys\n"
            "def found(name):\n"
            "    try:\n"
            "        return importlib.util.find_spec(name) is not None\n"
            "    except ModuleNotFoundError:\n"
            "        return False\n"
            "print(json.dumps({name: found(name) for name in sys.argv[1:]}))\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, *INSTALLED, *NOT_INSTALLED],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert [name for name in INSTALLED if not found[name]] == []
    assert [name for name in NOT_INSTALLED if found[name]] == []
