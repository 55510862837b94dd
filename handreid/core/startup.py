"""The process-wide settings of a run, made by `start()`: every entry script calls it before
anything imports torch (tests/conftest.py does too, as tests run scripts' main() in-process).
Importing a handreid module changes none of them; this module imports nothing heavy.

- OMP_WAIT_POLICY=PASSIVE unless the user set one: OpenMP worker threads that spin while they
  wait take the cores from everything else on a busy machine (a 2-core CPU run was 4x
  slower). libgomp reads it once, when torch loads.
"""
import os


def start():
    """Set the process-wide settings (a value the user set is kept)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
