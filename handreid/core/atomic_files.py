"""File writes that lose nothing: atomic writes (a kill or a full disk mid-write never leaves
a partial file), the previous result kept aside before a re-run replaces it, and files a user
made refused as outputs without --overwrite."""
import json
import os
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


def atomic_write(path, write):
    """Call write(binary_file) on a temp file in the same folder, then rename it over `path`:
    a kill mid-write never leaves a partial file. torch.save(obj, f) is a valid `write`.
    A failed write (disk full, quota, read-only or missing folder) is a UserError naming the
    file and the free space; the previous file stays as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
