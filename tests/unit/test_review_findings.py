"""Review of 552a73c + 8a16ff3 (durable job ends, pivot registry, safe activity log): each
test shows one finding on the code as reviewed, kernel-free, and is marked xfail(strict)
until it is fixed.

The state file is real (StateFile in tmp_path) and "a crash now" is read from it as the
next mount would (StateFile.open + plan_resume). Every state-file write here is followed
by its fdatasync, so the page cache is what a power loss leaves too. ``_Runner`` stands in
for ``trio.to_thread.run_sync`` on the trio thread: like it, a cancel is seen before the
call starts, never while the "thread" runs (a worker thread cannot be abandoned), and other
tasks run meanwhile; a test can hold one chosen call until it releases it.
"""

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from bitarray import bitarray
from helpers.images import FaultyImage, cfg, inline, make_pair, same, wait_state

import mirrorfs.checkpointer as checkpointer_module
from mirrorfs.job import State
from mirrorfs.mirror import Mirror
from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode
from mirrorfs.state import (
    BLOCK,
    ActivityLog,
    StateError,
    StateFile,
    identity,
    plan_resume,
)

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB  # granularity: 64 chunks per 4 MiB extent
EXTENT = 4 * MiB


# ---------------------------------------------------------------------- helpers
def _zeros(n: int) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


def _ids(img: Any) -> dict[str, Any]:
    """What mount.py's _image_id records for a file image."""
    return {"path": img.path, "size": img.size, **identity(img.fd)}


def _state(tmp: Path, src: Any, tgt: Any, sync: str = "none", **extra: Any) -> StateFile:
    """A state file as mount.py's _prepare_state creates it (no valid header yet)."""
    size = src.size
    header = {"phase": "running", "clean": False, "size": size, "granularity": G,
              "extent_bytes": EXTENT, "nchunks": -(-size // G),
              "nextents": -(-size // EXTENT), "sync": sync, "source": _ids(src),
              "target": _ids(tgt), **extra}
    return StateFile.create(str(tmp / "tgt.img.mirrorfs"), header)


async def _mount_checkpoint(m: Mirror) -> None:
    """The first checkpoint mount.py's _serve makes, before the first guest write."""
    await m.checkpoint(flush=False, phase="running", clean=False)


def _resumed_after_crash(path: str, src: Any, tgt: Any, sync: str = "none",
                         image: bytes | None = None) -> bitarray | None:
    """What the next mount resumes from (None: a new job). Raises StateError where it
    refuses. ``image``: the state file's bytes at the crash, if not the file as it is."""
    if image is not None:
        path = path + ".crash"
        Path(path).write_bytes(image)
    sf = StateFile.open(path)
    try:
        return plan_resume(sf, _ids(src), _ids(tgt), sync=sync).bitmap
    finally:
        sf.close()


class _Runner:
    """trio.to_thread.run_sync without a thread (see the module docstring). ``hold()``
    makes the next call wait (before it runs) until ``release`` is set; ``hold_after``
    makes the first call after which ``predicate()`` is true wait once it has run."""

    def __init__(self) -> None:
        self.reached = trio.Event()
        self.release = trio.Event()
        self._hold_next = False
        self._hold_after: Callable[[], bool] | None = None

    def hold(self) -> None:
        self._hold_next = True

    def hold_after(self, predicate: Callable[[], bool]) -> None:
        self._hold_after = predicate

    async def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()  # as to_thread.run_sync does
        with trio.CancelScope(shield=True):  # the "thread" runs: not abandonable
            if self._hold_next:
                self._hold_next = False
                self.reached.set()
                await self.release.wait()
            else:
                await trio.lowlevel.checkpoint()
            result = fn(*args)
            if self._hold_after is not None and self._hold_after():
                self._hold_after = None
                self.reached.set()
                await self.release.wait()
        return result


def _eio(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EIO, "Input/output error")


async def _reached(m: Mirror, state: State, limit: float) -> bool:
    with trio.move_on_after(limit):
        await wait_state(m, state, limit=limit + 1)
        return True
    return False


async def _until(cond: Callable[[], bool], limit: float = 30) -> None:
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(0.01)


# ---------------------------------------------------------------------- finding 1
async def test_a_job_end_that_cancels_a_checkpoint_keeps_the_old_log_on_disk(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """run() cancels the checkpointer when the job ends. If that lands while the new slot
    is being written, trio raises Cancelled at the header write's to_thread call, which
    ActivityLog.checkpoint handles only for OSError: memory then says "new slot" (al
    emptied, _old_al dropped) while the header still names the old slot. A guest write
    queued on the lock (tracking goes on until _record_end) logs its extent with the empty
    al into the old slot's log block, erasing every entry there. Power lost before
    _record_end's header: the next mount resumes "after a crash" without chunk 70."""
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, data=bytes(size))  # equal images
    sf = _state(tmp_path, src, tgt)
    runner = _Runner()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=runner)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE, checkpoint_s=1), persist=persist,
               run_sync=inline)
    await _mount_checkpoint(m)
    crash: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        await _until(lambda: persist.checkpoints >= 2)  # the one made at ready
        m.pause()  # nothing copies: what the guest writes now differs on the target
        await m.write(70 * G, b"A" * 4096)  # extent 1: protected by the log alone
        assert persist.covers(70, 71) and not persist.p[70]
        runner.hold()  # the next state-file call: the checkpointer's write_slot (P={70})
        await runner.reached.wait()
        m.cancel(force=True)  # the job ends; run() cancels the checkpointer
        n.start_soon(m.write, 200 * G, b"B" * 4096)  # extent 3: waits for the lock
        await trio.sleep(0.1)

        write_header = sf.write_header

        def header_after_crash_image(**fields: Any) -> None:
            crash.append(Path(sf.path).read_bytes())  # power lost right before it
            write_header(**fields)

        sf.write_header = header_after_crash_image  # type: ignore[method-assign]
        runner.release.set()
        await _until(lambda: not m.tracking)  # _record_end wrote phase=cancelled
    assert crash, "_record_end wrote no header"
    assert src.pread(4096, 70 * G) != tgt.pread(4096, 70 * G)
    bitmap = _resumed_after_crash(sf.path, src, tgt, image=crash[0])
    assert bitmap is not None and bitmap[70], \
        "the resumed job would not copy chunk 70, which differs on the target"


