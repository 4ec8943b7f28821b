"""The crash explorer (issue 16): the real Mirror, ActivityLog, StateFile and plan_resume
run over simulated storage; every prefix of the storage trace is a crash, in five
variants (process kill, power loss, a torn state-file write, power loss keeping the
source's unsynced writes, a random subset of unsynced writes); each must lead a mount to
refuse, to start a new job (a full copy), or to resume with a bitmap that covers every
chunk in which source and target differ, and never to anything but a refusal once the
target is the live image. The method is in crashsim.py's docstring.

Random scenarios: ``test_random_scenarios`` runs a few seeds that together cover every
ending (cancel, cancel force, cancel before ready, complete, a failed job, a clean
unmount and resume) and a state-file error; ``MIRRORFS_CRASH_SEEDS=N`` runs seeds
0..N-1 instead (thousands of crash points per seed, about a second each), and
``MIRRORFS_CRASH_SEED0`` moves the first one.

Targeted scenarios, each found on the code before issue 16's fixes (552a73c), where
these tests fail with the violation quoted (the crash leaves the trace up to and
including op N; ops[N] is printed with the operations around it):

* item 1, ``test_item1_writes_after_the_job_ended[cancel|cancel-force|fail]``: ready, a
  checkpoint (the log is empty), the job ends (a consistent cancel, a cancel force, or a
  target fault under policy report: failed), then a guest write to an extent that is not
  logged. Once the job had ended the write was neither marked nor logged, and the header
  still said ``phase: running``, so a kill right after it resumed a job that would not
  copy it: "seed 11 crash after op 24 (kill): source and target differ in chunks the
  resumed job would not copy: resuming the job after a crash: 0 bytes to copy (header
  seq 2, phase running, clean False); chunks [40]".
* item 5, ``test_item5_second_writer_waits_for_the_log``: writer A's log entry for a cold
  extent is held between setting its bit in memory and writing it (a Hold on the state
  file's ``log_extent``); writer B, into the same extent, found the bit set and wrote the
  source at once, so a kill after B's write, before A's log block was on disk, resumed
  without that extent: "seed 5 crash after op 24 (kill): ... resuming the job after a
  crash: 0 bytes to copy ...; chunks [27]".
* item 6, ``test_item6_checkpoint_covers_only_what_both_slots_cover``: chunk 0 is written
  and copied while a checkpoint flushes the target (a Hold on the target's flush), so the
  checkpoint's new P holds that whole 1 MiB unflushed extent, chunks 0-15, although
  chunk 8 is clean and in an activity-log extent (512 KiB) that was never logged. While
  the new slot is being written (a Hold on every call made under the log's lock), a
  guest write to chunk 8 found it covered by the new P in memory and skipped the log; a
  kill before the header switch left the old slot, which does not cover it: "seed 6
  crash after op 31 (kill): ... resuming the job after a crash: 524288 bytes to copy
  ...; chunks [8]".

Found by the explorer beyond those, each with a targeted test that fails on 552a73c and
passes since the fix named in its docstring: a write across a logged and a P-covered
extent that spun (``test_write_across_a_logged_and_a_covered_extent_does_not_spin``,
reported as a stalled task by SpinGuard), and a checkpoint's snapshot that missed what
another flush of the target had taken (``test_checkpoint_during_another_target_flush``).
``test_pivot_after_the_state_file_was_dropped`` checks item 2's last case. The random
seeds find item 1 on 552a73c too (most seeds with a cancel, a cancel force or a
failure), the spinning write, and one more hole: a state file dropped after a write
error was unlinked without syncing its directory, so after a power loss the stale file
came back and resumed a job that had stopped logging (``power`` and ``random`` only).
"""

import errno
import os
import random
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
from crashsim import (
    NEW,
    REFUSE,
    RESUME,
    Explorer,
    KiB,
    MiB,
    Plan,
    Report,
    SimMirror,
    World,
    calls_on,
    explore_seed,
    run_world,
    wait_until,
)

from mirrorfs.job import State
from mirrorfs.params import CopyMode

# Seeds whose scenarios together cover every ending, a remount, a refused remount
# after the pivot, write-blocking mode and state-file errors (see Plan.from_seed), and
# that find, with one of issue 16's fixes undone at a time on 97fea75: item 1 (tracking
# ends with the job: seeds 14, 15, 19, 27), item 5 (the log bit set before its write is
# durable: 15, 19), item 6 (covers() from the new P alone: 14, 27), a log entry or a
# checkpoint's slot not synced, a snapshot without the unflushed or the in-flight
# chunks, and the write that spins (seed 10).
DEFAULT_SEEDS = (1, 10, 14, 15, 19, 27)
MIN_POINTS_PER_SEED = 300  # a scenario that checks fewer did not run as it should


