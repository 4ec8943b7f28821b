"""Tests that kill surviving mutants (docs/mutation.md) in lines that keep an invariant of
DOMAIN.md: the activity log's coverage and durability (8), the state file's refusals and
resume plan (9), the pivot registry (9), and the dirty bitmap's search and resume.
Kernel-free and fast."""

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bitarray import bitarray

from mirrorfs.bitmap import BLOCK_CHUNKS, DirtyBitmap
from mirrorfs.pivots import PivotRegistry, source_identity
from mirrorfs.state import (
    BLOCK,
    MAGIC,
    VERSION,
    ActivityLog,
    StateError,
    StateFile,
    _parse_header,
    _render_header,
    identity,
    plan_resume,
    remove_durably,
)

HEADER = {"phase": "running", "clean": False, "size": 1 << 30, "granularity": 65536,
          "extent_bytes": 4 << 20, "nchunks": 16384, "nextents": 256}


def bits(n: int, ones: list[int] | range) -> bitarray:
    b = bitarray(n, endian="little")
    b.setall(0)
    for i in ones:
        b[i] = 1
    return b


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _log(tmp: Path, p: bitarray, run_sync: Any = _inline) -> ActivityLog:
    sf = StateFile.create(str(tmp / "state"), HEADER)
    sf.write_checkpoint(bits(16384, []))
    return ActivityLog(sf, p, 65536, 4 << 20, run_sync)  # 64 chunks per extent


# ---------------------------------------------------------------------- invariant 8
def test_p_covers_a_range_only_when_every_chunk_in_it_is_dirty(tmp_path: Path) -> None:
    """A write is unprotected unless P has every chunk of its range (or the log does)."""
    alog = _log(tmp_path, bits(16384, [1, 2]))
    assert not alog.covers(0, 2)  # chunk 0 is clean in P; the dirty chunks after it
    assert alog.covers(1, 3)


@pytest.mark.parametrize("logged", [[0], [2, 3]])
def test_the_log_covers_a_range_only_when_every_extent_in_it_is_logged(
        tmp_path: Path, logged: list[int]) -> None:
    alog = _log(tmp_path, bits(16384, []))
    alog.al = bits(256, logged)
    assert not alog.covers(0, 128)  # extents 0 and 1: not both logged


class _Boom(BaseException):
    pass


@pytest.mark.parametrize("fails", ["slot", "cancelled before the header"])
async def test_a_failed_checkpoint_leaves_nothing_covered(tmp_path: Path, fails: str) -> None:
    """After a checkpoint that did not switch the header, the P in memory is not what is
    on disk: it must claim nothing, so every later write logs first."""
    sf = StateFile.create(str(tmp_path / "state"), HEADER)
    sf.write_checkpoint(bits(16384, []))

    async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
        if fn == sf.write_slot and fails == "slot":
            raise OSError(errno.EIO, "slot")
        if getattr(fn, "__name__", "") == "<lambda>":  # the header switch
            raise _Boom
        return fn(*args)

    alog = ActivityLog(sf, bits(16384, []), 65536, 4 << 20, run_sync)
    with pytest.raises(OSError if fails == "slot" else _Boom):
        await alog.checkpoint(lambda p: p.setall(1))
    assert not alog.covers(0, 1) and not alog.covers(0, 16384)
    await alog.log(0, 1)  # and logging works, in the old slot
    assert alog.covers(0, 1)


def test_a_log_entry_lands_in_its_own_block_of_a_big_log(tmp_path: Path) -> None:
    """Past the first 8 * BLOCK extents the entry goes to a later block of the log."""
    n = 8 * BLOCK + 1000
    sf = StateFile.create(str(tmp_path / "state"), {
        "phase": "running", "clean": False, "size": n << 16, "granularity": 65536,
        "extent_bytes": 65536, "nchunks": n, "nextents": n})
    sf.write_checkpoint(bits(n, []))
    e = 8 * BLOCK + 500
    sf.log_extent(bits(n, [8 * BLOCK + 3]), e)
    sf.close()
    al, p = StateFile.open(str(tmp_path / "state")).read_slot()
    assert list(al.search(1)) == [8 * BLOCK + 3, e] and not p.any()


