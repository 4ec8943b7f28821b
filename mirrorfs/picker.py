"""Which chunks the copier copies next: dirty runs no copy or active write holds, cut into
ops of at most ``max_op_bytes`` (holes of the source as zero ops that read nothing).

Invariant 1 (DOMAIN.md): a chunk's dirty bit is cleared here, when its op is made, before
any worker reads the source; a guest write racing the copy marks it dirty again after its
data is in the source, and it is copied again. Invariant 2: each op holds its range
(busy.py) from here until the mirror settles it.
"""

from collections.abc import Callable

from mirrorfs.bitmap import DirtyBitmap
from mirrorfs.busy import BusyRanges
from mirrorfs.copier import CopyOp
from mirrorfs.images import Image


class Picker:
    """Walks the bitmap from a cursor, wrapping, so that a hot region cannot starve the
    rest. ``epoch`` reads the target epoch each op begins in (invariant 7)."""

    def __init__(self, bitmap: DirtyBitmap, busy: BusyRanges, source: Image, size: int,
                 max_op_bytes: int, ops_per_batch: int, cheap_zeroes: Callable[[], bool],
                 epoch: Callable[[], int]) -> None:
        self.bitmap, self.busy, self.source, self.size = bitmap, busy, source, size
        self.op_chunks = max(1, max_op_bytes >> bitmap.shift)
        self.ops_per_batch = ops_per_batch
        self._cheap_zeroes, self._epoch = cheap_zeroes, epoch
        self._cursor = 0

    def pick(self, data_budget: int) -> tuple[list[CopyOp], int]:
        """Choose the next ops, clear their dirty bits and hold their ranges. Returns them
        and the bytes they charge to the speed limit and buf-size: their data, and their
        zeros too where the target cannot zero cheaply (the zeros are sent as data)."""
        bm = self.bitmap
        shift, g = bm.shift, bm.granularity
        cheap_zeroes = self._cheap_zeroes()
        ops: list[CopyOp] = []
        data = 0
        while len(ops) < self.ops_per_batch and data < data_budget:
            run = self._find_free_dirty()
            if run is None:
                break
            a, b = run
            while a < b and len(ops) < self.ops_per_batch and data < data_budget:
                start = a << shift
                try:
                    d = self.source.next_data(start)
                except OSError:
                    d = start  # as data: the copy's own read finds the error and names it
                room = max(1, (data_budget - data) >> shift)
                if d >= start + g or d >= self.size:
                    # a hole covers whole chunks: one op, however long, reads nothing
                    e = b if d >= self.size else min(b, d >> shift)
                    if not cheap_zeroes:  # sized like data
                        e = min(e, a + min(self.op_chunks, room))
                    op = self._make_op(a, e, zero=True)
                else:
                    e = min(b, a + min(self.op_chunks, room))
                    op = self._make_op(a, e, zero=False)
                if not op.zero or not cheap_zeroes:
                    data += op.length
                bm.clear_chunks(op.a, op.b)  # invariant 1: before any read of the source
                ops.append(op)
                a = op.b
            self._cursor = a if a < bm.nchunks else 0
        return ops, data

    def _find_free_dirty(self) -> tuple[int, int] | None:
        """Next dirty run at or after the cursor (wrapping once) that no busy range
        overlaps, cut short where a busy range begins."""
        bm = self.bitmap
        start = self._cursor
        for wrapped in (False, True):
            stop = bm.nchunks if not wrapped else self._cursor
            pos = 0 if wrapped else start
            while pos < stop:
                a = bm.find_dirty(pos, stop)
                if a < 0:
                    break
                busy = self.busy.overlap(a, a + 1)
                if busy is not None:
                    pos = busy.b
                    continue
                limit = self.busy.next_start_after(a, default=bm.nchunks)
                return a, bm.run_end(a, limit)
        return None

    def _make_op(self, a: int, b: int, zero: bool) -> CopyOp:
        start, end = self.bitmap.byte_range(a, b)
        op = CopyOp(a, b, start, end - start, zero, epoch=self._epoch())
        op.busy = self.busy.hold(a, b, end - start)
        return op