def _report(capsys: pytest.CaptureFixture[str], name: str, rep: Report, seconds: float
            ) -> None:
    with capsys.disabled():
        print(f"\n[crash explorer] {name}: {rep.summary()} in {seconds:.1f} s")


def _assert_clean(rep: Report) -> None:
    assert rep.violation_count == 0, (
        f"{rep.violation_count} crash points violate the invariant; the first:\n"
        + "\n".join(str(v) for v in rep.violations[:3]))


def _seeds() -> list[int]:
    n = int(os.environ.get("MIRRORFS_CRASH_SEEDS", "0") or 0)
    if n <= 0:
        return list(DEFAULT_SEEDS)
    first = int(os.environ.get("MIRRORFS_CRASH_SEED0", "0") or 0)
    return list(range(first, first + n))


def test_random_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    seeds = _seeds()
    total = Report(seed=-1)
    endings: set[str] = set()
    t0 = time.monotonic()
    for seed in seeds:
        plan = Plan.from_seed(seed)
        endings.update(plan.endings)
        rep = explore_seed(seed, plan)
        assert rep.points >= MIN_POINTS_PER_SEED, f"seed {seed}: {rep.summary()}"
        total.add(rep)
    _report(capsys, f"{len(seeds)} random seeds", total, time.monotonic() - t0)
    assert total.points >= MIN_POINTS_PER_SEED * len(seeds)
    for outcome in (REFUSE, NEW, RESUME):
        assert total.outcomes[outcome] > 0, f"no crash point led to {outcome}"
    if seeds == list(DEFAULT_SEEDS):
        assert endings >= {"cancel", "cancel-force", "cancel-early", "complete", "fail",
                           "unmount"}, endings
    _assert_clean(total)
    assert not total.stalls, f"tasks spun without waiting: {total.stalls[:3]}"


# ====================================================================== targeted
def _world(seed: int, yields: tuple[int, int] = (0, 3)) -> World:
    return World(seed, 8 * MiB, 64 * KiB, yields=yields)


def _plan(seed: int, **kw: object) -> Plan:
    base: dict[str, object] = {"seed": seed, "extent_bytes": 512 * KiB, "writers": 0,
                               "checkpoint_s": 1e6, "copy_mode": CopyMode.BACKGROUND}
    base.update(kw)
    return Plan(**base)  # type: ignore[arg-type]


async def _mount_ready(world: World, plan: Plan, nursery: trio.Nursery) -> SimMirror:
    """Mount, start the copy loop, wait for ready and for the checkpoint that ready asks
    for: P is clean and the activity log empty from here."""
    mirror = await world.mount(plan.config(), plan.extent_bytes)
    assert mirror is not None
    nursery.start_soon(mirror.run)
    assert await wait_until(lambda: mirror.job.ready, 60)
    await trio.sleep(2)
    assert mirror.persist is not None and not mirror.persist.al.any()
    assert not mirror.persist.p.any() and mirror.remaining_bytes == 0
    world.trace.mark("ready, checkpointed")
    return mirror


def _explore(capsys: pytest.CaptureFixture[str], name: str, world: World,
             scenario: Callable[[], Awaitable[None]]) -> Report:
    t0 = time.monotonic()
    run_world(world, scenario)
    rep = Explorer(world).run()
    _report(capsys, name, rep, time.monotonic() - t0)
    _assert_clean(rep)
    assert rep.points >= 40, rep.summary()  # a scripted scenario is short, but not empty
    return rep


def _ops_after(world: World, mark: str, kind: str, file: str) -> int:
    ops = world.trace.ops
    start = ops.index(("mark", mark))
    return sum(1 for op in ops[start:] if op[0] == kind and op[1] == file)


