"""Issue 16's data-safety items, each as a kernel-free test that failed before its fix.

The mounted versions of items 1-4 are in tests/mounted/test_safety.py; the crash explorer
(test_crash_explorer.py) finds items 1, 5 and 6 by simulating crashes at every step.
"""

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from bitarray import bitarray
from helpers.images import FaultyImage, cfg, inline, make_pair, same, wait_state

from mirrorfs.copier import CopyError
from mirrorfs.images import FALLOC_FL_ZERO_RANGE
from mirrorfs.job import State
from mirrorfs.mirror import Mirror
from mirrorfs.params import CopyMode, ErrorPolicy
from mirrorfs.pivots import PivotRegistry, source_identity
from mirrorfs.state import ActivityLog, StateError, StateFile, plan_resume

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def _state(tmp: Path, size: int, extent: int = 4 * MiB, sync: str = "full") -> StateFile:
    """A state file as a mount leaves it after its first checkpoint: nothing dirty."""
    sf = StateFile.create(str(tmp / "state"), {
        "phase": "running", "clean": False, "size": size, "granularity": G,
        "extent_bytes": extent, "nchunks": -(-size // G), "nextents": -(-size // extent),
        "sync": sync, "source": {"path": "s", "dev": 1, "ino": 2, "size": size},
        "target": {"path": "t", "dev": 1, "ino": 3, "size": size}})
    sf.write_checkpoint(_zeros(sf.nchunks))
    return sf


def _zeros(n: int) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


class _Held:
    """A run_sync whose calls wait, on the trio thread, until ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.waiting = trio.Event()

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.waiting.set()
        await self.release.wait()
        return fn(*args)


# ---------------------------------------------------------------------- item 5
async def test_a_log_entry_protects_only_once_it_is_durable(tmp_path: Path) -> None:
    """Item 5: a second writer into an extent being logged must not see it as covered
    before the log block is synced; it waits for the first writer's entry."""
    sf = _state(tmp_path, 64 * MiB)
    held = _Held()
    alog = ActivityLog(sf, _zeros(sf.nchunks), G, 4 * MiB, run_sync=held)
    second_done = trio.Event()

    async def second() -> None:
        await alog.log(5, 6)  # the same extent as the first writer's
        second_done.set()

    async with trio.open_nursery() as n:
        n.start_soon(alog.log, 0, 1)
        await held.waiting.wait()  # the first entry is being written, not yet synced
        assert not alog.covers(0, 1) and not alog.covers(5, 6), \
            "a log entry that is not on disk yet protects nothing"
        n.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not second_done.is_set(), "the second writer went ahead of the log's sync"
        held.release.set()
    assert alog.covers(5, 6) and alog.al_writes == 1
    al, _p = StateFile.open(sf.path).read_slot()
    assert list(al.search(1)) == [0]


# ---------------------------------------------------------------------- item 6
async def test_during_a_checkpoint_only_what_both_slots_cover_is_covered(
        tmp_path: Path) -> None:
    """Item 6: until the header switch a crash leaves the old slot; a chunk that only the
    new P covers is not safe yet."""
    sf = _state(tmp_path, 64 * MiB)
    alog = ActivityLog(sf, _zeros(sf.nchunks), G, 4 * MiB, run_sync=inline)
    await alog.log(0, 1)  # extent 0 (chunks 0-63) in the old slot's log
    held = _Held()
    alog._run_sync = held

    def fill(p: bitarray) -> None:
        p.setall(0)
        p[1] = p[70] = 1  # chunk 1: extent 0 (logged); chunk 70: extent 1 (not)

    async with trio.open_nursery() as n:
        n.start_soon(alog.checkpoint, fill)
        await held.waiting.wait()
        assert not alog.covers(70, 71), "covered by the new P alone, which is not on disk"
        assert alog.covers(1, 2), "covered by the old log and by the new P"
        assert not alog.covers(2, 3), "in the old log only: the new slot would not cover it"
        held.release.set()
    assert alog.covers(70, 71) and not alog.covers(2, 3)


async def test_a_failed_checkpoint_header_drops_trust(tmp_path: Path) -> None:
    """A header write that fails leaves the disk unknown: StateFileLost, not a retry."""
    from mirrorfs.state import StateFileLost

    sf = _state(tmp_path, 8 * MiB)
    alog = ActivityLog(sf, _zeros(sf.nchunks), G, 4 * MiB, run_sync=inline)

    def broken(**fields: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    sf.write_header = broken  # type: ignore[method-assign]
    with pytest.raises(StateFileLost):
        await alog.checkpoint(lambda p: None)


# ---------------------------------------------------------------------- item 1
async def test_the_end_of_a_job_is_durable_before_tracking_stops(tmp_path: Path) -> None:
    """Item 1: after a consistent cancel the state file says so before writes stop being
    tracked; until then a guest write is still marked and logged."""
    src, tgt = make_pair(tmp_path, 8 * MiB)
    sf = _state(tmp_path, 8 * MiB)
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, 4 * MiB, run_sync=inline)
    m = Mirror(src, tgt, cfg(), persist=persist)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.cancel()
        await wait_state(m, State.CANCELLED)
        if m.tracking:  # the end is not durable yet: this write must be on record
            await m.write(0, b"w" * 4096)
            assert m.bitmap.is_dirty(0) and persist.covers(0, 1)
    assert not m.tracking
    assert StateFile.open(sf.path).header["phase"] == "cancelled"
    await m.write(MiB, b"x" * 4096)  # untracked now: only the source changes
    assert src.pread(4096, MiB) == b"x" * 4096


# ---------------------------------------------------------------------- item 2
async def test_a_pivot_that_cannot_be_recorded_does_not_happen(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 4 * MiB)
    calls: list[str] = []

    def record() -> None:
        calls.append("record")
        raise OSError(errno.EROFS, "Read-only file system")

    m = Mirror(src, tgt, cfg(), record_pivot=record, forget_pivot=lambda: calls.append("forget"))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.FAILED)
    assert m.serving is src and calls == ["record", "forget"]
    assert "cannot record the pivot" in (m.job.error or "")
    await m.write(0, b"still the source")
    assert src.pread(16, 0) == b"still the source"


