"""Invariant 2 (DOMAIN.md): never two operations on overlapping chunks at once, and an
active (write-blocking) write waits for the copies that overlap it; otherwise an older copy
could land on the target after a newer write.

Every copy op and every active write holds its chunk range here while it runs. The copier
never picks a held chunk (``overlap``, ``next_start_after``); an active write waits for
what overlaps it (``Busy.done``) and then holds its own range, with no await in between.
Held ranges are also part of every checkpoint's snapshot: a chunk in flight may differ.
"""

import dataclasses
from collections.abc import Callable, Iterator

import trio


@dataclasses.dataclass(eq=False)
class Busy:
    """A chunk range [a, b) that a copy or an active write holds."""

    a: int
    b: int
    done: trio.Event
    copy_bytes: int  # bytes of a copy op, 0 for an active write


class BusyRanges:
    """The held ranges (a handful at a time: a list is the right structure).
    ``on_release`` runs after each release (the copy loop may pick what was held)."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._held: list[Busy] = []
        self._on_release = on_release

    def __bool__(self) -> bool:
        return bool(self._held)

    def __iter__(self) -> Iterator[Busy]:
        return iter(self._held)

    def __getitem__(self, i: int) -> Busy:
        return self._held[i]

    def overlap(self, a: int, b: int) -> Busy | None:
        for busy in self._held:
            if busy.a < b and a < busy.b:
                return busy
        return None

    def next_start_after(self, a: int, default: int) -> int:
        """Where the first held range that starts after chunk ``a`` begins."""
        return min((x.a for x in self._held if x.a > a), default=default)

    def hold(self, a: int, b: int, copy_bytes: int) -> Busy:
        busy = Busy(a, b, trio.Event(), copy_bytes)
        self._held.append(busy)
        return busy

    def release(self, busy: Busy) -> None:
        self._held.remove(busy)
        busy.done.set()
        self._on_release()
