"""The copy itself: the worker-thread half of a copy batch, as plain blocking calls over
two images (no trio, no bitmap, no job). What a batch did is recorded in its ops (done,
error, zero bytes); the mirror settles them on the trio thread (mirror.py ``_settle``),
where invariant 3 (a failed op's range is dirty again before the error policy) is kept.

Between two local files the data never passes through user space: a 16-byte read tells a
data chunk from a candidate zero chunk (only a chunk that starts with zeros is read whole),
data runs go through ``copy_file_range`` (a reflink where the file system can), and holes
of the source and all-zero chunks become holes on the target, so a sparse disk stays
sparse. Elsewhere (another file system, a block device, an NBD export) the data is read
into a buffer first, then written as planned.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from mirrorfs.images import ZERO_BLOCK, Image
from mirrorfs.nbd import NBDImage

Segment = tuple[int, int, memoryview | None]  # offset, length, data (None: make it zeros)


class CopyError(Exception):
    def __init__(self, side: str, offset: int, length: int, err: OSError) -> None:
        self.side, self.offset, self.length, self.err = side, offset, length, err
        what = "reading the source" if side == "source" else "writing the target"
        super().__init__(f"error {what} at offset {offset} (+{length}): "
                         f"{err.strerror or err}")


@dataclasses.dataclass(eq=False)
class CopyOp:
    a: int  # chunk range [a, b)
    b: int
    offset: int  # byte range, clipped to the image size
    length: int
    zero: bool  # the source has a hole here: make the target read zeros, read nothing
    done: bool = False
    error: CopyError | None = None
    zero_bytes: int = 0
    busy: Any = None  # the mirror's hold on [a, b) (invariant 2)
    epoch: int = 0  # the target epoch it began in (invariant 7)


class BatchCopier:
    """Copies batches of ops from ``source`` to ``target``. ``copy_batch`` (local target)
    and ``plan_batch`` (the source side of a batch to NBD) run in a worker thread; each
    stops at its first error, which the op that met it carries."""

    def __init__(self, source: Image, target: Image | NBDImage, granularity: int) -> None:
        self.source, self.target, self.granularity = source, target, granularity
        # A new target's first pass: allocate each data run before copying into it
        # (FileImage.preallocate, ext4 only). Set by the mirror until the job is ready.
        self.preallocate = False

    def plan_batch(self, ops: list[CopyOp], buf: bytearray) -> list[list[Segment]]:
        """Worker thread: each op's segments, its data read into ``buf``. Stops at the first
        source error (that op carries it)."""
        mv = memoryview(buf)
        plans: list[list[Segment]] = []
        pos = 0
        for op in ops:
            if op.zero:
                plans.append([(op.offset, op.length, None)])
                continue
            view = mv[pos:pos + op.length]
            try:
                self._read_source(view, op.offset)
                plans.append(self._plan(view, op.offset))  # SEEK_DATA/HOLE may fail too
            except CopyError as e:
                op.error = e
                break
            pos += op.length
        return plans

    async def send_op(self, target: NBDImage, op: CopyOp, plan: list[Segment]) -> None:
        zeros = 0
        for offset, length, data in plan:
            try:
                if data is None:
                    await target.write_zeroes(offset, length)
                    zeros += length
                else:
                    await target.pwrite(data, offset)
            except OSError as e:
                op.error = CopyError("target", offset, length, e)
                return
        op.zero_bytes = zeros
        op.done = True

    def copy_batch(self, ops: list[CopyOp], buf: bytearray) -> None:
        """Runs in a worker thread, to a local target: no trio, no bitmap. Stops at the
        first error; the ops not done are marked dirty again by ``_settle``."""
        mv = memoryview(buf)
        for op in ops:
            try:
                if op.zero:
                    self._target_zero(op.offset, op.length)
                    op.zero_bytes = op.length
                else:
                    op.zero_bytes = self._copy_data(op.offset, op.length, mv)
                op.done = True
            except CopyError as e:
                op.error = e
                return

    def _extents(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """[offset, end) as (lo, hi, is_hole) runs of the source: holes of the file system's
        blocks, finer than a chunk (a chunk that is half hole must not become all data on
        the target). Looked up after the chunk's bit was cleared; a guest write racing the
        copy dirties the chunk again, so either answer is safe."""
        pos = offset
        try:
            while pos < end:
                data = min(self.source.next_data(pos), end)
                if data > pos:
                    yield pos, data, True
                if data >= end:
                    return
                hole = min(self.source.next_hole(data), end)
                yield data, hole, False
                pos = hole
        except OSError as e:  # SEEK_DATA/SEEK_HOLE failed: the source's error policy
            raise CopyError("source", pos, end - pos, e) from e

    def _copy_data(self, offset: int, length: int, mv: memoryview) -> int:
        """Copy a data op to a local target; returns the bytes made zero there. Between two
        files the data goes through the kernel (``_copy_extent``); otherwise it is read
        whole into the buffer first (one syscall), then written as planned."""
        target = self.target
        assert not isinstance(target, NBDImage)
        if target.can_copy_from(self.source):  # until the kernel first refuses, for good
            zeros = 0
            for lo, hi, hole in self._extents(offset, offset + length):
                if hole:
                    self._target_zero(lo, hi - lo)
                    zeros += hi - lo
                else:
                    zeros += self._copy_extent(lo, hi, mv)
            return zeros
        view = mv[:length]
        self._read_source(view, offset)
        zeros = 0
        for lo, n, data in self._plan(view, offset):
            if data is None:
                self._target_zero(lo, n)
                zeros += n
            else:
                self._write_target(data, lo)
        return zeros

    def _plan(self, view: memoryview, offset: int) -> list[Segment]:
        """What to write for source data read into ``view``: the source's holes and the
        all-zero chunks as zero segments, the rest as data."""
        out: list[Segment] = []
        for lo, hi, hole in self._extents(offset, offset + len(view)):
            if hole:
                out.append((lo, hi - lo, None))
            else:
                out.extend(self._zero_runs(view[lo - offset:hi - offset], lo))
        return out

    def _zero_runs(self, view: memoryview, offset: int) -> list[Segment]:
        """``view`` cut into runs of all-zero chunks and of data chunks."""
        step = min(self.granularity, len(view))
        n = len(view)
        out: list[Segment] = []
        pos = 0
        is_zero = self._is_zero(view, 0, min(step, n))
        while pos < n:
            end = pos + step
            nxt = is_zero
            while end < n:  # extend the run while the next chunk is of the same kind
                nxt = self._is_zero(view, end, min(end + step, n))
                if nxt != is_zero:
                    break
                end += step
            end = min(end, n)
            out.append((offset + pos, end - pos, None if is_zero else view[pos:end]))
            pos, is_zero = end, nxt
        return out

    def _read_source(self, view: memoryview, offset: int) -> None:
        try:
            self.source.pread_into(view, offset)
        except OSError as e:
            raise CopyError("source", offset, len(view), e) from e

    def _copy_extent(self, lo: int, hi: int, mv: memoryview) -> int:
        """Copy source data [lo, hi) to the target in the kernel, turning all-zero chunks
        into holes. A chunk whose first bytes are not zero is data, known from a 16-byte
        read; only a chunk that starts with zeros is read whole to be sure. Returns the bytes
        made zero."""
        g = self.granularity
        zeros = 0
        start, start_zero = lo, False
        pos = lo
        while pos < hi:
            nxt = min((pos // g + 1) * g, hi)
            is_zero = self._source_zero(pos, nxt, mv)
            if pos > start and is_zero != start_zero:
                zeros += self._flush_run(start, pos, start_zero, mv)
                start = pos
            start_zero = is_zero
            pos = nxt
        return zeros + self._flush_run(start, hi, start_zero, mv)

    def _source_zero(self, lo: int, hi: int, mv: memoryview) -> bool:
        head = mv[:min(16, hi - lo)]
        self._read_source(head, lo)
        if head.tobytes() != ZERO_BLOCK[:len(head)]:
            return False
        view = mv[:hi - lo]
        self._read_source(view, lo)
        return self._is_zero(view, 0, hi - lo)

    def _flush_run(self, lo: int, hi: int, zero: bool, mv: memoryview) -> int:
        if zero:
            self._target_zero(lo, hi - lo)
            return hi - lo
        target = self.target
        assert not isinstance(target, NBDImage)
        if self.preallocate:  # a new target's first pass fills holes:
            target.preallocate(lo, hi - lo)  # see FileImage.preallocate (ext4)
        try:
            if target.copy_in(self.source, lo, hi - lo):
                return 0  # else not between these two: buffers from now on
        except OSError:
            pass  # through the buffer again: a failing read or write names its side
        pos = lo
        while pos < hi:
            n = min(len(mv), hi - pos)
            self._read_source(mv[:n], pos)
            self._write_target(mv[:n], pos)
            pos += n
        return 0

    def _write_target(self, view: memoryview, offset: int) -> None:
        self._on_target(lambda t: t.pwrite(view, offset), offset, len(view))

    def _target_zero(self, offset: int, length: int) -> None:
        self._on_target(lambda t: t.write_zeroes(offset, length), offset, length)

    def _on_target(self, call: Callable[[Image], object], offset: int, length: int) -> None:
        """``call`` on the local target; its error as the target's, for the policy."""
        target = self.target
        assert not isinstance(target, NBDImage)
        try:
            call(target)
        except OSError as e:
            raise CopyError("target", offset, length, e) from e

    def _is_zero(self, view: memoryview, lo: int, hi: int) -> bool:
        # memoryview == memoryview compares element by element; bytes == bytes is memcmp.
        # Most data chunks fail on the first bytes, so test those before copying a chunk.
        if view[lo:lo + 16].tobytes() != ZERO_BLOCK[:min(16, hi - lo)]:
            return False
        z = ZERO_BLOCK
        pos = lo
        while pos < hi:
            n = min(len(z), hi - pos)
            if view[pos:pos + n].tobytes() != z[:n]:
                return False
            pos += n
        return True
