"""The state file: resume after a clean stop or a crash without a full recopy.

Layout of ``TARGET.mirrorfs`` (or ``--state FILE``), all offsets 4 KiB aligned:

    block 0, block 1   two header copies (JSON + crc32); the valid one with the higher
                       ``seq`` wins, and updates alternate between them, so a torn header
                       write never loses the previous one
    slot 0, slot 1     each: the activity log (one bit per extent) then the persisted dirty
                       bitmap P (one bit per chunk); the header names the active slot

What is on disk always covers every chunk in which source and target may differ: P, plus
every chunk of the extents set in the activity log (DRBD's idea). So:

* A guest write to chunks that P already holds as dirty needs nothing.
* Otherwise its extents must be in the activity log *on disk* (written and fdatasync'd)
  before the write reaches the source. That costs one small synchronous metadata write per
  extent (4 MiB by default), not per guest write.
* A log entry protects a write only once it is durable: its bit is visible to other
  writers only after its block was synced; writers into that extent wait meanwhile.
* A checkpoint first flushes both images (all but the first, before any guest write),
  then writes what may still differ (dirty, in flight, written since that flush began)
  into the inactive slot with an empty activity log, syncs, and switches the header to it.
  Until the switch the old slot is what a crash leaves, after it the new one: meanwhile a
  write skips the log only if both cover it (the new P and the old log); others wait for
  the checkpoint and log into the new slot. A checkpoint that fails before the header
  write changes nothing on disk; one whose header write fails leaves the disk unknown, and
  the state file is dropped (removed: no state means no resume).
* A clean stop is a checkpoint with ``clean: true``. After a crash, the resumed job copies P
  plus the logged extents: nothing else can differ.
* The end of a job (cancelled, failed) and the pivot (completed) are written in the header
  before their effect: before writes stop being tracked, before the target is served.
"""

import contextlib
import dataclasses
import errno
import json
import os
import zlib
from collections.abc import Callable
from typing import Any

import trio
from bitarray import bitarray

BLOCK = 4096
MAGIC = "mirrorfs-state"
VERSION = 1
DEFAULT_EXTENT = 4 << 20


class StateError(Exception):
    """A state file that cannot be used, as one line for the user."""


