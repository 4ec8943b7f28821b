"""The crash explorer's simulation: the real Mirror, ActivityLog, StateFile and
plan_resume over simulated storage that records every operation, then every crash.

Method
------
1. **One trace.** Every change to the four files a mount touches is appended, in the
   order it happens, to one list (``Trace.ops``): ``("write", file, offset, bytes)``,
   ``("zero", file, offset, length)``, ``("truncate", "state", size)`` (the state file
   created or emptied), ``("unlink", "state")``, ``("syncdir", "state")`` (its directory
   synced), ``("sync", file)``, and marks ``("mark", name)``. The files are "source",
   "target" (``SimImage``, the Image protocol over a bytearray), "state" (``SimStateIO``,
   the StateIO the state file does all its I/O through) and "registry" (the pivot
   registry: the Mirror's ``record_pivot`` / ``forget_pivot`` write a record and sync).
   The mark that matters is ``TARGET_LIVE``: ``SimMirror`` (the real Mirror, with
   ``serving`` made a property) records it the moment the mirror switches ``serving`` to
   the target. Other marks (mount, ready, ending ...) only make reports readable.
2. **Concurrency as with worker threads.** The run is a real trio run on
   ``MockClock(autojump_threshold=0)``. The Mirror and the ActivityLog get ``run_sync``
   from ``World``: the call takes a random bit of virtual time (an image's flush more)
   and yields a seeded random number of times before and after calling the function
   inline (shielded once started, as ``trio.to_thread.run_sync`` is), so guest writes,
   the copier and checkpoints interleave with state-file I/O as they would with threads.
   ``Hold`` stops chosen calls (say the state file's ``log_extent``) until a scripted
   test releases them: the targeted tests use it to open exact windows. ``SpinGuard``
   (a trio instrument) notices a task that runs on while virtual time stands still (a
   spin: the autojump clock would never move again), moves the clock on as real time
   would pass, and reports the task: a guest write must never spin.
3. **A scenario** (``Plan``, drawn from a seed, or a script): mount as mount.py does
   (state file created, or opened and ``plan_resume``'d; first checkpoint with
   ``flush=False``), the copy loop, two or three guest writers (hot and cold extents,
   bursts of requests in flight at once, fsyncs, punched holes) and a chaser that writes
   the moment a call starts under the activity log's lock (a log entry or a checkpoint
   on its way to the disk), checkpoints, ready, then endings: cancel, cancel force,
   cancel before ready, complete (the pivot), a target error under policy report (the
   job fails), or a clean unmount (``save_final_state``) and a remount that resumes;
   guest writes go on after every ending, and a mount may follow (a new job, or a
   refusal). Some seeds make one state-file write or sync fail.
4. **Crash states.** For every prefix of the trace (every operation boundary) the files
   are rebuilt as a crash there leaves them, in five variants:
   ``kill`` (process killed: every write of the prefix is in the page cache, so kept);
   ``power`` (power lost: per file, only what a sync of that file covered; the state
   file's creation and unlink are kept with its next sync or directory sync);
   ``torn`` (``power``, plus the state file's unsynced writes, the last one torn: a
   random subset of its 512-byte sectors); ``power+source`` (``power``, but the source
   keeps every write: the worst case for resuming, since the mirror never promised the
   source's writes were on disk, only that the log covering them was);
   ``random`` (``power``, plus a random subset of each file's unsynced operations, in
   order; the state file's truncate and unlink are barriers).
   Images are compared chunk by chunk, incrementally (sets of differing chunks kept per
   view as the prefix grows).
5. **The check.** For each crash state: a pivot record in the registry means the mount
   is refused (REFUSE); no state file means a new job, a full copy (NEW); else
   ``StateFile.open`` over the crashed bytes (StateError: REFUSE) and ``plan_resume`` with
   the images' identities (dev/ino/size fixed, mtime_ns the count of content operations
   that crashed image holds, so a clean stop followed by writes is seen): StateError is
   REFUSE, no bitmap NEW, else RESUME(R). The one invariant: once ``TARGET_LIVE`` is in
   the prefix, the outcome is REFUSE (the stale source is never copied over the live
   image); otherwise a RESUME's R has every chunk in which the crashed source and target
   differ. A violation names the seed, the prefix, the variant, the chunks and the
   operations around the crash point.
"""

import contextlib
import dataclasses
import errno
import inspect
import random
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio
import trio.lowlevel
import trio.testing
from bitarray import bitarray

from mirrorfs.config import MirrorConfig
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
from mirrorfs.job import Job
from mirrorfs.mirror import Mirror
from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode
from mirrorfs.state import ActivityLog, StateError, StateFile, plan_resume

KiB, MiB = 1 << 10, 1 << 20
SECTOR = 512
TARGET_LIVE = "target-live"
STATE_PATH = "/mirrorfs-crashsim/target.mirrorfs"  # never opened: all I/O is simulated
VARIANTS = ("kill", "power", "torn", "power+source", "random")
REFUSE, NEW, RESUME = "REFUSE", "NEW", "RESUME"

Op = tuple[Any, ...]


