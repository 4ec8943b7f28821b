"""Faults during the job.

(a) The target's filesystem fills up (the target lives on a tmpfs smaller than the source):
    with --on-target-error stop the job pauses with ENOSPC in its status, guest writes keep
    working (also write-blocking ones that hit the full target), and after the filesystem
    grows ``resume`` finishes the job; with ``report`` the job fails and the image keeps being
    served from the source; with ``ignore`` an error event appears and the job converges by
    itself once there is room.
    Also: a target filesystem that is full before the job starts; and a full filesystem
    that also holds the job's state file (next to the target), whose saves must go on
    (it was allocated when created), followed by a crash (SIGKILL) and a resumed job, which
    must still copy every difference.
(b) The daemon gets SIGTERM: it unmounts cleanly and exits; the source holds every write.
(c) ``fusermount3 -u`` while the job runs: the daemon exits, no mount is left behind.
(d) A client holds the image open across ``complete`` and keeps writing: its writes after
    the pivot land in the target only, and its fd reads the target afterwards.
"""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from helpers.mounted import (
    MiB,
    MirrorFactory,
    Mount,
    alive,
    assert_same,
    kill9,
    make_image,
    mounted,
    run_mirrorfs,
    saved_header,
    wait_for_checkpoints,
)
from helpers.writers import (
    WriterPool,
    check_source_at_pivot,
    describe_byte,
    first_diff,
    replay,
    resize_tmpfs,
    small_tmpfs,
)

SIZE = 24 * MiB
SMALL = "8m"  # the target's filesystem: a third of the source


