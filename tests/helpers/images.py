"""Images for tests of the mirror without FUSE: FaultyImage (a test double for I/O errors
and for holding a copy in flight), a source/target pair of real files, and small helpers
for driving a Mirror under trio (the autojump clock included)."""

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from mirrorfs.config import MirrorConfig
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FileImage, fallocate
from mirrorfs.job import State
from mirrorfs.mirror import Mirror

KiB, MiB = 1 << 10, 1 << 20


def never(offset: int, length: int) -> int | None:
    """A fault hook that never fails."""
    return None


class FaultyImage(FileImage):
    """A FileImage whose pwrite / pread_into / write_zeroes can fail or block on demand."""

    def __init__(self, path: str, fd: int) -> None:
        super().__init__(path, fd)
        self.fail_write: Callable[[int, int], int | None] = never
        self.fail_read: Callable[[int, int], int | None] = never
        self.fail_copy: Callable[[int, int], int | None] = never
        self.copies: list[tuple[int, int]] = []  # ranges copied by copy_file_range
        self.write_half = False
        self.fail_flush = 0  # this many flushes fail, losing what was written (see flush)
        self.gate: threading.Event | None = None  # a worker's writes wait for it
        self.gate_after = 0  # ... except this many first ones
        self.gate_reached = threading.Event()
        self.worker_writes = 0
        self.writes: list[tuple[int, int]] = []

    @classmethod
    def open(cls, path: str) -> "FaultyImage":
        return cls(path, os.open(path, os.O_RDWR))

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        if self.gate is not None and threading.current_thread() is not threading.main_thread():
            self.worker_writes += 1
            if self.worker_writes > self.gate_after:
                self.gate_reached.set()
                self.gate.wait(10)
        err = self.fail_write(offset, len(data))
        if err:
            if self.write_half:  # a write that fails halfway (ENOSPC after some blocks)
                super().pwrite(memoryview(data)[:len(data) // 2], offset)
            raise OSError(err, os.strerror(err))
        self.writes.append((offset, len(data)))
        return super().pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int, cheap_only: bool = False) -> bool:
        err = self.fail_write(offset, length)
        if err:
            raise OSError(err, os.strerror(err))
        return super().write_zeroes(offset, length, cheap_only)

    def copy_in(self, src: FileImage, offset: int, length: int) -> bool:
        # Tests that inject read or write faults, or hold writes, get the buffer path, whose
        # every pread and pwrite they see. fail_copy makes the kernel copy itself fail.
        err = self.fail_copy(offset, length)
        if err:
            raise OSError(err, os.strerror(err))
        if self.fail_write is not never or self.gate is not None or (
                isinstance(src, FaultyImage) and src.fail_read is not never):
            self._copy_ok = False  # as a real refusal: from then on (see FileImage.copy_in)
            return False
        self.copies.append((offset, length))
        return super().copy_in(src, offset, length)

    def flush(self) -> None:
        if self.fail_flush:
            # A lost write-back: the data written since the last flush never reaches the
            # disk (here: all of it reads as zeros), and fsync reports EIO once.
            self.fail_flush -= 1
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, self.size)
            raise OSError(errno.EIO, "Input/output error")
        super().flush()

    def pread_into(self, buf: memoryview, offset: int) -> int:
        err = self.fail_read(offset, len(buf))
        if err:
            raise OSError(err, os.strerror(err))
        return super().pread_into(buf, offset)


def make_pair(tmp: Path, size: int, data: bytes | None = None, sparse: bool = False
              ) -> tuple[FaultyImage, FaultyImage]:
    src, tgt = tmp / "src.img", tmp / "tgt.img"
    if sparse:
        with open(src, "wb") as f:
            f.truncate(size)
    else:
        src.write_bytes(data if data is not None else os.urandom(size))
    with open(tgt, "wb") as f:
        f.truncate(size)
    return FaultyImage.open(str(src)), FaultyImage.open(str(tgt))


def same(a: FileImage, b: FileImage) -> bool:
    return Path(a.path).read_bytes() == Path(b.path).read_bytes()


async def wait_state(m: Mirror, *states: State, limit: float = 600) -> None:
    with trio.fail_after(limit):
        while m.job.state not in states:
            await trio.sleep(0.01)


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run 'thread' work on the trio thread: with the autojump clock, time must not jump
    while a worker thread copies."""
    return fn(*args)


def cfg(**kw: object) -> MirrorConfig:
    base: dict[str, object] = {"granularity": 64 * KiB, "target_fresh": True}
    base.update(kw)
    return MirrorConfig(**base)  # type: ignore[arg-type]
