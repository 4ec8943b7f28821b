"""Helpers of the mounted tests: the real daemon in its own process (``run_mirrorfs``), a
mount of it (``Mount``, made by ``MirrorFactory``, which cleans up with fusermount3 -u -z,
then SIGTERM, then SIGKILL), images and their byte-for-byte comparison (``assert_same``),
crashes (``kill9``) and the state file's checkpoints. The fixtures that use them are in
tests/mounted/conftest.py."""

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from mirrorfs.system import alive, mounted

ROOT = Path(__file__).resolve().parents[2]
MIRRORFS = [sys.executable, "-m", "mirrorfs"]
MiB = 1 << 20


def run_mirrorfs(*args: str, timeout: float = 120, check: bool = False,
                 pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*MIRRORFS, *args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, cwd=ROOT, pass_fds=pass_fds)
    if check and r.returncode != 0:
        raise AssertionError(f"mirrorfs {' '.join(args)} failed ({r.returncode}): "
                             f"{r.stdout}{r.stderr}")
    return r


def make_image(path: Path, size: int, *, seed: int | None = None,
               data_ranges: list[tuple[int, int]] | None = None) -> Path:
    """A random image; with ``data_ranges``, a sparse one holding random data only there."""
    with open(path, "wb") as f:
        if data_ranges is None:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(os.urandom(n))
                left -= n
        else:
            f.truncate(size)
            for off, length in data_ranges:
                f.seek(off)
                f.write(os.urandom(length))
    return path


def first_difference(a: Path, b: Path) -> str | None:
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa != sb:
        return f"sizes differ: {sa} != {sb}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                i = next(k for k in range(min(len(x), len(y))) if x[k] != y[k])
                return f"first difference at byte {off + i}"
            if not x:
                return None
            off += len(x)


def assert_same(a: Path | str, b: Path | str) -> None:
    diff = first_difference(Path(a), Path(b))
    assert diff is None, f"{a} and {b} differ: {diff}"


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


class Mount:
    def __init__(self, src: Path, tgt: Path, mnt: Path, name: str) -> None:
        self.src, self.tgt, self.mnt = src, tgt, mnt
        self.img = mnt / name
        self.ctl_path = mnt / ".mirror" / "ctl"
        self.pid: int | None = None
        self.output = ""  # what ``mirrorfs mount`` printed (its notes)

    def status(self) -> dict[str, Any]:
        with open(self.ctl_path, "rb") as f:
            data = f.read()
        obj = json.loads(data)
        assert isinstance(obj, dict)
        return obj

    def command(self, cmd: str) -> None:
        """``echo CMD > ctl``: raises OSError with the errno on refusal."""
        fd = os.open(self.ctl_path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, (cmd + "\n").encode())
        finally:
            os.close(fd)

    def wait(self, *states: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["state"] in states:
                return st
            if st["state"] in ("failed", "cancelled", "completed"):
                raise AssertionError(f"waiting for {states}: job ended: {st}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not {states} after {timeout} s: {st}")
            time.sleep(0.05)

    def events(self) -> list[dict[str, Any]]:
        with open(self.mnt / ".mirror" / "events", "rb") as f:
            return [json.loads(line) for line in f.read().splitlines()]

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events()]

    def umount(self) -> None:
        run_mirrorfs("umount", str(self.mnt), check=True)
        assert not mounted(self.mnt)


class MirrorFactory:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mounts: list[Mount] = []

    def mount(self, src: Path, tgt: Path | None = None, *opts: str,
              mnt: Path | None = None, target_uri: str | None = None,
              pass_fds: tuple[int, ...] = ()) -> Mount:
        tgt = tgt or self.tmp / (src.stem + ".target" + src.suffix)
        mnt = mnt or self.tmp / f"mnt{len(self.mounts)}"
        mnt.mkdir(exist_ok=True)
        log = self.tmp / f"daemon{len(self.mounts)}.log"
        r = run_mirrorfs("mount", str(src), target_uri or str(tgt), str(mnt), "--log", str(log),
                         *opts, pass_fds=pass_fds)
        name = src.name
        for i, o in enumerate(opts):
            if o == "--name":
                name = opts[i + 1]
        m = Mount(src, tgt, mnt, name)
        m.output = r.stdout + r.stderr
        if r.returncode != 0:
            raise AssertionError(f"mount failed ({r.returncode}): {r.stderr}")
        self.mounts.append(m)
        m.pid = m.status()["pid"]
        return m

    def cleanup(self) -> None:
        for m in self.mounts:
            if mounted(m.mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(m.mnt)], capture_output=True)
            if m.pid:
                _stop(m.pid)


def kill9(m: Mount, timeout: float = 10) -> None:
    """A crash: SIGKILL the daemon, and check that it is gone and left a dead mount (every
    access to the image fails with ENOTCONN, or ECONNABORTED for the first ones after the
    kernel aborted the connection), so that what follows really is a crash."""
    assert m.pid is not None and alive(m.pid), f"the daemon {m.pid} is not running"
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(m.pid):
        assert time.monotonic() < deadline, f"the daemon {m.pid} survived SIGKILL"
        time.sleep(0.02)
    with pytest.raises(OSError) as e:
        os.stat(m.img)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), \
        f"not a dead mount after the crash: {e.value}"
    assert mounted(m.mnt), "the crash left no mount: the daemon unmounted as at a clean stop"


def saved_header(state: Path) -> tuple[int, int]:
    """(seq, slot) of a state file's newest valid header, read as the next mount reads it."""
    from mirrorfs.state import StateFile, StateIO  # trio, bitarray: only for the tests that ask

    sf = StateFile.open(str(state), StateIO(os.open(state, os.O_RDONLY | os.O_CLOEXEC)))
    try:
        return int(sf.header["seq"]), int(sf.header["slot"])
    finally:
        sf.close()


def wait_for_checkpoints(state: Path, n: int, timeout: float = 30) -> None:
    """Until ``n`` checkpoints (switches of the state file's slot) have ended since the call.
    The first may have begun before the call; each later one began after the one before had
    ended, so from the second on, its snapshot of what may differ was taken after the call."""
    seq, slot = saved_header(state)
    switches = 0
    deadline = time.monotonic() + timeout
    while switches < n:
        assert time.monotonic() < deadline, f"fewer than {n} checkpoints in {timeout} s"
        time.sleep(0.02)
        s, sl = saved_header(state)
        if s > seq:
            switches += sl != slot
            seq, slot = s, sl


def _stop(pid: int) -> None:
    for sig, wait in ((None, 5.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive(pid):
            return