# ---------------------------------------------------------------------- finding 2
async def test_a_write_across_an_extent_covered_half_by_p_half_by_the_log_goes_through(
        tmp_path: Path) -> None:
    """covers(a, b) asks "P covers all of [a, b)" or "the log covers all its extents";
    log(a, b) logs only extents that neither covers. Chunk 64 (extent 1) is in P, extent 0
    is in the log: a write to chunks 63-64 is covered chunk by chunk, covers() says no,
    log() logs nothing, and _change goes round again, for ever (it yields at the lock, so
    the daemon burns a core meanwhile). While the job is paused every checkpoint rebuilds
    the same picture (chunk 64 still dirty, the writer logs extent 0 again): the guest's
    write never returns. Any write across a 4 MiB boundary at the copy's frontier, or
    next to a dirty chunk, can hit it."""
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, data=bytes(size))
    sf = _state(tmp_path, src, tgt)
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=inline)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE), persist=persist, run_sync=inline)
    await _mount_checkpoint(m)
    # (no copy loop: as while the job is paused)
    await m.write(64 * G, b"x" * 4096)  # chunk 64 dirty ...
    await m.checkpoint()  # ... and in P on disk; the log is empty again
    await m.write(0, b"y" * 4096)  # extent 0 in the log
    assert persist.p[64] and not persist.p[63] and persist.al[0] and not persist.al[1]

    tries = 0
    log = persist.log

    async def counted(a: int, b: int) -> None:
        nonlocal tries
        tries += 1
        if tries > 100:
            raise RuntimeError(f"the write asked for a log entry of chunks [{a}, {b}) 100 "
                               f"times: covers() stays {persist.covers(a, b)}")
        await log(a, b)

    persist.log = counted  # type: ignore[method-assign]
    await m.write(63 * G + G // 2, b"z" * G)  # chunks 63 and 64
    assert tries <= 1


# ---------------------------------------------------------------------- finding 3
async def test_complete_finishes_after_an_ignored_error_that_no_batch_retried(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The gate closes only while ``_backoff_s`` is 0, and only a copy batch that settles
    without error (or ``resume``) resets it. Write-blocking, --on-target-error ignore: one
    active write's target part fails (chunk 0 dirty, back-off 0.1 s); the guest rewrites
    the whole chunk at once, which succeeds and cleans it. Nothing is dirty, so no batch
    ever runs: ``complete`` stays 'completing' for ever with nothing left to copy, the
    target healthy and every write since mirrored. (The same with a failed target flush,
    e.g. a guest fsync, when nothing was unflushed.)"""
    src, tgt = make_pair(tmp_path, 2 * MiB)
    m = Mirror(src, tgt, cfg(copy_mode=CopyMode.WRITE_BLOCKING,
                             on_target_error=ErrorPolicy.IGNORE), run_sync=inline)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        left = [1]

        def once(offset: int, length: int) -> int | None:
            if left[0]:
                left[0] = 0
                return errno.EIO
            return None

        tgt.fail_write = once
        await m.write(0, os.urandom(G))  # its target part fails: ignored, chunk 0 dirty
        await m.write(0, os.urandom(G))  # rewritten whole, to both: chunk 0 clean
        assert m.remaining_bytes == 0 and m.job.error
        m.complete()
        completed = await _reached(m, State.COMPLETED, limit=120)
        stuck = (m.job.state, m.remaining_bytes, m._backoff_s, m._gate)
        n.cancel_scope.cancel()
    assert completed, f"(state, remaining, backoff, gate) = {stuck} after 120 s"
    assert same(src, tgt)


# ---------------------------------------------------------------------- finding 4
async def test_record_end_after_a_writer_dropped_the_state_file_does_not_kill_the_loop(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The state file's disk fails. A guest write holds the lock while its log entry is
    written; the job ends (cancel force) and _record_end waits for the lock with the same
    ActivityLog. The entry fails: the writer drops the state file (persist = None). Then
    _record_end's header write fails too: StateFileLost -> _drop_state -> AssertionError,
    which no one catches: run() raises, the daemon's nursery ends, the mount is dead.
    (_unrecord_pivot and the checkpointer call _drop_state the same way.)"""
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, data=bytes(size))
    sf = _state(tmp_path, src, tgt)
    runner = _Runner()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=runner)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE), persist=persist, run_sync=inline)
    await _mount_checkpoint(m)
    crashed: list[BaseException] = []

    async def run() -> None:
        try:
            await m.run()
        except Exception as e:
            crashed.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await wait_state(m, State.READY)
        await _until(lambda: persist.checkpoints >= 2)
        sf.log_extent = _eio  # type: ignore[method-assign]  # the state file's disk fails
        runner.hold()
        n.start_soon(m.write, 0, b"x" * 4096)  # holds the lock while its entry is written
        await runner.reached.wait()
        m.cancel(force=True)  # the job ends: _record_end queues on the lock
        await trio.sleep(1)
        sf.write_header = _eio  # type: ignore[method-assign]
        runner.release.set()
        await _until(lambda: not m.tracking or bool(crashed))
    assert not crashed, f"run() raised {crashed[0]!r}"
    assert src.pread(4096, 0) == b"x" * 4096


