"""The errors a user can fix, and how every script reports them: one line on stderr and a
non-zero exit code, never a traceback.

The exit codes (docs/config.md): 0 done; 1 the command is well formed but what it names or
finds cannot be used (UserError: missing or corrupt data, a checkpoint of another model, an
output that exists without --overwrite, a full disk); 2 the command itself is wrong
(ConfigError: an unknown, malformed or out-of-range argument, config key or value; the fix is
in the command line or the config file); 130 interrupted (Ctrl-C), also while the script's
modules load.
"""
import errno
import os
import shutil
import signal
import sys
from pathlib import Path

INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


class UserError(Exception):
    """Bad input the user can fix (missing data, corrupt file, wrong checkpoint).

    The message is one line naming the problem and the fix; scripts exit with `exit_code`.
    """
    exit_code = 1


class ConfigError(UserError):
    """A bad config file, key, type, value or command-line argument."""
    exit_code = 2


def interrupted_while_starting(signum, frame):
    """The SIGINT handler of an entry script until run_cli runs its main() (startup.start()
    sets it): Ctrl-C while torch and the rest load is one line and exit code 130, as within
    main(), not an import traceback."""
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


# errno values of a write that failed for lack of room or permission to write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}


def run_cli(main):
    """Run main(); a UserError, or a write that failed for lack of space or permission
    anywhere in the script (e.g. linking a prepared dataset), becomes one line on stderr and a
    non-zero exit code, no traceback."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        # Within main() Ctrl-C is a KeyboardInterrupt again: training stops gracefully, and
        # every `finally` runs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = main()
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error(err.filename, err)}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    sys.exit(result or 0)


def write_error(path, err):
    """UserError for a failed write of `path`: the reason and the fix (the free space of
    the file's own disk when it is full, the permission when the folder cannot be written).
    `path` None: an error that names no file (then no free space is guessed)."""
    reason = err.strerror or str(err) if isinstance(err, OSError) else str(err)
    if path is None:
        return UserError(f"cannot write a file: {reason}; free space or write to another "
                         f"folder or disk")
    kept = "the previous complete file, if any, is intact"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: {reason} (the folder is read-only or not "
                         f"yours to write, the disk is not full); write to a folder you may "
                         f"write (results_dir:, save_path:, log_path:, --out) or fix its "
                         f"permissions; {kept}")
    if isinstance(err, OSError) and err.errno is not None and \
            err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return UserError(f"cannot write {path}: {reason}; write to another folder; {kept}")
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2 ** 30:.2f} GiB free on {folder}"
    except OSError:
        free = "free space unknown"
    return UserError(f"cannot write {path}: {reason} ({free}); free space or write to "
                     f"another folder or disk; {kept}")


def check_writable(path, room=0):
    """Before the work that leads to writing `path`: UserError (write_error's) unless the
    nearest existing folder on its way is a folder this process may write (nothing is
    created) and, with `room` bytes, has that much free space."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder",
                                     str(path))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        if room and shutil.disk_usage(folder).free < room:
            raise OSError(errno.ENOSPC, f"less than the {room / 2 ** 30:.2f} GiB it needs "
                                        f"free", str(path))
    except OSError as err:
        raise write_error(path, err) from None