@pytest.mark.parametrize("ending", ["cancel", "cancel-force", "fail"])
def test_item1_writes_after_the_job_ended(ending: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 1: a write after the job's end, then a crash."""
    world = _world(11)
    plan = _plan(11)
    expected = State.FAILED if ending == "fail" else State.CANCELLED

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            if ending == "fail":
                world.target.fail_errno = errno.EIO
                await m.write(1 * MiB + 4096, b"f" * 4096)  # its copy fails: job failed
            else:
                m.cancel(force=ending == "cancel-force")
            assert await wait_until(lambda: m.job.ended, 60)
            world.target.fail_errno = 0
            assert m.job.state is expected
            world.trace.mark("ended")
            await m.write(5 * MiB // 2 + 12345, b"w" * 8192)  # an extent not logged
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    rep = _explore(capsys, f"item 1 ({ending})", world, scenario)
    assert _ops_after(world, "ended", "write", "source") >= 1
    _assert_clean(rep)


def test_item5_second_writer_waits_for_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 5: a second writer into an extent whose log entry is on its way to
    the disk, but not there yet."""
    world = _world(5)
    plan = _plan(5)
    extent = 3  # [1.5 MiB, 2 MiB): cold
    seen: dict[str, bool] = {}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            assert m.persist is not None
            hold = world.hold(calls_on(m.persist.sf, "log_extent"))
            a_done, b_done = trio.Event(), trio.Event()

            async def write(offset: int, done: trio.Event) -> None:
                await m.write(offset, random.Random(offset).randbytes(4096))
                done.set()

            nursery.start_soon(write, extent * 512 * KiB + 8192, a_done)
            with trio.fail_after(10):
                await hold.reached.wait()  # A's log entry is held, not yet written
            world.trace.mark("A logs")
            nursery.start_soon(write, extent * 512 * KiB + 200 * KiB, b_done)
            await trio.sleep(0.5)
            seen["B done before A's log"] = b_done.is_set()  # 552a73c: yes
            hold.release.set()
            with trio.fail_after(10):
                await a_done.wait()
                await b_done.wait()
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    rep = _explore(capsys, "item 5", world, scenario)
    assert _ops_after(world, "A logs", "write", "source") >= 2
    _assert_clean(rep)


def test_item6_checkpoint_covers_only_what_both_slots_cover(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 6: covers() during a checkpoint, before the header switch."""
    world = _world(6)
    plan = _plan(6)  # activity-log extents of 512 KiB; the mirror's unflushed ones: 1 MiB
    g = plan.granularity
    seen: dict[str, bool] = {}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            persist = m.persist
            assert persist is not None
            flush = world.hold(calls_on(world.target, "flush"))
            done = trio.Event()

            async def checkpoint() -> None:
                await m.checkpoint()
                done.set()

            nursery.start_soon(checkpoint)
            with trio.fail_after(10):
                await flush.reached.wait()  # the checkpoint flushes the target
            # X: chunk 0 (log extent 0), written and copied while the flush runs, so its
            # 1 MiB unflushed extent (chunks 0-15) goes into the new P whole.
            await m.write(4096, b"x" * 4096)
            assert await wait_until(lambda: m.remaining_bytes == 0, 10)
            world.trace.mark("X copied during the flush")
            state_write = world.hold(lambda fn: persist.lock.locked())
            flush.release.set()
            with trio.fail_after(10):
                await state_write.reached.wait()  # the new slot is being written
            seen["chunk 8 in the new P"] = bool(persist.p[8])
            world.trace.mark("checkpoint writes its slot")
            y_done = trio.Event()

            async def write_y() -> None:
                # Y: chunk 8 (log extent 1, never logged), clean, in the new P only
                await m.write(8 * g + 512, b"y" * 4096)
                y_done.set()

            nursery.start_soon(write_y)
            await trio.sleep(0.5)
            seen["Y done before the switch"] = y_done.is_set()  # 552a73c: yes
            state_write.release.set()
            with trio.fail_after(10):
                await done.wait()
                await y_done.wait()
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    rep = _explore(capsys, "item 6", world, scenario)
    assert seen["chunk 8 in the new P"], "the scenario did not reach item 6's window"
    assert _ops_after(world, "checkpoint writes its slot", "write", "source") >= 1
    _assert_clean(rep)


def test_write_across_a_logged_and_a_covered_extent_does_not_spin(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Not in issue 16; the random scenarios found it on 552a73c (and it was fixed in
    199f2ee meanwhile): a guest write over two activity-log extents, one logged, the
    other's part of the write all in P. ``covers()`` asked P or the log to cover all of it,
    and neither did; ``log()`` skips an extent that is logged and one whose part P covers,
    so it logged nothing, and ``_change`` went round again, yielding each time: the write
    spun at 100% CPU until a checkpoint changed P and the log (``checkpoint_s``, 10 s by
    default). SpinGuard moves the clock on while a task spins, so on 552a73c the write
    ends after the checkpointer's next checkpoint, and the spin is reported: "task ...
    spun from virtual time 2.035 for 1.70 s: ... state.py:237 log <- mirror.py:780 _log
    <- mirror.py:349 _change <- mirror.py:309 write"."""
    world = _world(9)
    plan = _plan(9, checkpoint_s=3.0)
    g = plan.granularity

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            m.pause()  # nothing is copied: what is dirty stays dirty
            await m.write(8 * g, b"0" * 4096)  # chunk 8, log extent 1: logged, dirty
            await m.checkpoint()  # P = {8}, the log empty
            assert m.persist is not None and list(m.persist.p.search(1)) == [8]
            await m.write(7 * g, b"1" * 4096)  # chunk 7, log extent 0: logged, dirty
            world.trace.mark("the write across extents 0 and 1")
            t0 = trio.current_time()
            await m.write(8 * g - 4096, b"2" * 8192)  # chunks 7 and 8
            world.trace.mark(f"it took {trio.current_time() - t0:.3f} s")
            nursery.cancel_scope.cancel()

    rep = _explore(capsys, "write across extents", world, scenario)
    assert not rep.stalls, f"a task spun without waiting: {rep.stalls[0]}"


def test_checkpoint_during_another_target_flush(capsys: pytest.CaptureFixture[str]) -> None:
    """Not in issue 16; the random scenarios found it (on 552a73c and on 9f856d1), fixed
    since (the snapshot includes what a flush in progress has taken): two
    flushes of the target at once. ``_flush_target`` swaps ``_unflushed`` for an empty
    map, then flushes; the flush lock keeps two flushes apart, but not a checkpoint's
    snapshot from another flush. Here, in write-blocking mode: a checkpoint has flushed
    the target and is flushing the source; an active write puts chunk 48 on the target;
    the guest's fsync flushes the source, then the target, whose flush takes
    ``_unflushed`` (chunk 48's extent) and is still running when the checkpoint
    snapshots: its P calls chunk 48 clean, its header switch empties the log, and a power
    loss before the guest's target flush ends keeps the source's write (synced) and
    loses the target's: "seed 12 crash after op 35 (torn): ... resuming the job after a
    crash: 0 bytes to copy (header seq 3, phase running, clean False); chunks [48]" (and
    after op 36, the header's sync, in the power and random variants). The
    same held for the drain's flush in ``_finish`` next to the checkpointer. The fix
    (97fea75) keeps what a flush in flight has taken until it has returned, and the
    snapshot counts it too."""
    world = _world(12)
    plan = _plan(12, copy_mode=CopyMode.WRITE_BLOCKING)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            source_flush = world.hold(calls_on(world.source, "flush"), limit=1)
            checkpointed, fsynced = trio.Event(), trio.Event()

            async def checkpoint() -> None:
                await m.checkpoint()
                checkpointed.set()

            async def fsync() -> None:
                await m.fsync()
                fsynced.set()

            nursery.start_soon(checkpoint)
            with trio.fail_after(10):
                await source_flush.reached.wait()
            world.trace.mark("the checkpoint flushed the target, flushes the source")
            await m.write(3 * MiB + 4096, b"a" * 4096)  # active: source and target
            target_flush = world.hold(calls_on(world.target, "flush"), limit=1)
            nursery.start_soon(fsync)
            with trio.fail_after(10):
                await target_flush.reached.wait()
            world.trace.mark("the guest's fsync flushes the target")
            source_flush.release.set()
            with trio.fail_after(10):
                await checkpointed.wait()
            world.trace.mark("checkpoint done")
            target_flush.release.set()
            with trio.fail_after(10):
                await fsynced.wait()
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    _explore(capsys, "checkpoint during another target flush", world, scenario)


def test_pivot_after_the_state_file_was_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 2's last case: the state file cannot be written (ENOSPC), the job
    drops it and goes on without one, then completes. The pivot must still be recorded
    durably (the pivot registry) before the target goes live, or a crash after the
    pivot leaves no state file, and the next mount would copy the stale source over the
    live target (a new job). On 552a73c: "seed 2 crash after op 28 (kill): the target is
    the live image but the mount would start a new job: no state file" (and, the unlink
    not being synced there, "... the mount would resume" after a power loss)."""
    world = _world(2)
    plan = _plan(2)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            m = await _mount_ready(world, plan, nursery)
            world.fail_state_io(1)  # the next state file write fails
            await m.write(5 * MiB + 4096, b"s" * 4096)  # needs a log entry: dropped
            assert m.persist is None and world.state_failures == 1
            m.complete()
            assert await wait_until(lambda: m.job.ended, 60)
            assert m.job.state is State.COMPLETED
            world.trace.mark("completed")
            await m.write(6 * MiB + 8192, b"t" * 4096)  # goes to the target alone
            await trio.sleep(1)
            nursery.cancel_scope.cancel()

    _explore(capsys, "pivot without a state file", world, scenario)
    assert ("mark", "target-live") in world.trace.ops
    assert _ops_after(world, "completed", "write", "target") >= 1
