"""The mirror without FUSE: real files in tmp_path, trio's autojump clock for time, and
FaultyImage (helpers/images.py, a test double) for I/O errors and for holding a copy in flight."""

import errno
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from helpers.images import KiB, MiB, cfg, inline, make_pair, never, same, wait_state

from mirrorfs.images import FileImage
from mirrorfs.job import State, VerbRefused
from mirrorfs.mirror import Mirror
from mirrorfs.nbd import NBDImage
from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode


async def test_bulk_copy_then_complete(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 3 * MiB + 1234)
    m = Mirror(src, tgt, cfg())
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        assert m.job.ready and m.remaining_bytes == 0 and same(src, tgt)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert m.serving is tgt and m.job.target_consistent
    assert m.status()["progress"] == 100 and m.status()["remaining_bytes"] == 0
    assert same(src, tgt)


async def test_writes_racing_the_copier_are_never_lost(tmp_path: Path) -> None:
    size = 4 * MiB
    src, tgt = make_pair(tmp_path, size)
    m = Mirror(src, tgt, cfg(granularity=4 * KiB, speed=2 * MiB))
    rnd = random.Random(7)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        for _ in range(400):
            off = rnd.randrange(size - 70 * KiB)
            await m.write(off, os.urandom(rnd.randrange(1, 70 * KiB)))
            await trio.sleep(0.005)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_speed_limit_holds(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    src, tgt = make_pair(tmp_path, 8 * MiB)
    m = Mirror(src, tgt, cfg(speed=1 * MiB), run_sync=inline)
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await trio.sleep(3)
        copied = m.copied_bytes
        assert 2.7 * MiB <= copied <= 3.3 * MiB, copied
        m.set_speed(4 * MiB)  # takes effect within a slice
        await wait_state(m, State.READY)
        m.cancel()
        await wait_state(m, State.CANCELLED)
    elapsed = trio.current_time() - t0
    assert 4.0 <= elapsed <= 4.6, elapsed  # 3 s at 1 MiB/s, then 5 MiB at 4 MiB/s
    assert same(src, tgt) and m.job.target_consistent


async def test_pause_stops_copies_and_keeps_tracking(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    src, tgt = make_pair(tmp_path, 4 * MiB)
    m = Mirror(src, tgt, cfg(speed=1 * MiB), run_sync=inline)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await trio.sleep(1)
        m.pause()
        await trio.sleep(0.2)  # let in-flight copies finish
        before = m.copied_bytes
        await m.write(3 * MiB, b"x" * 5000)
        await trio.sleep(10)
        assert m.copied_bytes == before and m.job.state is State.PAUSED
        with pytest.raises(VerbRefused):
            m.pause()
        with pytest.raises(VerbRefused):
            m.complete()
        m.resume()
        assert m.job.state is State.COPYING
        m.set_speed(0)
        await wait_state(m, State.READY)
        m.pause()
        assert m.job.ready and m.job.state is State.PAUSED
        m.resume()
        assert m.job.state is State.READY
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


def sparse_pair(tmp: Path, size: int, offsets: tuple[int, ...]) -> tuple[FileImage, FileImage]:
    """A sparse source with 300 KiB of data at each offset, and an empty sparse target."""
    src, tgt = make_pair(tmp, size, sparse=True)
    for off in offsets:
        os.pwrite(src.fd, os.urandom(300 * KiB), off)
    return src, tgt


async def run_past_ready(m: Mirror, verb: Callable[[], None], end: State) -> None:
    """Run the job to ready, then end it with ``verb`` and wait for ``end``."""
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        verb()
        await wait_state(m, end)


async def test_sync_top_copies_only_extents_and_keeps_target_sparse(tmp_path: Path) -> None:
    size = 64 * MiB
    src, tgt = sparse_pair(tmp_path, size, (0, 10 * MiB + 4096, 40 * MiB))
    m = Mirror(src, tgt, cfg(sync=SyncMode.TOP))
    assert m.bitmap.dirty_bytes < 2 * MiB
    await run_past_ready(m, m.cancel, State.CANCELLED)
    assert same(src, tgt)
    assert os.stat(tgt.path).st_blocks * 512 <= 2 * MiB


async def test_sync_full_to_a_new_target_copies_only_the_data_extents(tmp_path: Path) -> None:
    """A target created for the job reads as zeros, as the source's holes do: sync full then
    marks only the data extents (QEMU's mirror does the same on a zero-initialized target)
    and punches no hole of the 256 MiB of holes around them."""
    size = 256 * MiB
    src, tgt = sparse_pair(tmp_path, size, (0, 100 * MiB + 4096, 250 * MiB))
    punched: list[tuple[int, int]] = []
    zero = tgt.write_zeroes
    tgt.write_zeroes = lambda off, n: (punched.append((off, n)), zero(off, n))[1]  # type: ignore[method-assign]
    m = Mirror(src, tgt, cfg(sync=SyncMode.FULL, target_fresh=True))
    assert m.bitmap.dirty_bytes <= 3 * 384 * KiB
    await run_past_ready(m, m.complete, State.COMPLETED)
    assert same(src, tgt)
    # only the holes inside the extents' chunks (partly data) are punched
    assert m.zeroed_bytes <= 3 * 64 * KiB and sum(n for _, n in punched) <= 3 * 64 * KiB
    assert os.stat(tgt.path).st_blocks * 512 <= 2 * MiB


async def test_sync_full_punches_holes_and_zero_data(tmp_path: Path) -> None:
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, sparse=True)
    os.pwrite(src.fd, os.urandom(MiB), 2 * MiB)
    os.pwrite(src.fd, bytes(4 * MiB), 8 * MiB)  # allocated, but all zeros
    os.pwrite(tgt.fd, os.urandom(size), 0)  # an existing target full of old data
    m = Mirror(src, tgt, cfg(sync=SyncMode.FULL, target_fresh=False))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)
    assert os.stat(tgt.path).st_blocks * 512 <= 1 * MiB + 64 * KiB
    assert m.zeroed_bytes >= size - MiB
    assert all(n <= MiB for _, n in tgt.writes + tgt.copies), "zeros were written as data"


