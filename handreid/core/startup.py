"""The process-wide settings of a run, made by `start()`: every entry script calls it before
anything imports torch (tests/conftest.py does too, as tests run scripts' main() in-process).
Importing a handreid module changes none of them; this module imports nothing heavy.

- OMP_WAIT_POLICY=PASSIVE unless the user set one: OpenMP worker threads that spin while they
  wait take the cores from everything else on a busy machine (a 2-core CPU run was 4x
  slower). libgomp reads it once, when torch loads.
- Ctrl-C while the script's modules load (seconds: torch, open_clip) is one line and exit
  code 130, not an import traceback (errors.interrupted_while_starting; run_cli puts
  Python's own handler back before main() runs).
"""
import os
import signal
import threading

from handreid.core.errors import interrupted_while_starting


def start():
    """Set the process-wide settings (a value the user set is kept)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupted_while_starting)
