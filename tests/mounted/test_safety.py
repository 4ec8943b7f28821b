"""Issue 16, items 1-4, mounted: the real daemon, a real FUSE mount, driven as a user would
(``mirrorfs`` commands, ``.mirror/ctl``, pwrite / fallocate(1) through the mount).

1. A crash (kill -9) after the job ended (a consistent ``cancel``, ``cancel force``, or a
   ``failed`` job) and a write through the mount: the next mount must copy that write, never
   resume with "0 bytes to copy".
2. After a pivot the target is the live image: a later mount of the same SOURCE and TARGET
   is refused whatever keeps the job's state (the default state file, ``--no-state``, an NBD
   export without ``--state``) unless ``--fresh``; the refused mount changes nothing.
3. The target fails (ENOSPC) during ``complete`` with ``--on-target-error ignore``: the
   guest's writes keep completing, and once the target has room the job completes.
4. Write-blocking mode onto a target without FALLOC_FL_ZERO_RANGE (tmpfs): a guest's zero
   range and punch hole keep the job running and the range reads as zeros everywhere.

The pivot registry lives in ``$MIRRORFS_STATE_DIR``: every test points it at its own tmp
directory, so no test reads or writes /var/lib/mirrorfs.
"""

import os
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import nbd_servers as srv
from helpers.mounted import (
    MiB,
    MirrorFactory,
    Mount,
    alive,
    assert_same,
    make_image,
    mounted,
    run_mirrorfs,
)
from helpers.writers import resize_tmpfs, small_tmpfs

