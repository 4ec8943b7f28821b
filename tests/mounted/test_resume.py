"""Restarts and crashes: the state file lets a new mount resume without a full recopy, and a
crash never leaves a difference between source and target that the resumed job misses."""

import os
import random
import signal
import time
from pathlib import Path

import pytest
from helpers.loadgen import Writers
from helpers.mounted import (
    MiB,
    MirrorFactory,
    Mount,
    assert_same,
    kill9,
    make_image,
    mounted,
    run_mirrorfs,
    wait_for_checkpoints,
)
from helpers.writers import WriteRec, WriterPool, check_source_at_pivot, first_diff, replay

SIZE = 64 * MiB
EXTENT = 4 * MiB  # the activity log's extent (state.py's default)


def started_event(m: Mount) -> dict[str, object]:
    ev = [e for e in m.events() if e["event"] == "started"]
    assert len(ev) == 1
    return ev[0]


def extents_bytes(recs: list[WriteRec]) -> int:
    """The bytes of the activity log's extents that the writes touched."""
    touched: set[int] = set()
    for r in recs:
        touched.update(range(r.offset // EXTENT, (r.offset + r.length - 1) // EXTENT + 1))
    return len(touched) * EXTENT


def finish_and_compare(mirrorfs: MirrorFactory, m: Mount,
                       max_resumed: int) -> dict[str, object]:
    """Remount after a stop or crash, check what the resumed job copies (at most
    ``max_resumed`` bytes: what remained at the stop), complete, cmp."""
    r = mirrorfs.mount(m.src, m.tgt, mnt=m.mnt)
    ev = started_event(r)
    assert ev["resumed"] is True, ev
    assert 0 < int(ev["resumed_bytes"]) <= max_resumed, (  # type: ignore[call-overload]
        f"the resumed job names more than the {max_resumed} bytes left at the stop: {ev}")
    r.wait("ready", timeout=60)
    copied = r.status()["copied_bytes"]
    assert copied <= int(ev["resumed_bytes"]), (  # type: ignore[call-overload]
        f"the resumed job copied {copied} bytes, more than the {ev['resumed_bytes']} saved")
    r.command("complete")
    r.wait("completed")
    r.umount()
    assert_same(m.src, m.tgt)
    return ev


def test_clean_stop_resumes_where_it_stopped(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    m = mirrorfs.mount(src, None, "--speed", "16M")
    time.sleep(1.5)
    left = m.status()["remaining_bytes"]  # the copier goes on until the stop: no more left
    m.umount()  # the job is not finished: its exact bitmap is saved
    assert (tmp_path / "disk.target.img.mirrorfs").exists()
    r = mirrorfs.mount(src, m.tgt, mnt=m.mnt)
    ev = started_event(r)
    assert ev["resumed"] is True and ev["clean_stop"] is True
    assert 0 < int(ev["resumed_bytes"]) <= SIZE - 16 * MiB, ev  # type: ignore[call-overload]
    assert int(ev["resumed_bytes"]) <= left, (left, ev)  # type: ignore[call-overload]
    r.wait("ready")
    r.command("complete")
    r.wait("completed")
    r.umount()
    assert_same(src, m.tgt)


def test_sigterm_is_a_clean_stop(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "16M")
    w = Writers(m.img, model, threads=2, seed=2).start()
    time.sleep(1)
    w.stop()
    left = m.status()["remaining_bytes"]  # no write after this: the most a stop can leave
    assert m.pid
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while mounted(m.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(m.mnt), "SIGTERM did not unmount"
    assert bytes(model) == src.read_bytes(), "a guest write was lost at SIGTERM"
    ev = finish_and_compare(mirrorfs, m, max_resumed=left)
    assert ev["clean_stop"] is True


@pytest.mark.parametrize("moment", ["bulk", "writes", "complete"])
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_never_loses_a_difference(tmp_path: Path, mirrorfs: MirrorFactory,
                                          moment: str, seed: int) -> None:
    """SIGKILL during the bulk copy, in ready under writes, or right after ``complete``; the
    next mount resumes. The source holds every acknowledged write (a model of them), the
    resumed job copies no more than the state file can name since its last checkpoint, and
    it brings the target up to the source byte for byte."""
    rnd = random.Random(seed)
    src = make_image(tmp_path / "disk.img", SIZE)
    initial = src.read_bytes()
    m = mirrorfs.mount(src, None, "--speed", "16M", "--granularity", "16K",
                       "--checkpoint-interval", "1")
    state = Path(str(m.tgt) + ".mirrorfs")
    # a hot region, as a guest has: the activity log covers its extents, not the disk
    pool = WriterPool(m.img, tmp_path / "w.lock", seed, SIZE, threads=3, procs=0,
                      workdir=str(tmp_path), min_len=512, max_len=512 << 10,
                      fsync_prob=0.02, hot=(20 * MiB, 32 * MiB), hot_prob=1.0)
    pool.start()
    if moment == "bulk":
        time.sleep(2 + rnd.random())
        m.command("speed 1M")  # from here the copy crawls: the crash is in the bulk copy
        # What the state file can name from here on: what is left now, and what is written.
        left = m.status()["remaining_bytes"]
        assert left < SIZE - 16 * MiB, f"the copy made no progress: {m.status()}"
    else:
        m.command("speed 0")
        m.wait("ready", timeout=60)
        left = 0  # what may differ from now on was written after this
    # the second began after what the test measured above
    wait_for_checkpoints(state, 2)
    time.sleep(rnd.random())
    if moment == "bulk":
        st = m.status()
        assert st["state"] == "copying" and not st["ready"], st
    if moment == "complete":
        pool.stop()
        m.command("complete")
        time.sleep(rnd.random() * 0.05)
    t_kill = time.monotonic_ns()
    kill9(m)
    t_dead = time.monotonic_ns()
    pool.stop()  # writes in flight at the crash fail
    # ENOTCONN / ECONNABORTED: the daemon is gone; anything else would be a real error
    assert all("[Errno 107]" in e or "[Errno 103]" in e for e in pool.errors), pool.errors
    writes = pool.records + pool.failed
    assert len(pool.records) > 20, pool.summary()
    # Every acknowledged write is in the source; a write the crash cut short may be there in
    # whole, in part or not at all (each byte is the old one or the write's).
    problem = check_source_at_pivot(initial, src.read_bytes(), writes, seed, t_kill, t_dead)
    assert problem is None, f"the source after the crash: {problem}"
    if not pool.failed:  # nothing was cut short: the model is exact
        expect = tmp_path / "model.img"
        expect.write_bytes(replay(initial, pool.records, seed))
        assert_same(expect, src)
    # The crash leaves a dead mount; the next mount cleans it up and says so.
    r = run_mirrorfs("mount", str(src), str(m.tgt), str(m.mnt))
    if r.returncode != 0:
        # only legitimate when the pivot was recorded before the crash
        assert moment == "complete" and "live image" in r.stderr, r.stderr
        assert_same(src, m.tgt)
        return
    assert "dead mount" in r.stderr and "resuming the job after a crash" in r.stderr, r.stderr
    r2 = Mount(src, m.tgt, m.mnt, src.name)
    r2.pid = r2.status()["pid"]
    mirrorfs.mounts.append(r2)
    ev = started_event(r2)
    assert ev["resumed"] is True and ev["clean_stop"] is False
    # No full recopy: the last checkpoint began after ``left`` was measured, so the state
    # file names at most that and the extents the writes touched (3 of the disk's 16).
    bound = left + extents_bytes(writes)
    resumed = int(ev["resumed_bytes"])  # type: ignore[call-overload]
    assert resumed <= bound, (f"a crash after a checkpoint must not recopy more than what was "
                              f"left then and the extents written since ({bound}): {ev}")
    r2.wait("ready", timeout=60)
    copied = r2.status()["copied_bytes"]
    assert copied <= resumed, ev
    r2.command("complete")
    r2.wait("completed")
    r2.umount()
    # The resumed job brought the target up to the source: nothing the crash left different
    # was missed.
    bad = first_diff(src.read_bytes(), m.tgt.read_bytes())
    assert bad is None, f"the target misses a difference at byte {bad} ({ev})"
    assert_same(src, m.tgt)


def test_after_completion_the_stale_source_is_never_copied(tmp_path: Path,
                                                          mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 8 * MiB)
    m = mirrorfs.mount(src, None)
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    fd = os.open(m.img, os.O_WRONLY)
    os.pwrite(fd, b"only in the target", 4096)
    os.close(fd)
    m.umount()
    r = run_mirrorfs("mount", str(src), str(m.tgt), str(m.mnt))
    assert r.returncode != 0 and "live image" in r.stderr, r.stderr
    assert not mounted(m.mnt)
    with open(m.tgt, "rb") as f:
        f.seek(4096)
        assert f.read(18) == b"only in the target"
    # --fresh starts a new mirror on purpose
    f2 = mirrorfs.mount(src, m.tgt, "--fresh", mnt=m.mnt)
    assert started_event(f2)["resumed"] is False
    f2.wait("ready")
    f2.command("cancel")
    f2.wait("cancelled")
    f2.umount()
    assert_same(src, m.tgt)


def test_a_state_file_of_another_target_is_refused(tmp_path: Path,
                                                   mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 8 * MiB)
    m = mirrorfs.mount(src, None, "--speed", "1M")
    m.umount()
    os.replace(make_image(tmp_path / "other.img", 8 * MiB), m.tgt)  # replaced behind its back
    before = m.tgt.read_bytes()
    r = run_mirrorfs("mount", str(src), str(m.tgt), str(m.mnt))
    assert r.returncode != 0 and "belongs to another target" in r.stderr, r.stderr
    assert m.tgt.read_bytes() == before and not mounted(m.mnt)
    r2 = mirrorfs.mount(src, m.tgt, "--fresh", mnt=m.mnt)
    r2.wait("ready")
    r2.command("complete")
    r2.wait("completed")
    r2.umount()
    assert_same(src, m.tgt)
