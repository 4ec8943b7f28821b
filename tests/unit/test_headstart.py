"""The head start (headstart.py): its helper process on real files, and the mirror taking
over from it. Guest writes that arrive while it copies must never be lost."""

import os
import signal
from pathlib import Path

import trio

from mirrorfs import headstart
from mirrorfs.images import FileImage
from mirrorfs.job import State
from mirrorfs.mirror import Mirror, MirrorConfig

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def reports(fd: int) -> list[tuple[int, int]]:
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return list(headstart.REPORT.iter_unpack(data))


def test_the_helper_copies_the_data_and_skips_zeros(tmp_path: Path) -> None:
    size = 64 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(1 * MiB + 4096)  # an extent that starts and ends inside chunks
        f.write(os.urandom(5 * MiB))
        f.seek(20 * MiB)
        f.write(bytes(2 * G) + os.urandom(G) + bytes(G - 1) + b"x")  # zero chunks as data
        f.seek(size - 100)
        f.write(os.urandom(100))
    with open(tgt, "wb") as f:
        f.truncate(size)
    s, t = os.open(src, os.O_RDONLY), os.open(tgt, os.O_RDWR)
    rr, rw = os.pipe()
    sr, sw = os.pipe()
    try:
        assert headstart.copy_extents(s, t, size, G, rw, sr) == 0
        os.close(rw)
        got = reports(rr)
    finally:
        for fd in (s, t, rr, sr, sw):
            os.close(fd)
    assert src.read_bytes() == tgt.read_bytes()
    positions = [p for p, _ in got]
    assert positions == sorted(positions) and positions[-1] == size
    assert got[-1][1] == 2 * G  # the two all-zero chunks, not the one ending in "x"
    assert allocated(tgt) <= 5 * MiB + 4096 + 2 * G + 4096 + 64 * KiB


def test_the_helper_stops_when_asked(tmp_path: Path) -> None:
    size = 16 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(size))
    with open(tgt, "wb") as f:
        f.truncate(size)
    s, t = os.open(src, os.O_RDONLY), os.open(tgt, os.O_RDWR)
    rr, rw = os.pipe()
    sr, sw = os.pipe()
    os.close(sw)  # as the daemon does to stop it, or as its death does
    try:
        assert headstart.copy_extents(s, t, size, G, rw, sr) == 1
        os.close(rw)
        assert reports(rr) == []
    finally:
        for fd in (s, t, rr, sr):
            os.close(fd)
    assert allocated(tgt) == 0


def test_no_head_start_for_an_existing_target_a_uri_or_a_speed_limit(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(MiB))
    tgt.write_bytes(bytes(MiB))
    assert headstart.start(str(src), str(tgt), "full", 0, G) is None
    assert tgt.read_bytes() == bytes(MiB)
    new = str(tmp_path / "new.img")
    assert headstart.start(str(src), new, "full", 1 * MiB, G) is None
    assert headstart.start(str(src), new, "none", 0, G) is None
    assert headstart.start(str(src), "nbd://localhost/x", "full", 0, G) is None
    assert not os.path.exists(new)


def test_an_aborted_head_start_leaves_nothing(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(32 * MiB))
    hs = headstart.start(str(src), str(tgt), "full", 0, G)
    assert hs is not None and tgt.exists()
    hs.abort()
    assert not tgt.exists() and hs.status is not None
    # its locks went with it: the source can be locked again
    again = headstart.start(str(src), str(tgt), "full", 0, G)
    assert again is not None
    again.abort()


async def test_guest_writes_during_the_head_start_are_not_lost(tmp_path: Path) -> None:
    """The helper is frozen (SIGSTOP) after its first reports; guest writes then land
    before, inside and after what it copied. Each waits until the helper has stopped and
    its reports are applied; the mirror copies the rest, and the target ends equal."""
    size = 256 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    with open(src, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    hs = headstart.start(str(src), str(tgt), "full", 0, G)
    assert hs is not None
    sfd, tfd = hs.take_images()
    source, target = FileImage(str(src), sfd), FileImage(str(tgt), tfd)
    m = Mirror(source, target, MirrorConfig(granularity=G, target_fresh=True), head_start=hs)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(m.run)
            with trio.fail_after(30):
                while m.copied_bytes == 0:
                    await trio.lowlevel.checkpoint()
            os.kill(hs.pid, signal.SIGSTOP)
            copied = m.copied_bytes
            assert 0 < copied < size, "the helper was not caught in the middle"
            writes = [(0, os.urandom(4096)), (copied - 3 * G, os.urandom(3 * G + 5)),
                      (size - 4096, os.urandom(4096))]

            async def thaw() -> None:
                await trio.sleep(0.05)
                assert not m._head_done.is_set(), "a write did not wait for the helper"
                os.kill(hs.pid, signal.SIGCONT)

            n.start_soon(thaw)
            for off, data in writes:
                await m.write(off, data)
            assert hs.status == 1, "the helper did not stop at the first write"
            with trio.fail_after(60):
                while m.job.state is not State.READY:
                    await trio.sleep(0.01)
            m.complete()
            with trio.fail_after(60):
                while m.job.state is not State.COMPLETED:
                    await trio.sleep(0.01)
    finally:
        hs.kill()
        source.close()
        target.close()
    data = src.read_bytes()
    for off, d in writes:
        assert data[off:off + len(d)] == d
    assert data == tgt.read_bytes()