def wait_for(pred: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def guest_write(m: Mount, offset: int, data: bytes, model: bytearray | None = None) -> None:
    """A write through the mount that must succeed (with fsync), and read back the same."""
    fd = os.open(m.img, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
        assert os.pread(fd, len(data), offset) == data
    finally:
        os.close(fd)
    if model is not None:
        model[offset:offset + len(data)] = data


def error_events(m: Mount) -> list[dict[str, Any]]:
    return [e for e in m.events() if e["event"] == "error"]


# ====================================================================== (a) target fills up
def test_target_full_stop_then_grow_and_resume(tmp_path: Path,
                                               mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    with small_tmpfs(tmp_path / "small", SMALL, before_umount=mirrorfs.cleanup) as small:
        m = mirrorfs.mount(src, small / "target.img", "--on-target-error", "stop")
        st = m.wait("paused")
        assert not st["ready"] and st["serving"] == "source"
        assert st["error"] and "No space left on device" in st["error"], st
        ev = error_events(m)
        assert ev and ev[0]["side"] == "target" and ev[0]["action"] == "stop", ev

        guest_write(m, 20 * MiB + 777, os.urandom(300_000))  # background: the source only
        m.command("copy-mode write-blocking")  # guest writes now go to the full target too
        guest_write(m, 16 * MiB + 5, os.urandom(2 * MiB + 3))
        guest_write(m, 100, os.urandom(5000))
        st = m.status()
        assert st["state"] == "paused" and "No space left" in (st["error"] or ""), st

        m.command("resume")  # still no room: paused again, with the error again
        wait_for(lambda: len(error_events(m)) > len(ev), "a second error event")
        st = m.wait("paused")
        assert "No space left" in (st["error"] or ""), st

        resize_tmpfs(small, "64m")
        m.command("resume")
        st = m.wait("ready")
        assert st["error"] is None, st
        guest_write(m, 3 * MiB + 1, os.urandom(70_000))
        m.command("complete")
        m.wait("completed")
        m.umount()
        assert_same(src, small / "target.img")


def test_target_full_report_fails_and_keeps_serving_the_source(
        tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    with small_tmpfs(tmp_path / "small", SMALL, before_umount=mirrorfs.cleanup) as small:
        m = mirrorfs.mount(src, small / "target.img", "--on-target-error", "report")
        st = wait_for(lambda: (s := m.status())["state"] == "failed" and s, "failed")
        assert "No space left on device" in (st["error"] or ""), st
        assert st["serving"] == "source" and st["target_consistent"] is False
        assert "failed" in m.event_names()
        guest_write(m, 12 * MiB + 9, os.urandom(1 * MiB + 17))  # the guest is unaffected
        assert_same(m.img, src)
        assert m.pid is not None and alive(m.pid)
        m.umount()


def test_target_full_ignore_converges_when_room_appears(tmp_path: Path,
                                                        mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    with small_tmpfs(tmp_path / "small", SMALL, before_umount=mirrorfs.cleanup) as small:
        m = mirrorfs.mount(src, small / "target.img", "--on-target-error", "ignore")
        ev = wait_for(lambda: error_events(m), "an error event")
        assert ev[0]["action"] == "ignore" and "No space left" in ev[0]["message"], ev
        st = m.status()
        assert st["state"] == "copying" and not st["ready"], st
        guest_write(m, 9 * MiB + 3, os.urandom(123_456))
        time.sleep(0.5)
        assert m.status()["state"] == "copying"
        resize_tmpfs(small, "64m")
        st = m.wait("ready", timeout=30)  # by itself: retries with a backoff of <= 5 s
        assert st["error"] is None, st
        m.command("complete")
        m.wait("completed")
        m.umount()
        assert_same(src, small / "target.img")


def test_target_filesystem_full_at_mount(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    """No room at all where the target goes (nor for the state file next to it): either the
    mount is refused cleanly (one line, no mount, no daemon, no file left behind), or it
    mounts and the job reports the error while the guest is served from the source. A dead
    mount and a stray target file are neither."""
    src = make_image(tmp_path / "disk.img", 8 * MiB)
    before = src.read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def cleanup() -> None:
        mirrorfs.cleanup()
        if mounted(mnt):  # a dead mount, left by a daemon that died
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)

    with small_tmpfs(tmp_path / "small", "1m", before_umount=cleanup) as small:
        with open(small / "filler", "wb") as f:  # fill it up
            try:
                while True:
                    f.write(bytes(64 << 10))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
        r = run_mirrorfs("mount", str(src), str(small / "target.img"), str(mnt), "--log",
                         str(tmp_path / "daemon.log"), timeout=60)
        if r.returncode == 0:  # mounted: the job must fail (or stop) on the full target
            m = Mount(src, small / "target.img", mnt, src.name)
            mirrorfs.mounts.append(m)
            m.pid = m.status()["pid"]
            st = wait_for(lambda: (s := m.status())["state"] in ("failed", "paused") and s,
                          "the job to fail on the full target")
            assert "No space left" in (st["error"] or ""), st
            guest_write(m, 4096, os.urandom(10_000))
            assert_same(m.img, src)
            m.umount()
        else:
            out = (r.stdout + r.stderr).strip()
            problems = []
            try:
                os.stat(mnt)
            except OSError as e:
                problems.append(f"a dead mount was left at {mnt} ({e.strerror})")
            else:
                if mounted(mnt):
                    problems.append(f"a mount was left at {mnt}")
            leftover = sorted(p.name for p in small.iterdir())
            if leftover != ["filler"]:
                problems.append(f"files were left behind: {leftover}")
            if len([ln for ln in out.splitlines() if ln.strip()]) != 1:
                problems.append("the error is not one line")
            if "space" not in out.lower():
                problems.append("the message does not say why (no space)")
            assert not problems, f"refused mount: {'; '.join(problems)}; output: {out!r}"
    assert src.read_bytes() == before
    expect = tmp_path / "before.img"
    expect.write_bytes(before)
    assert_same(src, expect)


def fill_up(filler: Path) -> None:
    """Take whatever room is left on the filesystem of ``filler`` (an existing file: a new
    one may find no room for its inode) until ENOSPC."""
    fd = os.open(filler, os.O_WRONLY | os.O_APPEND)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def test_full_filesystem_then_crash_loses_nothing(tmp_path: Path,
                                                  mirrorfs: MirrorFactory) -> None:
    """(a) and a crash: the target's filesystem fills up, to the last page, while the job's
    state file lives on it too. The state file was allocated when it was created, so its
    saves keep working on the full filesystem: the test sees a checkpoint switch slots after
    the filesystem was full and no state error. Guest writes go on (each into a hole of the
    source: logged); then the daemon is killed (-9). The next mount resumes the job from the
    state file (the test checks that it did, and how much it names), and after the pivot the
    target equals the source, byte for byte."""
    src = make_image(tmp_path / "disk.img", SIZE, data_ranges=[(0, 12 * MiB)])  # sparse
    opts = ["--sync", "top", "--on-target-error", "stop", "--checkpoint-interval", "0.5"]
    with small_tmpfs(tmp_path / "small", SMALL, before_umount=mirrorfs.cleanup) as small:
        tgt = small / "target.img"
        state = Path(str(tgt) + ".mirrorfs")
        (small / "filler").touch()
        m = mirrorfs.mount(src, tgt, *opts)
        # a write where the source has a hole: not in the saved bitmap, so it is logged
        guest_write(m, 20 * MiB + 100, os.urandom(64 << 10))
        m.wait("paused")  # the target's filesystem is full
        fill_up(small / "filler")  # to the last page, whatever the copier left
        seq, _ = saved_header(state)
        guest_write(m, 16 * MiB + 100, os.urandom(64 << 10))  # another extent, logged
        wait_for_checkpoints(state, 1)  # a save on the full filesystem
        assert saved_header(state)[0] > seq
        assert not [e for e in error_events(m) if e.get("side") == "state"], m.events()
        assert state.exists(), "the state file was dropped"
        kill9(m)
        resize_tmpfs(small, "64m")
        m2 = mirrorfs.mount(src, tgt, *opts)  # resumes the job from the state file
        assert "resuming the job after a crash" in m2.output, m2.output
        started = [e for e in m2.events() if e["event"] == "started"]
        assert len(started) == 1 and started[0]["resumed"] is True, started
        assert started[0]["clean_stop"] is False, started
        # What the state file names: at most the source's data and the two logged 4 MiB
        # extents; at least the part of the data that did not fit (4 MiB) and the two
        # written chunks.
        resumed = int(started[0]["resumed_bytes"])
        assert 4 * MiB < resumed <= 12 * MiB + 2 * 4 * MiB, started
        st = m2.wait("ready", timeout=60)
        assert st["state"] == "ready", st
        assert st["copied_bytes"] <= resumed, (st, started)  # only what the state file named
        m2.command("complete")
        m2.wait("completed")
        m2.umount()
        diff = first_diff(src.read_bytes(), tgt.read_bytes())
        assert diff is None, (f"after the crash and the resume the target differs from the "
                              f"source at byte {diff}: a difference was lost")
        assert_same(src, tgt)


# ====================================================================== (b), (c) the daemon stops
def _stop_test(tmp_path: Path, mirrorfs: MirrorFactory, how: str) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "4M")
    for i in range(20):
        guest_write(m, (i * 1_234_567) % (SIZE - 70_000), os.urandom(60_000 + i), model)
    st = m.status()
    assert st["state"] == "copying" and st["remaining_bytes"] > 0
    assert m.pid is not None
    if how == "sigterm":
        os.kill(m.pid, signal.SIGTERM)
    else:
        r = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    wait_for(lambda: not alive(m.pid), "the daemon to exit", timeout=20)  # type: ignore[arg-type]
    assert not mounted(m.mnt), "a mount was left behind"
    os.stat(m.mnt)  # a plain directory again, not a dead mount (ENOTCONN)
    assert os.listdir(m.mnt) == []
    log = (tmp_path / "daemon0.log").read_text()
    assert "Traceback" not in log and "the daemon failed" not in log, log[-3000:]
    if how == "sigterm":
        assert "SIGTERM" in log, log[-2000:]
    assert m.tgt.exists() and os.path.getsize(m.tgt) == SIZE  # kept, for a later attempt
    expect = tmp_path / "model.img"
    expect.write_bytes(model)
    assert_same(src, expect)


def test_sigterm_unmounts_cleanly(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    _stop_test(tmp_path, mirrorfs, "sigterm")


def test_fusermount_u_while_copying(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    _stop_test(tmp_path, mirrorfs, "fusermount")


# ====================================================================== (d) open across the pivot
def test_client_keeps_writing_across_complete(tmp_path: Path,
                                              mirrorfs: MirrorFactory) -> None:
    seed = 606
    src = make_image(tmp_path / "disk.img", SIZE)
    initial = src.read_bytes()
    m = mirrorfs.mount(src, None, "--granularity", "16K", "--speed", "16M")
    held = os.open(m.img, os.O_RDWR)  # opened before the pivot, read after it
    pool = WriterPool(m.img, tmp_path / "w.lock", seed, SIZE, threads=1, procs=0,
                      workdir=str(tmp_path), max_len=1 * MiB, fsync_prob=0.1,
                      pace_bps=4 * MiB)
    try:
        pool.start()
        m.wait("ready", timeout=60)
        time.sleep(0.3)
        t_issue = time.monotonic_ns()
        m.command("complete")
        while (st := m.status())["state"] != "completed":
            assert st["state"] == "completing", st
            time.sleep(0.01)
        t_seen = time.monotonic_ns()
        time.sleep(0.8)
    finally:
        pool.stop()
    try:
        assert not pool.errors, pool.errors
        recs = pool.records
        assert sum(r.t0 > t_seen for r in recs) > 0, "no write after the pivot"
        assert sum(r.t1 < t_issue for r in recs) > 0, "no write before the pivot"
        expected = replay(initial, recs, seed)
        seen = bytearray()
        for off in range(0, SIZE, 4 * MiB):  # the fd held across the pivot reads the target
            seen += os.pread(held, 4 * MiB, off)
        bad = first_diff(seen, expected)
        assert bad is None, f"held fd reads stale data: {describe_byte(bad, recs)}"
    finally:
        os.close(held)
    m.umount()
    bad = first_diff(m.tgt.read_bytes(), expected)
    assert bad is None, f"target: {describe_byte(bad, recs, t_issue, t_seen)}"
    model = tmp_path / "model.img"
    model.write_bytes(expected)
    assert_same(model, m.tgt)
    problem = check_source_at_pivot(initial, src.read_bytes(), recs, seed, t_issue, t_seen)
    assert problem is None, problem