async def test_kernel_copy_keeps_zero_detection(tmp_path: Path) -> None:
    """Between two files the data goes through copy_file_range; chunks are still told
    apart by content: one that only starts with zeros is data, an all-zero one a hole."""
    g = 64 * KiB
    data = bytearray(os.urandom(4 * MiB))
    data[0:g] = bytes(g)  # all zeros, allocated: a hole on the target
    data[g:2 * g] = bytes(g - 1) + b"x"  # zeros up to its last byte: data
    data[5 * g:7 * g] = bytes(2 * g)
    src, tgt = make_pair(tmp_path, len(data), data=bytes(data))
    m = Mirror(src, tgt, cfg(granularity=g))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.cancel()
    assert same(src, tgt)
    assert tgt.copies and not tgt.writes, "the data did not go through the kernel"
    assert m.zeroed_bytes == 3 * g
    assert os.stat(tgt.path).st_blocks * 512 <= len(data) - 3 * g
    copied = sum(n for _, n in tgt.copies)
    assert copied == len(data) - 3 * g


async def test_a_failing_kernel_copy_falls_back_and_names_the_side(tmp_path: Path) -> None:
    """copy_file_range failing (EIO: which side?) is retried through the buffer. Where the
    buffer path works the copy succeeds; where the source cannot be read, that is a source
    error, under the source's policy."""
    src, tgt = make_pair(tmp_path, 2 * MiB)
    tgt.fail_copy = lambda off, n: errno.EIO
    m = Mirror(src, tgt, cfg(on_target_error=ErrorPolicy.REPORT))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        assert m.job.error is None
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt) and tgt.writes and not tgt.copies

    src, tgt = make_pair(tmp_path, 2 * MiB)
    tgt.fail_copy = lambda off, n: errno.EIO
    src.fail_read = lambda off, n: errno.EIO if off >= MiB and n > 16 else None
    m = Mirror(src, tgt, cfg(on_source_error=ErrorPolicy.REPORT,
                             on_target_error=ErrorPolicy.IGNORE))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.FAILED)
    assert "reading the source" in (m.job.error or "")


