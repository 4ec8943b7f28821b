"""Guest writers for the mounted tests, with an exact model of what each image must hold.

Writers run as threads of the test process and as separate processes (``python writers.py``)
at the same time. Each writes random data of random sizes at unaligned offsets into the
mounted image, with fsyncs now and then. Overlapping writes are serialized by OFD byte-range
locks on a shared lock file (they work across threads and processes alike), and every write
is logged with the CLOCK_MONOTONIC times (system wide) just after its lock was taken and just
before it was released. So:

- replaying the log in lock order gives exactly what the guest's view of the image holds
  (``replay``): after a completed job, that is the target;
- given the moment ``complete`` was sent and the moment ``completed`` was seen, each write is
  certainly before the pivot, certainly after it, or in between; ``check_source_at_pivot``
  then checks the frozen source byte for byte against what it may hold.

A write's data is derived from (seed, writer, index), so logs stay small and a failure can be
replayed from the seed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux


@dataclasses.dataclass(frozen=True)
class WriteRec:
    t0: int  # ns, CLOCK_MONOTONIC, lock taken (the write starts after)
    t1: int  # ns, the write returned (the lock is released after)
    writer: int
    index: int
    offset: int
    length: int
    kind: str = "w"  # w: pwrite; p: fallocate punch-hole; z: fallocate zero-range

    def data(self, seed: int) -> bytes:
        if self.kind != "w":
            return bytes(self.length)
        return write_data(seed, self.writer, self.index, self.length)


def write_data(seed: int, writer: int, index: int, length: int) -> bytes:
    return random.Random(f"{seed}:{writer}:{index}").randbytes(length)


@dataclasses.dataclass
class WriterSpec:
    """What one writer does. ``hot`` is a small region that a share of the writes hits, so
    that overlapping writes and writes racing copies of the same chunk are frequent."""

    writer: int
    seed: int
    size: int  # image size
    min_len: int = 512
    max_len: int = 4 * MiB
    fsync_prob: float = 0.05
    odirect: bool = False
    pace_bps: int = 0  # this writer's average rate; 0 = as fast as it can
    hot: tuple[int, int] = (0, 256 * KiB)
    hot_prob: float = 0.3
    small_prob: float = 0.75  # share of writes of at most 64 KiB (many small, a few large)
    falloc_prob: float = 0.0  # share of punch-hole / zero-range fallocates instead of writes

    def choose(self, rnd: random.Random) -> tuple[int, int]:
        if self.odirect:  # O_DIRECT: whole 4 KiB blocks, the portable case
            n = 4 * KiB * rnd.randint(1, min(256, self.size // (4 * KiB)))
            off = 4 * KiB * rnd.randrange(0, (self.size - n) // (4 * KiB) + 1)
            return off, n
        top = min(self.max_len, self.size)
        if rnd.random() < self.small_prob:
            top = min(top, max(self.min_len, 64 * KiB))
        lo, hi = math.log(self.min_len), math.log(top)
        n = max(self.min_len, min(int(math.exp(rnd.uniform(lo, hi))), self.size))
        a, b = self.hot
        if rnd.random() < self.hot_prob and b - a > self.min_len:
            n = min(n, b - a)
            off = a + rnd.randrange(0, b - a - n + 1)
        else:
            off = rnd.randrange(0, self.size - n + 1)
        return off, n


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
FALLOC_MODES = {"p": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                "z": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def falloc_unsupported(directory: str | os.PathLike[str]) -> list[str]:
    """The fallocate modes (``FALLOC_MODES`` keys) that the filesystem of ``directory``
    refuses with EOPNOTSUPP, probed on a scratch file there."""
    missing = []
    fd, path = tempfile.mkstemp(dir=directory, prefix=".falloc-probe")
    try:
        os.pwrite(fd, bytes(64 * KiB), 0)
        for kind, mode in FALLOC_MODES.items():
            try:
                fallocate(fd, mode, 4 * KiB, 8 * KiB)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                missing.append(kind)
    finally:
        os.close(fd)
        os.unlink(path)
    return missing


def require_fallocates(pool: WriterPool, source: str | os.PathLike[str]) -> None:
    """For a test whose writers make fallocates: some of each kind returned successfully.
    A fallocate refused through the mount (EOPNOTSUPP) fails the test when the filesystem
    of the image's ``source`` supports that mode (the mount must pass it through), and
    skips the test, saying why, when that filesystem does not."""
    import pytest  # only the tests need it, not a writer process

    if pool.unsupported:
        missing = falloc_unsupported(os.path.dirname(os.path.abspath(source)))
        if missing:
            pytest.skip(f"the source's filesystem does not support fallocate "
                        f"{' and '.join(missing)} (p: punch hole, z: zero range), which this "
                        f"test needs: {pool.unsupported[0]}")
        raise AssertionError(f"the mount refused a fallocate that the source's filesystem "
                             f"supports: {pool.unsupported}")
    made = pool.fallocates()
    assert all(made.values()), f"the writers made too few fallocates to test them: {made}"


def _lock(fd: int, offset: int, length: int, ltype: int) -> None:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, length, 0)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, arg)
            return
        except InterruptedError:  # a signal (the stop request) while waiting: just retry
            continue


def run_writer(image: str, lockfile: str, spec: WriterSpec, stop: threading.Event,
               records: list[WriteRec], errors: list[str],
               failed: list[WriteRec] | None = None,
               unsupported: list[str] | None = None) -> None:
    """Write until ``stop`` is set; append a record per completed write. Never raises: an I/O
    error is recorded in ``errors`` and ends this writer, and the write that failed goes to
    ``failed`` (t1: when it failed): it may have landed, whole or in part (a crash). A
    fallocate refused with EOPNOTSUPP is reported in ``unsupported`` and ends this writer's
    fallocates of that kind (see ``require_fallocates``)."""
    failed = failed if failed is not None else []
    unsupported = unsupported if unsupported is not None else []
    # The stop request (SIGTERM) is for the main thread: no FUSE request of ours is ever
    # interrupted by it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    rnd = random.Random(f"{spec.seed}:w{spec.writer}")
    flags = os.O_RDWR | (os.O_DIRECT if spec.odirect else 0)
    fd = os.open(image, flags)
    lfd = os.open(lockfile, os.O_RDWR)
    buf = mmap.mmap(-1, 1 * MiB) if spec.odirect else None  # page aligned, for O_DIRECT
    what = f"writer {spec.writer}{' (O_DIRECT)' if spec.odirect else ''}"
    index = 0
    kinds = "pz" if spec.falloc_prob > 0 and not spec.odirect else ""
    try:
        while not stop.is_set():
            off, n = spec.choose(rnd)
            if kinds and rnd.random() < spec.falloc_prob:
                kind = rnd.choice(kinds)
                _lock(lfd, off, n, fcntl.F_WRLCK)
                t0 = time.monotonic_ns()
                try:
                    fallocate(fd, FALLOC_MODES[kind], off, n)
                    t1 = time.monotonic_ns()
                except OSError as e:
                    if e.errno == errno.EOPNOTSUPP:  # said so, never silently
                        unsupported.append(f"{what}: fallocate({kind}, {off}, {n}): {e}")
                        kinds = kinds.replace(kind, "")
                        continue
                    failed.append(WriteRec(t0, time.monotonic_ns(), spec.writer, index, off,
                                           n, kind))
                    errors.append(f"{what}: fallocate({kind}, {off}, {n}): {e}")
                    return
                finally:
                    _lock(lfd, off, n, fcntl.F_UNLCK)
                records.append(WriteRec(t0, t1, spec.writer, index, off, n, kind))
                index += 1
                continue
            data = write_data(spec.seed, spec.writer, index, n)
            if buf is not None:
                buf[:n] = data
                mv = memoryview(buf)[:n]
            else:
                mv = memoryview(data)
            _lock(lfd, off, n, fcntl.F_WRLCK)
            t0 = time.monotonic_ns()
            try:
                done = 0
                while done < n:
                    w = os.pwrite(fd, mv[done:], off + done)
                    if w <= 0:
                        raise OSError(errno.EIO, f"pwrite returned {w}")
                    done += w
                t1 = time.monotonic_ns()
            except OSError as e:
                failed.append(WriteRec(t0, time.monotonic_ns(), spec.writer, index, off, n))
                errors.append(f"{what}: pwrite({off}, {n}): {e}")
                return
            finally:
                mv.release()
                _lock(lfd, off, n, fcntl.F_UNLCK)
            records.append(WriteRec(t0, t1, spec.writer, index, off, n))
            index += 1
            if rnd.random() < spec.fsync_prob:
                try:
                    os.fsync(fd)
                except OSError as e:
                    errors.append(f"{what}: fsync: {e}")
                    return
            if spec.pace_bps:
                stop.wait(min(2.0, n / spec.pace_bps * rnd.uniform(0.2, 1.8)))
    finally:
        if buf is not None:
            buf.close()
        os.close(lfd)
        try:
            os.close(fd)
        except OSError as e:  # the flush at close, on a mount whose daemon was killed
            errors.append(f"{what}: close: {e}")


# ====================================================================== a pool of writers
class WriterPool:
    """``threads`` writer threads here and ``procs`` writer processes, all on one image."""

    def __init__(self, image: str | os.PathLike[str], lockfile: str | os.PathLike[str],
                 seed: int, size: int, threads: int, procs: int, workdir: str,
                 **spec_kw: object) -> None:
        self.image, self.lockfile = str(image), str(lockfile)
        self.seed, self.size = seed, size
        self.workdir = workdir
        self.nthreads, self.nprocs = threads, procs
        self.spec_kw = spec_kw
        self.records: list[WriteRec] = []
        self.errors: list[str] = []
        self.failed: list[WriteRec] = []  # writes that failed: they may have landed in part
        self.unsupported: list[str] = []  # fallocates refused with EOPNOTSUPP
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._procs: list[tuple[int, object, str]] = []
        with open(self.lockfile, "a"):
            pass

    def spec(self, writer: int, **kw: object) -> WriterSpec:
        args = {**self.spec_kw, **kw}
        return WriterSpec(writer=writer, seed=self.seed, size=self.size, **args)  # type: ignore[arg-type]

    def start(self, odirect_threads: int = 0) -> None:
        for i in range(self.nthreads):
            spec = self.spec(i, odirect=i < odirect_threads)
            t = threading.Thread(target=run_writer, daemon=True, name=f"writer{i}",
                                 args=(self.image, self.lockfile, spec, self._stop,
                                       self.records, self.errors, self.failed,
                                       self.unsupported))
            t.start()
            self._threads.append(t)
        for j in range(self.nprocs):
            w = self.nthreads + j
            out = os.path.join(self.workdir, f"writer{w}.json")
            spec = self.spec(w)
            cmd = [sys.executable, os.path.abspath(__file__), "--image", self.image,
                   "--lockfile", self.lockfile, "--out", out,
                   "--spec", json.dumps(dataclasses.asdict(spec))]
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            self._procs.append((w, p, out))

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and all(
            p.poll() is None for _, p, _ in self._procs)  # type: ignore[attr-defined]

    def stop(self, timeout: float = 60) -> None:
        """Stop every writer and collect the logs. Errors and stuck writers are recorded in
        ``errors``."""
        self._stop.set()
        for _, p, _ in self._procs:
            if p.poll() is None:  # type: ignore[attr-defined]
                p.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                self.errors.append(f"{t.name} is stuck (a write did not return)")
        for w, p, out in self._procs:
            try:
                rc = p.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[attr-defined]
            except Exception:
                p.kill()  # type: ignore[attr-defined]
                self.errors.append(f"writer process {w} is stuck (a write did not return)")
                continue
            try:
                with open(out) as f:
                    doc = json.load(f)
            except (OSError, ValueError) as e:
                self.errors.append(f"writer process {w} exited {rc} without a log: {e}")
                continue
            self.records += [WriteRec(*r) for r in doc["records"]]
            self.errors += doc["errors"]
            self.failed += [WriteRec(*r) for r in doc["failed"]]
            self.unsupported += doc["unsupported"]
            if rc != 0 and not doc["errors"]:
                self.errors.append(f"writer process {w} exited with status {rc}")

    def fallocates(self) -> dict[str, int]:
        """How many punch-holes (``p``) and zero-ranges (``z``) returned successfully."""
        return {k: sum(r.kind == k for r in self.records) for k in "pz"}

    def summary(self) -> str:
        n = len(self.records)
        nbytes = sum(r.length for r in self.records if r.kind == "w")
        made = self.fallocates()
        per: dict[int, int] = {}
        for r in self.records:
            per[r.writer] = per.get(r.writer, 0) + 1
        return (f"{n} writes ({made['p']} of them punch-holes, {made['z']} zero-ranges), "
                f"{nbytes / MiB:.1f} MiB, "
                f"per writer {dict(sorted(per.items()))}")


# ====================================================================== checking
def replay(initial: bytes | bytearray, records: Iterable[WriteRec], seed: int) -> bytearray:
    """The image after ``records``, applied in lock order (exact: overlapping writes never
    ran at the same time, so the later one's lock was taken after the earlier one's write
    returned)."""
    img = bytearray(initial)
    for r in sorted(records, key=lambda r: r.t0):
        img[r.offset:r.offset + r.length] = r.data(seed)
    return img


def first_diff(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview,
               step: int = 64 * KiB) -> int | None:
    """Offset of the first differing byte, or None."""
    n = min(len(a), len(b))
    ma, mb = memoryview(a), memoryview(b)
    for off in range(0, n, step):
        if ma[off:off + step] != mb[off:off + step]:
            x, y = bytes(ma[off:off + step]), bytes(mb[off:off + step])
            return off + next(i for i in range(len(x)) if x[i] != y[i])
    return None if len(a) == len(b) else n


def describe_byte(off: int, records: Sequence[WriteRec], t_issue: int | None = None,
                  t_seen: int | None = None) -> str:
    """Which writes cover byte ``off`` (for failure messages)."""
    cover = sorted((r for r in records if r.offset <= off < r.offset + r.length),
                   key=lambda r: r.t0)
    if not cover:
        return f"byte {off} was never written"
    parts = []
    for r in cover[-6:]:
        when = ""
        if t_issue is not None and t_seen is not None:
            when = (" pre" if r.t1 < t_issue else " post" if r.t0 > t_seen else " pivot-window")
        parts.append(f"w{r.writer}#{r.index}[{r.offset},+{r.length}]{when}")
    return f"byte {off} written by {len(cover)} writes, last: {', '.join(parts)}"


def check_source_at_pivot(initial: bytes | bytearray, source: bytes | bytearray,
                          records: Sequence[WriteRec], seed: int, t_issue: int,
                          t_seen: int) -> str | None:
    """The source after a completed job, given that ``complete`` was sent at ``t_issue`` and
    ``completed`` seen at ``t_seen``. Returns a problem or None.

    Writes that returned before ``t_issue`` are in the source (``pre``); writes that began
    after ``t_seen`` are not (the guest is served from the target by then). A write in between
    may have reached the source or not, in parts (FUSE splits a large write into requests
    and the pivot can fall between two of them). So: outside the in-between writes' ranges
    the source equals the replay of ``pre``; inside, every byte equals the ``pre`` replay or
    one of the in-between writes that cover it (searched by bisection: pieces that one
    candidate explains whole are done at once)."""
    pre = [r for r in records if r.t1 < t_issue]
    window = sorted((r for r in records if r.t1 >= t_issue and r.t0 <= t_seen),
                    key=lambda r: r.t0)
    expect = replay(initial, pre, seed)
    datas = {(r.writer, r.index): r.data(seed) for r in window}
    cuts = sorted({0, len(source)} | {r.offset for r in window}
                  | {r.offset + r.length for r in window})
    src = memoryview(source)
    exp = memoryview(expect)

    def unexplained(lo: int, hi: int, cands: list[tuple[memoryview, int]]) -> int | None:
        if src[lo:hi] == exp[lo:hi]:
            return None
        for data, base in cands:
            if src[lo:hi] == data[lo - base:hi - base]:
                return None
        if hi - lo == 1:
            return lo
        mid = (lo + hi) // 2
        bad = unexplained(lo, mid, cands)
        return bad if bad is not None else unexplained(mid, hi, cands)

    for lo, hi in itertools.pairwise(cuts):
        cover = [r for r in window if r.offset <= lo and hi <= r.offset + r.length]
        if not cover:
            bad = first_diff(src[lo:hi], exp[lo:hi])
            if bad is not None:
                off = lo + bad
                why = describe_byte(off, records, t_issue, t_seen)
                return (f"source byte {off} is neither its value before the pivot nor that of "
                        f"a write in the pivot window ({why})")
            continue
        cands = [(memoryview(datas[(r.writer, r.index)]), r.offset) for r in cover]
        bad_off = unexplained(lo, hi, cands)
        if bad_off is not None:
            return (f"source byte {bad_off} holds a value no write before or during the pivot "
                    f"put there ({describe_byte(bad_off, records, t_issue, t_seen)})")
    return None


# ====================================================================== a small filesystem
@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike[str], size: str,
                before_umount: Callable[[], None] | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the test; ``before_umount``
    (e.g. the mirrorfs fixture's cleanup, so that no daemon holds a file in it) runs first
    when it is unmounted, whatever happened."""
    p = Path(path)
    p.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(p)],
                   check=True, capture_output=True)
    try:
        yield p
    finally:
        try:
            if before_umount is not None:
                before_umount()
        finally:
            r = subprocess.run(["umount", str(p)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(p)], capture_output=True)


def resize_tmpfs(path: str | os.PathLike[str], size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True,
                   capture_output=True)


# ====================================================================== a writer process
def _main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--lockfile", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--spec", required=True)
    a = ap.parse_args()
    d = json.loads(a.spec)
    d["hot"] = tuple(d["hot"])
    spec = WriterSpec(**d)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    records: list[WriteRec] = []
    errors: list[str] = []
    failed: list[WriteRec] = []
    unsupported: list[str] = []
    t = threading.Thread(target=run_writer, daemon=True,
                         args=(a.image, a.lockfile, spec, stop, records, errors, failed,
                               unsupported))
    t.start()
    while t.is_alive():
        t.join(0.1)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"records": [dataclasses.astuple(r) for r in records], "errors": errors,
                   "failed": [dataclasses.astuple(r) for r in failed],
                   "unsupported": unsupported}, f)
    os.rename(tmp, a.out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(_main())
