"""What the mirror reads and writes: a raw image in a regular file or on a block device.

One small interface (``Image``) so that the copy loop does not care which kind of file it
has. Every method is a plain blocking syscall: the FUSE handlers call them inline (a thread
round trip per request would cost more than a 4 KiB pwrite), the copier calls them from
worker threads in batches. An NBD target (nbd.py) is async instead; mirror.py takes either.
"""

import ctypes
import errno
import os
import stat
from typing import Protocol

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:  # find_library runs ldconfig: only where glibc's soname is not the usual one
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    import ctypes.util  # 7 ms of every mount's start, so only here

    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int

ZERO_BLOCK = bytes(1 << 20)
EXT4_SUPER_MAGIC = 0xEF53  # linux/magic.h (ext2 and ext3 share it)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate has none). Releases the GIL."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fs_magic(fd: int) -> int:
    """statfs(2)'s f_type for the file system of ``fd``: which kind of file system it is
    (os.statvfs does not tell). 0 where statfs fails."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value  # f_type: the first field, a long


class Image(Protocol):
    """What the mirror needs of a local image (FileImage)."""

    path: str
    size: int
    fd: int  # -1 where there is no local file descriptor (NBD)
    is_block: bool

    def pread_into(self, buf: memoryview, offset: int) -> int: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def pwrite(self, data: bytes | memoryview, offset: int) -> int: ...
    def write_zeroes(self, offset: int, length: int, cheap_only: bool = False) -> bool: ...
    def copy_in(self, src: "Image", offset: int, length: int) -> bool: ...
    def can_copy_from(self, src: "Image") -> bool: ...
    def preallocate(self, offset: int, length: int) -> bool: ...
    @property
    def zeroes_cheaply(self) -> bool: ...
    def fallocate(self, mode: int, offset: int, length: int) -> None: ...
    def next_data(self, offset: int) -> int: ...
    def next_hole(self, offset: int) -> int: ...
    def data_extents(self) -> list[tuple[int, int]]: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class FileImage:
    """A regular file or a block device opened O_RDWR."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        st = os.fstat(fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.size = block_device_size(fd) if self.is_block else st.st_size
        self._punch_ok = True  # cleared when the filesystem says it cannot punch holes
        self._seek_ok = not self.is_block
        self._copy_ok = not self.is_block  # copy_file_range: regular files only
        self._hole_hint = (0, 0)  # (offset, the hole SEEK_HOLE found from it)
        self._prealloc_ok: bool | None = None  # None: not yet asked (see preallocate)

    @classmethod
    def open(cls, path: str) -> "FileImage":
        return cls(path, os.open(path, os.O_RDWR | os.O_CLOEXEC))

    # ------------------------------------------------------------------ data
    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = os.preadv(self.fd, [buf], offset)
        if n < len(buf):  # only at the end of the image: read as zeros
            buf[n:] = ZERO_BLOCK[: len(buf) - n] if len(buf) - n <= len(ZERO_BLOCK) else bytes(
                len(buf) - n)
        return n

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        done = os.pwrite(self.fd, data, offset)
        while done < len(data):  # short writes happen (signals, some filesystems)
            n = os.pwrite(self.fd, memoryview(data)[done:], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n
        return done

    @property
    def zeroes_cheaply(self) -> bool:
        """Can ranges be zeroed without writing zero data (punch hole, zero range)?"""
        return self._punch_ok

    def write_zeroes(self, offset: int, length: int, cheap_only: bool = False) -> bool:
        """Make [offset, offset + length) read as zeros without writing zero data where the
        file system allows it: punch a hole (files) or zero the range (block devices).
        Elsewhere zero data is written, unless ``cheap_only``: then False, nothing done
        (the caller has the zeros written as data its own way, sized and rate-limited)."""
        if length <= 0:
            return True
        if self._punch_ok:
            mode = (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE if self.is_block
                    else FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            try:
                fallocate(self.fd, mode, offset, length)
                return True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                self._punch_ok = False
        if cheap_only:
            return False
        end = offset + length
        while offset < end:
            n = min(len(ZERO_BLOCK), end - offset)
            self.pwrite(memoryview(ZERO_BLOCK)[:n], offset)
            offset += n
        return True

    def can_copy_from(self, src: Image) -> bool:
        """May ``copy_in`` work from ``src``? (Two regular files; false once it failed.)"""
        return self._copy_ok and src.fd >= 0 and not src.is_block

    def copy_in(self, src: Image, offset: int, length: int) -> bool:
        """Copy bytes [offset, offset + length) of ``src`` to the same place in this file
        inside the kernel (copy_file_range(2)): no trip through user space, and a shared
        extent (reflink) on file systems that can. False where the kernel cannot do it
        (another file system, a device), and from then on; the caller then
        copies through a buffer. Other errors raise and the caller retries through a buffer,
        which tells a source error from a target error."""
        if not self.can_copy_from(src):
            return False
        pos, end = offset, offset + length
        while pos < end:
            try:
                n = os.copy_file_range(src.fd, self.fd, end - pos, pos, pos)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                               errno.EBADF):
                    self._copy_ok = False
                    return False
                raise
            if n <= 0:  # the source ended early (changed under us): let a buffer do it
                raise OSError(errno.EIO, "copy_file_range copied nothing")
            pos += n
        return True

    def preallocate(self, offset: int, length: int) -> bool:
        """Allocate [offset, offset + length) of a hole before data is copied into it, on
        ext4 only, where it makes the copy faster: a buffered write into allocated blocks
        skips delayed allocation's work per page (reserving space, quota, the extent
        status tree). A 1 GiB copy_file_range into a new file took 0.18 s instead of
        0.25 s (cp's time) here. Elsewhere it would cost: tmpfs zeroes the pages, and a
        file system that can reflink would allocate what the copy shares. False where it
        does not apply or failed (and from then on): the copy does without."""
        if self._prealloc_ok is None:
            self._prealloc_ok = not self.is_block and fs_magic(self.fd) == EXT4_SUPER_MAGIC
        if self._prealloc_ok:
            try:
                fallocate(self.fd, 0, offset, length)  # within the size: it stays
            except OSError:  # no room (the copy will say so), no fallocate: do without
                self._prealloc_ok = False
        return self._prealloc_ok

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """A guest's fallocate(2), passed through (punch hole, zero range, allocate)."""
        fallocate(self.fd, mode, offset, length)

    def next_data(self, offset: int) -> int:
        """Offset of the first byte at or after ``offset`` that may hold data (SEEK_DATA);
        ``size`` if there is none. Where holes cannot be seen, everything is data."""
        if not self._seek_ok:
            return offset
        start, hole = self._hole_hint  # known data (see next_hole): no syscall per op
        if start <= offset < hole:
            return offset
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return self.size
            if e.errno == errno.EINVAL:  # file system without SEEK_DATA
                self._seek_ok = False
                return offset
            raise

    def next_hole(self, offset: int) -> int:
        """Offset of the first hole at or after ``offset`` (``size`` at the end).

        tmpfs answers SEEK_HOLE by walking page by page to the hole, so a copier asking
        once per op from inside a fully allocated file would cost O(size) each time. The
        last answer is reused for offsets it covers, by this and by ``next_data`` (whose
        SEEK_DATA costs tmpfs some 30 us, once per op otherwise). It can only be stale by
        calling data what has since become a hole (a guest's punch), which is safe (the
        copy reads zeros and zero detection keeps the target sparse). Data that fills a
        hole is found by a fresh SEEK_DATA, never through this hint."""
        if not self._seek_ok:
            return self.size
        start, hole = self._hole_hint
        if start <= offset < hole:
            return hole
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.EINVAL):
                return self.size
            raise
        self._hole_hint = (offset, hole)  # one tuple: threads see the old or the new one
        return hole

    def data_extents(self) -> list[tuple[int, int]]:
        """The allocated extents [start, end), via SEEK_DATA/SEEK_HOLE (one, for a device)."""
        out: list[tuple[int, int]] = []
        off = 0
        while off < self.size:
            d = self.next_data(off)
            if d >= self.size:
                break
            h = min(self.next_hole(d), self.size)
            out.append((d, h))
            off = h
        return out

    def flush(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def block_device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)
