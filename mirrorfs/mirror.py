"""The mirror: the guest's write path, the copy loop, and the drain that ends a job.

Invariants (see DOMAIN.md), kept where the comments say:
 1. A guest write marks its chunks dirty only after the data is in the source; the copier
    clears a chunk's bit before it reads the source. A write racing a copy re-dirties the
    chunk and it is copied again.
 2. Never two operations on overlapping chunks at once: every copy and every active write
    holds its chunk range in ``_busy`` (busy.py) while it runs; an active write waits for
    overlapping ones first, and the copier never picks a busy chunk.
 3. A failed copy or active write marks its range dirty again *before* the error policy
    runs. Nothing is dropped.
 4. The pivot (and a cancel in ready) closes a gate in front of guest writes, waits for what
    is in flight, copies what is still dirty, flushes the target, switches, reopens.
 6. A target error never becomes a guest I/O error, nor a guest write that waits without
    end: every error opens the drain's gate, which closes again only once a copy succeeds.
 7. A copy counts as done for good only once a flush of the target covers it
    (durability.py: the unflushed map and the target epoch). A copy or active write begun
    in an older epoch does not count; a checkpoint flushes first, then snapshots dirty,
    busy, everything written since the flush began and what a flush in progress took.
 8. What protects a write after a crash is what is on disk (state.py): a guest write to a
    chunk the saved bitmap does not cover waits until its extent's log entry is synced.
 9. A phase change that later mounts rely on is durable before its effect: the end of a
    job before writes stop being tracked (``_record_end``), the pivot before the target is
    served (``_record_pivot``: the registry and the state file); no state means no resume.

Concurrency model: everything here runs on the trio thread except the copier's
``copy_batch`` and ``plan_batch`` (copier.py), which a worker thread runs for a batch of
copy operations (to a local target, and the source reads of a batch to NBD), and which
touch only the two images and the batch's ops. Guest I/O to files is done inline (a
syscall on a page-cache file costs microseconds; a thread round trip costs 100). An NBD
target is a trio-native client: guest writes to it are awaited on the trio thread, and a
copy batch to it reads the source in one worker-thread call, then sends its ops as
concurrent tasks, which the client pipelines on one connection.
"""

import errno
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from bitarray import bitarray

from mirrorfs.bitmap import DirtyBitmap
from mirrorfs.busy import BusyRanges
from mirrorfs.changes import Change, Fallocate, Target, Write, apply, retried
from mirrorfs.checkpointer import Checkpointer
from mirrorfs.config import MirrorConfig
from mirrorfs.copier import BatchCopier, CopyError, CopyOp
from mirrorfs.drain import Gate, PivotRecords
from mirrorfs.durability import TargetDurability, flush_image
from mirrorfs.images import Image
from mirrorfs.job import ENDED, Job, State, Verb, VerbRefused
from mirrorfs.nbd import NBDImage
from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode
from mirrorfs.picker import Picker
from mirrorfs.ratelimit import RateMeter, TokenBucket
from mirrorfs.state import ActivityLog

log = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20

RunSync = Callable[..., Awaitable[Any]]


