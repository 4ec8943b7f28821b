"""Restarts and crashes: the state file lets a new mount resume without a full recopy, and a
crash never leaves a difference between source and target that the resumed job misses."""

import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import (
    MiB,
    MirrorFactory,
    Mount,
    alive,
    assert_same,
    make_image,
    mounted,
    run_mirrorfs,
)
from loadgen import Writers

SIZE = 64 * MiB


def started_event(m: Mount) -> dict[str, object]:
    ev = [e for e in m.events() if e["event"] == "started"]
    assert len(ev) == 1
    return ev[0]


def kill9(m: Mount) -> None:
    assert m.pid
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(m.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def finish_and_compare(mirrorfs: MirrorFactory, m: Mount) -> dict[str, object]:
    """Remount after a stop or crash, check what the resumed job copies, complete, cmp."""
    r = mirrorfs.mount(m.src, m.tgt, mnt=m.mnt)
    ev = started_event(r)
    assert ev["resumed"] is True, ev
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
    m.umount()  # the job is not finished: its exact bitmap is saved
    assert (tmp_path / "disk.target.img.mirrorfs").exists()
    r = mirrorfs.mount(src, m.tgt, mnt=m.mnt)
    ev = started_event(r)
    assert ev["resumed"] is True and ev["clean_stop"] is True
    assert 0 < int(ev["resumed_bytes"]) <= SIZE - 16 * MiB, ev  # type: ignore[call-overload]
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
    assert m.pid
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while mounted(m.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(m.mnt), "SIGTERM did not unmount"
    assert bytes(model) == src.read_bytes(), "a guest write was lost at SIGTERM"
    ev = finish_and_compare(mirrorfs, m)
    assert ev["clean_stop"] is True


@pytest.mark.parametrize("moment", ["bulk", "writes", "complete"])
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_never_loses_a_difference(tmp_path: Path, mirrorfs: MirrorFactory,
                                          moment: str, seed: int) -> None:
    rnd = random.Random(seed)
    src = make_image(tmp_path / "disk.img", SIZE)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "16M", "--granularity", "16K",
                       "--checkpoint-interval", "2")
    # a hot region, as a guest has: the activity log covers its extents, not the disk
    w = Writers(m.img, model, threads=3, seed=seed, max_size=512 << 10,
                region=(20 * MiB, 32 * MiB)).start()
    if moment == "bulk":
        time.sleep(4 + rnd.random())  # a checkpoint (every 2 s, then fsyncs) happened
    else:
        m.command("speed 0")
        m.wait("ready", timeout=60)
        time.sleep(1 + rnd.random() * 2)  # ready is saved within about 0.5 s
    if moment == "complete":
        w.stop()
        m.command("complete")
        time.sleep(rnd.random() * 0.05)
    kill9(m)
    w.stop(allow_errors=True)  # writes in flight at the crash fail with ENOTCONN
    # ENOTCONN / ECONNABORTED: the daemon is gone; anything else would be a real error
    assert all("[Errno 107]" in e or "[Errno 103]" in e for e in w.errors), w.errors
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
    if moment != "complete":
        assert int(ev["resumed_bytes"]) < SIZE, (  # type: ignore[call-overload]
            f"a crash after a checkpoint must not recopy everything: {ev}")
    r2.wait("ready", timeout=60)
    copied = r2.status()["copied_bytes"]
    assert copied <= int(ev["resumed_bytes"]), ev  # type: ignore[call-overload]
    r2.command("complete")
    r2.wait("completed")
    r2.umount()
    # Every acknowledged write is in the source, and the resumed job brought the target
    # up to it: nothing the crash left different was missed.
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
