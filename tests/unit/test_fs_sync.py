"""O_DSYNC / O_SYNC opens of the image, at the FUSE boundary without a mount.

With direct_io the kernel sends no FSYNC after a write through such a file descriptor (it
does so only for cached files): the daemon must make each write durable itself before it
answers. MirrorOperations runs here over a real Mirror whose images log every write and
flush, so a test sees what reached the images, and in which order, by the time the
handler returned.
"""

import os
from pathlib import Path

import pyfuse3
import pytest
import trio

from mirrorfs.config import MirrorConfig
from mirrorfs.fs import CTL, IMAGE, MirrorOperations
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FileImage
from mirrorfs.job import State
from mirrorfs.mirror import Mirror
from mirrorfs.params import CopyMode

KiB, MiB = 1 << 10, 1 << 20
SIZE = 2 * MiB


class LoggedImage(FileImage):
    """A FileImage that appends ("write" | "punch" | "flush", name) to a shared log."""

    def __init__(self, path: str, name: str, log: list[tuple[str, str]]) -> None:
        super().__init__(path, os.open(path, os.O_RDWR))
        self.name, self.log = name, log

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        self.log.append(("write", self.name))
        return super().pwrite(data, offset)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self.log.append(("punch", self.name))
        super().fallocate(mode, offset, length)

    def flush(self) -> None:
        self.log.append(("flush", self.name))
        super().flush()


def setup(tmp: Path, **kw: object) -> tuple[MirrorOperations, Mirror, list[tuple[str, str]]]:
    src, tgt = tmp / "src.img", tmp / "tgt.img"
    src.write_bytes(os.urandom(SIZE))
    with open(tgt, "wb") as f:
        f.truncate(SIZE)
    log: list[tuple[str, str]] = []
    cfg = MirrorConfig(**{"granularity": 64 * KiB, "target_fresh": True, **kw})  # type: ignore[arg-type]
    m = Mirror(LoggedImage(str(src), "source", log), LoggedImage(str(tgt), "target", log), cfg)
    ops = MirrorOperations("disk.img", os.getuid(), os.getgid())
    ops.mirror = m
    return ops, m, log


async def open_image(ops: MirrorOperations, flags: int, inode: int = IMAGE) -> int:
    fi = await ops.open(pyfuse3.InodeT(inode), os.O_RDWR | flags, pyfuse3.RequestContext())
    return int(fi.fh)


async def wait_state(m: Mirror, state: State) -> None:
    with trio.fail_after(60):
        while m.job.state is not state:
            await trio.sleep(0.01)


@pytest.mark.parametrize("flag", [os.O_DSYNC, os.O_SYNC], ids=["O_DSYNC", "O_SYNC"])
async def test_sync_open_flushes_the_source_after_each_write(tmp_path: Path, flag: int) -> None:
    ops, m, log = setup(tmp_path)
    fh = await open_image(ops, flag)
    data = os.urandom(8 * KiB)
    assert await ops.write(pyfuse3.FileHandleT(fh), 100 * KiB, data) == len(data)
    # background mode: the target gets the chunk later, from the copier (it is dirty)
    assert log == [("write", "source"), ("flush", "source")]
    assert m.bitmap.dirty_bytes > 0
    log.clear()
    await ops.write(pyfuse3.FileHandleT(fh), 300 * KiB, data)
    assert log == [("write", "source"), ("flush", "source")]  # every write, not the first
    with open(m.source.path, "rb") as f:
        f.seek(300 * KiB)
        assert f.read(len(data)) == data


async def test_plain_open_does_not_flush(tmp_path: Path) -> None:
    ops, _, log = setup(tmp_path)
    fh = await open_image(ops, 0)
    await ops.write(pyfuse3.FileHandleT(fh), 0, b"x" * 4096)
    direct = await open_image(ops, os.O_DIRECT)  # qemu cache=none: no flush either
    await ops.write(pyfuse3.FileHandleT(direct), 4096, b"y" * 4096)
    assert log == [("write", "source"), ("write", "source")]
    # a plain handle stays plain while a sync one is open on the same image
    sync = await open_image(ops, os.O_DSYNC)
    await ops.write(pyfuse3.FileHandleT(fh), 8192, b"z" * 4096)
    await ops.release(pyfuse3.FileHandleT(sync))
    assert log[2:] == [("write", "source")]


async def test_sync_open_in_write_blocking_mode_flushes_both_images(tmp_path: Path) -> None:
    ops, m, log = setup(tmp_path, copy_mode=CopyMode.WRITE_BLOCKING)
    fh = await open_image(ops, os.O_DSYNC)
    await ops.write(pyfuse3.FileHandleT(fh), 64 * KiB, b"w" * (64 * KiB))
    assert log == [("write", "source"), ("write", "target"),
                   ("flush", "source"), ("flush", "target")]
    with open(m.target.path, "rb") as f:
        f.seek(64 * KiB)
        assert f.read(64 * KiB) == b"w" * (64 * KiB)


async def test_sync_open_after_the_pivot_flushes_the_target(tmp_path: Path) -> None:
    ops, m, log = setup(tmp_path)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert m.serving is m.target
    fh = await open_image(ops, os.O_SYNC)
    log.clear()
    await ops.write(pyfuse3.FileHandleT(fh), 0, b"p" * 4096)
    assert log == [("write", "target"), ("flush", "target")]


async def test_sync_open_flushes_a_punched_hole(tmp_path: Path) -> None:
    """A guest's discard or write-zeroes changes the disk as a write does."""
    ops, _, log = setup(tmp_path)
    fh = await open_image(ops, os.O_DSYNC)
    await ops.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 64 * KiB)
    assert log == [("punch", "source"), ("flush", "source")]


async def test_sync_open_of_ctl_is_a_command_only(tmp_path: Path) -> None:
    ops, _, log = setup(tmp_path)
    fh = await open_image(ops, os.O_DSYNC, CTL)
    assert await ops.write(pyfuse3.FileHandleT(fh), 0, b"pause\n") == 6
    assert log == []