# ---------------------------------------------------------------------- invariant 9
def _saved(tmp: Path, size: int, source: dict[str, Any], target: dict[str, Any],
           phase: str = "running", clean: bool = False, logged: tuple[int, ...] = ()
           ) -> StateFile:
    sf = StateFile.create(str(tmp / "state"), {
        "phase": phase, "clean": clean, "size": size, "granularity": 65536,
        "extent_bytes": 4 << 20, "nchunks": size >> 16, "nextents": size >> 22,
        "sync": "full", "source": source, "target": target})
    sf.write_checkpoint(bits(size >> 16, []))
    for e in logged:
        sf.log_extent(bits(size >> 22, []), e)
    return StateFile.open(sf.path)


def _files(tmp: Path, size: int) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    fds = []
    for name in ("src", "tgt"):
        (tmp / name).write_bytes(b"")
        os.truncate(tmp / name, size)
        fds.append(os.open(tmp / name, os.O_RDWR))
    src = dict(identity(fds[0]), path=str(tmp / "src"), size=size)
    tgt = dict(identity(fds[1]), path=str(tmp / "tgt"), size=size)
    return src, tgt, fds[0], fds[1]


def test_a_state_file_of_other_images_is_refused_by_their_identity(tmp_path: Path) -> None:
    size = 16 << 20
    src, tgt, fs, ft = _files(tmp_path, size)
    try:
        sf = _saved(tmp_path, size, src, tgt)
        assert plan_resume(sf, src, tgt).bitmap is not None
        with pytest.raises(StateError, match="another source"):
            plan_resume(sf, tgt, tgt)  # another file: its identity says so
        with pytest.raises(StateError, match="another target"):
            plan_resume(sf, src, dict(tgt, size=size * 2))  # same inode, resized
        sf = _saved(tmp_path, size, src, tgt, clean=True)
        os.utime(fs, ns=(1, 1))  # written after the clean stop, behind the job's back
        with pytest.raises(StateError, match="modified after the job stopped"):
            plan_resume(sf, dict(identity(fs), path=src["path"], size=size), tgt)
    finally:
        os.close(fs)
        os.close(ft)


def test_a_block_device_state_file_is_matched_by_path_too(tmp_path: Path) -> None:
    size = 16 << 20
    src, tgt = {"path": "/dev/vdb", "size": size}, {"path": "/dev/vdc", "size": size}
    sf = _saved(tmp_path, size, src, tgt)
    assert plan_resume(sf, src, tgt).bitmap is not None
    with pytest.raises(StateError, match="another source"):
        plan_resume(sf, dict(src, path="/dev/vdx"), tgt)


def test_a_completed_job_is_never_resumed(tmp_path: Path) -> None:
    size = 16 << 20
    src, tgt = {"path": "/s", "dev": 1, "ino": 2, "size": size}, \
        {"path": "/t", "dev": 1, "ino": 3, "size": size}
    sf = _saved(tmp_path, size, src, tgt, phase="completed")
    with pytest.raises(StateError, match="is the live image"):
        plan_resume(sf, src, tgt)
    sf = _saved(tmp_path, size, src, tgt, phase="cancelled")
    plan = plan_resume(sf, src, tgt)
    assert plan.bitmap is None and plan.granularity == 65536


def test_a_logged_extent_resumes_exactly_its_chunks_dirty(tmp_path: Path) -> None:
    size = 32 << 20  # 8 extents of 64 chunks
    src, tgt = {"path": "/s", "dev": 1, "ino": 2, "size": size}, \
        {"path": "/t", "dev": 1, "ino": 3, "size": size}
    plan = plan_resume(_saved(tmp_path, size, src, tgt, logged=(3,)), src, tgt)
    assert plan.bitmap is not None
    assert list(plan.bitmap.search(1)) == list(range(3 * 64, 4 * 64))


