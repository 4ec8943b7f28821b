"""The dirty bitmap: one bit per chunk of ``granularity`` bytes.

Offsets and lengths are in bytes; chunks are bitmap indices. A second, coarse level (one
summary bit per ``BLOCK_CHUNKS`` chunks) keeps the search for the next dirty chunk independent
of the image size: a 16 TiB image at 64 KiB granularity has 256 Mi chunks but only 64 Ki
summary bits. Summary bits may be stale-true (set over a block that is clean by now); the
search clears them lazily, so clearing chunks never has to scan a block.
"""

from bitarray import bitarray

BLOCK_SHIFT = 12
BLOCK_CHUNKS = 1 << BLOCK_SHIFT


class DirtyBitmap:
    def __init__(self, size: int, granularity: int) -> None:
        if granularity <= 0 or granularity & (granularity - 1):
            raise ValueError(f"granularity {granularity} is not a power of two")
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.nchunks = (size + granularity - 1) >> self.shift
        self._bits = bitarray(self.nchunks, endian="little")  # the state file's bit order
        self._bits.setall(0)
        self._summary = bitarray((self.nchunks + BLOCK_CHUNKS - 1) >> BLOCK_SHIFT)
        self._summary.setall(0)
        self._count = 0

    # ------------------------------------------------------------------ geometry
    def chunks_of(self, offset: int, length: int) -> tuple[int, int]:
        """Chunk range [a, b) that the byte range [offset, offset + length) touches."""
        if length <= 0:
            return offset >> self.shift, offset >> self.shift
        return offset >> self.shift, ((offset + length - 1) >> self.shift) + 1

    def byte_range(self, a: int, b: int) -> tuple[int, int]:
        """Byte range [start, end) of chunks [a, b), clipped to the image size."""
        return a << self.shift, min(b << self.shift, self.size)

    # ------------------------------------------------------------------ counting
    @property
    def dirty_chunks(self) -> int:
        return self._count

    @property
    def dirty_bytes(self) -> int:
        n = self._count << self.shift
        if self.nchunks and self._bits[-1]:
            n -= (self.nchunks << self.shift) - self.size  # the last chunk may be short
        return n

    def count(self, a: int, b: int) -> int:
        return self._bits.count(1, a, b) if b > a else 0

    def is_dirty(self, chunk: int) -> bool:
        return bool(self._bits[chunk])

    # ------------------------------------------------------------------ changing
    def mark(self, offset: int, length: int) -> None:
        """Mark the chunks touched by a byte range dirty (hot path: every guest write)."""
        if length <= 0:
            return
        a = offset >> self.shift
        b = ((offset + length - 1) >> self.shift) + 1
        self.mark_chunks(a, min(b, self.nchunks))

    def mark_chunks(self, a: int, b: int) -> None:
        if b <= a:
            return
        bits = self._bits
        if b == a + 1:
            if not bits[a]:
                bits[a] = 1
                self._count += 1
                self._summary[a >> BLOCK_SHIFT] = 1
            return
        self._count += (b - a) - bits.count(1, a, b)
        bits[a:b] = 1
        self._summary[a >> BLOCK_SHIFT : ((b - 1) >> BLOCK_SHIFT) + 1] = 1

    def mark_all(self) -> None:
        self.mark_chunks(0, self.nchunks)

    def clear_chunks(self, a: int, b: int) -> None:
        if b <= a:
            return
        bits = self._bits
        if b == a + 1:
            if bits[a]:
                bits[a] = 0
                self._count -= 1
            return
        self._count -= bits.count(1, a, b)
        bits[a:b] = 0

    # ------------------------------------------------------------------ searching
    def find_dirty(self, start: int, stop: int | None = None) -> int:
        """First dirty chunk in [start, stop), or -1. Cost grows with the number of coarse
        blocks skipped, never with the number of clean chunks."""
        stop = self.nchunks if stop is None else min(stop, self.nchunks)
        bits, summary = self._bits, self._summary
        while start < stop:
            blk = start >> BLOCK_SHIFT
            if summary[blk]:
                blk_end = min((blk + 1) << BLOCK_SHIFT, stop)
                i = bits.find(1, start, blk_end)
                if i >= 0:
                    return i
                if start == blk << BLOCK_SHIFT and blk_end == min((blk + 1) << BLOCK_SHIFT,
                                                                  self.nchunks):
                    summary[blk] = 0  # the whole block was searched: the bit was stale
            nxt = summary.find(1, blk + 1, ((stop - 1) >> BLOCK_SHIFT) + 1)
            if nxt < 0:
                return -1
            start = nxt << BLOCK_SHIFT
        return -1

    def run_end(self, a: int, limit: int) -> int:
        """End of the dirty run that starts at chunk a, at most ``limit``."""
        limit = min(limit, self.nchunks)
        i = self._bits.find(0, a, limit)
        return limit if i < 0 else i

    def copy_into(self, into: bitarray) -> None:
        """Overwrite ``into`` (same length) with the dirty bits, allocating nothing."""
        into.setall(0)
        into |= self._bits

    def mark_from(self, bits: bitarray) -> None:
        """OR a saved bitmap (same length) into this one."""
        self._bits |= bits
        self._count = self._bits.count(1)
        self._summary.setall(1)  # stale-true is allowed; the search cleans it
