"""What the target holds for good: DOMAIN.md invariant 7, "a copy counts as done only
once a flush of the target covers it".

Linux reports a lost write-back to ``fsync`` only once, and an NBD server with a write
cache may lose acknowledged writes when it restarts: neither may leave a hole in the target
that the job does not know about. So every copy or active write to the target is noted in
an "unflushed" map (coarse extents: 1 MiB, or the granularity if larger, coarser on images
over 2 TiB, at most 2 Mi bits per map); a flush that succeeds clears what it covered; a
failed flush, or an NBD connection that was replaced, makes those extents dirty again and
starts a new target *epoch*: a copy or active write begun in an older epoch does not count
(it may have landed just before the loss). Flushes are serialized: two at once would cover
for each other. While a flush runs, what it took is still reported by ``chunk_runs(
flushing=True)``: a checkpoint must not call it clean before the flush has returned.
"""

import errno
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
from bitarray import bitarray
from bitarray.util import intervals

from mirrorfs.bitmap import DirtyBitmap
from mirrorfs.images import Image
from mirrorfs.nbd import NBDImage

MiB = 1 << 20
RunSync = Callable[..., Awaitable[Any]]


async def flush_image(img: Image | NBDImage, run_sync: RunSync) -> None:
    """fsync a local image in a worker thread, or FLUSH an NBD export."""
    if isinstance(img, NBDImage):
        await img.flush()
    else:
        await run_sync(img.flush)


class TargetDurability:
    """The unflushed map and the target epoch of one job's target. ``on_loss`` is called
    after a loss made chunks dirty again (the copier must wake up); ``tracking`` says
    whether losses are still the job's to repair (after its end they are the guest's to
    hear about, through its next fsync)."""

    def __init__(self, target: Image | NBDImage, bitmap: DirtyBitmap, run_sync: RunSync,
                 on_loss: Callable[[], None], tracking: Callable[[], bool]) -> None:
        self.target, self.bitmap = target, bitmap
        self._run_sync, self._on_loss, self._tracking = run_sync, on_loss, tracking
        size = bitmap.size
        self._shift = max(max(bitmap.granularity, 1 * MiB).bit_length() - 1,
                          (max(1, size - 1) >> 21).bit_length())
        self._nbits = -(-size // (1 << self._shift))
        self._unflushed = self._empty()
        self._flushing: bitarray | None = None  # what a flush in progress will cover
        self._generation = target.generation if isinstance(target, NBDImage) else 0
        self.epoch = 0  # + 1 whenever the target may have lost acknowledged writes
        self._lock = trio.Lock()

    def _empty(self) -> bitarray:
        bits = bitarray(self._nbits, endian="little")
        bits.setall(0)
        return bits

    def note_written(self, offset: int, length: int) -> None:
        """[offset, offset + length) was written to the target (copied or actively)."""
        if length > 0:
            sh = self._shift
            self._unflushed[offset >> sh:((offset + length - 1) >> sh) + 1] = 1

    async def flush(self) -> None:
        """Flush the target; invariant 7 either way. Raises the flush's error after making
        what it should have covered dirty again."""
        async with self._lock:  # two flushes at once would cover for each other
            if isinstance(self.target, NBDImage):
                # A connection that dropped while idle: every flush needs a live one (a
                # new one voids what the old one had not flushed, through the epoch).
                await self.target.reconnect()
            epoch = self.check_epoch()
            covered, self._unflushed = self._unflushed, self._empty()
            self._flushing = covered  # not durable until the flush returns
            try:
                await flush_image(self.target, self._run_sync)
                if self.check_epoch() != epoch:
                    raise OSError(errno.EIO, "the target may have lost writes during a flush")
            except BaseException:
                self._unflushed |= covered
                self.lost()
                raise
            finally:
                self._flushing = None

    def lost(self) -> None:
        """What the target acknowledged since its last good flush may be gone: dirty it."""
        for a, b in self.chunk_runs():
            self.bitmap.mark_chunks(a, b)
        self._unflushed.setall(0)
        self.epoch += 1  # what is in flight now may have landed before the loss
        self._on_loss()

    def chunk_runs(self, flushing: bool = False) -> Iterator[tuple[int, int]]:
        """The chunk ranges [a, b) of the unflushed extents; with ``flushing``, also those
        a flush in progress has taken but not yet made durable."""
        sh, g_shift, n = self._shift, self.bitmap.shift, self.bitmap.nchunks
        bits = self._unflushed
        if flushing and self._flushing is not None:
            bits = bits | self._flushing
        for value, a, b in intervals(bits):
            if value:
                yield a << sh >> g_shift, min(n, -(-(b << sh) >> g_shift))

    def check_epoch(self) -> int:
        """Notice an NBD target's replaced connection; returns the current epoch."""
        target = self.target
        if isinstance(target, NBDImage) and target.generation != self._generation \
                and self._tracking():
            self._generation = target.generation
            target.forget_lost_writes()  # handled here: the extents are dirty again
            self.lost()
        return self.epoch