KiB = 1 << 10
INTERVAL = 0.5  # --checkpoint-interval: a checkpoint within a second, not 10 s
IO_TIMEOUT = 10.0  # a guest write that takes longer than this is a hung guest


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The pivot registry of every mirrorfs command the test runs (run_mirrorfs inherits
    the environment). Not created here: mirrorfs must create it, as /var/lib/mirrorfs may
    not exist on a fresh machine either."""
    d = tmp_path / "registry"
    monkeypatch.setenv("MIRRORFS_STATE_DIR", str(d))
    return d


# ====================================================================== helpers
def guest_io(what: str, fn: Any, timeout: float = IO_TIMEOUT) -> Any:
    """Run ``fn`` (guest I/O through the mount) in a thread; fail if it does not return within
    ``timeout`` (a write blocked in the kernel cannot be interrupted: the thread is left
    behind, a daemon thread, and ends when the fixture kills the daemon)."""
    out: list[Any] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # reported in the test's thread
            err.append(e)

    t = threading.Thread(target=run, daemon=True, name=what)
    t0 = time.monotonic()
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"the guest hangs: {what} did not return within {timeout} s")
    if err:
        raise AssertionError(f"{what} failed: {err[0]!r}")
    assert time.monotonic() - t0 < timeout
    return out[0] if out else None


def guest_write(m: Mount, offset: int, data: bytes, model: bytearray | None = None,
                timeout: float = IO_TIMEOUT) -> None:
    """pwrite + fsync through the mount, in a thread with a timeout; read back the same."""
    def run() -> None:
        fd = os.open(m.img, os.O_RDWR)
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
            os.fsync(fd)
            assert os.pread(fd, len(data), offset) == data, "read back differs"
        finally:
            os.close(fd)

    guest_io(f"a write of {len(data)} bytes at {offset}", run, timeout)
    if model is not None:
        model[offset:offset + len(data)] = data


def wait_for(pred: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill9(m: Mount) -> None:
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    pid = m.pid
    wait_for(lambda: not alive(pid), f"the daemon {pid} to die after SIGKILL", timeout=10)


def remount(mirrorfs: MirrorFactory, m: Mount, *opts: str) -> tuple[Mount, str]:
    """The same ``mirrorfs mount`` again, on the same mountpoint (the crash left a dead mount
    there: the mount removes it). Returns the new mount and what the command printed."""
    log = mirrorfs.tmp / f"daemon{len(mirrorfs.mounts)}.log"
    r = run_mirrorfs("mount", str(m.src), str(m.tgt), str(m.mnt), "--log", str(log), *opts)
    assert r.returncode == 0, f"the mount after the crash failed ({r.returncode}): {r.stderr}"
    m2 = Mount(m.src, m.tgt, m.mnt, m.src.name)
    mirrorfs.mounts.append(m2)
    m2.pid = m2.status()["pid"]
    return m2, (r.stdout + r.stderr).strip()


def events_since(m: Mount, name: str) -> list[dict[str, Any]]:
    """The events after the last ``name`` event (none if there is none)."""
    evs = m.events()
    last = max((i for i, e in enumerate(evs) if e["event"] == name), default=len(evs))
    return evs[last + 1:]


def started(m: Mount) -> dict[str, Any]:
    ev = [e for e in m.events() if e["event"] == "started"]
    assert len(ev) == 1, ev
    return ev[0]


def finish(m: Mount) -> None:
    """ready -> complete -> completed -> unmount."""
    m.wait("ready", timeout=30)
    m.command("complete")
    st = m.wait("completed", timeout=30)
    assert st["serving"] == "target", st
    m.umount()


def save(path: Path, content: bytes | bytearray) -> Path:
    path.write_bytes(content)
    return path


def refused(mirrorfs: MirrorFactory, src: Path, target: str, mnt: Path, *opts: str
            ) -> str:
    """``mirrorfs mount SRC TARGET MNT OPTS`` must be refused: non-zero exit, one line that
    says the target is the live image (or the source stale), no mount left. A mount that is
    (wrongly) accepted is handed to the fixture, so that it is cleaned up."""
    mnt.mkdir(exist_ok=True)
    r = run_mirrorfs("mount", str(src), target, str(mnt), *opts, timeout=60)
    out = (r.stdout + r.stderr).strip()
    if r.returncode == 0:
        m = Mount(src, Path(target), mnt, src.name)
        mirrorfs.mounts.append(m)
        with_pid = ""
        try:
            st = m.status()
            m.pid = st["pid"]
            with_pid = f" (job {st['state']}, {st['copied_bytes']} bytes copied)"
        except OSError:
            pass
        raise AssertionError(
            f"mirrorfs mount {' '.join(opts) or '(default state)'} after the pivot was "
            f"accepted{with_pid}: it copies the stale source {src} over the live image "
            f"{target}; output: {out!r}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, f"the refusal is not one line: {out!r}"
    assert "live image" in out or "stale" in out, \
        f"the refusal does not say the target is the live image: {out!r}"
    assert target in out or str(src) in out, f"the refusal names neither image: {out!r}"
    assert not mounted(mnt), f"a refused mount left a mount at {mnt}"
    os.stat(mnt)  # a plain directory, not a dead mount
    return out


# ====================================================================== 1. crash after the end
SIZE1 = 16 * MiB


@pytest.mark.parametrize("how", ["cancel", "cancel force"])
def test_crash_after_cancel_then_write_is_not_lost(tmp_path: Path, mirrorfs: MirrorFactory,
                                                   how: str) -> None:
    """Mount, ready, a checkpoint, ``cancel`` (consistent) or ``cancel force``, a 1 MiB write
    at offset 0 (the job has ended: writes are no longer tracked), kill -9, the same mount
    again: the new job must copy the write (a new job, or a resume whose bitmap covers it)."""
    src = make_image(tmp_path / "disk.img", SIZE1)
    opts = ("--checkpoint-interval", str(INTERVAL))
    m = mirrorfs.mount(src, None, *opts)
    m.wait("ready", timeout=30)
    time.sleep(3 * INTERVAL)  # the saved bitmap is clean: everything was copied
    m.command(how)
    st = m.wait("cancelled", timeout=30)
    assert st["serving"] == "source", st
    assert st["target_consistent"] is (how == "cancel"), st

    n = 1 * MiB
    data = os.urandom(n)
    guest_write(m, 0, data)
    with open(src, "rb") as f:
        assert f.read(n) == data, "the write is not in the source"
    with open(m.tgt, "rb") as f:
        assert f.read(n) != data  # the job has ended: the target lacks it
    kill9(m)

    m2, said = remount(mirrorfs, m, *opts)  # the same command again
    ev = started(m2)
    assert not ev.get("resumed") or int(ev["resumed_bytes"]) >= n, (
        f"after a crash that followed '{how}' the new mount resumed the old job with a "
        f"bitmap that misses the 1 MiB written after the job ended: {said!r}; {ev}")
    finish(m2)
    with open(m.tgt, "rb") as f:
        assert f.read(n) == data, \
            f"the target lacks the 1 MiB written after '{how}' and before the crash"
    assert_same(src, m.tgt)


def test_crash_after_failed_job_then_write_is_not_lost(tmp_path: Path,
                                                       mirrorfs: MirrorFactory) -> None:
    """The job fails (ENOSPC on a small tmpfs, ``--on-target-error report``) after ready and
    a checkpoint; then a 1 MiB write at offset 0, kill -9, room on the target, the same mount
    again: the write must reach the target. The state file is kept off the full tmpfs, so
    that only the end of the job is in question, not whether a checkpoint fits."""
    size = 32 * MiB
    src = make_image(tmp_path / "disk.img", size, data_ranges=[(0, 4 * MiB)])
    with small_tmpfs(tmp_path / "small", "12m", before_umount=mirrorfs.cleanup) as small:
        tgt = small / "target.img"
        opts = ("--on-target-error", "report", "--checkpoint-interval", str(INTERVAL),
                "--state", str(tmp_path / "job.state"))
        m = mirrorfs.mount(src, tgt, *opts)
        m.wait("ready", timeout=30)
        time.sleep(3 * INTERVAL)
        # 10 MiB into holes: more than the tmpfs has room for, the copy fails
        for i in range(10):
            guest_write(m, 16 * MiB + i * MiB, os.urandom(1 * MiB))
        st = wait_for(lambda: (s := m.status())["state"] == "failed" and s,
                      "the job to fail on the full target")
        assert "No space left" in (st["error"] or ""), st
        assert st["serving"] == "source", st

        n = 1 * MiB
        data = os.urandom(n)
        guest_write(m, 0, data)
        with open(src, "rb") as f:
            assert f.read(n) == data, "the write is not in the source"
        kill9(m)
        resize_tmpfs(small, "64m")

        m2, said = remount(mirrorfs, m, *opts)  # the same command again
        ev = started(m2)
        assert not ev.get("resumed") or int(ev["resumed_bytes"]) >= n, (
            f"after a crash that followed a failed job the new mount resumed the old job "
            f"with a bitmap that misses the 1 MiB written after the end: {said!r}; {ev}")
        finish(m2)
        with open(tgt, "rb") as f:
            assert f.read(n) == data, \
                "the target lacks the 1 MiB written after the job failed and before the crash"
        assert_same(src, tgt)


# ====================================================================== 2. no stale source copied
SIZE2 = 16 * MiB


@pytest.mark.parametrize("first", ["default", "--no-state"])
def test_remount_after_pivot_is_refused(tmp_path: Path, mirrorfs: MirrorFactory,
                                        first: str) -> None:
    """Mount (with the default state file, or ``--no-state``), complete, a write that lands
    in the target only, unmount. Then ``--no-state`` and the default are both refused and
    change nothing; ``--fresh`` (the operator asks for it) mirrors the old source again."""
    src = make_image(tmp_path / "disk.img", SIZE2)
    src_at_pivot = src.read_bytes()
    opts = () if first == "default" else ("--no-state",)
    m = mirrorfs.mount(src, None, *opts)
    m.wait("ready", timeout=30)
    m.command("complete")
    m.wait("completed", timeout=30)
    data = os.urandom(1 * MiB)
    guest_write(m, 5 * MiB + 123, data)  # after the pivot: the target only
    m.umount()
    tgt = m.tgt
    live = bytearray(src_at_pivot)
    live[5 * MiB + 123:5 * MiB + 123 + len(data)] = data
    assert_same(save(tmp_path / "live.model", live), tgt)
    assert_same(save(tmp_path / "src.model", src_at_pivot), src)
    tgt_before = tmp_path / "target.before"
    shutil.copyfile(tgt, tgt_before)

    mnt = tmp_path / "again"
    refused(mirrorfs, src, str(tgt), mnt)  # the default state file
    assert_same(tgt_before, tgt)
    refused(mirrorfs, src, str(tgt), mnt, "--no-state")
    assert_same(tgt_before, tgt)
    assert_same(tmp_path / "src.model", src)

    # --fresh: a new mirror of the old source, asked for explicitly
    m2 = mirrorfs.mount(src, tgt, "--fresh", mnt=m.mnt)
    ev = started(m2)
    assert not ev.get("resumed"), ev
    finish(m2)
    assert_same(tmp_path / "src.model", tgt)
    assert_same(src, tgt)


def test_remount_after_pivot_to_nbd_without_state_is_refused(
        tmp_path: Path, mirrorfs: MirrorFactory, nbd_tools: None) -> None:
    """The same to a qemu-nbd export, without ``--state`` (no state file at all): after the
    pivot and a write into the export, the same mount is refused and the export's file is
    unchanged."""
    src = make_image(tmp_path / "disk.img", SIZE2)
    src_at_pivot = src.read_bytes()
    exp = tmp_path / "export.img"
    with open(exp, "wb") as f:
        f.truncate(SIZE2)
    sock = tmp_path / "q.sock"
    uri = f"nbd+unix:///disk?socket={sock}"
    data = os.urandom(1 * MiB)
    off = 7 * MiB + 4321
    exp_before = tmp_path / "export.before"
    with srv.qemu_nbd(exp, tmp_path, sock=sock, export="disk"):
        m = mirrorfs.mount(src, None, target_uri=uri)
        m.wait("ready", timeout=30)
        m.command("complete")
        m.wait("completed", timeout=30)
        guest_write(m, off, data)  # after the pivot: the export only
        m.umount()
        shutil.copyfile(exp, exp_before)
        refused(mirrorfs, src, uri, tmp_path / "again")
    live = bytearray(src_at_pivot)
    live[off:off + len(data)] = data
    assert_same(save(tmp_path / "live.model", live), exp)
    assert_same(exp_before, exp)
    assert_same(save(tmp_path / "src.model", src_at_pivot), src)


# ====================================================================== 3. target fails in complete
def test_target_full_during_complete_never_hangs_the_guest(tmp_path: Path,
                                                          mirrorfs: MirrorFactory) -> None:
    """Target on a 12 MiB tmpfs, 8 MiB of data copied (ready), 6 MiB more written into
    holes, ``complete`` with ``--on-target-error ignore``: the copies fail with ENOSPC. Every
    guest write must still return promptly; once the tmpfs grows the job completes and the
    target holds every write."""
    size = 32 * MiB
    src = make_image(tmp_path / "disk.img", size, data_ranges=[(0, 8 * MiB)])
    model = bytearray(src.read_bytes())
    with small_tmpfs(tmp_path / "small", "12m", before_umount=mirrorfs.cleanup) as small:
        tgt = small / "target.img"
        m = mirrorfs.mount(src, tgt, "--on-target-error", "ignore")
        st = m.wait("ready", timeout=30)
        assert st["copied_bytes"] >= 8 * MiB, st
        for i in range(6):  # into what were holes: 14 MiB of data, the tmpfs holds 12
            guest_write(m, 16 * MiB + i * MiB, os.urandom(1 * MiB), model)
        m.command("complete")

        def failed_under_complete() -> list[dict[str, Any]]:
            """The error events since ``complete``, once a copy *started* under it failed:
            a batch in flight when ``complete`` came may fail first, so wait for errors of
            a second attempt (retries come after a back-off of at least 0.1 s; up to 5 s),
            unless the job has left ``completing`` (e.g. paused on the error)."""
            errs = [e for e in events_since(m, "completing") if e["event"] == "error"]
            if not errs:
                return []
            if m.status()["state"] != "completing":
                return errs
            t = [datetime.fromisoformat(e["time"]).timestamp() for e in errs]
            return errs if max(t) - min(t) >= 0.09 else []

        ev = wait_for(failed_under_complete, "copies to fail during complete", timeout=20)
        assert ev[0]["side"] == "target" and "No space left" in ev[0]["message"], ev

        guest_write(m, 24 * MiB + 512, os.urandom(1 * MiB), model)
        for off in (4 * KiB, 3 * MiB + 100, 17 * MiB + 8 * KiB, 30 * MiB):
            guest_write(m, off, os.urandom(4 * KiB), model)
        st = m.status()
        assert st["state"] not in ("completed", "failed", "cancelled"), st
        assert st["error"], st  # the job tells why it is not done
        assert st["serving"] == "source", st

        resize_tmpfs(small, "64m")
        st = m.wait("completed", timeout=30)
        assert st["serving"] == "target", st
        m.umount()
        model_path = save(tmp_path / "model.img", model)
        assert_same(model_path, tgt)
        assert_same(model_path, src)  # the source as of the pivot: every write was before
        assert_same(src, tgt)


# ====================================================================== 4. no zero-range target
def test_write_blocking_zero_range_and_punch_on_tmpfs_target(tmp_path: Path,
                                                             mirrorfs: MirrorFactory) -> None:
    """Write-blocking mode, target on tmpfs (punch hole, no FALLOC_FL_ZERO_RANGE): guest
    ``fallocate -z`` and ``fallocate -p`` through the mount keep the job running; the ranges
    read as zeros through the mount, in the source and in the target."""
    size = 16 * MiB
    src = make_image(tmp_path / "disk.img", size)
    model = bytearray(src.read_bytes())
    ranges = [("-z", 2 * MiB, 1 * MiB),  # whole chunks
              ("-z", 5 * MiB + 4 * KiB + 512, 1 * MiB + 3 * KiB),  # partial chunks
              ("-p", 9 * MiB + 1000, 1 * MiB + 500 * KiB),
              ("-p", 12 * MiB, 256 * KiB)]
    with small_tmpfs(tmp_path / "small", "64m", before_umount=mirrorfs.cleanup) as small:
        tgt = small / "target.img"
        m = mirrorfs.mount(src, tgt, "--copy-mode", "write-blocking")
        st = m.wait("ready", timeout=30)
        assert st["copy_mode"] == "write-blocking", st
        for flag, off, n in ranges:
            cmd = ["fallocate", flag, "-o", str(off), "-l", str(n), str(m.img)]
            r = guest_io(" ".join(cmd[:6]), lambda c=cmd: subprocess.run(
                c, capture_output=True, text=True, timeout=IO_TIMEOUT + 5))
            assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr.strip()}"
            model[off:off + n] = bytes(n)
            time.sleep(0.2)  # a job that fails does so right away
            st = m.status()
            assert st["state"] == "ready", f"after fallocate {flag} at {off}+{n}: {st}"
            with open(m.img, "rb") as f:
                f.seek(off)
                assert f.read(n) == bytes(n), \
                    f"fallocate {flag} at {off}+{n}: the range does not read as zeros"
        m.command("complete")
        m.wait("completed", timeout=30)
        m.umount()
        model_path = save(tmp_path / "model.img", model)
        for flag, off, n in ranges:
            for img in (src, tgt):
                with open(img, "rb") as f:
                    f.seek(off)
                    assert f.read(n) == bytes(n), f"{img}: fallocate {flag} range not zeros"
        assert_same(model_path, src)
        assert_same(src, tgt)
