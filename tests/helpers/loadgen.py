"""Guest writers with an exact model of what the image must hold.

Each thread writes random data at random (unaligned, overlapping) offsets. Overlapping writes
are serialized by a byte-range lock, so the model (a bytearray) is exactly the image's
content at any quiet moment. Every write is logged with its start and end times, so a test
can tell which writes may have landed after a given moment (the pivot).
"""

import os
import random
import threading
import time
from dataclasses import dataclass


@dataclass
class WriteRecord:
    start: float
    end: float
    offset: int
    length: int


class RangeLock:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._held: list[tuple[int, int]] = []

    def acquire(self, a: int, b: int) -> None:
        with self._cv:
            while any(a < hb and ha < b for ha, hb in self._held):
                self._cv.wait()
            self._held.append((a, b))

    def release(self, a: int, b: int) -> None:
        with self._cv:
            self._held.remove((a, b))
            self._cv.notify_all()


class Writers:
    def __init__(self, path: os.PathLike[str] | str, model: bytearray, threads: int = 3,
                 seed: int = 1, min_size: int = 512, max_size: int = 256 << 10,
                 fsync_every: int = 50, region: tuple[int, int] | None = None) -> None:
        self.path, self.model = path, model
        self.size = len(model)
        self.lo, self.hi = region or (0, self.size)  # where the writers write
        self.nthreads, self.seed = threads, seed
        self.min_size, self.max_size = min_size, max_size
        self.fsync_every = fsync_every
        self.lock = RangeLock()
        self.stop_evt = threading.Event()
        self.records: list[WriteRecord] = []
        self.errors: list[str] = []
        self.bytes_written = 0
        self._threads: list[threading.Thread] = []
        self._rec_lock = threading.Lock()

    def start(self) -> "Writers":
        for i in range(self.nthreads):
            t = threading.Thread(target=self._run, args=(self.seed * 1000 + i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, allow_errors: bool = False) -> None:
        """Stop and join; fail on any guest write error unless the test caused them."""
        self.stop_evt.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a writer thread hung"
        assert allow_errors or not self.errors, f"guest write errors: {self.errors[:3]}"

    def _run(self, seed: int) -> None:
        rnd = random.Random(seed)
        fd = os.open(self.path, os.O_RDWR)
        try:
            n = 0
            while not self.stop_evt.is_set():
                # log-uniform sizes: many small writes, some large ones
                length = int(self.min_size * (self.max_size / self.min_size) ** rnd.random())
                off = self.lo + rnd.randrange(self.hi - self.lo - length + 1)
                data = rnd.randbytes(length)
                self.lock.acquire(off, off + length)
                try:
                    t0 = time.monotonic()
                    done = os.pwrite(fd, data, off)
                    if done != length:
                        raise OSError(f"short write {done} of {length}")
                    self.model[off:off + length] = data
                    t1 = time.monotonic()
                finally:
                    self.lock.release(off, off + length)
                with self._rec_lock:
                    self.records.append(WriteRecord(t0, t1, off, length))
                    self.bytes_written += length
                n += 1
                if self.fsync_every and n % self.fsync_every == 0:
                    os.fsync(fd)
        except OSError as e:
            self.errors.append(str(e))
        finally:
            try:
                os.close(fd)
            except OSError as e:  # ENOTCONN when a test kills the daemon
                self.errors.append(str(e))


def differing_ranges(a: bytes, b: bytes, block: int = 4096) -> list[tuple[int, int]]:
    """Byte ranges (block-granular, merged) where a and b differ."""
    out: list[tuple[int, int]] = []
    for off in range(0, len(a), block):
        if a[off:off + block] != b[off:off + block]:
            end = min(off + block, len(a))
            if out and out[-1][1] == off:
                out[-1] = (out[-1][0], end)
            else:
                out.append((off, end))
    return out


def covered(ranges: list[tuple[int, int]], writes: list[WriteRecord],
            a: bytes, b: bytes) -> list[int]:
    """Bytes inside ``ranges`` where a != b that none of ``writes`` touched."""
    bad: list[int] = []
    marks = bytearray(len(a))
    for w in writes:
        marks[w.offset:w.offset + w.length] = b"\x01" * w.length
    for lo, hi in ranges:
        for i in range(lo, hi):
            if a[i] != b[i] and not marks[i]:
                bad.append(i)
                if len(bad) > 10:
                    return bad
    return bad
