"""The FUSE operations: the image, ``.mirror/ctl`` and ``.mirror/events``.

This is the FUSE boundary: pyfuse3 is imported here and in mount.py only. Handlers are thin
and translate domain errors to errnos. pyfuse3 ends the whole mount on any exception that is
not a FUSEError, so every handler goes through ``_guard``: nothing a client sends can take
the mount down.
"""

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from mirrorfs.control import CommandError, apply_command, parse_command, render_status
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from mirrorfs.job import VerbRefused
from mirrorfs.mirror import Mirror

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
IMAGE, MIRROR_DIR, CTL, EVENTS = ROOT + 1, ROOT + 2, ROOT + 3, ROOT + 4
MIRROR_DIR_NAME = b".mirror"

P = ParamSpec("P")
R = TypeVar("R")


def _guard(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise FUSEError(errno.EIO) from None

    return wrapper


class _Handle:
    __slots__ = ("inode", "snapshot", "sync")

    def __init__(self, inode: int, sync: bool = False) -> None:
        self.inode = inode
        self.snapshot = b""
        self.sync = sync  # the image opened O_DSYNC or O_SYNC: each change durable at once


class MirrorOperations(pyfuse3.Operations):
    def __init__(self, name: str, uid: int, gid: int) -> None:
        super().__init__()
        self.name = name.encode()
        self.uid, self.gid = uid, gid  # the mounting user owns the control files
        self.mirror: Mirror | None = None  # set before the FUSE loop runs
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._t0_ns = time.time_ns()

    @property
    def _m(self) -> Mirror:
        assert self.mirror is not None
        return self.mirror

    # ------------------------------------------------------------------ attributes
    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_nlink = 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._t0_ns
        a.entry_timeout = a.attr_timeout = 0
        if inode in (ROOT, MIRROR_DIR):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode == IMAGE:
            m = self._m
            # the disk keeps the source's mode and owner across the pivot; allocation and
            # times are those of the image being served
            src = os.fstat(m.source.fd)
            a.st_mode = stat.S_IFREG | (src.st_mode & 0o7777 or 0o600)
            if stat.S_ISBLK(src.st_mode):
                a.st_mode = stat.S_IFREG | 0o600
            a.st_uid, a.st_gid = src.st_uid, src.st_gid
            serving_fd = m.serving.fd
            st = src if serving_fd in (-1, m.source.fd) else os.fstat(serving_fd)
            a.st_size = m.size
            a.st_blocks = st.st_blocks if stat.S_ISREG(st.st_mode) else m.size // 512
            a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = (st.st_atime_ns, st.st_mtime_ns,
                                                           st.st_ctime_ns)
            a.entry_timeout = a.attr_timeout = 1
        elif inode == CTL:
            a.st_mode = stat.S_IFREG | 0o600
        elif inode == EVENTS:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self._m.job.events.size  # grows: tail -F sees new events
            a.st_mtime_ns = a.st_ctime_ns = time.time_ns()
        else:
            raise FUSEError(errno.ENOENT)
        return a

    @_guard
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    @_guard
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        children = self._children(parent_inode)
        for child_name, inode in children:
            if child_name == name:
                return self._attr(inode)
        raise FUSEError(errno.ENOENT)

    def _children(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ROOT:
            return [(self.name, IMAGE), (MIRROR_DIR_NAME, MIRROR_DIR)]
        if inode == MIRROR_DIR:
            return [(b"ctl", CTL), (b"events", EVENTS)]
        raise FUSEError(errno.ENOTDIR)

    @_guard
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if fields.update_size:
            if inode == IMAGE and attr.st_size != self._m.size:
                log.warning("refused to resize the image to %d bytes", attr.st_size)
                raise FUSEError(errno.EPERM)  # a disk does not change size under a mirror
            if inode not in (IMAGE, CTL):  # O_TRUNC on ctl (echo cmd > ctl) is fine
                raise FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(errno.EPERM)
        return self._attr(inode)

    # ------------------------------------------------------------------ directories
    @_guard
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        self._children(inode)
        return (inode)

    @_guard
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        entries = self._children(fh)
        for i in range(start_id, len(entries)):
            name, inode = entries[i]
            if not pyfuse3.readdir_reply(token, (name),
                                         self._attr(inode), i + 1):
                break

    @_guard
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    # ------------------------------------------------------------------ files
    @_guard
    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode not in (IMAGE, CTL, EVENTS):
            raise FUSEError(errno.EISDIR if inode in (ROOT, MIRROR_DIR) else errno.ENOENT)
        if inode == EVENTS and flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EACCES)
        fh = self._next_fh
        self._next_fh += 1
        # O_DSYNC / O_SYNC (dd oflag=dsync, fio sync=dsync, databases): the kernel passes
        # them here, but with direct_io it sends no FSYNC after such a write (only the
        # cached path calls generic_write_sync), so each change is flushed before it is
        # acknowledged. Limit: a per-write RWF_DSYNC / RWF_SYNC (pwritev2, io_uring) on a
        # plain descriptor is only in that write's flags, which pyfuse3 does not pass on.
        h = _Handle(inode, sync=inode == IMAGE and bool(flags & (os.O_DSYNC | os.O_SYNC)))
        if inode == CTL:
            h.snapshot = render_status(self._m.status())  # one consistent snapshot per open
        self._handles[fh] = h
        # direct_io: every client request reaches us as it is (1 MiB for buffered writers
        # too), nothing stale is cached across the pivot, and ctl/events need no size.
        return pyfuse3.FileInfo(fh=fh, direct_io=True,
                                keep_cache=False)

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise FUSEError(errno.EBADF)
        return h

    @_guard
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.inode == IMAGE:
            return await self._m.read(off, size)
        if h.inode == CTL:
            if off == 0:  # a new read from the start (e.g. pread polling): fresh snapshot
                h.snapshot = render_status(self._m.status())
            return h.snapshot[off:off + size]
        return self._m.job.events.render()[off:off + size]

    @_guard
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes | memoryview) -> int:
        # The patched pyfuse3 passes a view of its receive buffer (no copy of the request):
        # valid only until this returns, so nothing may keep it or a slice of it.
        h = self._handle(fh)
        if h.inode == IMAGE:
            n = await self._m.write(off, buf)
            if h.sync:  # durable before acknowledged (see open); a failed flush fails it
                await self._m.fsync()
            return n
        if h.inode == CTL:
            return self._command(bytes(buf))
        raise FUSEError(errno.EBADF)

    def _command(self, buf: bytes) -> int:
        try:
            cmd = parse_command(buf)
        except CommandError as e:
            log.warning("ctl: malformed command: %s", e)
            raise FUSEError(errno.EINVAL) from None
        try:
            apply_command(self._m, cmd)
        except VerbRefused as e:
            log.warning("ctl: %s", e)
            raise FUSEError(errno.EBUSY) from None
        except ValueError as e:
            log.warning("ctl: %s", e)
            raise FUSEError(errno.EINVAL) from None
        log.info("ctl: %s accepted", cmd.verb)
        return len(buf)

    @_guard
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        if self._handle(fh).inode == IMAGE:
            await self._m.fsync()

    @_guard
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Needs pyfuse3 with the fallocate handler (scripts/setup.sh builds it)."""
        h = self._handle(fh)
        if h.inode != IMAGE:
            raise FUSEError(errno.EOPNOTSUPP)
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        changes = mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)  # collapse/insert range would move data
        if offset < 0 or length <= 0:
            raise FUSEError(errno.EINVAL)
        if offset + length > self._m.size and not keep_size:
            raise FUSEError(errno.EPERM)  # a disk does not grow under a mirror
        if changes:
            await self._m.fallocate(mode, offset, length)
            if h.sync:  # a discard or write-zeroes changes the disk as a write does
                await self._m.fsync()
        else:  # plain allocation: the content does not change, nothing to mirror
            await self._m.allocate(mode, offset, length)

    @_guard
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        return None

    @_guard
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._handles.pop(fh, None)

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        serving = self._m.serving
        st = os.fstatvfs(serving.fd if serving.fd >= 0 else self._m.source.fd)
        d = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(d, k, getattr(st, k))
        return d