async def test_the_pivot_is_recorded_before_the_target_is_served(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 4 * MiB)
    seen: list[bool] = []
    m: Mirror | None = None

    def record() -> None:
        assert m is not None
        seen.append(m.serving is src)

    m = Mirror(src, tgt, cfg(), record_pivot=record)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert seen == [True] and m.serving is tgt and same(src, tgt)


def test_pivot_registry_matches_only_the_file_as_it_was(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORFS_STATE_DIR", str(tmp_path / "reg"))
    reg = PivotRegistry()
    p = tmp_path / "src.img"
    p.write_bytes(b"a" * 4096)
    fd = os.open(p, os.O_RDWR)
    try:
        ident = source_identity(str(p), fd)
        assert reg.find(ident) is None
        reg.record(ident, "/new/target.img")
        rec = reg.find(source_identity(str(p), fd))
        assert rec is not None and rec["target"] == "/new/target.img"
        os.pwrite(fd, b"b", 0)  # written since: another image now, not the stale one
        os.utime(fd, ns=(1, 1))
        assert reg.find(source_identity(str(p), fd)) is None
        reg.clear(ident)
        assert not list((tmp_path / "reg" / "pivots").iterdir())
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- item 3
async def test_a_failing_target_never_holds_the_guest_at_the_gate(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """Item 3: with --on-target-error ignore, every copy fails during complete; the gate
    must reopen and guest writes go through; once the target heals, the pivot happens."""
    src, tgt = make_pair(tmp_path, 8 * MiB)
    m = Mirror(src, tgt, cfg(on_target_error=ErrorPolicy.IGNORE), run_sync=inline)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        tgt.fail_write = lambda off, n: errno.ENOSPC
        for i in range(8):
            await m.write(i * MiB, os.urandom(8 * KiB))
        m.complete()
        await trio.sleep(5)  # many failed attempts, the gate closed and reopened
        assert m.job.state is State.COMPLETING and m.job.error
        for i in range(20):
            with trio.fail_after(1):  # never held for longer than one failing attempt
                await m.write(i * 256 * KiB, os.urandom(4 * KiB))
            await trio.sleep(0.3)
        tgt.fail_write = lambda off, n: None
        await wait_state(m, State.COMPLETED, limit=60)
    assert same(src, tgt)


# ---------------------------------------------------------------------- item 4
class _NoZeroRange(FaultyImage):
    """A target on a file system without FALLOC_FL_ZERO_RANGE (tmpfs); ``punch`` False:
    without punch-hole either (zeros must be written as data)."""

    punch = True

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if mode & FALLOC_FL_ZERO_RANGE or not self.punch:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        super().fallocate(mode, offset, length)

    def write_zeroes(self, offset: int, length: int, cheap_only: bool = False) -> bool:
        if not self.punch:
            self._punch_ok = False
        return super().write_zeroes(offset, length, cheap_only)


@pytest.mark.parametrize("punch", [True, False])
async def test_write_blocking_zero_range_onto_a_target_without_it(tmp_path: Path,
                                                                  punch: bool) -> None:
    src, tgt0 = make_pair(tmp_path, 4 * MiB)
    tgt0.close()
    tgt = _NoZeroRange.open(tgt0.path)
    tgt.punch = punch
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        await m.fallocate(FALLOC_FL_ZERO_RANGE, 100 * KiB, 300 * KiB)
        assert m.job.state is State.READY, m.job.error
        assert src.pread(300 * KiB, 100 * KiB) == bytes(300 * KiB)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt) and tgt.pread(300 * KiB, 100 * KiB) == bytes(300 * KiB)


# ---------------------------------------------------------------------- item 7
async def test_a_seek_error_while_planning_a_batch_reaches_the_policy(
        tmp_path: Path) -> None:
    """Item 7: SEEK_HOLE failing in the NBD batch's planning must not escape."""
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg())
    ops, _data = m._picker.pick(2 * MiB)

    def broken(offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    src.next_hole = broken  # type: ignore[method-assign]
    m._copier.plan_batch(ops, bytearray(4 * MiB))
    assert isinstance(ops[0].error, CopyError) and ops[0].error.side == "source"


async def test_any_os_error_of_a_batch_reaches_the_policy(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg())

    def broken(ops: Any, buf: Any) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    m._copier.copy_batch = broken  # type: ignore[method-assign]
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.FAILED)
    assert "Bad file descriptor" in (m.job.error or "")
    assert m.bitmap.dirty_bytes == 2 * MiB, "nothing counted as copied"
    src.close()
    tgt.close()
    src2, tgt2 = FaultyImage.open(src.path), FaultyImage.open(tgt.path)
    m2 = Mirror(src2, tgt2, cfg(target_fresh=False))
    async with trio.open_nursery() as n:
        n.start_soon(m2.run)
        await wait_state(m2, State.READY)
        m2.complete()
        await wait_state(m2, State.COMPLETED)
    assert same(src2, tgt2)