@pytest.mark.parametrize("mode", [CopyMode.BACKGROUND, CopyMode.WRITE_BLOCKING])
async def test_a_guest_write_failing_halfway_is_still_mirrored(tmp_path: Path,
                                                               mode: CopyMode) -> None:
    """The guest gets its error, but whatever part of the write reached the source is
    dirty, so the target follows the source all the same."""
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg(copy_mode=mode))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        src.write_half = True
        src.fail_write = lambda off, n: errno.ENOSPC
        with pytest.raises(OSError):
            await m.write(100 * KiB, os.urandom(200 * KiB))
        src.fail_write = never
        await wait_state(m, State.READY)
        with trio.fail_after(10):
            while m.remaining_bytes:
                await trio.sleep(0.01)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_sync_none_copies_only_new_writes(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        await m.write(100_000, b"new" * 1000)
        while m.remaining_bytes:
            await trio.sleep(0.01)
        m.cancel()
        await wait_state(m, State.CANCELLED)
    data = Path(tgt.path).read_bytes()
    lo, hi = m.bitmap.chunks_of(100_000, 3000)
    start, end = lo * 64 * KiB, hi * 64 * KiB
    assert data[start:end] == Path(src.path).read_bytes()[start:end]
    assert data[:start] == bytes(start), "sync none copied data written before the start"


@pytest.mark.parametrize("policy", list(ErrorPolicy))
async def test_target_error_policies(tmp_path: Path, policy: ErrorPolicy,
                                     autojump_clock: trio.testing.MockClock) -> None:
    src, tgt = make_pair(tmp_path, 2 * MiB)
    failures = {"left": 3}

    def fail(off: int, n: int) -> int | None:
        if failures["left"] and off >= MiB:
            failures["left"] -= 1
            return errno.ENOSPC
        return None

    tgt.fail_write = fail
    m = Mirror(src, tgt, cfg(on_target_error=policy), run_sync=inline)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        if policy is ErrorPolicy.REPORT:
            await wait_state(m, State.FAILED)
            assert "No space left" in (m.job.error or "")
            assert m.serving is src and not m.tracking
            assert await m.write(0, b"guest io still works") == 20
            return
        if policy is ErrorPolicy.STOP:
            await wait_state(m, State.PAUSED)
            assert "No space left" in (m.job.error or "")
            await m.write(1536 * KiB, b"written while stopped")  # the guest never notices
            resumes = 0
            while m.job.state is State.PAUSED:  # each resume retries; 3 failures queued
                m.resume()
                assert m.job.error is None
                resumes += 1
                await wait_state(m, State.PAUSED, State.READY)
            assert resumes == 3
        await wait_state(m, State.READY)
        assert m.job.error is None
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)
    assert "error" in m.job.events.names()


@pytest.mark.parametrize("policy", [ErrorPolicy.REPORT, ErrorPolicy.IGNORE])
async def test_source_read_errors(tmp_path: Path, policy: ErrorPolicy,
                                  autojump_clock: trio.testing.MockClock) -> None:
    src, tgt = make_pair(tmp_path, 2 * MiB)
    left = {"n": 2}

    def fail(off: int, n: int) -> int | None:
        if left["n"]:
            left["n"] -= 1
            return errno.EIO
        return None

    src.fail_read = fail
    m = Mirror(src, tgt, cfg(on_source_error=policy), run_sync=inline)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        if policy is ErrorPolicy.REPORT:
            await wait_state(m, State.FAILED)
            assert "reading the source" in (m.job.error or "")
            return
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_cancel_before_ready_is_inconsistent(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 8 * MiB)
    m = Mirror(src, tgt, cfg(speed=1 * MiB))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await trio.sleep(0.3)
        m.cancel()
        await wait_state(m, State.CANCELLED)
    assert not m.job.target_consistent and m.serving is src
    before = Path(tgt.path).read_bytes()
    await m.write(0, b"after cancel")
    assert Path(tgt.path).read_bytes() == before, "a write after cancel reached the target"
    assert Path(src.path).read_bytes()[:12] == b"after cancel"