def _round_up(n: int, to: int = BLOCK) -> int:
    return -(-n // to) * to


class StateIO:
    """The state file's bytes: plain blocking calls on one descriptor. Everything the
    state file does to the disk goes through here, so the crash explorer (tests) can
    record every write and sync and replay any prefix of them as a crash would leave it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def truncate(self, size: int) -> None:
        """Size the file and allocate its blocks: later writes never need new space, so a
        file system that fills up (next to a growing target) cannot fail them with ENOSPC."""
        os.ftruncate(self.fd, size)
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a fs that cannot: do without
                raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StateFile:
    """The on-disk format. Plain blocking I/O; callers run it off the trio thread."""

    def __init__(self, path: str, io: StateIO, header: dict[str, Any]) -> None:
        self.path, self.io, self.header = path, io, header
        self.nchunks: int = header["nchunks"]
        self.nextents: int = header["nextents"]
        self.al_bytes = _round_up((self.nextents + 7) // 8)
        self.p_bytes = _round_up((self.nchunks + 7) // 8)
        self.slot_bytes = self.al_bytes + self.p_bytes

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: str, header: dict[str, Any], io: StateIO | None = None
               ) -> "StateFile":
        """A new state file with no valid header yet: until the first checkpoint, opening
        it fails (a crash before then leaves nothing to resume from, never a wrong job)."""
        if io is None:
            io = StateIO(os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                 0o600))
        h = dict(header, magic=MAGIC, version=VERSION, seq=0, slot=0)
        sf = cls(path, io, h)
        try:
            # with room for every later header: the longest phase, a huge seq
            _render_header(dict(h, phase="cancelled", seq=10**15, clean=False))
            io.truncate(2 * BLOCK + 2 * sf.slot_bytes)
        except BaseException:
            io.close()
            remove_durably(path)
            raise
        return sf

    @classmethod
    def open(cls, path: str, io: StateIO | None = None) -> "StateFile":
        if io is None:
            io = StateIO(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        try:
            best: dict[str, Any] | None = None
            for i in (0, 1):
                h = _parse_header(io.pread(BLOCK, i * BLOCK))
                if h is not None and (best is None or h["seq"] > best["seq"]):
                    best = h
            if best is None:
                raise StateError(f"state file {path} is not a mirrorfs state file or is "
                                 "damaged (use --fresh to start over)")
            return cls(path, io, best)
        except BaseException:
            io.close()
            raise

    def close(self) -> None:
        self.io.close()

    # ------------------------------------------------------------------ slots
    def _slot_off(self, slot: int) -> int:
        return 2 * BLOCK + slot * self.slot_bytes

    def read_slot(self) -> tuple[bitarray, bitarray]:
        """(activity log over extents, P over chunks) of the active slot."""
        off = self._slot_off(self.header["slot"])
        al = bitarray(endian="little")
        al.frombytes(self.io.pread(self.al_bytes, off))
        p = bitarray(endian="little")
        p.frombytes(self.io.pread(self.p_bytes, off + self.al_bytes))
        return al[:self.nextents], p[:self.nchunks]

    def write_checkpoint(self, p: bitarray, **fields: Any) -> None:
        """P into the inactive slot with an empty log, sync, then switch the header."""
        self.write_slot(p)
        self.write_header(slot=1 - self.header["slot"], **fields)

    def write_slot(self, p: bitarray) -> None:
        """P into the inactive slot with an empty log, synced. The header still names the
        active slot: a failure here leaves what is on disk as it was."""
        off = self._slot_off(1 - self.header["slot"])
        self.io.pwrite(bytes(self.al_bytes), off)
        assert p.endian == "little"
        self.io.pwrite(memoryview(p), off + self.al_bytes)  # no copy of a large P
        self.io.sync()

    def write_header(self, **fields: Any) -> None:
        h = dict(self.header, **fields)
        h["seq"] = self.header["seq"] + 1
        self.io.pwrite(_render_header(h), (h["seq"] % 2) * BLOCK)
        self.io.sync()
        self.header = h

    def void(self) -> bool:
        """Make the file unusable where it cannot be removed: both header copies zeroed
        (their blocks were allocated at creation, so no space is needed), synced. A later
        mount then refuses it ("damaged") instead of resuming from it. False on failure."""
        try:
            self.io.pwrite(bytes(2 * BLOCK), 0)
            self.io.sync()
        except OSError:
            return False
        return True

    def log_extent(self, al: bitarray, extent: int) -> None:
        """Write the log block holding ``extent``'s bit, set, and the rest of ``al``'s bits in
        that block, sync. ``al`` itself is not changed: its bit is set by the caller once
        this has returned (a log entry protects only once it is durable)."""
        blk = extent // 8 // BLOCK * BLOCK  # byte offset of its block in the log
        bits = al[blk * 8:(blk + BLOCK) * 8]  # only that block (a copy): a guest waits
        bits[extent - blk * 8] = 1
        self.io.pwrite(_padded(bits, BLOCK), self._slot_off(self.header["slot"]) + blk)
        self.io.sync()


def _padded(bits: bitarray, nbytes: int) -> bytes:
    assert bits.endian == "little"
    b = bits.tobytes()
    return b + bytes(nbytes - len(b))


def _render_header(h: dict[str, Any]) -> bytes:
    body = json.dumps(h, sort_keys=True).encode()
    line = body + b"\n" + f"{zlib.crc32(body):08x}\n".encode()
    if len(line) > BLOCK:  # an OSError: every writer of the header drops the file then
        raise StateFileLost(errno.EFBIG, "the state file's header outgrew its block")
    return line + bytes(BLOCK - len(line))


def _parse_header(block: bytes) -> dict[str, Any] | None:
    try:
        body, crc, _rest = block.split(b"\n", 2)
        if int(crc, 16) != zlib.crc32(body):
            return None
        h = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(h, dict) or h.get("magic") != MAGIC or h.get("version") != VERSION:
        return None
    return h


def identity(fd: int) -> dict[str, int]:
    st = os.fstat(fd)
    return {"dev": st.st_dev, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns}


class StateFileLost(OSError):
    """The state file no longer says what a resumed job must copy: stop using it."""


class ActivityLog:
    """The in-memory side of the state file, used by the mirror's write path.

    Invariant 8: what protects a guest write is what is *on disk*. ``p`` is the P that
    is on disk (while a checkpoint writes a new one: that new P), ``al`` the extents whose
    log entries in the current slot are durable. A bit is set in ``al`` only once its
    block is synced; a writer into an extent being logged finds it not covered and waits
    for the lock, which the logging writer holds until the sync returned."""

    def __init__(self, sf: StateFile, p: bitarray, granularity: int, extent_bytes: int,
                 run_sync: Any = None) -> None:
        self.sf = sf
        self.p = p
        self.al = bitarray(sf.nextents, endian="little")
        self.al.setall(0)
        self.ext_shift = (extent_bytes // granularity).bit_length() - 1  # chunks -> extent
        self.lock = trio.Lock()
        self._run_sync = run_sync or trio.to_thread.run_sync
        # While a checkpoint is being written: the log of the slot still on disk. Until the
        # header switch a crash leaves the old slot, after it the new one, so only what
        # both cover is safe: the new P and the old log (the old P is gone from memory).
        self._old_al: bitarray | None = None
        self.al_writes = 0
        self.checkpoints = 0

    def covers(self, a: int, b: int) -> bool:
        """Is every chunk in [a, b) safe on disk already? (hot path: no I/O) Extent by
        extent: by its log entry, or by P for all of its chunks in the range (as ``log``
        sees it, or a write across a P-covered and a logged extent would never pass)."""
        old_al = self._old_al
        if old_al is not None:
            return self._p_covers(a, b) and self._al_covers(old_al, a, b)
        if self._p_covers(a, b) or self._al_covers(self.al, a, b):
            return True
        sh = self.ext_shift
        for e in range(a >> sh, ((b - 1) >> sh) + 1):
            if not self.al[e] and not self._p_covers(max(a, e << sh), min(b, (e + 1) << sh)):
                return False
        return True

    def _p_covers(self, a: int, b: int) -> bool:
        if b == a + 1:
            return bool(self.p[a])
        return self.p.count(1, a, b) == b - a

    def _al_covers(self, al: bitarray, a: int, b: int) -> bool:
        ea, eb = a >> self.ext_shift, ((b - 1) >> self.ext_shift) + 1
        if eb == ea + 1:
            return bool(al[ea])
        return al.count(1, ea, eb) == eb - ea

    async def log(self, a: int, b: int) -> None:
        """Record the extents of chunks [a, b) on disk before a guest write proceeds."""
        async with self.lock:
            if self.covers(a, b):  # a checkpoint or another writer did it meanwhile
                return
            for e in range(a >> self.ext_shift, ((b - 1) >> self.ext_shift) + 1):
                lo, hi = max(a, e << self.ext_shift), min(b, (e + 1) << self.ext_shift)
                if not self.al[e] and self.p.count(1, lo, hi) < hi - lo:
                    await self._run_sync(self.sf.log_extent, self.al, e)
                    self.al[e] = 1  # durable now: from here it protects other writers
                    self.al_writes += 1

    async def checkpoint(self, fill: Callable[[bitarray], None], **fields: Any) -> None:
        """Persist a snapshot of the chunks that may differ and empty the log.

        ``fill`` writes the snapshot into ``self.p`` in place (no second copy of a bitmap
        that is 32 MiB for 16 TiB), under the lock, so no write can slip between it and the
        switch to the new log. P must never say "clean" about a chunk whose copy is still
        only in a cache: the caller flushed both images first, or (the first checkpoint,
        before any guest write) ``fill`` counts everything written since as dirty.

        A failure before the header write leaves the old slot on disk and the old log in
        memory; a failure of the header write itself leaves the disk unknown (either
        header may win at the next open): StateFileLost, the caller stops trusting it."""
        async with self.lock:
            old_al = self.al.copy()
            self._old_al = old_al
            try:
                fill(self.p)
                # Writes not covered by both slots wait for the lock and log in the new one.
                self.al.setall(0)
                try:
                    await self._run_sync(self.sf.write_slot, self.p)
                except BaseException:
                    self.p.setall(0)  # the old P is gone from memory: empty is the safe
                    self.al = old_al  # stand-in (every uncovered write logs first)
                    raise
                try:
                    await self._run_sync(lambda: self.sf.write_header(
                        slot=1 - self.sf.header["slot"], **fields))
                except OSError as e:
                    raise StateFileLost(e.errno, "cannot switch the state file's header: "
                                        f"{e.strerror or e}") from e
                except BaseException:  # cancelled before the header write began: the
                    self.p.setall(0)  # old slot is what is on disk, as after a failed
                    self.al = old_al  # slot write
                    raise
            finally:
                self._old_al = None
            self.checkpoints += 1

    async def set_fields(self, **fields: Any) -> None:
        """Write the header with ``fields`` changed. A failed header write leaves the disk
        unknown: StateFileLost."""
        async with self.lock:
            try:
                await self._run_sync(lambda: self.sf.write_header(**fields))
            except OSError as e:
                raise StateFileLost(e.errno, "cannot write the state file's header: "
                                    f"{e.strerror or e}") from e


def remove_durably(path: str) -> bool:
    """Unlink ``path`` and sync its directory: a state file that is dropped must not come
    back after a power loss. False if it could not be removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclasses.dataclass
class ResumePlan:
    """What a mount does with a saved job: resume it (``bitmap``: every chunk that may
    differ) or start a new one (``bitmap`` None). ``note`` says which, for the user."""

    bitmap: bitarray | None
    granularity: int
    note: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def plan_resume(sf: StateFile, source: dict[str, Any], target: dict[str, Any],
                sync: str | None = None, granularity: int | None = None) -> ResumePlan:
    """Decide from the state file alone (pure: no I/O but reading it) whether and how a
    job resumes. ``source`` and ``target`` are the images' identities now (``identity``
    plus path and size); ``sync`` and ``granularity`` what the new mount asks for. Raises
    StateError, with the reason, where resuming would be unsafe or not what was asked
    (a saved bitmap covers what its own sync mode needs, not another's) and starting anew
    could overwrite the live image."""
    h = sf.header
    for what, now, saved in (("source", source, h.get("source", {})),
                             ("target", target, h.get("target", {}))):
        if (saved.get("dev"), saved.get("ino")) != (now.get("dev"), now.get("ino")) \
                or saved.get("size") != now.get("size") \
                or ("dev" not in now and saved.get("path") != now.get("path")):
            raise StateError(f"the state file {sf.path} belongs to another {what} "
                             f"({saved.get('path')}): use --fresh to start a new mirror")
        if h.get("clean") and h.get("phase") == "running" \
                and saved.get("mtime_ns") != now.get("mtime_ns"):
            raise StateError(f"the {what} {now.get('path')} was modified after the job "
                             "stopped: resuming could miss those writes; use --fresh to "
                             "start over")
    phase = h.get("phase")
    if phase == "completed":
        raise StateError(f"{target.get('path')} is the live image since the mirror "
                         f"completed: {source.get('path')} is stale and must not be copied "
                         f"over it (use --fresh to start a new mirror from "
                         f"{source.get('path')})")
    if phase in ("cancelled", "failed"):
        return ResumePlan(None, h["granularity"],
                          f"the previous job {phase}: starting a new one")
    if sync is not None and h.get("sync", sync) != sync:
        raise StateError(f"the saved job in {sf.path} runs with --sync {h.get('sync')}, not "
                         f"{sync}: remount with --sync {h.get('sync')} to resume it, or use "
                         "--fresh to start a new mirror")
    al, p = sf.read_slot()
    shift = (h["extent_bytes"] // h["granularity"]).bit_length() - 1
    for e in al.search(1):
        p[e << shift:(e + 1) << shift] = 1
    clean = bool(h.get("clean"))
    nbytes = p.count(1) * h["granularity"]
    how = "a clean stop" if clean else "a crash"
    note = f"resuming the job after {how}: {nbytes} bytes to copy"
    if granularity is not None and granularity != h["granularity"]:
        # the saved bitmap is in its own chunks: the job keeps them, and says so
        note += f" (at the saved job's granularity {h['granularity']}, not {granularity})"
    return ResumePlan(p, h["granularity"], note, {"clean_stop": clean,
                                                  "resumed_bytes": nbytes})