async def test_two_writers_whose_log_entries_fail_both_succeed(tmp_path: Path) -> None:
    """Two guest writes into two cold extents: the first holds the lock while its entry
    is written, the second waits for the lock with the same ActivityLog. Both entries
    fail (the state file's disk is gone): the first drops the state file, the second's
    _drop_state finds persist None and asserts. fs.py turns the AssertionError into EIO:
    a state-file fault becomes a guest I/O error (the write never reached the source)."""
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, data=bytes(size))
    sf = _state(tmp_path, src, tgt)
    runner = _Runner()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=runner)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE), persist=persist, run_sync=inline)
    await _mount_checkpoint(m)
    sf.log_extent = _eio  # type: ignore[method-assign]
    results: list[object] = []

    async def guest(offset: int) -> None:
        try:
            results.append(await m.write(offset, b"w" * 4096))
        except BaseException as e:  # what the guest would get (fs.py: EIO)
            results.append(e)

    async with trio.open_nursery() as n:
        runner.hold()
        n.start_soon(guest, 0)
        await runner.reached.wait()
        n.start_soon(guest, 8 * MiB)
        await trio.testing.wait_all_tasks_blocked()
        runner.release.set()
    assert results == [4096, 4096]
    assert src.pread(4096, 8 * MiB) == b"w" * 4096


