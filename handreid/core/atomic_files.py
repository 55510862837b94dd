"""File writes that lose nothing: atomic writes (a kill or a full disk mid-write never leaves
a partial file, and the temporaries a killed writer left are removed by the next write of the
same file), the previous result kept aside before a re-run replaces it, files a user made
refused as outputs without --overwrite, and files opened for writing without following a
symbolic link planted at their name."""
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from handreid.core.errors import UserError, write_error


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteRecorder:
    """A binary file wrapper that remembers the OSError of a failed write: torch.save turns it
    into a RuntimeError ('unexpected pos ...') that no longer says the disk is full."""

    def __init__(self, handle):
        self.handle, self.error = handle, None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):  # seek, tell, read, ...: the file's own
        return getattr(self.handle, name)


# A temporary untouched this long, whose writer holds no lock on it, was left by a writer that
# died (kill -9, power loss). The wait covers the instant between a writer creating its
# temporary and locking it, clock skew on network disks, and writers of earlier versions
# (which took no lock).
STALE_TEMPORARY_SECONDS = 60
# The temporaries' names seen per folder: a folder is listed once per process (an output
# written into a folder of thousands of files, e.g. a prepared split, must not list it for
# every file).
_temporaries_in = {}


def _temporary_pattern(path):
    """atomic_write's temporaries of `path`: .<name>.<mkstemp's 8 characters>.tmp."""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")


def _remove_if_stale(candidate):
    """Remove a temporary no live writer holds (its lock is free) and nobody touched for
    STALE_TEMPORARY_SECONDS; -> whether it is gone. A file system without locks keeps every
    temporary."""
    try:
        fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(fd)
        if time.time() - held.st_mtime <= STALE_TEMPORARY_SECONDS or \
                os.stat(candidate, follow_symlinks=False).st_ino != held.st_ino:
            return False
        os.unlink(candidate)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Remove the temporaries of `path` (atomic_write's naming, in its folder) that writers
    killed mid-write left; those of a writer still running are kept."""
    path = Path(path)
    folder = str(path.parent)
    if folder not in _temporaries_in:
        try:
            _temporaries_in[folder] = {entry.name for entry in os.scandir(folder)
                                       if entry.name.startswith(".")
                                       and entry.name.endswith(".tmp")}
        except OSError:
            return
    pattern = _temporary_pattern(path)
    for name in [n for n in _temporaries_in[folder] if pattern.fullmatch(n)]:
        if _remove_if_stale(os.path.join(folder, name)):
            _temporaries_in[folder].discard(name)


def atomic_write(path, write):
    """Call write(binary_file) on a temp file in the same folder, then rename it over `path`:
    a kill mid-write never leaves a partial file. torch.save(obj, f) is a valid `write`.
    The writer locks its temp file while it writes; stale temps of `path` that killed writers
    left are removed first (remove_stale_temporaries).
    A failed write (disk full, quota, read-only or missing folder) is a UserError naming the
    file and the free space; the previous file stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file closes or the writer dies
        except OSError:
            pass  # a file system without locks: the write proceeds, unprotected
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            recorder = _WriteRecorder(handle)
            try:
                write(recorder)
            except RuntimeError:
                if recorder.error is None:
                    raise
                raise recorder.error from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise write_error(path, err) from None
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def keep_previous(path):
    """Before `path` is replaced, keep the old file as <stem>.<its mtime><suffix> (a hard link
    where possible, so the stable name never goes missing). Returns the kept path or None."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)
    return kept


def refuse_to_replace(path, overwrite):
    """A file the user made earlier is replaced only with --overwrite (checked before any work)."""
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")


def open_no_follow(path, flags, fix):
    """os.open(path, flags | O_NOFOLLOW, 0o666): a file this process writes in place (a lock, a
    log) is never reached through a symbolic link planted at its name, whose target would be
    written instead. UserError naming the link and `fix` (what to set instead)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}); the toolkit does "
                        f"not write through links: remove it, or {fix}") from None