class Mirror:
    def __init__(self, source: Image, target: Target, cfg: MirrorConfig,
                 job: Job | None = None, clock: Callable[[], float] = trio.current_time,
                 pid: int | None = None, run_sync: RunSync | None = None,
                 persist: ActivityLog | None = None, resume: bitarray | None = None,
                 resume_info: dict[str, Any] | None = None,
                 record_pivot: Callable[[], None] | None = None,
                 forget_pivot: Callable[[], None] | None = None) -> None:
        self.source, self.target, self.cfg = source, target, cfg
        self.size = source.size
        self.job = job if job is not None else Job()
        self._now = clock
        # How blocking I/O leaves the trio thread: worker threads. Tests that drive time
        # with trio's autojump clock pass an inline runner, since a clock that jumps while
        # a thread works would make every rate meaningless.
        self._run_sync: RunSync = run_sync or trio.to_thread.run_sync
        self.pid = pid if pid is not None else os.getpid()
        self.bitmap = DirtyBitmap(self.size, cfg.granularity)
        self.serving: Target = source
        self.copy_mode = cfg.copy_mode
        self.actively_synced = False
        self.bucket = TokenBucket(cfg.speed, clock())
        self.meter = RateMeter()
        self._t0 = clock()
        self._busy = BusyRanges(on_release=self._wake)  # invariant 2 (busy.py)
        self._picker = Picker(self.bitmap, self._busy, source, self.size, cfg.max_op_bytes,
                              cfg.ops_per_batch, cheap_zeroes=lambda: target.zeroes_cheaply,
                              epoch=lambda: self._durable.epoch)
        self._copier = BatchCopier(source, target, cfg.granularity)
        self._batches = 0
        self._inflight_data = 0
        self._wakeup = trio.Event()
        self._gate = Gate()  # closed: guest writes wait (drain.py)
        self._abandon = False  # cancel force / cancel before ready: stop, copy nothing more
        self._untracked = False  # the job's end (or the pivot) is durable: see ``tracking``
        self._paused_from: State | None = None
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._buffers: list[bytearray] = []
        # A batch to a local target reuses one op-sized buffer; one to NBD holds all its ops'
        # data at once (they are sent concurrently).
        self._buf_bytes = max(cfg.max_op_bytes, cfg.granularity) + (
            cfg.batch_bytes if isinstance(target, NBDImage) else 0)
        # Invariant 7: what the target holds for good (durability.py).
        self._durable = TargetDurability(target, self.bitmap, self._run_sync,
                                         on_loss=self._wake, tracking=lambda: self.tracking)
        self._source_flush_failed = False  # a checkpoint's fsync of the source failed
        # statistics
        self.copied_bytes = 0  # bytes made equal on the target (data and zeros)
        self.zeroed_bytes = 0  # ... of which written as holes / zero ranges
        self.active_bytes = 0  # ... of which written by active (write-blocking) writes
        self.guest_ops = 0  # reads and writes: the copier backs off while this moves
        self._ops_seen = 0
        self._batch_done_at = 0.0
        self._copier_idle = False  # the loop waits for work: guest writes must wake it
        self._state = Checkpointer(
            persist, self.job, interval_s=cfg.checkpoint_s,
            max_logged_extents=cfg.max_logged_extents, nchunks=self.bitmap.nchunks,
            snapshot=self._snapshot, flush_images=self._flush_images,
            on_copy_error=self._on_error, copied=lambda: self.copied_bytes, clock=clock)
        # The pivot registry (pivots.py): blocking calls, run off the trio thread. The pivot
        # is recorded there before the target goes live, and forgotten if it does not.
        self._pivot_records = PivotRecords(
            self._state, source.path, record_pivot, forget_pivot,
            flush_source=lambda: self._flush(self.source), run_sync=self._run_sync)
        # Called right before a guest write is copied into the source inline, with nothing
        # after it that can suspend: the FUSE layer's write read-ahead (see mount.py).
        self.before_inline_write: Callable[[int], None] | None = None
        self._mark_initial(resume, resume_info or {})

    # ================================================================== setup
    def _mark_initial(self, resume: bitarray | None, resume_info: dict[str, Any]) -> None:
        sync = self.cfg.sync
        if resume is not None:
            # Everything that may differ after the previous run: its saved bitmap plus the
            # extents of its activity log (see state.py).
            self.bitmap.mark_from(resume)
        elif sync in (SyncMode.FULL, SyncMode.TOP) and not self.cfg.target_fresh:
            # An existing target may hold anything where the source has holes: copy
            # everything (holes become punch-hole/zero-range ops, never zero data).
            self.bitmap.mark_all()
        elif sync in (SyncMode.FULL, SyncMode.TOP):
            # A target we created reads as zeros, as the source's holes do: only the data
            # extents can differ (QEMU's mirror skips the same on a zero-initialized target).
            # Nothing punches 1023 holes of a 64 GiB image that has them already.
            for start, end in self.source.data_extents():
                self.bitmap.mark(start, end - start)
        self.job.emit("started", source=self.source.path, target=self.target.path,
                      size=self.size, sync=str(sync), copy_mode=str(self.copy_mode),
                      granularity=self.cfg.granularity, speed=self.bucket.rate,
                      remaining_bytes=self.bitmap.dirty_bytes, resumed=resume is not None,
                      **resume_info)

    # ================================================================== guest I/O
    @property
    def tracking(self) -> bool:
        """Are guest writes recorded (marked dirty, logged in the state file)? Until the
        job's end is durable (invariant 9, ``_record_end``), also after the job ended: a
        crash before that resumes a job, which must copy them. After the pivot the guest's
        writes go to the target alone."""
        return not self._untracked

    @property
    def _active(self) -> bool:
        # Write-blocking mode; also while draining towards the pivot or a consistent cancel,
        # so that complete and cancel converge however fast the guest writes.
        return not self.job.ended and not self._abandon and (
            self.copy_mode is CopyMode.WRITE_BLOCKING
            or self.job.state in (State.COMPLETING, State.CANCELLING))

    async def read(self, offset: int, length: int) -> bytes:
        self.guest_ops += 1
        serving = self.serving
        if isinstance(serving, NBDImage):
            return await retried(serving, lambda: serving.pread(length, offset))
        return serving.pread(length, offset)

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """A guest's write. ``data`` may be a view of the FUSE request: it is used only
        until this returns (both images are written by then, or the range is dirty).
        The disk does not grow: a write past its end fails whole, as on a block device,
        and changes nothing (a tail the job does not know would never be mirrored)."""
        if offset + len(data) > self.size:
            raise OSError(errno.ENOSPC, f"write past the end of the {self.size}-byte disk")
        await self._change(offset, len(data), Write(offset, memoryview(data)))
        return len(data)

    async def fallocate(self, mode: int, offset: int, length: int) -> None:
        """A guest's punch-hole or zero-range: applied like a write of zeros."""
        length = min(length, self.size - offset)
        if length <= 0:
            return

        await self._change(offset, length, Fallocate(mode))

    async def allocate(self, mode: int, offset: int, length: int) -> None:
        """A plain fallocate (no content change): on the serving image only."""
        length = min(length, self.size - offset)
        if length > 0:
            await apply(self.serving, Fallocate(mode), offset, offset + length)

    async def _change(self, offset: int, length: int, change: Change) -> None:
        """Change bytes [offset, offset + length) of the disk the way the job needs."""
        self.guest_ops += 1
        persist = self.persist
        while True:
            await self._gate.wait_open()
            if not self.tracking:
                await apply(self.serving, change, offset, offset + length)
                return
            if self._active:
                if await self._active_change(offset, length, change):
                    return
                continue  # the gate closed or the job ended while it waited
            if persist is None:
                break
            a, b = self.bitmap.chunks_of(offset, length)
            if persist.covers(a, b):
                break
            # Crash safety: the extent must be in the activity log on disk before the
            # source changes. Then look at the gate again: it may have closed meanwhile.
            await self._state.log(a, b)
            persist = self.persist
        # No checkpoint from here to the mark: the change and its dirty bit are atomic
        # with respect to the copier, checkpoints and the drain. The mark comes even after
        # a failure: a write that failed halfway may have changed the source.
        self._announce_inline_write(change, length)  # nothing from here on can suspend
        try:
            change.local(self.source, offset, offset + length)
        finally:
            self.bitmap.mark(offset, length)  # invariant 1: after the data is in the source
            if self._copier_idle:  # else a batch's end or a timer wakes the loop anyway
                self._wakeup.set()

    async def _flush(self, img: Target) -> None:
        await flush_image(img, self._run_sync)

    def _wake(self) -> None:
        self._wakeup.set()

    async def fsync(self) -> None:
        serving = self.serving
        if isinstance(serving, NBDImage):
            await retried(serving, serving.flush)
            return
        if self._source_flush_failed and serving is self.source:
            # A checkpoint's fsync took the write-back error the guest must hear about.
            self._source_flush_failed = False
            raise OSError(errno.EIO, "writing back the source failed")
        await self._flush(serving)
        if serving is self.source and self._active:
            try:
                await self._durable.flush()
            except OSError as e:  # invariant 6: the guest's fsync succeeded on its image
                self._on_error(CopyError("target", 0, self.size, e))

    async def _active_change(self, offset: int, length: int, change: Change) -> bool:
        """Write-blocking: source, then target, before the guest's write returns. False if
        the drain's gate closed or the job ended while it waited: the caller looks at the
        gate again (invariant 4: nothing may change the images once the drain has seen
        nothing busy), then applies the change the way the job now needs."""
        a, b = self.bitmap.chunks_of(offset, length)
        # Invariant 2: wait for overlapping copies and active writes, then hold the range
        # (the check and the hold happen with no checkpoint in between).
        while (other := self._busy.overlap(a, b)) is not None:
            await other.done.wait()
        if self._gate.closed or not self._active:
            return False
        busy = self._busy.hold(a, b, 0)
        try:
            if self.persist is not None and not self.persist.covers(a, b):
                # held chunks are in every checkpoint, so a checkpoint meanwhile is safe
                await self._state.log(a, b)
            if not isinstance(self.target, NBDImage):  # both writes inline: no await left
                self._announce_inline_write(change, length)
            try:
                change.local(self.source, offset, offset + length)
            except BaseException:
                self.bitmap.mark_chunks(a, b)  # it may have changed part of the source
                raise
            lo, hi = self._target_part(offset, offset + length)
            if lo < hi:
                epoch = self._durable.check_epoch()
                try:
                    if not await self._apply_to_target(change, lo, hi):
                        self.bitmap.mark_chunks(a, b)  # the copier writes these zeros
                        return True
                except OSError as e:
                    self.bitmap.mark_chunks(a, b)  # invariant 3, then the policy
                    self._on_error(CopyError("target", lo, hi - lo, e))
                except BaseException:
                    self.bitmap.mark_chunks(a, b)  # cancelled: the target may lack it
                    raise
                else:
                    if self._durable.check_epoch() != epoch:
                        self.bitmap.mark_chunks(a, b)  # the target may have lost it
                        return True
                    ca, cb = self._full_chunks(lo, hi)
                    self.bitmap.clear_chunks(ca, cb)
                    self._durable.note_written(lo, hi - lo)
                    self.active_bytes += hi - lo
                    self.copied_bytes += hi - lo
        finally:
            self._busy.release(busy)
        return True

    async def _apply_to_target(self, change: Change, lo: int, hi: int) -> bool:
        """An active write's target part. A guest's punch or zero-range becomes the
        target's own way to read zeros (a hole, or zero-range on a device), never the
        guest's mode, which the target may lack (tmpfs has no zero-range). False where it
        cannot zero without writing zero data: the caller leaves the chunks dirty and the
        copier writes the zeros, sized and rate-limited as data."""
        target = self.target
        if isinstance(change, Fallocate) and not isinstance(target, NBDImage):
            return target.write_zeroes(lo, hi - lo, cheap_only=True)
        await apply(target, change, lo, hi)
        return True

    def _announce_inline_write(self, change: Change, length: int) -> None:
        """Tell the FUSE layer that a guest write is about to be copied inline and that
        nothing after it in this request can suspend (its read-ahead relies on that)."""
        if self.before_inline_write is not None and type(change) is Write:
            self.before_inline_write(length)

    def _target_part(self, lo: int, hi: int) -> tuple[int, int]:
        """The part of a guest write that can go to the target now: all of it, except the
        partly covered chunks at either end that are still dirty (the target lacks the rest
        of those chunks; the copier brings them over whole)."""
        g = self.cfg.granularity
        bm = self.bitmap
        if hi <= lo:
            return lo, lo
        head = lo // g
        head_end = min((head + 1) * g, self.size)
        if (lo % g or hi < head_end) and bm.is_dirty(head):
            lo = head_end
        tail = (hi - 1) // g
        if hi < min((tail + 1) * g, self.size) and tail * g >= lo and bm.is_dirty(tail):
            hi = tail * g
        return lo, max(lo, hi)

    def _full_chunks(self, lo: int, hi: int) -> tuple[int, int]:
        g = self.cfg.granularity
        a = -(-lo // g)
        b = self.bitmap.nchunks if hi >= self.size else hi // g
        return a, max(a, b)

    # ================================================================== verbs
    def complete(self) -> None:
        self.job.check(Verb.COMPLETE)
        self.job.transition(State.COMPLETING, "completing",
                            remaining_bytes=self.remaining_bytes)
        self._wakeup.set()

    def cancel(self, force: bool = False) -> None:
        verb = Verb.CANCEL_FORCE if force else Verb.CANCEL
        self.job.check(verb)
        was = self.job.state
        # Before ready, a cancel has nothing consistent to offer: it abandons at once.
        self._abandon = force or not self.job.ready
        if was is State.PAUSED:
            self._paused_from = None
        self.job.transition(State.CANCELLING, "cancelling", force=force,
                            remaining_bytes=self.remaining_bytes)
        self._gate.open()
        self._wakeup.set()

    def pause(self) -> None:
        self.job.check(Verb.PAUSE)
        self._pause(None)

    def _pause(self, error: str | None) -> None:
        self._paused_from = self.job.state
        self.job.transition(State.PAUSED, "paused", **({"error": error} if error else {}))
        self._gate.open()  # never hold the guest while nothing copies
        self._wakeup.set()

    def resume(self) -> None:
        self.job.check(Verb.RESUME)
        back = self._paused_from or (State.READY if self.job.ready else State.COPYING)
        self._paused_from = None
        self.job.error = None
        self._backoff_s = self._backoff_until = 0.0
        self.job.transition(back, "resumed", state=str(back))
        self._wakeup.set()

    def set_speed(self, speed: int) -> None:
        self.job.check(Verb.SPEED)
        self.bucket.set_rate(speed, self._now())
        self.job.emit("speed", speed=speed)
        self._wakeup.set()

    def set_copy_mode(self, mode: CopyMode) -> None:
        self.job.check(Verb.COPY_MODE)
        if mode is self.copy_mode:
            return
        if mode is CopyMode.BACKGROUND:
            raise VerbRefused(Verb.COPY_MODE, self.job.state,
                              "the copy mode can only change from background to write-blocking")
        self.copy_mode = mode
        self.actively_synced = False
        self.job.emit("copy_mode", copy_mode=str(mode))
        self._wakeup.set()

    # ================================================================== errors
    def _on_error(self, err: CopyError) -> None:
        """Apply the error policy. The failed range is already dirty again (invariant 3)."""
        policy = self.cfg.on_source_error if err.side == "source" else self.cfg.on_target_error
        msg = str(err)
        log.error("%s (policy: %s)", msg, policy)
        if self.job.ended or self._abandon:
            return  # nothing more is copied anyway
        self.job.emit("error", side=err.side, message=msg, action=str(policy),
                      offset=err.offset, length=err.length)
        if policy is ErrorPolicy.REPORT:
            self._fail(msg)
        elif policy is ErrorPolicy.STOP:
            self.job.error = msg
            if self.job.state is not State.PAUSED and not self._abandon:
                self._pause(msg)
        else:
            self.job.error = msg
            self._backoff_s = min(max(self._backoff_s * 2, 0.1), self.cfg.max_backoff_s)
            self._backoff_until = self._now() + self._backoff_s
        # Invariant 6: a closed gate must not hold the guest while the copy behind it keeps
        # failing. It closes again only once a copy has succeeded (``_step``).
        self._gate.open()
        self._wakeup.set()

    def _fail(self, msg: str) -> None:
        self.job.error = msg
        self.job.target_consistent = False
        self.job.transition(State.FAILED, "failed", error=msg)
        self._gate.open()

    # ================================================================== status
    @property
    def inflight_bytes(self) -> int:
        n = 0
        for busy in self._busy:
            if busy.copy_bytes:
                start, end = self.bitmap.byte_range(busy.a, busy.b)
                # chunks re-dirtied during their copy are counted as dirty already
                n += end - start - self.bitmap.count(busy.a, busy.b) * self.cfg.granularity
        return max(n, 0)

    @property
    def remaining_bytes(self) -> int:
        if self.job.state is State.COMPLETED or (self.job.state is State.CANCELLED
                                                  and self.job.target_consistent):
            return 0
        return min(self.size, self.bitmap.dirty_bytes + self.inflight_bytes)

    def status(self) -> dict[str, Any]:
        now = self._now()
        remaining = self.remaining_bytes
        done = self.copied_bytes
        progress = 100.0 if remaining == 0 else math.floor(1000 * done / (done + remaining)) / 10
        rate = self.meter.rate(now, self._t0)
        job = self.job
        return {
            "state": str(job.state),
            "ready": job.ready,
            "serving": "target" if self.serving is self.target else "source",
            "size": self.size,
            "sync": str(self.cfg.sync),
            "copy_mode": str(self.copy_mode),
            "granularity": self.cfg.granularity,
            "speed": self.bucket.rate,
            "copied_bytes": done,
            "remaining_bytes": remaining,
            "progress": progress,
            "target_consistent": job.target_consistent,
            "error": job.error,
            "pid": self.pid,
            "source": self.source.path,
            "target": self.target.path,
            "buf_size": self.cfg.buf_size,
            "on_source_error": str(self.cfg.on_source_error),
            "on_target_error": str(self.cfg.on_target_error),
            "actively_synced": self.actively_synced,
            "dirty_bytes": self.bitmap.dirty_bytes,
            "in_flight_bytes": self.inflight_bytes,
            "zeroed_bytes": self.zeroed_bytes,
            "active_bytes": self.active_bytes,
            "rate": round(rate),
            "eta_seconds": round(remaining / rate, 1) if rate > 0 and remaining else None,
            "elapsed_seconds": round(now - self._t0, 1),
        }

    # ================================================================== the copy loop
    async def run(self) -> None:
        """The copy loop; returns when the job has ended. Worker batches run in a nursery
        of their own, so the loop always waits for them (no copy outlives the job)."""
        async with trio.open_nursery() as nursery:
            if self.persist is not None:
                nursery.start_soon(self._state.run)
            while not self.job.ended:
                await self._step(nursery)
            nursery.cancel_scope.cancel()  # the checkpointer; batches are done by now
        log.info("mirror loop ended in state %s", self.job.state)
        await self._record_end()

    async def _record_end(self) -> None:
        """Invariant 9: the job's end is durable before guest writes stop being tracked.
        Until then they are marked and logged as during the job, so a crash meanwhile
        resumes a job that copies them; after it, the next mount starts a new job (a full
        copy). A completed job recorded its end before the pivot."""
        if self.serving is self.target:
            return
        if await self._state.record_end(str(self.job.state)):
            self._untracked = True

    # ------------------------------------------------------------------ the state file
    def _snapshot(self, into: bitarray) -> None:
        """What may differ between source and target, as far as the disk knows, right after
        a flush of both: dirty, in flight, written since the flush began, and what another
        flush of the target (a guest's fsync) has taken but not yet made durable."""
        self._durable.check_epoch()
        self.bitmap.copy_into(into)
        for busy in self._busy:
            into[busy.a:busy.b] = 1
        for a, b in self._durable.chunk_runs(flushing=True):
            into[a:b] = 1

    @property
    def persist(self) -> ActivityLog | None:
        """The state file's activity log (None: no state file, never kept or dropped)."""
        return self._state.persist

    async def checkpoint(self, flush: bool = True, **fields: Any) -> None:
        """Save the job's state now (see checkpointer.py)."""
        await self._state.checkpoint(flush, **fields)

    async def save_final_state(self, source_id: dict[str, Any],
                               target_id: dict[str, Any]) -> None:
        """At unmount, with the copier stopped: a clean stop records the exact bitmap and
        the images' identities, so that the next mount resumes from here (and refuses if
        either image changes meanwhile)."""
        persist = self.persist
        if persist is None:
            return
        state = self.job.state
        try:
            if state is State.COMPLETED:
                return  # recorded before the pivot
            if state in (State.CANCELLED, State.FAILED) or self._abandon:
                # (a cancel force that the loop had not acted on yet ends the job too)
                await persist.set_fields(phase="cancelled" if self._abandon else str(state))
                return
            # unmounted and the copier stopped: nothing changes the images any more
            await self.checkpoint(phase="running", clean=True, source=source_id,
                                  target=target_id)
            log.info("saved the job's state: %d bytes left to copy", self.bitmap.dirty_bytes)
        except (OSError, CopyError) as e:
            log.error("cannot save the job's state in %s: %s", persist.sf.path, e)

    async def _flush_images(self) -> None:
        try:
            await self._durable.flush()
        except OSError as e:
            raise CopyError("target", 0, self.size, e) from e
        try:
            await self._flush(self.source)
        except OSError:
            self._source_flush_failed = True  # the guest's next fsync must hear of it
            raise

    async def _step(self, nursery: trio.Nursery) -> None:
        self._wakeup = trio.Event()
        state = self.job.state
        now = self._now()
        if state is State.CANCELLING and self._abandon:
            if not self._busy:
                self._end(State.CANCELLED, consistent=False)
                return
            await self._wakeup.wait()
            return
        if state is State.PAUSED:
            await self._wakeup.wait()
            return
        if now < self._backoff_until:
            with trio.move_on_after(self._backoff_until - now):
                await self._wakeup.wait()
            return
        if self._backoff_s and not self._busy and not self.bitmap.dirty_chunks:
            self._backoff_s = 0.0  # nothing left to retry: the error is behind us
        draining = state in (State.COMPLETING, State.CANCELLING)
        if draining and not self._gate.closed and not self._backoff_s \
                and self.remaining_bytes <= self.cfg.drain_bytes:
            self._gate.close()  # invariant 4: stop admitting writes
        if self._gate.closed and not self._busy and not self.bitmap.dirty_chunks:
            await self._finish()
            return
        delay = self._start_batches(nursery, unthrottled=self._gate.closed)
        if not self._busy and not self.bitmap.dirty_chunks:
            await self._caught_up()
            if self.job.ended or self.job.state is not state:
                return
        if delay:
            with trio.move_on_after(delay):
                await self._wakeup.wait()
        else:
            self._copier_idle = not self._busy
            try:
                await self._wakeup.wait()
            finally:
                self._copier_idle = False

    def _start_batches(self, nursery: trio.Nursery, unthrottled: bool) -> float:
        """Start worker batches while buffer space and tokens last. Returns how long to
        wait for tokens or for the guest back-off (0: wait for a wakeup)."""
        cfg = self.cfg
        max_batches = max(1, cfg.buf_size // cfg.batch_bytes)
        batch_bytes = cfg.batch_bytes
        if not unthrottled and self._guest_busy():
            max_batches, batch_bytes = 1, cfg.max_op_bytes
            if not self._batches:
                wait = self._batch_done_at + cfg.guest_backoff_s - self._now()
                if wait > 0:
                    return wait
        while self._batches < max_batches and self._inflight_data < cfg.buf_size:
            budget = min(batch_bytes, cfg.buf_size - self._inflight_data)
            if not unthrottled:
                now = self._now()
                allowance = self.bucket.allowance(now, batch_bytes)
                if allowance == 0:
                    return self.bucket.delay(now, batch_bytes)
                if allowance is not None:
                    budget = min(budget, allowance)
            ops, data = self._picker.pick(max(budget, cfg.granularity))
            if not ops:
                return 0.0
            if not unthrottled:
                self.bucket.charge(data, self._now())
            self._batches += 1
            self._inflight_data += data
            nursery.start_soon(self._run_batch, ops, data)
        return 0.0

    def _guest_busy(self) -> bool:
        """Has the guest done I/O since the last look?"""
        busy = self.guest_ops != self._ops_seen
        self._ops_seen = self.guest_ops
        return busy

    async def _run_batch(self, ops: list[CopyOp], data: int) -> None:
        buf = self._buffers.pop() if self._buffers else bytearray(self._buf_bytes)
        try:
            if isinstance(self.target, NBDImage):
                await self._copy_batch_remote(self.target, ops, buf)
            else:
                # the first pass into a new target fills holes (see copier.py)
                self._copier.preallocate = self.cfg.target_fresh and not self.job.ready
                await self._run_sync(self._copier.copy_batch, ops, buf)
        except (CopyError, OSError) as e:
            # Every error in a batch reaches the error policy (``_settle``), none the loop:
            # an escaping one would end the daemon and leave the guest a dead mount.
            undone = next((op for op in ops if not op.done and op.error is None), None)
            if undone is not None:
                undone.error = e if isinstance(e, CopyError) else CopyError(
                    "target", undone.offset, undone.length, e)
        finally:
            self._buffers.append(buf)
            self._batch_done_at = self._now()
            self._batches -= 1
            self._inflight_data -= data
            self._settle(ops)

    def _settle(self, ops: list[CopyOp]) -> None:
        now = self._now()
        first_error: CopyError | None = None
        epoch = self._durable.check_epoch()
        for op in ops:
            if op.done and op.epoch != epoch:
                op.done = False  # the target may have lost it (invariant 7)
            if not op.done:
                self.bitmap.mark_chunks(op.a, op.b)  # invariant 3: dirty again first
                first_error = first_error or op.error
            else:
                self._durable.note_written(op.offset, op.length)
                self.copied_bytes += op.length
                self.zeroed_bytes += op.zero_bytes
                self.meter.add(op.length, now)
            assert op.busy is not None
            self._busy.release(op.busy)
        if first_error is not None:
            self._on_error(first_error)
        elif self._backoff_s and not self.job.ended:
            # only the ignore policy backs off: its error is over once a copy succeeds
            self._backoff_s = 0.0
            self.job.error = None
        self._wakeup.set()

    # ------------------------------------------------------------------ to an NBD export
    async def _copy_batch_remote(self, target: NBDImage, ops: list[CopyOp],
                                 buf: bytearray) -> None:
        """Read the batch's source data in one worker-thread call, then send every op as a
        task of its own: the client pipelines them on its connection. Ops not done are
        marked dirty again by ``_settle``."""
        try:  # a connection that dropped: connect again before the retry
            await target.reconnect()
        except OSError as e:
            ops[0].error = CopyError("target", ops[0].offset, ops[0].length, e)
            return
        epoch = self._durable.check_epoch()  # a replaced connection: old epochs' copies void
        for op in ops:
            op.epoch = epoch  # nothing of these is written yet
        plans = await self._run_sync(self._copier.plan_batch, ops, buf)
        async with trio.open_nursery() as nursery:
            for op, plan in zip(ops, plans, strict=False):
                nursery.start_soon(self._copier.send_op, target, op, plan)

    # ------------------------------------------------------------------ phases
    async def _caught_up(self) -> None:
        """Nothing dirty and nothing in flight: the target equals the source. Ready is
        reported only after a flush of the target, as QEMU's mirror does: from then on the
        target durably holds the source as of the moment it caught up (writes made during
        the flush are dirty, as any later write in ready)."""
        if self.copy_mode is CopyMode.WRITE_BLOCKING and not self.actively_synced:
            self.actively_synced = True
            self.job.emit("actively_synced")
        if self.job.state is State.COPYING:
            epoch = self._durable.epoch
            try:
                await self._durable.flush()
            except OSError as e:  # what it should have covered is dirty again
                self._on_error(CopyError("target", 0, self.size, e))
                return
            if self.job.state is not State.COPYING or self._durable.check_epoch() != epoch:
                return  # paused, cancelled or a lost target meanwhile: go round again
            self._state.soon = True  # a crash right after ready must not recopy all
            self.job.ready = True
            self.job.transition(State.READY, "ready", copied_bytes=self.copied_bytes,
                                elapsed_seconds=round(self._now() - self._t0, 3))

    async def _finish(self) -> None:
        """The gate is closed, nothing is dirty or in flight: flush, then pivot or end.
        Every await is followed by the same check: a checkpoint's failing flush, a pause or
        a replaced connection may have changed the picture meanwhile; then go round again."""
        epoch = self._durable.epoch
        try:
            await self._durable.flush()
        except OSError as e:  # what the flush should have covered is dirty again
            self._gate.open()
            self._on_error(CopyError("target", 0, self.size, e))
            return
        if not self._drained(epoch):
            return
        if self.job.state is State.COMPLETING:
            # Shielded: an unmount must not leave the registry and the state file saying
            # different things. The gate stays closed until the records are made or undone:
            # no write may be acknowledged on the source while they say the target is live.
            with trio.CancelScope(shield=True), self._gate.held():
                try:
                    await self._pivot_records.record()
                except OSError as e:
                    self._gate.open()
                    self._fail(f"cannot record the pivot: {e.strerror or e}")
                    return
                if self.job.state is not State.COMPLETING or not self._drained(epoch):
                    # not pivoting after all (a cancel force, a pause, a loss meanwhile)
                    await self._pivot_records.undo()
                    return
                self.serving = self.target  # from now on the guest's I/O goes there
                self._untracked = True
            self._end(State.COMPLETED, consistent=True)
        elif self.job.state is State.CANCELLING:
            self._end(State.CANCELLED, consistent=True)

    def _drained(self, epoch: int) -> bool:
        """Still draining, gate closed, nothing busy or dirty, no loss since ``epoch``?"""
        return (self.job.state in (State.COMPLETING, State.CANCELLING)
                and self._gate.closed and not self._busy
                and not self.bitmap.dirty_chunks and self._durable.check_epoch() == epoch)

    def _end(self, state: State, consistent: bool) -> None:
        assert state in ENDED
        self.job.target_consistent = consistent
        details: dict[str, Any] = {"copied_bytes": self.copied_bytes,
                                   "target_consistent": consistent}
        if state is State.CANCELLED and not consistent:
            details["remaining_bytes"] = self.remaining_bytes
        self.job.transition(state, str(state), **details)
        self._gate.open()
