"""The head start through the real daemon: a new target is being copied by the helper
process while the mount starts; guest writes, a crash and a remount must lose nothing."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MIRRORFS, ROOT, MiB, MirrorFactory, Mount, alive, assert_same, run_mirrorfs

SIZE = 1536 * MiB


@pytest.fixture(autouse=True)
def _drop_images(tmp_path: Path) -> Iterator[None]:
    """3 GiB per test: not kept for pytest's last three runs on a small disk."""
    yield
    for p in tmp_path.glob("*.img"):
        p.unlink(missing_ok=True)


def big_image(path: Path) -> Path:
    """1.5 GiB of data (a random 4 MiB block, repeated: quick to write, and no chunk is
    all zeros), so that the helper is still copying when the mount returns."""
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for i in range(SIZE // len(block)):
            f.write(block[:8] + i.to_bytes(8, "little") + block[16:])
    return path


def helpers_of(daemon: int, target: Path) -> list[int]:
    """The processes other than the daemon that have the target open: the helper (forked
    by the command before the daemon, so not the daemon's child)."""
    st = os.stat(target)
    want = (st.st_dev, st.st_ino)  # its fd's link names the O_TMPFILE it was created as
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != daemon:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with contextlib.suppress(OSError):
                        fst = os.stat(f"/proc/{entry}/fd/{fd}")
                        if (fst.st_dev, fst.st_ino) == want:
                            out.append(int(entry))
                            break
    return out


def daemon_log(m: Mount, mirrorfs: MirrorFactory) -> str:
    i = mirrorfs.mounts.index(m)
    return (mirrorfs.tmp / f"daemon{i}.log").read_text()


def test_guest_writes_right_after_the_mount(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = big_image(tmp_path / "disk.img")
    m = mirrorfs.mount(src)
    writes = [(0, os.urandom(4096)), (700 * MiB + 12345, os.urandom(200 * 1024)),
              (SIZE - 65536, os.urandom(65536))]
    fd = os.open(m.img, os.O_WRONLY)
    try:
        for off, data in writes:
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    m.wait("ready", timeout=120)
    m.command("complete")
    m.wait("completed")
    log = daemon_log(m, mirrorfs)
    m.umount()
    assert "head start" in log, "the mount did not use the head start"
    with open(src, "rb") as f:
        for off, data in writes:
            assert os.pread(f.fileno(), len(data), off) == data
    assert_same(src, m.tgt)


def test_the_helper_ends_with_a_killed_daemon(tmp_path: Path,
                                              mirrorfs: MirrorFactory) -> None:
    """kill -9 of the daemon while the helper copies: the helper ends too (its stop pipe
    ends), so nothing writes the target behind the next mount; that mount copies again
    what the crash left unsure, and the target ends equal."""
    src = big_image(tmp_path / "disk.img")
    m = mirrorfs.mount(src)
    assert m.pid
    helpers = helpers_of(m.pid, m.tgt)
    assert helpers, "the helper had finished before the test could see it"
    for h in helpers:  # the command began the copy before it forked the daemon
        with open(f"/proc/{h}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) != m.pid
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in [m.pid, *helpers]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(alive(p) for p in helpers), "the helper outlived its daemon"
    run_mirrorfs("umount", str(m.mnt))  # the dead mount
    r = mirrorfs.mount(src, m.tgt, mnt=m.mnt)
    assert "head start" not in daemon_log(r, mirrorfs)  # not for an existing target
    r.wait("ready", timeout=120)
    r.command("complete")
    r.wait("completed")
    r.umount()
    assert_same(src, m.tgt)


def write_and_complete(m: Mount, offset: int) -> None:
    """A guest write through the mount, then ready, complete, unmount."""
    fd = os.open(m.img, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(65536), offset)
    finally:
        os.close(fd)
    m.wait("ready", timeout=120)
    m.command("complete")
    m.wait("completed")
    m.umount()


def test_a_foreground_daemon_started_with_stdin_closed(tmp_path: Path) -> None:
    """Under a supervisor that closed stdin the source is opened as fd 0; the helper,
    which points its stdio at /dev/null, must not copy from /dev/null (a review found it
    spinning there, and the first guest write waiting for it for ever)."""
    src = big_image(tmp_path / "disk.img")
    tgt, mnt = tmp_path / "disk.target.img", tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join([*MIRRORFS, "mount", "--foreground", str(src), str(tgt), str(mnt)])
    daemon = subprocess.Popen(["bash", "-c", f"exec {cmd} <&- >/dev/null 2>&1"], cwd=ROOT)
    m = Mount(src, tgt, mnt, src.name)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / ".mirror" / "ctl").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, "no mount"
            time.sleep(0.01)
        write_and_complete(m, SIZE // 2)
        daemon.wait(30)
    finally:
        if daemon.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            daemon.kill()
            daemon.wait()
    assert_same(src, tgt)


def test_a_background_mount_started_with_stdin_and_stdout_closed(tmp_path: Path) -> None:
    """The command opens the images (early head start) and the daemon's notification pipe
    where stdio would be: each must be moved above it, since the daemon puts /dev/null
    on stdio (a review found the pipe would become /dev/null, and the mount fail)."""
    src = big_image(tmp_path / "disk.img")
    tgt, mnt = tmp_path / "disk.target.img", tmp_path / "mnt"
    mnt.mkdir()
    cmd = " ".join([*MIRRORFS, "mount", str(src), str(tgt), str(mnt)])
    r = subprocess.run(["bash", "-c", f"exec {cmd} <&- >&-"], cwd=ROOT, capture_output=False,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    write_and_complete(Mount(src, tgt, mnt, src.name), SIZE // 3)
    assert_same(src, tgt)