# ---------------------------------------------------------------------- item 9
async def test_a_write_past_the_end_changes_nothing(tmp_path: Path) -> None:
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg())
    with pytest.raises(OSError) as e:
        await m.write(2 * MiB - 10, b"z" * 20)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        await m.write(2 * MiB, b"z")
    assert os.fstat(src.fd).st_size == 2 * MiB and src.pread(10, 2 * MiB - 10) != b"z" * 10
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)


# ---------------------------------------------------------------------- item 11
def _saved(tmp: Path, **header: Any) -> StateFile:
    sf = _state(tmp, 8 * MiB)
    p = _zeros(sf.nchunks)
    p[3] = 1
    sf.write_checkpoint(p, **header)
    return sf


def test_resume_with_another_sync_mode_is_refused(tmp_path: Path) -> None:
    sf = _saved(tmp_path, sync="none")
    ids = sf.header["source"], sf.header["target"]
    with pytest.raises(StateError, match="--sync none"):
        plan_resume(sf, *ids, sync="full", granularity=G)
    plan = plan_resume(sf, *ids, sync="none", granularity=G)
    assert plan.bitmap is not None and list(plan.bitmap.search(1)) == [3]


def test_resume_with_another_granularity_keeps_the_saved_one_and_says_so(
        tmp_path: Path) -> None:
    sf = _saved(tmp_path)
    plan = plan_resume(sf, sf.header["source"], sf.header["target"], sync="full",
                       granularity=1 * MiB)
    assert plan.granularity == G and plan.bitmap is not None
    assert f"granularity {G}" in plan.note


def test_images_modified_after_a_clean_stop_are_refused(tmp_path: Path) -> None:
    sf = _state(tmp_path, 8 * MiB)
    src = dict(sf.header["source"], mtime_ns=1)
    tgt = dict(sf.header["target"], mtime_ns=1)
    sf.write_checkpoint(_zeros(sf.nchunks), clean=True, source=src, target=tgt)
    assert plan_resume(sf, src, tgt, sync="full").bitmap is not None
    for which in ("source", "target"):
        changed = dict(src if which == "source" else tgt, mtime_ns=2)
        ids = (changed, tgt) if which == "source" else (src, changed)
        with pytest.raises(StateError, match="modified after the job stopped"):
            plan_resume(sf, *ids, sync="full")


# ---------------------------------------------------------------------- invariant 4
async def test_an_active_write_that_finds_the_gate_closed_waits_at_it(tmp_path: Path) -> None:
    """Invariant 4 (a surviving mutant of ``_change``): an active write that waited for an
    overlapping copy and then finds the drain's gate closed must wait at the gate, not
    write the source behind the drain's back (the drain has seen nothing busy)."""
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING))
    copy = m._busy.hold(0, 1, G)  # a copy of chunk 0 in flight
    data = os.urandom(4096)
    done = trio.Event()

    async def guest() -> None:
        await m.write(0, data)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(guest)
        await trio.testing.wait_all_tasks_blocked()
        m._gate.close()  # the drain closes the gate while the write waits for the copy
        m._busy.release(copy)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and src.pread(4096, 0) != data, \
            "the write went to the source while the gate was closed"
        m._gate.open()
    assert done.is_set() and src.pread(4096, 0) == data and m.bitmap.is_dirty(0)
    async with trio.open_nursery() as n:  # and the mirror then copies it
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert same(src, tgt)