def test_a_header_of_another_version_or_format_is_not_trusted() -> None:
    h = dict(HEADER, magic=MAGIC, version=VERSION, seq=1, slot=0)
    assert _parse_header(_render_header(h)) == h
    assert _parse_header(_render_header(dict(h, version=VERSION + 1))) is None
    assert _parse_header(_render_header(dict(h, magic="other"))) is None


def test_an_opened_state_file_keeps_its_path(tmp_path: Path) -> None:
    """Dropping it later removes that path (no state means no resume)."""
    sf = StateFile.create(str(tmp_path / "state"), HEADER)
    sf.write_checkpoint(bits(16384, []))
    sf.close()
    assert StateFile.open(str(tmp_path / "state")).path == str(tmp_path / "state")


class _FailingIO:
    fd = -1

    def pwrite(self, data: bytes, offset: int) -> None:
        raise OSError(errno.EIO, "gone")

    def sync(self) -> None:
        raise OSError(errno.EIO, "gone")


def test_void_says_whether_the_file_was_made_unusable(tmp_path: Path) -> None:
    sf = StateFile.create(str(tmp_path / "state"), HEADER)
    sf.write_checkpoint(bits(16384, []))
    assert sf.void() is True
    with pytest.raises(StateError, match="damaged"):
        StateFile.open(str(tmp_path / "state"))
    broken = StateFile(str(tmp_path / "state"), _FailingIO(), sf.header)  # type: ignore
    assert broken.void() is False