async def test_active_write_waits_for_an_overlapping_copy(tmp_path: Path) -> None:
    """Invariant 2: an older copy must never land on the target after a newer write."""
    src, tgt = make_pair(tmp_path, 1 * MiB)
    tgt.gate = threading.Event()  # the copier's target writes block until we open it
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING, granularity=64 * KiB,
                             max_op_bytes=64 * KiB, batch_bytes=64 * KiB))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        while not m._busy:  # a copy of chunk 0 is in flight and held at the gate
            await trio.sleep(0.001)
        assert m._busy[0].a == 0
        done = trio.Event()

        async def guest() -> None:
            await m.write(0, b"N" * 64 * KiB)  # covers chunk 0 fully
            done.set()

        n.start_soon(guest)
        await trio.sleep(0.05)
        assert not done.is_set(), "the active write did not wait for the copy"
        tgt.gate.set()
        await done.wait()
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert Path(tgt.path).read_bytes()[:64 * KiB] == b"N" * 64 * KiB
    assert same(src, tgt)


async def test_write_blocking_dirty_only_shrinks(tmp_path: Path) -> None:
    size = 4 * MiB
    src, tgt = make_pair(tmp_path, size)
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING, speed=256 * KiB,
                             granularity=4 * KiB))
    rnd = random.Random(3)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        last = m.bitmap.dirty_bytes + m.inflight_bytes
        for _ in range(300):
            off = rnd.randrange(size - 100 * KiB)
            await m.write(off, os.urandom(rnd.randrange(1, 100 * KiB)))
            now = m.bitmap.dirty_bytes + m.inflight_bytes
            assert now <= last, "a write-blocking write grew the dirty set"
            last = now
        m.set_speed(0)
        await wait_state(m, State.READY)
        assert m.actively_synced
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_switch_to_write_blocking_is_one_way(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 1 * MiB)
    m = Mirror(src, tgt, cfg(speed=64 * KiB))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        m.set_copy_mode(CopyMode.WRITE_BLOCKING)
        assert m.status()["copy_mode"] == "write-blocking"
        with pytest.raises(VerbRefused):
            m.set_copy_mode(CopyMode.BACKGROUND)
        m.cancel(force=True)
        await wait_state(m, State.CANCELLED)
    assert not m.job.target_consistent