# ---------------------------------------------------------------------- finding 5
async def test_no_write_is_acknowledged_on_the_source_while_the_pivot_is_on_record(
        tmp_path: Path) -> None:
    """_finish records the pivot (registry, then phase=completed) with the gate closed.
    'cancel force' (COMPLETING accepts it; so does any _on_error, e.g. a guest fsync whose
    target flush fails) opens the gate meanwhile: the guest's next write goes to the
    source alone and is acknowledged while both durable records say the target is the
    live image. Power lost now: the next mount refuses the pair and tells the operator
    that TARGET is live and SOURCE stale; following it loses that acknowledged write."""
    size = 4 * MiB
    src, tgt = make_pair(tmp_path, size)
    sf = _state(tmp_path, src, tgt, sync="full")
    runner = _Runner()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=runner)
    registry: set[str] = set()
    m = Mirror(src, tgt, cfg(), persist=persist, run_sync=inline,
               record_pivot=lambda: registry.add(src.path),
               forget_pivot=lambda: registry.discard(src.path))
    await _mount_checkpoint(m)
    at_ack: dict[str, object] = {}

    async def guest() -> None:
        await m.write(0, b"after the cancel")
        # acknowledged: what a crash right now leaves behind
        on_disk = StateFile.open(sf.path)
        at_ack["phase"] = on_disk.header["phase"]
        on_disk.close()
        at_ack["registry"] = set(registry)
        at_ack["target has it"] = tgt.pread(16, 0) == b"after the cancel"

    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        runner.hold_after(lambda: sf.header.get("phase") == "completed")
        m.complete()
        await runner.reached.wait()  # registry and state file say: pivoted
        m.cancel(force=True)
        n.start_soon(guest)
        await trio.testing.wait_all_tasks_blocked()
        runner.release.set()
        await wait_state(m, State.CANCELLED)
        await _until(lambda: bool(at_ack))
    live_on_record = at_ack["phase"] == "completed" or bool(at_ack["registry"])
    assert not (live_on_record and not at_ack["target has it"]), at_ack


# ---------------------------------------------------------------------- finding 6
async def test_an_unmount_during_the_pivot_record_leaves_no_stale_record(
        tmp_path: Path) -> None:
    """The unmount cancels run() (mount.py: nursery.cancel_scope.cancel()) while the
    registry's record is being written (its fsyncs take milliseconds). The to_thread call
    finishes; the cancel lands at set_fields' lock: no phase=completed, no _unrecord_pivot.
    save_final_state then saves a clean stop (phase=running) while the registry keeps the
    record: the next 'mirrorfs mount SOURCE TARGET' is refused ("SOURCE is stale ...
    TARGET is the live image since"), though SOURCE is the live image; --fresh discards
    the clean stop (a full copy)."""
    src, tgt = make_pair(tmp_path, 4 * MiB)
    sf = _state(tmp_path, src, tgt, sync="full")
    runner = _Runner()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=runner)
    registry: set[str] = set()
    unmount = trio.CancelScope()

    def record() -> None:
        registry.add(src.path)
        unmount.cancel()  # fusermount -u / SIGTERM arrives meanwhile

    m = Mirror(src, tgt, cfg(), persist=persist, run_sync=inline, record_pivot=record,
               forget_pivot=lambda: registry.discard(src.path))
    await _mount_checkpoint(m)
    with unmount:
        async with trio.open_nursery() as n:
            n.start_soon(m.run)
            await wait_state(m, State.READY)
            m.complete()
            await trio.sleep_forever()
    await m.save_final_state(_ids(src), _ids(tgt))  # as _serve does after its nursery
    on_disk = StateFile.open(sf.path)
    phase = on_disk.header["phase"]
    on_disk.close()
    pivoted = m.serving is tgt  # either outcome is right, as long as the records agree
    assert bool(registry) == pivoted, \
        f"registry {registry}, target live: {pivoted}, state file phase={phase}"
    assert phase == ("completed" if pivoted else "running")


# ---------------------------------------------------------------------- finding 7
class _SyncTracking(FaultyImage):
    """Knows whether it was changed since its last fsync (whose inode, mtime included,
    a power loss may then roll back: ext4 commits it up to 5 s later, lazytime later)."""

    changed_since_sync = False

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        self.changed_since_sync = True
        return super().pwrite(data, offset)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self.changed_since_sync = True
        super().fallocate(mode, offset, length)

    def flush(self) -> None:
        super().flush()
        self.changed_since_sync = False