def test_remove_durably_says_whether_the_file_is_gone(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_bytes(b"x")
    assert remove_durably(str(tmp_path / "a")) is True and not (tmp_path / "a").exists()
    monkeypatch.chdir(tmp_path)
    Path("b").write_bytes(b"x")
    assert remove_durably("b") is True and not Path("b").exists()  # its directory: "."
    (tmp_path / "d").mkdir()
    assert remove_durably(str(tmp_path / "d")) is False  # cannot be unlinked


# ---------------------------------------------------------------------- pivots.py
# Invariant 9: once a target went live, no later mount may copy the stale source over it.
# The registry's find is what a mount asks; every key of the identity must take part.
def _file_ident(tmp: Path) -> tuple[dict[str, Any], int]:
    p = tmp / "src.img"
    p.write_bytes(b"a" * 4096)
    fd = os.open(p, os.O_RDWR)
    return source_identity(str(p), fd), fd


@pytest.mark.parametrize("key", ["dev", "ino", "size", "mtime_ns"])
def test_a_pivot_record_matches_only_the_same_file(tmp_path: Path, key: str) -> None:
    reg = PivotRegistry(str(tmp_path / "reg"))
    ident, fd = _file_ident(tmp_path)
    os.close(fd)
    reg.record(ident, "/live.img")
    rec = reg.find(dict(ident))
    assert rec is not None and rec["target"] == "/live.img"
    other = dict(ident)
    other[key] += 1
    assert reg.find(other) is None  # another file (a recycled inode), or changed since


def test_a_block_device_record_is_keyed_and_matched_by_its_device_number(
        tmp_path: Path) -> None:
    reg = PivotRegistry(str(tmp_path / "reg"))
    blk = {"path": "/dev/vdb", "rdev": 0xFD10}  # no dev/ino: a block device's identity
    reg.record(blk, "/dev/vdc")
    assert (Path(reg.dir) / (hashlib.sha256(b"blk:64784").hexdigest()[:32] + ".json")
            ).exists()
    rec = reg.find({"path": "/dev/vdb", "rdev": 0xFD10})
    assert rec is not None and rec["target"] == "/dev/vdc"
    assert reg.find({"path": "/dev/vdb", "rdev": 0xFD11}) is None
    assert reg.find({"path": "/dev/vdx", "rdev": 0xFD10}) is None  # path changed too


def test_pivot_records_keep_their_name_and_place(tmp_path: Path) -> None:
    """A record written by an earlier version must still be found: the name is part of
    the format, and it lives in the registry's directory, not the working directory."""
    reg = PivotRegistry(str(tmp_path / "reg"))
    ident = {"path": "/img", "dev": 7, "ino": 42, "size": 1, "mtime_ns": 2}
    reg.record(ident, "/t")
    name = hashlib.sha256(b"7:42").hexdigest()[:32] + ".json"
    assert os.listdir(reg.dir) == [name]
    reg.record({**ident, "ino": 43}, "/t2")  # the directory exists now: still fine
    assert len(os.listdir(reg.dir)) == 2
    assert stat.S_IMODE(os.stat(reg.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Path(reg.dir) / name).st_mode) == 0o600


def test_an_unreadable_pivot_record_refuses_with_a_message(tmp_path: Path) -> None:
    """Unreadable means do not trust; the mount's refusal names target and time."""
    reg = PivotRegistry(str(tmp_path / "reg"))
    ident = {"path": "/img", "dev": 7, "ino": 42, "size": 1, "mtime_ns": 2}
    reg.record(ident, "/t")
    Path(reg._file(ident)).write_text("{torn")
    rec = reg.find(ident)
    assert rec is not None
    assert rec["source"] == ident and "unreadable" in rec["target"] and rec["time"] == "?"


def test_a_stale_temporary_file_does_not_corrupt_a_new_record(tmp_path: Path) -> None:
    reg = PivotRegistry(str(tmp_path / "reg"))
    ident = {"path": "/img", "dev": 7, "ino": 42, "size": 1, "mtime_ns": 2}
    os.makedirs(reg.dir)
    Path(reg._file(ident) + ".tmp").write_text("x" * 4096)  # a crash's leftover
    reg.record(ident, "/t")
    rec = reg.find(ident)
    assert rec is not None and rec["target"] == "/t"


def test_clearing_a_source_without_a_record_is_fine(tmp_path: Path) -> None:
    reg = PivotRegistry(str(tmp_path / "reg"))
    reg.clear({"path": "/img", "dev": 7, "ino": 42, "size": 1, "mtime_ns": 2})


# ---------------------------------------------------------------------- bitmap.py
def test_a_one_byte_write_touches_its_chunk() -> None:
    """chunks_of decides which extents a write logs first (invariant 8)."""
    bm = DirtyBitmap(1 << 20, 65536)
    assert bm.chunks_of(5, 1) == (0, 1)
    assert bm.chunks_of(65536 * 3 + 7, 0) == (3, 3)


def test_a_resumed_bitmap_is_ored_in_and_searchable() -> None:
    """Resume: every saved dirty chunk stays dirty, and the copier finds it."""
    n = 3 * BLOCK_CHUNKS
    bm = DirtyBitmap(n << 16, 65536)
    bm.mark_chunks(3, 4)
    saved = bits(n, [10, 2 * BLOCK_CHUNKS + 5])
    bm.mark_from(saved)
    saved[20] = 1  # the caller's bitarray is not the bitmap
    assert [c for c in range(n) if bm.is_dirty(c)] == [3, 10, 2 * BLOCK_CHUNKS + 5]
    assert bm.dirty_chunks == 3
    assert bm.find_dirty(4) == 10 and bm.find_dirty(11) == 2 * BLOCK_CHUNKS + 5


def test_a_partial_search_never_hides_a_dirty_chunk() -> None:
    """find_dirty over part of a block must not mark the block clean in its summary: the
    copier would then never find the dirty chunks after ``stop`` (invariant 3)."""
    bm = DirtyBitmap((2 * BLOCK_CHUNKS) << 16, 65536)
    bm.mark_chunks(20, 21)
    assert bm.find_dirty(0, 10) == -1
    assert bm.find_dirty(0) == 20
    bm.mark_chunks(BLOCK_CHUNKS + 20, BLOCK_CHUNKS + 21)
    bm.clear_chunks(20, 21)
    assert bm.find_dirty(BLOCK_CHUNKS, BLOCK_CHUNKS + 10) == -1
    assert bm.find_dirty(0) == BLOCK_CHUNKS + 20


def test_a_resized_source_is_another_image_for_the_registry(tmp_path: Path) -> None:
    """source_identity's size takes part, even with the mtime put back."""
    reg = PivotRegistry(str(tmp_path / "reg"))
    ident, fd = _file_ident(tmp_path)
    try:
        reg.record(ident, "/live.img")
        st = os.fstat(fd)
        os.ftruncate(fd, 8192)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert reg.find(source_identity(ident["path"], fd)) is None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the pivot's records
async def _records(tmp_path: Path, calls: list[str], fail: str = ""
                   ) -> tuple[Any, StateFile]:
    """drain.PivotRecords over a real state file, with registry hooks and a source flush
    that record the order of calls (and fail where asked)."""
    from mirrorfs.checkpointer import Checkpointer
    from mirrorfs.drain import PivotRecords
    from mirrorfs.job import Job

    sf = StateFile.create(str(tmp_path / "s"), HEADER)
    sf.write_checkpoint(bits(16384, []), phase="running")

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    persist = ActivityLog(sf, bits(16384, []), 65536, 4 << 20, run_sync=inline)

    async def nothing() -> None:
        pass

    state = Checkpointer(persist, Job(), interval_s=10, max_logged_extents=1024,
                         nchunks=16384, snapshot=lambda p: None, flush_images=nothing,
                         on_copy_error=lambda e: None, copied=lambda: 0, clock=lambda: 0.0)

    def hook(name: str) -> Callable[[], None]:
        def call() -> None:
            calls.append(name)
            if name == fail:
                raise OSError(errno.EROFS, "Read-only file system")
        return call

    async def flush_source() -> None:
        calls.append("flush source")

    records = PivotRecords(state, "/src", hook("record"), hook("forget"), flush_source,
                           run_sync=inline)
    return records, sf


async def test_the_pivot_is_recorded_source_flushed_registry_then_state(
        tmp_path: Path) -> None:
    """Invariant 9: the source's mtime (which the registry names) is durable before the
    record; the registry before the state file; the state file says completed."""
    calls: list[str] = []
    records, sf = await _records(tmp_path, calls)
    await records.record()
    assert calls == ["flush source", "record"]
    assert StateFile.open(sf.path).header["phase"] == "completed"


async def test_an_undone_pivot_says_running_again_and_forgets_the_record(
        tmp_path: Path) -> None:
    calls: list[str] = []
    records, sf = await _records(tmp_path, calls)
    await records.record()
    await records.undo()
    assert calls == ["flush source", "record", "forget"]
    h = StateFile.open(sf.path).header
    assert h["phase"] == "running", "a pivot that did not happen must not stay on record"


async def test_a_pivot_whose_record_fails_is_undone(tmp_path: Path) -> None:
    calls: list[str] = []
    records, sf = await _records(tmp_path, calls, fail="record")
    with pytest.raises(OSError):
        await records.record()
    assert calls == ["flush source", "record", "forget"]
    assert StateFile.open(sf.path).header["phase"] == "running"


async def test_a_checkpoints_fields_reach_the_header(tmp_path: Path) -> None:
    """state.ActivityLog.checkpoint: the fields it is given (a clean stop, the images'
    identities) are what the next mount reads."""
    sf = StateFile.create(str(tmp_path / "s"), HEADER)
    sf.write_checkpoint(bits(16384, []), phase="running")

    async def inline(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    alog = ActivityLog(sf, bits(16384, []), 65536, 4 << 20, run_sync=inline)
    await alog.checkpoint(lambda p: None, clean=True, source={"path": "x", "mtime_ns": 7})
    h = StateFile.open(sf.path).header
    assert h["clean"] is True and h["source"] == {"path": "x", "mtime_ns": 7}