async def test_a_failing_state_file_never_fails_a_guest_write(tmp_path: Path) -> None:
    from bitarray import bitarray

    from mirrorfs.state import ActivityLog, StateFile

    src, tgt = make_pair(tmp_path, 2 * MiB)
    c = cfg()
    nchunks = 2 * MiB // c.granularity
    sf = StateFile.create(str(tmp_path / "state"), {
        "phase": "running", "clean": False, "size": 2 * MiB, "granularity": c.granularity,
        "extent_bytes": 4 * MiB, "nchunks": nchunks, "nextents": 1})

    def broken(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    sf.log_extent = broken  # type: ignore[method-assign]
    persist = ActivityLog(sf, bitarray(nchunks, endian="little"), c.granularity, 4 * MiB)
    m = Mirror(src, tgt, c, persist=persist)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        assert await m.write(4096, b"the guest's write succeeds") == 26
        assert m.persist is None and not (tmp_path / "state").exists()
        assert "state" in [e.get("side") for e in map(__import__("json").loads,
                                                      m.job.events.render().splitlines())]
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_a_failed_target_flush_makes_its_copies_dirty_again(tmp_path: Path) -> None:
    """Invariant 7: the checkpoint after ready flushes the target, and the flush fails with
    the data lost. What it should have covered is copied again, under the target's error
    policy (stop: paused), and the job still ends with equal images."""
    from bitarray import bitarray

    from mirrorfs.state import ActivityLog, StateFile

    src, tgt = make_pair(tmp_path, 2 * MiB)
    c = cfg(on_target_error=ErrorPolicy.STOP, checkpoint_s=0.5)
    nchunks = 2 * MiB // c.granularity
    sf = StateFile.create(str(tmp_path / "state"), {
        "phase": "running", "clean": False, "size": 2 * MiB, "granularity": c.granularity,
        "extent_bytes": 4 * MiB, "nchunks": nchunks, "nextents": 1})
    persist = ActivityLog(sf, bitarray(nchunks, endian="little"), c.granularity, 4 * MiB)
    m = Mirror(src, tgt, c, persist=persist)
    tgt.fail_flush = 1  # the first checkpoint's (at ready, or during the copy)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.PAUSED, limit=30)
        assert "writing the target" in (m.job.error or "")
        assert m.bitmap.dirty_bytes > 0
        m.resume()
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


async def test_a_copy_in_flight_across_a_failed_flush_is_copied_again(tmp_path: Path) -> None:
    """Invariant 7: a batch's first op lands on the target, then a flush fails and loses it
    before the batch has settled. The op must not count as copied."""
    src, tgt = make_pair(tmp_path, 1 * MiB)
    tgt.gate, tgt.gate_after = threading.Event(), 1  # op 1 lands, op 2 waits
    m = Mirror(src, tgt, cfg(max_op_bytes=64 * KiB, batch_bytes=128 * KiB, buf_size=128 * KiB,
                             copy_mode=CopyMode.WRITE_BLOCKING,
                             on_target_error=ErrorPolicy.IGNORE))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await trio.to_thread.run_sync(tgt.gate_reached.wait, 10)
        tgt.fail_flush = 1
        await m.fsync()  # write-blocking: flushes the target, which loses op 1
        tgt.gate.set()
        await wait_state(m, State.READY, limit=30)
        m.complete()
        await wait_state(m, State.COMPLETED, limit=30)
    assert same(src, tgt)


class _SlowTarget(NBDImage):
    """An async target (NBD's interface, no server) whose writes can wait on a hook."""

    def __init__(self, size: int) -> None:  # no connection: only what the mirror uses
        self.path, self.size, self.generation = "nbd://test", size, 0
        self.data = bytearray(size)
        self.can_zero, self._zero_ok, self._lost_writes, self._closed = True, True, False, False
        self.hooks: dict[int, Callable[[], Any]] = {}

    async def reconnect(self) -> bool:
        return False

    async def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        hook = self.hooks.pop(offset, None)
        if hook is not None:
            await hook()
        self.data[offset:offset + len(data)] = data
        return len(data)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    async def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    async def flush(self) -> None:
        await trio.sleep(0.01)


@pytest.mark.parametrize("trial", range(8))
async def test_an_active_write_never_slips_past_the_pivot(tmp_path: Path, trial: int) -> None:
    """Invariant 4: a write-blocking write that waited for an overlapping one when the
    drain's gate closed waits at the gate; it then goes to the live target, and if that
    fails the guest hears of it. Never acknowledged and missing."""
    src, _ = make_pair(tmp_path, 1 * MiB)
    tgt = _SlowTarget(1 * MiB)
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING))
    release = trio.Event()

    async def fail_later() -> None:
        await trio.sleep(0.05)
        raise OSError(errno.EIO, "the target failed")

    outcome: list[object] = []

    async def w2() -> None:
        try:
            outcome.append(await m.write(4096, b"2" * 4096))  # same chunk as W1
        except OSError as e:
            outcome.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY, limit=30)
        tgt.hooks[0] = release.wait
        tgt.hooks[4096] = fail_later
        n.start_soon(m.write, 0, b"1" * 4096)  # W1: its target write waits
        await trio.sleep(0.01)
        n.start_soon(w2)
        await trio.sleep(0.01)
        m.complete()
        await trio.sleep(0.01)
        release.set()
        await wait_state(m, State.COMPLETED, limit=30)
        with trio.fail_after(5):
            while not outcome:
                await trio.sleep(0.01)
    if outcome == [4096]:
        assert tgt.data[4096:8192] == b"2" * 4096
    else:
        assert isinstance(outcome[0], OSError)
