import json

import pytest

from mirrorfs.job import ENDED, TRANSITIONS, VERBS, EventLog, Job, State, Verb, VerbRefused


def test_every_state_has_a_row() -> None:
    assert set(VERBS) == set(State) == set(TRANSITIONS)
    for s in ENDED:
        assert not VERBS[s] and not TRANSITIONS[s], f"{s} must accept nothing"


def test_complete_needs_ready() -> None:
    job = Job()
    with pytest.raises(VerbRefused, match="not caught up"):
        job.check(Verb.COMPLETE)
    job.ready = True
    job.transition(State.READY)
    job.check(Verb.COMPLETE)
    job.transition(State.PAUSED)
    with pytest.raises(VerbRefused, match="'complete' is refused in state 'paused'"):
        job.check(Verb.COMPLETE)


def test_illegal_transition_is_a_bug() -> None:
    job = Job()
    with pytest.raises(AssertionError):
        job.transition(State.COMPLETED)


def test_events_are_json_lines() -> None:
    log = EventLog(lambda: "2026-01-01T00:00:00.000Z")
    log.append("started", size=5)
    log.append("ready")
    lines = log.render().decode().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["started", "ready"]
    assert json.loads(lines[0]) == {"time": "2026-01-01T00:00:00.000Z", "event": "started",
                                    "size": 5}
    assert log.size == len(log.render())
