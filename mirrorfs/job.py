"""The job's life cycle: states, verbs, the tables that connect them, and the event log.

Nothing here does I/O or knows about copying: the mirror (mirror.py) drives a Job through
``transition`` and asks ``check`` before it acts on a verb, as QEMU's job.c does for
block/mirror.c. A refused verb raises VerbRefused naming the verb and the state.
"""

import datetime
import enum
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class State(enum.StrEnum):
    COPYING = "copying"  # bulk phase: the target has never caught up
    READY = "ready"  # caught up; new writes keep being mirrored
    PAUSED = "paused"  # no new copies start (``ready`` says from which phase)
    COMPLETING = "completing"  # draining towards the pivot
    COMPLETED = "completed"  # pivoted: the target is served
    CANCELLING = "cancelling"  # draining towards a point-in-time copy
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = frozenset({State.COMPLETED, State.CANCELLED, State.FAILED})


class Verb(enum.StrEnum):
    COMPLETE = "complete"
    CANCEL = "cancel"
    CANCEL_FORCE = "cancel force"
    PAUSE = "pause"
    RESUME = "resume"
    SPEED = "speed"
    COPY_MODE = "copy-mode"


# Which verbs each state accepts. ``complete`` also needs the ``ready`` flag (checked by
# the mirror), so COPYING lists it only through that rule: see Job.check.
VERBS: dict[State, frozenset[Verb]] = {
    State.COPYING: frozenset({Verb.CANCEL, Verb.CANCEL_FORCE, Verb.PAUSE, Verb.SPEED,
                              Verb.COPY_MODE}),
    State.READY: frozenset({Verb.COMPLETE, Verb.CANCEL, Verb.CANCEL_FORCE, Verb.PAUSE,
                            Verb.SPEED, Verb.COPY_MODE}),
    State.PAUSED: frozenset({Verb.RESUME, Verb.CANCEL, Verb.CANCEL_FORCE, Verb.SPEED,
                             Verb.COPY_MODE}),
    State.COMPLETING: frozenset({Verb.CANCEL_FORCE, Verb.SPEED, Verb.COPY_MODE}),
    State.CANCELLING: frozenset({Verb.CANCEL_FORCE, Verb.SPEED}),
    State.COMPLETED: frozenset(),
    State.CANCELLED: frozenset(),
    State.FAILED: frozenset(),
}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.COPYING: frozenset({State.READY, State.PAUSED, State.CANCELLING, State.FAILED}),
    State.READY: frozenset({State.PAUSED, State.COMPLETING, State.CANCELLING, State.CANCELLED,
                            State.FAILED}),
    State.PAUSED: frozenset({State.COPYING, State.READY, State.COMPLETING, State.CANCELLING,
                             State.CANCELLED, State.FAILED}),
    State.COMPLETING: frozenset({State.COMPLETED, State.PAUSED, State.CANCELLING,
                                 State.FAILED}),
    State.CANCELLING: frozenset({State.CANCELLED, State.PAUSED, State.FAILED}),
    State.COMPLETED: frozenset(),
    State.CANCELLED: frozenset(),
    State.FAILED: frozenset(),
}


class VerbRefused(Exception):
    """The verb is well formed but the job's current state does not accept it."""

    def __init__(self, verb: Verb, state: State, why: str = "") -> None:
        self.verb, self.state = verb, state
        super().__init__(f"'{verb}' is refused in state '{state}'" + (f": {why}" if why else ""))


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class EventLog:
    """Append-only list of events, rendered as JSON lines (``.mirror/events``)."""

    def __init__(self, wall_clock: Callable[[], str] = utc_now_iso) -> None:
        self._wall = wall_clock
        self._lines: list[bytes] = []
        self._size = 0

    def append(self, event: str, **details: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"time": self._wall(), "event": event, **details}
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        self._lines.append(line)
        self._size += len(line)
        return rec

    @property
    def size(self) -> int:
        return self._size

    def render(self) -> bytes:
        return b"".join(self._lines)

    def names(self) -> list[str]:
        return [json.loads(line)["event"] for line in self._lines]


class Job:
    """State, the ``ready`` flag, the error, and the events of one mirror job."""

    def __init__(self, events: EventLog | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.state = State.COPYING
        self.ready = False  # the target has caught up at least once
        self.error: str | None = None
        self.events = events if events is not None else EventLog()
        self.target_consistent = False
        self._monotonic = monotonic
        self.started_at = monotonic()

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def check(self, verb: Verb) -> None:
        if verb is Verb.COMPLETE and not self.ready and not self.ended:
            raise VerbRefused(verb, self.state, "the target has not caught up yet")
        if verb not in VERBS[self.state]:
            raise VerbRefused(verb, self.state)

    def transition(self, new: State, event: str | None = None, **details: Any) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"illegal job transition {self.state} -> {new}")
        log.info("job: %s -> %s", self.state, new)
        self.state = new
        if event:
            self.events.append(event, **details)

    def emit(self, event: str, **details: Any) -> None:
        self.events.append(event, **details)
