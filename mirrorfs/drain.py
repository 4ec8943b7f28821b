"""The end of a drain: the gate in front of guest writes, and the pivot's records.

Invariant 4: complete (and a consistent cancel) close a gate in front of guest writes once
little is left, copy what is still dirty, flush the target, switch, and open the gate.
Invariant 6: the gate must never hold the guest while the copy behind it keeps failing:
every error opens it. Invariant 9: before the target is served it is recorded, durably, as
the live image: in the pivot registry (pivots.py, which any later mount of the source
consults, state file or not) and in the state file; while those records are being made or
undone the gate stays closed, so that no write is acknowledged on the source while they say
the target is live.
"""

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from mirrorfs.checkpointer import Checkpointer

log = logging.getLogger(__name__)


class Gate:
    """Closed: guest writes wait. ``open`` while ``held`` is deferred until it is not."""

    def __init__(self) -> None:
        self._event: trio.Event | None = None
        self._held = False
        self._open_asked = False

    @property
    def closed(self) -> bool:
        return self._event is not None

    def close(self) -> None:
        if self._event is None:
            self._event = trio.Event()

    def open(self) -> None:
        if self._held:
            self._open_asked = True
            return
        if self._event is not None:
            event, self._event = self._event, None
            event.set()

    async def wait_open(self) -> None:
        while self._event is not None:
            await self._event.wait()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep the gate as it is (opening deferred) for the duration."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            if self._open_asked:
                self._open_asked = False
                self.open()


class PivotRecords:
    """Records that the target is the live image, or undoes that. ``record_hook`` and
    ``forget_hook`` (the registry: blocking, run through ``run_sync``) may be None;
    ``flush_source`` makes the source's mtime, which the registry names, durable."""

    def __init__(self, state: Checkpointer, source_path: str,
                 record_hook: Callable[[], None] | None,
                 forget_hook: Callable[[], None] | None,
                 flush_source: Callable[[], Awaitable[None]],
                 run_sync: Callable[..., Awaitable[Any]]) -> None:
        self._state, self._source_path = state, source_path
        self._record, self._forget = record_hook, forget_hook
        self._flush_source, self._run_sync = flush_source, run_sync

    async def record(self) -> None:
        """Registry first, then the state file. Raises OSError after undoing both."""
        try:
            if self._record is not None:
                await self._flush_source()
                await self._run_sync(self._record)
            await self._state.set_phase(phase="completed", clean=False)
        except OSError:
            await self.undo()
            raise

    async def undo(self) -> None:
        """The pivot did not happen: the state file says running again (else it is
        dropped), then the registry forgets it. In that order: a crash between them leaves
        a refusal, never a copy over a live image."""
        try:
            await self._state.set_phase(phase="running")
        except OSError as e:
            self._state.drop(e)
        if self._forget is not None:
            try:
                await self._run_sync(self._forget)
            except OSError as e:  # a stale record refuses the next mount: safe, and said
                log.error("cannot remove the pivot record of %s: %s", self._source_path, e)
