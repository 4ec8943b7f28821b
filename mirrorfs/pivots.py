"""The pivot registry: which images were pivoted away from, so that none is ever copied
over the image that replaced it.

After ``complete`` the target is the live disk and the source is stale. A later
``mirrorfs mount SOURCE TARGET`` must not copy the stale source over it, whatever the
options: with ``--no-state``, for a block device or an NBD export without ``--state``, or
after the state file was lost. So the pivot is recorded here as well as in the state file,
durably, before the target becomes the live image (DOMAIN.md, invariant 9), and a mount
refuses a source that has a record, unless ``--fresh`` (the operator means it), which
removes the record once the source is served again.

One small JSON file per source in ``$MIRRORFS_STATE_DIR/pivots`` (default
``/var/lib/mirrorfs``; ``$XDG_STATE_HOME/mirrorfs`` or ``~/.local/state/mirrorfs`` for
other users than root), named by the source's identity: the device and inode of a file,
the device number of a block device. A record matches only while the file is as it was
at the pivot (same size and mtime), so a file later created with a recycled inode is not
refused; a block device has no such stamp and matches by its device number and path.
"""

import contextlib
import hashlib
import json
import os
import stat
from typing import Any

from mirrorfs.job import utc_now_iso


def default_dir() -> str:
    env = os.environ.get("MIRRORFS_STATE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/mirrorfs"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "mirrorfs")


def source_identity(path: str, fd: int) -> dict[str, Any]:
    """What identifies an image for the registry (see the module docstring)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return {"path": path, "rdev": st.st_rdev}
    return {"path": path, "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


class PivotRegistry:
    """Records in a directory. Plain blocking calls: run them off the trio thread."""

    def __init__(self, directory: str | None = None) -> None:
        self.dir = os.path.join(directory or default_dir(), "pivots")

    def _file(self, ident: dict[str, Any]) -> str:
        key = f"blk:{ident['rdev']}" if "rdev" in ident else f"{ident['dev']}:{ident['ino']}"
        return os.path.join(self.dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")

    def find(self, ident: dict[str, Any]) -> dict[str, Any] | None:
        """The record for this image, if it is still the image that was pivoted away from."""
        try:
            with open(self._file(ident), encoding="utf-8") as f:
                rec = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # unreadable: do not trust the image
            return {"source": ident, "target": "(unreadable pivot record)", "time": "?"}
        saved = rec.get("source", {})
        keys = ("rdev", "path") if "rdev" in ident else ("dev", "ino", "size", "mtime_ns")
        if any(saved.get(k) != ident.get(k) for k in keys):
            return None  # another file now (a recycled inode) or changed since
        return rec if isinstance(rec, dict) else None

    def record(self, ident: dict[str, Any], target: str) -> None:
        """Durably: the file, then its name in the directory."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        path = self._file(ident)
        tmp = path + ".tmp"
        body = json.dumps({"source": ident, "target": target, "time": utc_now_iso()})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, body.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        self._sync_dir()

    def clear(self, ident: dict[str, Any]) -> None:
        """The image is served again (a new mirror from it): it is no longer stale."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(ident))
            self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