# ====================================================================== the trace
class Trace:
    """Every storage operation, in order (see the module docstring)."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def add(self, *op: Any) -> None:
        self.ops.append(op)

    def mark(self, name: str) -> None:
        self.ops.append(("mark", name))


def describe(op: Op) -> str:
    kind = op[0]
    if kind == "write":
        return f"write {op[1]} @{op[2]} +{len(op[3])}"
    if kind == "zero":
        return f"zero {op[1]} @{op[2]} +{op[3]}"
    if kind == "truncate":
        return f"truncate {op[1]} to {op[2]}"
    if kind == "mark":
        return f"-- {op[1]}"
    return f"{kind} {op[1]}"


# ====================================================================== simulated files
class SimImage:
    """An image in memory: what Mirror uses of mirrorfs.images.Image. Every change of
    content goes to the trace; ``flush`` is a sync. ``writes`` counts content operations:
    the modelled mtime."""

    fd = -1
    is_block = False

    def __init__(self, trace: Trace, name: str, data: bytearray, ino: int) -> None:
        self.trace = trace
        self.path = name
        self.size = len(data)
        self.data = data
        self.ino = ino
        self.writes = 0
        self.fail_errno = 0  # nonzero: writes and zeroing fail with it (a target fault)

    def identity(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "dev": 1, "ino": self.ino,
                "mtime_ns": self.writes}

    def _check(self) -> None:
        if self.fail_errno:
            raise OSError(self.fail_errno, f"{self.path}: injected fault")

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.size - offset))
        buf[:n] = self.data[offset:offset + n]
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return n

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int) -> int:
        self._check()
        n = len(data)
        if offset + n > self.size:
            raise OSError(errno.ENOSPC, "the simulated image does not grow")
        self.data[offset:offset + n] = data
        self.writes += 1
        self.trace.add("write", self.path, offset, bytes(data))
        return n

    def _zero(self, offset: int, length: int) -> None:
        length = min(length, self.size - offset)
        if length <= 0:
            return
        self._check()
        self.data[offset:offset + length] = bytes(length)
        self.writes += 1
        self.trace.add("zero", self.path, offset, length)

    def write_zeroes(self, offset: int, length: int, cheap_only: bool = False) -> bool:
        self._zero(offset, length)
        return True

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            self._zero(offset, length)  # else an allocation: no content change

    def copy_in(self, src: Any, offset: int, length: int) -> bool:
        return False

    def can_copy_from(self, src: Any) -> bool:
        return False

    def preallocate(self, offset: int, length: int) -> bool:
        return False

    @property
    def zeroes_cheaply(self) -> bool:
        return True

    def next_data(self, offset: int) -> int:
        return offset  # all data: zero chunks are found by reading them

    def next_hole(self, offset: int) -> int:
        return self.size

    def data_extents(self) -> list[tuple[int, int]]:
        return [(0, self.size)]

    def flush(self) -> None:
        self.trace.add("sync", self.path)

    def close(self) -> None:
        pass


class StateInode:
    def __init__(self, size: int = 0) -> None:
        self.data = bytearray(size)


class SimStateIO:
    """mirrorfs.state.StateIO over the world's state file. Writes to an inode that was
    unlinked since are not traced (no later mount can see them)."""

    def __init__(self, world: "World") -> None:
        self.world = world
        if world.state is None:
            world.state = StateInode()
        self.inode = world.state

    def _live(self) -> bool:
        return self.inode is self.world.state

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.inode.data[offset:offset + length])

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.world.state_io("pwrite")
        buf = self.inode.data
        end = offset + len(data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
        if self._live():
            self.world.trace.add("write", "state", offset, bytes(data))

    def sync(self) -> None:
        self.world.state_io("sync")
        if self._live():
            self.world.trace.add("sync", "state")

    def truncate(self, size: int) -> None:
        self.inode.data = bytearray(size)  # as StateFile.create's O_TRUNC, then ftruncate
        if self._live():
            self.world.trace.add("truncate", "state", size)

    def close(self) -> None:
        pass


class CrashedStateIO:
    """A crashed state file's bytes, read only (the check never writes)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def pread(self, length: int, offset: int) -> bytes:
        return self.data[offset:offset + length]

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        raise AssertionError("the check writes nothing")

    def sync(self) -> None:
        raise AssertionError("the check writes nothing")

    def truncate(self, size: int) -> None:
        raise AssertionError("the check writes nothing")

    def close(self) -> None:
        pass


# ====================================================================== the world
@dataclasses.dataclass
class Hold:
    """Stops ``run_sync`` calls whose function ``match``es (at most ``limit`` of them)
    until ``release`` is set."""

    match: Callable[[Callable[..., Any]], bool]
    limit: int | None = None
    reached: trio.Event = dataclasses.field(default_factory=trio.Event)
    release: trio.Event = dataclasses.field(default_factory=trio.Event)
    calls: int = 0


def fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", "")


def calls_on(obj: object, name: str) -> Callable[[Callable[..., Any]], bool]:
    """Matches the bound method ``name`` of ``obj`` (as the mirror passes it)."""
    return lambda fn: getattr(fn, "__self__", None) is obj and fn_name(fn) == name


