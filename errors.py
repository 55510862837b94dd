"""The errors a user can fix, and how every script reports them: one line on stderr and a
non-zero exit code, never a traceback."""
import errno
import shutil
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input the user can fix (missing data, corrupt file, wrong checkpoint).

    The message is one line naming the problem and the fix; scripts exit with `exit_code`.
    """
    exit_code = 1


class ConfigError(UserError):
    """A bad config file, key, type, value or command-line argument."""
    exit_code = 2


# errno values of a write that failed for lack of room or permission to write.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}


def run_cli(main):
    """Run main(); a UserError, or a write that failed for lack of space or permission
    anywhere in the script (e.g. linking a prepared dataset), becomes one line on stderr and a
    non-zero exit code, no traceback."""
    try:
        result = main()
    except OSError as err:
        if err.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error(err.filename or 'a file', err)}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(result or 0)


def write_error(path, err):
    """UserError for a failed write of `path`: the reason, the free space, the fix."""
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2 ** 30:.2f} GiB free on {folder}"
    except OSError:
        free = "free space unknown"
    reason = err.strerror or str(err) if isinstance(err, OSError) else str(err)
    return UserError(f"cannot write {path}: {reason} ({free}); free space or write to "
                     f"another folder or disk; the previous complete file, if any, is intact")