async def test_the_source_is_synced_before_its_identity_is_recorded(tmp_path: Path) -> None:
    """A file source's record matches only while (dev, ino, size, mtime_ns) are as
    recorded. source_identity reads the in-memory inode; _finish flushes the target, never
    the source, before it records. Power lost within ext4's commit interval after the
    guest's last write (with lazytime: within a day) and the source comes back with an
    older mtime: find() returns None, and a block-device or NBD target without --state
    (registry only, issue 16 item 2) gets the stale source copied over the live image."""
    src0, tgt = make_pair(tmp_path, 4 * MiB)
    src0.close()
    src = _SyncTracking.open(src0.path)
    at_record: list[bool] = []
    m = Mirror(src, tgt, cfg(), run_sync=inline,
               record_pivot=lambda: at_record.append(src.changed_since_sync))
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        await m.write(MiB, b"the guest's last write before complete")
        m.complete()
        await wait_state(m, State.COMPLETED)
    assert at_record == [False], "the identity recorded may not be the one on disk"


# ---------------------------------------------------------------------- finding 8
async def test_a_state_file_that_cannot_be_removed_is_never_resumed_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        autojump_clock: trio.testing.MockClock) -> None:
    """The state file's file system turns read-only (errors=remount-ro) or its disk fails:
    the log entry fails and so does the unlink. _drop_state sets persist None and
    _keep_tracking, which only keeps the in-memory bitmap going: nothing durable changes.
    The job goes on, the guest writes extent 2 while paused (acknowledged), the daemon
    is unmounted cleanly (save_final_state: persist is None, nothing saved). The stale
    file says phase=running, not clean: the next mount resumes "after a crash" from its
    P and log, which do not hold chunk 128. Only the log says to remove it by hand."""
    monkeypatch.setattr(checkpointer_module, "remove_durably", lambda path: False)
    size = 16 * MiB
    src, tgt = make_pair(tmp_path, size, data=bytes(size))
    sf = _state(tmp_path, src, tgt)
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=inline)
    m = Mirror(src, tgt, cfg(sync=SyncMode.NONE), persist=persist, run_sync=inline)
    await _mount_checkpoint(m)
    async with trio.open_nursery() as n:
        n.start_soon(m.run)
        await wait_state(m, State.READY)
        await _until(lambda: persist.checkpoints >= 2)
        m.pause()
        await m.write(0, b"x" * 4096)  # logged in extent 0
        sf.log_extent = _eio  # type: ignore[method-assign]
        await m.write(8 * MiB, b"y" * 4096)  # extent 2: the entry fails, the write succeeds
        assert m.persist is None and os.path.exists(sf.path)
        await trio.sleep(30)
        n.cancel_scope.cancel()  # unmount
    await m.save_final_state(_ids(src), _ids(tgt))
    assert src.pread(4096, 8 * MiB) != tgt.pread(4096, 8 * MiB)
    try:
        bitmap = _resumed_after_crash(sf.path, src, tgt)
    except StateError:
        return  # refused: safe
    assert bitmap is None or bitmap[8 * MiB // G], \
        "the next mount resumes without chunk 128, which differs on the target"


# ---------------------------------------------------------------------- finding 9
async def test_a_header_that_outgrows_its_block_does_not_kill_the_loop(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    """The header holds both images' absolute paths (up to 4095 bytes each). One that
    fits with phase=running can outgrow the block later: 'cancelled'/'completed' are two
    bytes longer, and seq gains a digit now and then. _render_header raises StateError,
    which _record_end, _record_pivot, _unrecord_pivot and the checkpointer let through
    (they catch OSError): run() raises and the daemon dies, the mount left dead. (At the
    mount's first checkpoint, _serve catches only OSError as well.)"""
    src, tgt = make_pair(tmp_path, 4 * MiB)
    sf = _state(tmp_path, src, tgt, sync="full", note="")
    for _ in range(10):  # seq 10: two digits for the rest of this test
        sf.write_checkpoint(_zeros(sf.nchunks))
    # pad the header to one byte under its block with phase=running and a 2-digit seq
    body = len(json.dumps(dict(sf.header, seq=99), sort_keys=True))
    sf.header["note"] = "n" * (BLOCK - 10 - body - 1)
    sf.write_header()
    persist = ActivityLog(sf, _zeros(sf.nchunks), G, EXTENT, run_sync=inline)
    m = Mirror(src, tgt, cfg(), persist=persist, run_sync=inline)
    await _mount_checkpoint(m)
    crashed: list[BaseException] = []

    async def run() -> None:
        try:
            await m.run()
        except Exception as e:
            crashed.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(run)
        await wait_state(m, State.READY)
        m.cancel()
        await wait_state(m, State.CANCELLED)
        await _until(lambda: not m.tracking or bool(crashed))
    assert not crashed, f"run() raised {crashed[0]!r}"
