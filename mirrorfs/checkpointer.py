"""The job's state file, from the job's side (state.py is the format): when a checkpoint
is taken, what it may claim, how the end of a job is recorded, and what happens when the
file cannot be written.

Invariants kept here (DOMAIN.md):
 8. A checkpoint claims clean only what a flush covered: both images are flushed first
    (outside the state file's lock: a slow target flush must not hold up guest writes that
    need a log entry), then the mirror's snapshot (dirty, in flight, written since that
    flush, taken by a flush in progress) is written.
 9. No state means no resume, never a silent one: a state file that cannot be written is
    removed durably (or its headers zeroed) and the job goes on without one; if neither
    works, guest writes stay tracked for good (``keep_tracking``).
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from bitarray import bitarray

from mirrorfs.copier import CopyError
from mirrorfs.job import Job
from mirrorfs.state import ActivityLog, StateFileLost, remove_durably

log = logging.getLogger(__name__)


class Checkpointer:
    """``persist`` is the state file's activity log, None once there is none (never kept,
    or dropped). ``snapshot`` fills a bitmap with what may differ; ``flush_images``
    flushes target then source (raising CopyError for the target's failure);
    ``copied`` reads the job's copied bytes (a checkpoint is due only on progress)."""

    def __init__(self, persist: ActivityLog | None, job: Job, *, interval_s: float,
                 max_logged_extents: int, nchunks: int,
                 snapshot: Callable[[bitarray], None],
                 flush_images: Callable[[], Awaitable[None]],
                 on_copy_error: Callable[[CopyError], None],
                 copied: Callable[[], int], clock: Callable[[], float]) -> None:
        self.persist = persist
        self.job = job
        # a huge bitmap (16 TiB: 32 MiB) is saved less often: at most ~8 MiB/s of metadata
        self.interval_s = max(interval_s, nchunks / 8 / (8 << 20))
        self.max_logged_extents = max_logged_extents
        self._snapshot, self._flush_images = snapshot, flush_images
        self._on_copy_error, self._copied, self._now = on_copy_error, copied, clock
        self.soon = False  # take one at the next look (set at ready)
        self.keep_tracking = False  # a stale state file could not be removed

    async def run(self) -> None:
        """The periodic task: every ``interval_s`` when the copy progressed or the log
        holds entries, at once when asked (``soon``) or when the log is full."""
        last, last_copied = self._now(), self._copied()
        while self.persist is not None:
            await trio.sleep(0.5)
            persist = self.persist
            if persist is None:
                return
            al_full = persist.al.count(1) >= self.max_logged_extents
            due = self._now() - last >= self.interval_s
            if al_full or self.soon or (
                    due and (self._copied() != last_copied or persist.al.any())):
                self.soon = False
                try:
                    await self.checkpoint()
                except CopyError as e:  # the target's flush: its extents are dirty again
                    self._on_copy_error(e)
                except StateFileLost as e:
                    self.drop(e)
                except OSError as e:
                    log.error("cannot save the job's state: %s", e)
                    self.job.emit("error", side="state", message=f"saving state: {e}",
                                  action="retry")
                last, last_copied = self._now(), self._copied()

    async def checkpoint(self, flush: bool = True, **fields: Any) -> None:
        """Save the job's state. Without ``flush`` (the first one, before any guest write)
        the snapshot claims clean only what was clean when the job started, and what a
        flush covered since. Raises StateFileLost if the file is no good now."""
        if self.persist is None:
            return
        if flush:
            await self._flush_images()
        if self.persist is not None:
            await self.persist.checkpoint(self._snapshot, **fields)

    async def log(self, a: int, b: int) -> None:
        """Log chunks [a, b) before a guest write proceeds. If the state file cannot be
        written, the guest's write must still succeed (a state file is not the disk)."""
        if self.persist is None:
            return
        try:
            await self.persist.log(a, b)
        except OSError as e:
            self.drop(e)

    async def set_phase(self, **fields: Any) -> None:
        """Write the header (a phase change): raises OSError, the caller decides."""
        if self.persist is not None:
            await self.persist.set_fields(**fields)

    def drop(self, e: OSError) -> bool:
        """Stop using a state file that cannot be written: remove it, durably (no state
        means no resume: the next mount starts a new job, a full copy). False if it could
        not be removed either: it then still says what it said, and tracking never stops."""
        persist = self.persist
        if persist is None:  # another task dropped it meanwhile
            return not self.keep_tracking
        path = persist.sf.path
        self.persist = None
        removed = remove_durably(path) or persist.sf.void()
        if removed:
            msg = f"cannot write the state file {path} ({e.strerror or e}): the job goes " \
                  "on without one, and a crash now means a full copy"
        else:
            self.keep_tracking = True
            msg = f"cannot write or remove the state file {path} ({e.strerror or e}): " \
                  "remove it by hand before the next mount, or mount with --fresh"
        log.error("%s", msg)
        self.job.emit("error", side="state", message=msg, action="dropped state file")
        return removed

    async def record_end(self, phase: str) -> bool:
        """Invariant 9: the job's end in the header before tracking stops. True once
        tracking may stop (recorded, or no state file that could say otherwise)."""
        if self.persist is not None:
            try:
                await self.persist.set_fields(phase=phase)
            except OSError as e:  # StateFileLost too: drop it, or keep tracking
                self.drop(e)
        return not self.keep_tracking
