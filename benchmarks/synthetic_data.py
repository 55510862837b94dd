"""The synthetic raw 11k dataset the benchmarks measure on, made and prepared in place by the
project's own scripts."""
import subprocess
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def prepare_synthetic_11k(folder, subjects, num_splits, *generator_args):
    """make_synthetic_hands.py --out folder, then prepare_11k.py --raw folder."""
    for command in (["make_synthetic_hands.py", "--out", folder, "--subjects", subjects,
                     *generator_args],
                    ["prepare_11k.py", "--raw", folder, "--num-splits", num_splits]):
        subprocess.run([sys.executable, str(DATASETS / command[0]), *map(str, command[1:])],
                       check=True, stdout=subprocess.DEVNULL)