class World:
    """The storage of one scenario (images, state file, registry, trace), shared by every
    mount of it, and the simulated worker threads (``run_sync``)."""

    def __init__(self, seed: int, size: int, granularity: int, yields: tuple[int, int] = (0, 3),
                 latency: float = 0.01) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.sched = random.Random(seed * 7919 + 1)  # run_sync's yields
        self.size, self.granularity = size, granularity
        self.trace = Trace()
        src = self.rng.randbytes(size)
        tgt = bytearray(src)
        # an existing target that differs: random, zero and equal chunks
        for c in range(-(-size // granularity)):
            lo, hi = c * granularity, min(size, (c + 1) * granularity)
            r = self.rng.random()
            if r < 0.4:
                tgt[lo:hi] = self.rng.randbytes(hi - lo)
            elif r < 0.55:
                tgt[lo:hi] = bytes(hi - lo)
            elif r < 0.6:
                tgt[lo + self.rng.randrange(hi - lo)] ^= 0x5A  # one byte differs
        self.initial_source, self.initial_target = bytes(src), bytes(tgt)
        self.source = SimImage(self.trace, "source", bytearray(src), 1)
        self.target = SimImage(self.trace, "target", tgt, 2)
        self.state: StateInode | None = None
        self.registry = b""
        self.yields = yields
        # Virtual seconds a 'thread' call may take (uniform from 0): without it every call
        # would finish in the instant it started, and no guest write would ever land
        # while a log entry, a checkpoint or a flush is on its way to the disk.
        self.latency = latency
        self.holds: list[Hold] = []
        self.watchers: list[Callable[[Callable[..., Any]], None]] = []  # see Guest.watch
        self.state_ops = 0
        self.state_fail_at: int | None = None  # the state I/O call with this number fails
        self.state_fail_errno = errno.ENOSPC
        self.state_failures = 0
        self.mounts = 0
        self.refused: list[str] = []
        self.stalls: list[str] = []  # tasks that spun without waiting: see SpinGuard

    # ------------------------------------------------------------------ threads
    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """As trio.to_thread.run_sync: a cancellation before the 'thread' starts raises;
        once started it runs to the end (shielded). It takes a random bit of virtual time
        and yields around the call, so that other tasks run meanwhile, as they would while
        a worker thread works."""
        await trio.lowlevel.checkpoint()
        with trio.CancelScope(shield=True):
            for watch in self.watchers:
                watch(fn)
            for hold in self.holds:
                if not hold.release.is_set() and (hold.limit is None or hold.calls < hold.limit
                                                  ) and hold.match(fn):
                    hold.calls += 1
                    hold.reached.set()
                    await hold.release.wait()
            latency = self.latency * (2 if fn_name(fn) == "flush" else 1)  # an image's
            if latency:  # the call's own time: others run meanwhile   # flush takes longer
                await trio.sleep(self.sched.uniform(0, latency))
            for _ in range(self.sched.randint(*self.yields)):
                await trio.lowlevel.checkpoint()
            result = fn(*args)
            for _ in range(self.sched.randint(*self.yields)):
                await trio.lowlevel.checkpoint()
        return result

    def hold(self, match: Callable[[Callable[..., Any]], bool], limit: int | None = None
             ) -> Hold:
        h = Hold(match, limit)
        self.holds.append(h)
        return h

    # ------------------------------------------------------------------ the state file
    def state_io(self, what: str) -> None:
        self.state_ops += 1
        if self.state_fail_at is not None and self.state_ops == self.state_fail_at:
            self.state_failures += 1
            self.trace.mark(f"state {what} fails ({errno.errorcode[self.state_fail_errno]})")
            raise OSError(self.state_fail_errno, f"injected state file {what} fault")

    def fail_state_io(self, after: int, err: int = errno.ENOSPC) -> None:
        """The ``after``-th state file write or sync from now fails."""
        self.state_fail_at = self.state_ops + after
        self.state_fail_errno = err

    def remove_state_quietly(self, path: str) -> None:
        """What mirror.py's remove_quietly does to the simulated state file: unlink."""
        if self.state is not None:
            self.state = None
            self.trace.add("unlink", "state")

    def remove_state_durably(self, path: str) -> bool:
        """What remove_durably does: unlink, then sync the directory."""
        self.remove_state_quietly(path)
        self.trace.add("syncdir", "state")
        return True

    @contextlib.contextmanager
    def patched_unlink(self) -> Iterator[None]:
        """The mirror drops a state file it cannot write by unlinking its path: point that
        at the simulated file, in every mirrorfs module that holds one of the two helpers
        (remove_quietly before issue 16's fixes, remove_durably after)."""
        saved: list[tuple[Any, str, Any]] = []
        fakes = {"remove_quietly": self.remove_state_quietly,
                 "remove_durably": self.remove_state_durably}
        modules = [m for name, m in sorted(sys.modules.items())
                   if name == "mirrorfs" or name.startswith("mirrorfs.")]
        for module in modules:
            for name, fake in fakes.items():
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, fake)
        try:
            yield
        finally:
            for module, name, real in saved:
                setattr(module, name, real)

    # ------------------------------------------------------------------ the registry
    def record_pivot(self) -> None:
        self.registry = b"pivoted: source -> target\n"
        self.trace.add("write", "registry", 0, self.registry)
        self.trace.add("sync", "registry")

    def forget_pivot(self) -> None:
        self.registry = b""
        self.trace.add("write", "registry", 0, b"")
        self.trace.add("sync", "registry")

    # ------------------------------------------------------------------ mounting
    async def mount(self, cfg: MirrorConfig, extent_bytes: int) -> "SimMirror | None":
        """As mount.py's prepare (_prepare_state) and _serve up to the copy loop: resume
        from the state file, or start a new job with a new one; None if refused."""
        self.mounts += 1
        self.trace.mark(f"mount {self.mounts}")
        if self.registry:
            return self._refuse("the source has a pivot record")
        g = cfg.granularity
        sf: StateFile | None = None
        resume: bitarray | None = None
        info: dict[str, Any] = {}
        if self.state is not None:
            try:
                sf = StateFile.open(STATE_PATH, io=SimStateIO(self))  # type: ignore[arg-type]
                plan = call_plan_resume(sf, self.source.identity(), self.target.identity(),
                                        str(cfg.sync), g)
            except StateError as e:
                return self._refuse(str(e))
            if plan.bitmap is None:
                sf = None
            else:
                resume, info, g = plan.bitmap, plan.info, plan.granularity
                cfg = dataclasses.replace(cfg, granularity=g)
                self.trace.mark(f"resume: {plan.note}")
        if sf is None:
            nchunks = -(-self.size // g)
            header = {"phase": "running", "clean": False, "size": self.size,
                      "granularity": g, "extent_bytes": extent_bytes, "nchunks": nchunks,
                      "nextents": -(-self.size // extent_bytes), "sync": str(cfg.sync),
                      "source": self.source.identity(), "target": self.target.identity()}
            sf = StateFile.create(STATE_PATH, header, io=SimStateIO(self))  # type: ignore[arg-type]
        persist = ActivityLog(sf, zeros(sf.nchunks), g, sf.header["extent_bytes"],
                              run_sync=self.run_sync)
        mirror = SimMirror(self, self.source, self.target, cfg, Job(), run_sync=self.run_sync,
                           persist=persist, resume=resume, resume_info=info,
                           record_pivot=self.record_pivot, forget_pivot=self.forget_pivot)
        try:
            await mirror.checkpoint(flush=False, phase="running", clean=False)
        except OSError as e:
            return self._refuse(f"cannot write the state file: {e}")
        return mirror

    def _refuse(self, why: str) -> "SimMirror | None":
        """A refused mount: noted, and None for ``mount`` to return."""
        self.refused.append(why)
        self.trace.mark(f"mount refused: {why}")
        return None


_PLAN_KW = set(inspect.signature(plan_resume).parameters)


def call_plan_resume(sf: StateFile, source: dict[str, Any], target: dict[str, Any],
                     sync: str, granularity: int) -> Any:
    """plan_resume as mount.py calls it (with the mount's sync and granularity where this
    version of state.py takes them)."""
    kw: dict[str, Any] = {}
    if "sync" in _PLAN_KW:
        kw["sync"] = sync
    if "granularity" in _PLAN_KW:
        kw["granularity"] = granularity
    return plan_resume(sf, source, target, **kw)


def zeros(n: int) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    return b


class SimMirror(Mirror):
    """The real Mirror; ``serving`` is a property only to mark in the trace the moment
    the target becomes the live image."""

    def __init__(self, world: World, *args: Any, **kw: Any) -> None:
        self._sim_world = world
        self._sim_serving: Any = None
        super().__init__(*args, **kw)

    @property
    def serving(self) -> Any:
        return self._sim_serving

    @serving.setter
    def serving(self, image: Any) -> None:
        if image is self.target and self._sim_serving is not image:
            self._sim_world.trace.mark(TARGET_LIVE)
        self._sim_serving = image


# ====================================================================== the guest
class Guest:
    """Guest writer tasks on one mount: random writes into hot and cold extents, some
    fsyncs and punched holes, until stopped."""

    def __init__(self, world: World, mirror: Mirror, rng: random.Random, writers: int,
                 extent_bytes: int, pause: float = 0.1, hot: float = 0.75) -> None:
        self.world, self.mirror, self.rng = world, mirror, rng
        self.writers = writers
        self.extent = extent_bytes
        nextents = -(-world.size // extent_bytes)
        self.hot = rng.sample(range(nextents), min(2, nextents))
        self.pause = pause  # mean seconds between a writer's requests
        self.hot_share = hot  # of the writes that go to the two hot extents
        self.paused = False  # writers idle while set (a quiet moment before a checkpoint)
        self.stop = trio.Event()
        self.done = 0
        self.writes = 0
        self.chase = trio.Event()  # set when a 'thread' call starts under the log's lock

    def watch(self, fn: Callable[..., Any]) -> None:
        """World.run_sync calls this as a call starts: one made under the activity log's
        lock (a checkpoint being written, a log entry on its way) is a window worth a
        write or two (the chaser's)."""
        persist = self.mirror.persist
        if persist is not None and persist.lock.locked():
            self.chase.set()

    def pick(self) -> tuple[int, int]:
        rng, size = self.rng, self.world.size
        n = rng.choice((512, 4 * KiB, 4 * KiB, 16 * KiB, 60 * KiB, 64 * KiB, 100 * KiB,
                        300 * KiB))
        if rng.random() < self.hot_share:
            e = rng.choice(self.hot)
            off = e * self.extent + rng.randrange(self.extent)
        else:
            off = rng.randrange(size)
        off -= off % 512
        return off, max(1, min(n, size - off))

    async def one(self, off: int, n: int) -> None:
        if self.rng.random() < 0.06:
            await self.mirror.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n)
        else:
            await self.mirror.write(off, self.rng.randbytes(n))
        self.writes += 1

    async def writer(self) -> None:
        rng, m = self.rng, self.mirror
        try:
            while not self.stop.is_set():
                if self.paused:
                    await trio.sleep(0.01)
                    continue
                off, n = self.pick()
                if rng.random() < 0.25:
                    # several requests in flight at once, near each other (queue depth)
                    base = off - off % self.extent
                    async with trio.open_nursery() as burst:
                        burst.start_soon(self.one, off, n)
                        for _ in range(rng.randrange(1, 4)):
                            o = min(base + rng.randrange(self.extent), self.world.size - 512)
                            o -= o % 512
                            burst.start_soon(self.one, o,
                                             min(rng.choice((4 * KiB, 64 * KiB)),
                                                 self.world.size - o))
                else:
                    await self.one(off, n)
                if rng.random() < 0.1:
                    await m.fsync()
                await trio.sleep(rng.uniform(0, 2 * self.pause))
        finally:
            self.done += 1

    async def chaser(self) -> None:
        """Writes anywhere, right when the state file is being written (see ``watch``)."""
        rng = self.rng
        try:
            while not self.stop.is_set():
                with trio.move_on_after(0.5):
                    await self.chase.wait()
                self.chase = trio.Event()
                if self.stop.is_set() or self.paused or rng.random() < 0.5:
                    continue
                persist = self.mirror.persist
                # where P (in memory: a checkpoint's new one) says "may differ", or anywhere
                marked = list(persist.p.search(1)) if persist is not None else []
                g = self.world.granularity
                async with trio.open_nursery() as burst:
                    for _ in range(rng.randrange(1, 3)):
                        if marked and rng.random() < 0.7:
                            off = rng.choice(marked) * g + rng.randrange(g - 4 * KiB)
                        else:
                            off = rng.randrange(self.world.size - 4 * KiB)
                        burst.start_soon(self.one, off - off % 512, 4 * KiB)
                await trio.sleep(rng.uniform(0, self.pause))
        finally:
            self.done += 1

    def start(self, nursery: trio.Nursery) -> None:
        if not self.writers:
            return
        for _ in range(self.writers):
            nursery.start_soon(self.writer)
        nursery.start_soon(self.chaser)
        self.world.watchers.append(self.watch)

    async def halt(self) -> None:
        self.stop.set()
        while self.writers and self.done < self.writers + 1:
            await trio.sleep(0.001)
        if self.watch in self.world.watchers:
            self.world.watchers.remove(self.watch)


# ====================================================================== scenarios
ENDINGS = ("cancel", "cancel-force", "cancel-early", "complete", "fail", "unmount")


@dataclasses.dataclass
class Plan:
    """A scenario, drawn from a seed by ``from_seed``."""

    seed: int
    size: int = 8 * MiB
    granularity: int = 64 * KiB
    extent_bytes: int = 512 * KiB
    copy_mode: CopyMode = CopyMode.BACKGROUND
    speed: int = 0
    checkpoint_s: float = 1.0
    writers: int = 3
    pause: float = 0.1  # see Guest
    hot: float = 0.75
    endings: tuple[str, ...] = ("cancel",)
    remount_last: bool = False  # after the last ending: unmount and mount once more
    state_fail_after: int | None = None  # this state file write or sync after mount fails
    state_fail_errno: int = errno.ENOSPC

    @classmethod
    def from_seed(cls, seed: int) -> "Plan":
        rng = random.Random(f"plan {seed}")
        n = rng.choice((1, 2, 2, 3))
        endings = tuple(rng.choice(ENDINGS) for _ in range(n))
        return cls(seed=seed, extent_bytes=rng.choice((256 * KiB, 512 * KiB, 1 * MiB)),
                   copy_mode=rng.choice((CopyMode.BACKGROUND, CopyMode.BACKGROUND,
                                         CopyMode.WRITE_BLOCKING)),
                   speed=rng.choice((0, 0, 16 * MiB)), checkpoint_s=rng.choice((1.0, 2.0)),
                   writers=rng.choice((2, 3)), endings=endings,
                   pause=rng.choice((0.03, 0.1, 0.2)), hot=rng.choice((0.5, 0.75, 0.9)),
                   remount_last=rng.random() < 0.5,
                   state_fail_after=rng.randrange(3, 60) if rng.random() < 0.25 else None,
                   state_fail_errno=rng.choice((errno.ENOSPC, errno.EIO)))

    def config(self) -> MirrorConfig:
        return MirrorConfig(granularity=self.granularity, speed=self.speed,
                            copy_mode=self.copy_mode, sync=SyncMode.FULL,
                            on_target_error=ErrorPolicy.REPORT, target_fresh=False,
                            checkpoint_s=self.checkpoint_s)


async def wait_until(pred: Callable[[], bool], limit: float) -> bool:
    """Poll ``pred`` every 10 ms of virtual time for at most ``limit`` seconds."""
    with trio.move_on_after(limit):
        while not pred():
            await trio.sleep(0.01)
        return True
    return False


def poke_checkpointer(mirror: Mirror) -> None:
    """Ask the mirror's own checkpointer for a checkpoint soon (as it does at ready). A
    second caller of Mirror.checkpoint next to the checkpointer is no state mount.py
    creates, so random scenarios ask the checkpointer instead. (A private lever, for
    tests only: where it is depends on the version of mirror.py.)"""
    checkpointer = getattr(mirror, "_state", None)
    if checkpointer is not None and hasattr(checkpointer, "soon"):
        checkpointer.soon = True
    elif hasattr(mirror, "_checkpoint_soon"):
        mirror._checkpoint_soon = True
    else:
        raise AssertionError("no way to ask this mirror's checkpointer for a checkpoint")


@dataclasses.dataclass
class MountRun:
    """One mount being served: its mirror, the copy loop's scope, the guest."""

    mirror: SimMirror
    scope: trio.CancelScope
    guest: Guest
    done: trio.Event


async def _run_loop(mirror: Mirror, scope: trio.CancelScope, done: trio.Event) -> None:
    try:
        with scope:
            await mirror.run()
    finally:
        done.set()


async def serve(world: World, plan: Plan, nursery: trio.Nursery, rng: random.Random,
                cfg: MirrorConfig | None = None) -> MountRun | None:
    """Mount and start the copy loop and the guest writers."""
    mirror = await world.mount(cfg or plan.config(), plan.extent_bytes)
    if mirror is None:
        return None
    scope, done = trio.CancelScope(), trio.Event()
    nursery.start_soon(_run_loop, mirror, scope, done)
    guest = Guest(world, mirror, rng, plan.writers, plan.extent_bytes, plan.pause, plan.hot)
    guest.start(nursery)
    return MountRun(mirror, scope, guest, done)


async def unmount(world: World, run: MountRun) -> None:
    """As _serve after pyfuse3.main returns: no more guest I/O, the loop cancelled, then
    save_final_state."""
    await run.guest.halt()
    run.scope.cancel()
    await run.done.wait()
    world.trace.mark(f"unmount ({run.mirror.job.state})")
    await run.mirror.save_final_state(world.source.identity(), world.target.identity())


async def _end_job(world: World, run: MountRun, ending: str, rng: random.Random) -> bool:
    """Apply one ending to a running job; True once the job has ended (or, for
    "unmount", once it is unmounted)."""
    m = run.mirror
    if ending == "cancel-early":
        await trio.sleep(rng.uniform(0, 0.3))
        if m.job.ready or m.job.ended:
            ending = "cancel"  # too late for an early one: a plain cancel then
        else:
            world.trace.mark("cancel (before ready)")
            m.cancel()
            return await wait_until(lambda: m.job.ended, 60)
    if not await wait_until(lambda: m.job.ready or m.job.ended, 120):
        raise AssertionError(f"seed {world.seed}: the job never became ready")
    if m.job.ended:
        return True
    world.trace.mark("ready")
    for _ in range(rng.randrange(1, 4)):  # in sync: writes, checkpoints
        await trio.sleep(rng.uniform(0.2, 1.5))
        if rng.random() < 0.6:
            poke_checkpointer(m)
    if rng.random() < 0.7:
        # A quiet moment and a checkpoint first (as "wait 12 s, then cancel"): the log is
        # empty when the ending comes, so what is written after it shows.
        run.guest.paused = True
        await trio.sleep(0.3)
        poke_checkpointer(m)
        await trio.sleep(rng.uniform(0.6, 1.2))
        run.guest.paused = False
    if m.job.ended:
        return True
    world.trace.mark(ending)
    if ending == "unmount":
        await unmount(world, run)
        return True
    if ending == "fail":
        world.target.fail_errno = errno.EIO
        ok = await wait_until(lambda: m.job.ended, 60)
        world.target.fail_errno = 0
        return ok
    if ending == "complete":
        m.complete()
    else:
        m.cancel(force=ending == "cancel-force")
    return await wait_until(lambda: m.job.ended, 120)


async def random_scenario(world: World, plan: Plan) -> None:
    rng = random.Random(f"steps {plan.seed}")
    async with trio.open_nursery() as nursery:
        run = await serve(world, plan, nursery, rng)
        if run is None:
            raise AssertionError(f"seed {plan.seed}: the first mount was refused")
        if plan.state_fail_after is not None:
            world.fail_state_io(plan.state_fail_after, plan.state_fail_errno)
        for i, ending in enumerate(plan.endings):
            last = i == len(plan.endings) - 1
            await _end_job(world, run, ending, rng)
            if ending != "unmount":
                world.trace.mark(f"ended: {run.mirror.job.state}")
                await trio.sleep(rng.uniform(0.3, 1.5))  # writes after the end
                if last and not plan.remount_last:
                    await run.guest.halt()
                    break
                await unmount(world, run)
            nxt = await serve(world, plan, nursery, rng)
            if nxt is None:  # refused (after a pivot): nothing more to run
                break
            run = nxt
            if last:  # the remount itself was the point: a little of it, then stop
                await trio.sleep(rng.uniform(0.2, 1.0))
                await run.guest.halt()
                run.scope.cancel()
                break
        nursery.cancel_scope.cancel()


class SpinGuard(trio.abc.Instrument):
    """Notices a task that keeps running while virtual time stands still (the autojump
    clock moves only when every task waits, so a task that spins freezes it): it then
    moves the clock on by ``jump`` seconds, as real time passes while a task spins, so that
    timers (the checkpointer) run as they would. Each spinning task is kept in ``spins``
    with its stack and the virtual time it spun. Normal tasks take a handful of steps
    per instant; a spin takes thousands."""

    def __init__(self, clock: trio.testing.MockClock, limit: int = 2000, jump: float = 0.05
                 ) -> None:
        self.clock, self.limit, self.jump = clock, limit, jump
        self.when = -1.0
        self.steps: Counter[trio.lowlevel.Task] = Counter()
        self.spins: dict[trio.lowlevel.Task, tuple[float, str]] = {}  # start, stack
        self.ends: dict[trio.lowlevel.Task, float] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self.when:
            self.when = now
            self.steps.clear()
            return
        self.steps[task] += 1
        if self.steps[task] > self.limit:
            if task not in self.spins:
                frames = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{lineno} "
                          f"{f.f_code.co_name}" for f, lineno in task.iter_await_frames()]
                self.spins[task] = (now, " <- ".join(reversed(frames)))
            self.clock.jump(self.jump)

    def report(self) -> list[str]:
        return [f"task {task.name} spun from virtual time {start:.3f} for "
                f"{self._spun(task):.2f} s: {stack}"
                for task, (start, stack) in self.spins.items()]

    def _spun(self, task: trio.lowlevel.Task) -> float:
        return self.ends.get(task, self.when) - self.spins[task][0]

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task in self.spins:
            self.ends.setdefault(task, trio.current_time())


def run_world(world: World, scenario: Callable[[], Awaitable[None]], limit: float = 3600
              ) -> None:
    """Run a scenario under trio with the autojump clock and seeded scheduling. Tasks
    that spun (see SpinGuard) are kept in ``world.stalls``."""
    import trio._core._run as trio_run  # the scheduler's own randomness, for repeatability

    trio_run._r.seed(world.seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    guard = SpinGuard(clock)

    async def main() -> None:
        with trio.fail_after(limit):
            await scenario()

    with world.patched_unlink():
        trio.run(main, clock=clock, instruments=[guard])
    world.stalls = guard.report()


# ====================================================================== the explorer
@dataclasses.dataclass
class Violation:
    seed: int
    prefix: int  # the crash leaves ops[:prefix]
    variant: str
    what: str
    chunks: list[int]
    context: list[str]

    def __str__(self) -> str:
        ctx = "\n      ".join(self.context)
        where = f"after op {self.prefix - 1}" if self.prefix else "before any op"
        return (f"seed {self.seed} crash {where} ({self.variant}): {self.what}"
                f"; chunks {self.chunks[:12]}{' ...' if len(self.chunks) > 12 else ''}\n"
                f"      {ctx}")


@dataclasses.dataclass
class Report:
    seed: int
    ops: int = 0
    points: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    variants: Counter[str] = dataclasses.field(default_factory=Counter)
    violations: list[Violation] = dataclasses.field(default_factory=list)
    violation_count: int = 0
    stalls: list[str] = dataclasses.field(default_factory=list)  # "seed N: ..."

    def add(self, other: "Report") -> None:
        self.ops += other.ops
        self.points += other.points
        self.outcomes.update(other.outcomes)
        self.variants.update(other.variants)
        self.violations.extend(other.violations)
        self.violation_count += other.violation_count
        self.stalls.extend(other.stalls)

    def summary(self) -> str:
        out = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        var = ", ".join(f"{k} {v}" for k, v in sorted(self.variants.items()))
        spins = f", {len(self.stalls)} stalled tasks" if self.stalls else ""
        return (f"{self.points} crash points over {self.ops} trace ops ({out}; {var}); "
                f"{self.violation_count} violations{spins}")


@dataclasses.dataclass
class Decision:
    outcome: str
    bitmap: bitarray | None
    why: str


class Overlay:
    """Chunks of an image changed on top of a base image, without copying the base."""

    def __init__(self, base: bytearray, g: int) -> None:
        self.base, self.g = base, g
        self.chunks: dict[int, bytearray] = {}

    def apply(self, op: Op) -> None:
        g, size = self.g, len(self.base)
        off = op[2]
        n = len(op[3]) if op[0] == "write" else op[3]
        end = min(size, off + n)
        for c in range(off // g, (end - 1) // g + 1 if end > off else off // g):
            buf = self.chunks.get(c)
            if buf is None:
                buf = self.chunks[c] = bytearray(self.base[c * g:min(size, (c + 1) * g)])
            lo, hi = max(off, c * g), min(end, (c + 1) * g)
            if op[0] == "write":
                buf[lo - c * g:hi - c * g] = op[3][lo - off:hi - off]
            else:
                buf[lo - c * g:hi - c * g] = bytes(hi - lo)

    def chunk(self, c: int) -> bytes:
        buf = self.chunks.get(c)
        g = self.g
        return bytes(buf) if buf is not None else bytes(self.base[c * g:(c + 1) * g])


def _apply_image(img: bytearray, op: Op) -> tuple[int, int]:
    """Apply a write or zero op; returns its byte range."""
    off = op[2]
    if op[0] == "write":
        img[off:off + len(op[3])] = op[3]
        return off, off + len(op[3])
    img[off:off + op[3]] = bytes(op[3])
    return off, off + op[3]


def _apply_state(value: bytearray | None, op: Op) -> bytearray | None:
    """Apply a state file op to its content (None: no file). ``value`` is changed."""
    kind = op[0]
    if kind == "truncate":
        return bytearray(op[2])
    if kind == "unlink":
        return None
    if kind == "write" and value is not None:
        off, data = op[2], op[3]
        if off + len(data) > len(value):
            value.extend(bytes(off + len(data) - len(value)))
        value[off:off + len(data)] = data
    return value


class Explorer:
    """Replays a trace and checks every crash state (see the module docstring)."""

    def __init__(self, world: World, max_violations: int = 10, every: int = 1,
                 variants: tuple[str, ...] = VARIANTS) -> None:
        self.world = world
        self.g = world.granularity
        self.size = world.size
        self.nchunks = -(-self.size // self.g)
        self.max_violations = max_violations
        self.every = every  # check every n-th plain op boundary (all syncs and state ops)
        self.variants = variants
        self.rng = random.Random(f"explore {world.seed}")
        self._cache: dict[tuple[Any, ...], Decision] = {}

    # ------------------------------------------------------------------ decisions
    def decide(self, state: bytes | None, registry: bytes, src_writes: int, tgt_writes: int
               ) -> Decision:
        key = (state, registry, src_writes, tgt_writes)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._decide(state, registry, src_writes, tgt_writes)
        return hit

    def _decide(self, state: bytes | None, registry: bytes, src_writes: int,
                tgt_writes: int) -> Decision:
        if registry:
            return Decision(REFUSE, None, "pivot record")
        if state is None:
            return Decision(NEW, None, "no state file")
        try:
            sf = StateFile.open(STATE_PATH, io=CrashedStateIO(state))  # type: ignore[arg-type]
        except StateError as e:
            return Decision(REFUSE, None, str(e))
        w = self.world
        src = dict(w.source.identity(), mtime_ns=src_writes)
        tgt = dict(w.target.identity(), mtime_ns=tgt_writes)
        try:
            plan = call_plan_resume(sf, src, tgt, str(SyncMode.FULL), self.g)
        except StateError as e:
            return Decision(REFUSE, None, str(e))
        if plan.bitmap is None:
            return Decision(NEW, None, plan.note)
        assert plan.granularity == self.g, "the scenarios keep one granularity"
        return Decision(RESUME, plan.bitmap, f"{plan.note} (header seq {sf.header['seq']}, "
                        f"phase {sf.header.get('phase')}, clean {sf.header.get('clean')})")

    # ------------------------------------------------------------------ replay
    def _chunks(self, lo: int, hi: int) -> range:
        return range(lo // self.g, (hi - 1) // self.g + 1) if hi > lo else range(0)

    def _differs(self, a: bytearray, b: bytearray, c: int) -> bool:
        lo, hi = c * self.g, min(self.size, (c + 1) * self.g)
        return a[lo:hi] != b[lo:hi]

    def run(self) -> Report:
        w = self.world
        ops = w.trace.ops
        rep = Report(w.seed, ops=len(ops))
        rep.stalls.extend(f"seed {w.seed}: {stall}" for stall in w.stalls)
        src_kill, tgt_kill = bytearray(w.initial_source), bytearray(w.initial_target)
        src_dur, tgt_dur = bytearray(w.initial_source), bytearray(w.initial_target)
        diff_kill = {c for c in range(self.nchunks) if self._differs(src_kill, tgt_kill, c)}
        diff_dur, diff_mix = set(diff_kill), set(diff_kill)
        pending: dict[str, list[Op]] = {"source": [], "target": [], "state": [],
                                        "registry": []}
        kill_n = {"source": 0, "target": 0}
        dur_n = {"source": 0, "target": 0}
        state_kill: bytearray | None = None
        state_dur: bytearray | None = None
        reg_kill = reg_dur = b""
        live = False
        self._check(rep, 0, live, View(
            src_kill, tgt_kill, src_dur, tgt_dur, diff_kill, diff_dur, diff_mix, pending,
            kill_n, dur_n, state_kill, state_dur, reg_kill, reg_dur))
        for i, op in enumerate(ops):
            kind, name = op[0], op[1]
            important = True
            if kind in ("write", "zero") and name in ("source", "target"):
                img = src_kill if name == "source" else tgt_kill
                lo, hi = _apply_image(img, op)
                for c in self._chunks(lo, hi):
                    if self._differs(src_kill, tgt_kill, c):
                        diff_kill.add(c)
                    else:
                        diff_kill.discard(c)
                    if name == "source":
                        if self._differs(src_kill, tgt_dur, c):
                            diff_mix.add(c)
                        else:
                            diff_mix.discard(c)
                pending[name].append(op)
                kill_n[name] += 1
                important = False
            elif kind == "sync" and name in ("source", "target"):
                img = src_dur if name == "source" else tgt_dur
                touched: set[int] = set()
                for p in pending[name]:
                    touched.update(self._chunks(*_apply_image(img, p)))
                dur_n[name] += len(pending[name])
                pending[name].clear()
                for c in touched:
                    if self._differs(src_dur, tgt_dur, c):
                        diff_dur.add(c)
                    else:
                        diff_dur.discard(c)
                    if name == "target":
                        if self._differs(src_kill, tgt_dur, c):
                            diff_mix.add(c)
                        else:
                            diff_mix.discard(c)
            elif name == "state":
                if kind == "sync":
                    for p in pending["state"]:
                        state_dur = _apply_state(state_dur, p)
                    pending["state"].clear()
                elif kind == "syncdir":  # the unlinks (and creations) before it are durable
                    last_ns = max((j for j, p in enumerate(pending["state"])
                                   if p[0] in ("unlink", "truncate")), default=-1)
                    for p in pending["state"][:last_ns + 1]:
                        state_dur = _apply_state(state_dur, p)
                    del pending["state"][:last_ns + 1]
                else:
                    state_kill = _apply_state(state_kill, op)
                    pending["state"].append(op)
            elif name == "registry":
                if kind == "sync":
                    for p in pending["registry"]:
                        reg_dur = p[3]
                    pending["registry"].clear()
                else:
                    reg_kill = op[3]
                    pending["registry"].append(op)
            elif kind == "mark":
                if name != TARGET_LIVE:
                    continue  # a crash here is the one just before it
                live = True
            if not important and self.every > 1 and i % self.every:
                continue
            self._check(rep, i + 1, live, View(
                src_kill, tgt_kill, src_dur, tgt_dur, diff_kill, diff_dur, diff_mix, pending,
                kill_n, dur_n, state_kill, state_dur, reg_kill, reg_dur))
        return rep

    # ------------------------------------------------------------------ checks
    def _check(self, rep: Report, k: int, live: bool, v: "View") -> None:
        any_pending = any(v.pending.values())
        b = bytes
        state_kill = b(v.state_kill) if v.state_kill is not None else None
        state_dur = b(v.state_dur) if v.state_dur is not None else None
        self._point(rep, k, live, "kill", state_kill, v.reg_kill, v.kill_n["source"],
                    v.kill_n["target"], v.diff_kill)
        if not any_pending:
            return  # every other variant is this one
        if "power" in self.variants:
            self._point(rep, k, live, "power", state_dur, v.reg_dur, v.dur_n["source"],
                        v.dur_n["target"], v.diff_dur)
        writes = [p for p in v.pending["state"] if p[0] == "write"]
        if "torn" in self.variants and writes:
            state: bytearray | None = bytearray(v.state_dur) if v.state_dur is not None \
                else None
            for p in v.pending["state"][:-1]:
                state = _apply_state(state, p)
            last = v.pending["state"][-1]
            if last[0] == "write":
                data = last[3]
                torn = bytearray(data)
                if state is not None:
                    old = bytearray(state[last[2]:last[2] + len(data)])
                    old.extend(bytes(len(data) - len(old)))
                    for s in range(0, len(data), SECTOR):
                        if self.rng.random() < 0.5:
                            torn[s:s + SECTOR] = old[s:s + SECTOR]
                    state = _apply_state(state, ("write", "state", last[2], bytes(torn)))
            self._point(rep, k, live, "torn", b(state) if state is not None else None,
                        v.reg_dur, v.dur_n["source"], v.dur_n["target"], v.diff_dur)
        if "power+source" in self.variants and v.pending["source"]:
            self._point(rep, k, live, "power+source", state_dur, v.reg_dur,
                        v.kill_n["source"], v.dur_n["target"], v.diff_mix)
        if "random" in self.variants:
            self._random_point(rep, k, live, v)

    def _random_point(self, rep: Report, k: int, live: bool, v: "View") -> None:
        rng = self.rng
        src, tgt = Overlay(v.src_dur, self.g), Overlay(v.tgt_dur, self.g)
        n = {"source": v.dur_n["source"], "target": v.dur_n["target"]}
        for name, ov in (("source", src), ("target", tgt)):
            for p in v.pending[name]:
                if rng.random() < 0.5:
                    ov.apply(p)
                    n[name] += 1
        state = bytearray(v.state_dur) if v.state_dur is not None else None
        for p in v.pending["state"]:
            if rng.random() < 0.5:
                state = _apply_state(state, p)
            elif p[0] in ("truncate", "unlink"):
                break  # nothing of the file after it reached the disk without it
        reg = v.reg_dur
        for p in v.pending["registry"]:
            if rng.random() < 0.5:
                reg = p[3]
        touched = set(src.chunks) | set(tgt.chunks)
        diff = (v.diff_dur - touched) | {c for c in touched if src.chunk(c) != tgt.chunk(c)}
        self._point(rep, k, live, "random", bytes(state) if state is not None else None, reg,
                    n["source"], n["target"], diff)

    def _point(self, rep: Report, k: int, live: bool, variant: str, state: bytes | None,
               registry: bytes, src_writes: int, tgt_writes: int, diff: set[int]) -> None:
        d = self.decide(state, registry, src_writes, tgt_writes)
        rep.points += 1
        rep.variants[variant] += 1
        rep.outcomes[d.outcome] += 1
        if live and d.outcome != REFUSE:
            self._violation(rep, k, variant, f"the target is the live image but the mount "
                            f"would {'start a new job' if d.outcome == NEW else 'resume'}: "
                            f"{d.why}", sorted(diff))
        elif d.outcome == RESUME:
            assert d.bitmap is not None
            missing = sorted(c for c in diff if not d.bitmap[c])
            if missing:
                self._violation(rep, k, variant, "source and target differ in chunks the "
                                f"resumed job would not copy: {d.why}", missing)

    def _violation(self, rep: Report, k: int, variant: str, what: str, chunks: list[int]
                   ) -> None:
        rep.violation_count += 1
        if len(rep.violations) >= self.max_violations:
            return
        ops = self.world.trace.ops
        lo = max(0, k - 10)
        ctx = [f"{'>' if j == k - 1 else ' '} {j}: {describe(ops[j])}"
               for j in range(lo, min(len(ops), k + 3))]
        ctx.insert(min(k, len(ops)) - lo, "  ^^^ crash here")
        rep.violations.append(Violation(self.world.seed, k, variant, what, chunks, ctx))


@dataclasses.dataclass
class View:
    src_kill: bytearray
    tgt_kill: bytearray
    src_dur: bytearray
    tgt_dur: bytearray
    diff_kill: set[int]
    diff_dur: set[int]
    diff_mix: set[int]
    pending: dict[str, list[Op]]
    kill_n: dict[str, int]
    dur_n: dict[str, int]
    state_kill: bytearray | None
    state_dur: bytearray | None
    reg_kill: bytes
    reg_dur: bytes


# ====================================================================== entry points
def explore_seed(seed: int, plan: Plan | None = None, **explorer_kw: Any) -> Report:
    """Run the seed's random scenario and check every crash point of its trace."""
    plan = plan or Plan.from_seed(seed)
    world = World(seed, plan.size, plan.granularity)
    run_world(world, lambda: random_scenario(world, plan))
    return Explorer(world, **explorer_kw).run()
