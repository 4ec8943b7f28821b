"""A real VM on the mirrorfs mount: a Linux guest (QEMU, TCG) uses the mounted image as its
virtio disk, writes raw patterns and an ext4 file system while the copy runs, keeps writing
while the host completes the mirror, and writes more after the pivot. The host then checks
the TARGET: the guest's checksums, e2fsck -fn, the untouched regions, and that the source
was not written after the pivot.

The guest (kernel + busybox initramfs, /init = scripts/vm/guest-init.sh) is built by
scripts/vm/build-guest.sh from Debian packages and cached outside the repository
(MIRRORFS_VM_CACHE, default /var/cache/mirrorfs-vm). MIRRORFS_VM_ACCEL picks QEMU's
accelerator (default tcg: KVM cannot be assumed).
"""

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.mounted import MiB, MirrorFactory, make_image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "scripts" / "vm" / "build-guest.sh"



# The guest's disk (MiB): ext4 on [0, FS), pattern A (before the pivot) at PA, pattern B
# (after it) at PB, both PLEN long; [TAIL, DISK) is never written by the guest.
DISK, FS, PA, PB, PLEN, TAIL = 64, 40, 44, 52, 4, 56
NFILES = 12
SPEED = "512K"  # the copy of 64 MiB takes >2 min: it is still running in the guest's phase 1


@pytest.fixture
def mirrorfs(tmp_path: Path) -> Iterator[Any]:
    f = MirrorFactory(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()


@pytest.fixture(scope="session")
def guest_files() -> tuple[Path, Path]:
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=1200,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        pytest.fail(f"{BUILD} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    out = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    kernel, initrd = Path(out["KERNEL"]), Path(out["INITRD"])
    assert kernel.is_file() and initrd.is_file(), r.stdout
    return kernel, initrd


def sha256_file(path: Path, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = os.path.getsize(path) - offset if length is None else length
        while left > 0:
            b = f.read(min(left, 4 * MiB))
            if not b:
                break
            h.update(b)
            left -= len(b)
    return h.hexdigest()


class GuestFailed(AssertionError):
    pass


class Guest:
    """QEMU with the guest; its control channel (ttyS1) is a unix socket QEMU connects to.
    The kernel console (ttyS0) goes to ``console.log``."""

    def __init__(self, tmp: Path, kernel: Path, initrd: Path, disk: Path, cache: str) -> None:
        self.console = tmp / "console.log"
        self.sock_path = tmp / "ctl.sock"
        assert len(str(self.sock_path)) < 100, "unix socket path too long"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.buf = b""
        self.lines: list[str] = []
        qemu = shutil.which("qemu-system-x86_64")
        assert qemu, "qemu-system-x86_64 is missing (scripts/vm/build-guest.sh installs it)"
        append = (f"console=ttyS0 panic=-1 mfs.fs={FS} mfs.pa={PA} mfs.pb={PB} "
                  f"mfs.plen={PLEN} mfs.nfiles={NFILES}")
        self.argv = [
            qemu, "-accel", os.environ.get("MIRRORFS_VM_ACCEL", "tcg"),
            "-smp", "1", "-m", "256M",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-no-reboot",
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,id=ctl,path={self.sock_path}",
            "-serial", "chardev:ctl",
            "-drive", f"file={disk},format=raw,if=virtio,cache={cache}",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
        ]
        self.stderr = open(tmp / "qemu.stderr", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def diagnostics(self) -> str:
        self.stderr.seek(0)
        err = self.stderr.read().decode(errors="replace")[-2000:]
        try:
            con = self.console.read_text(errors="replace")[-4000:]
        except OSError:
            con = ""
        return f"\n--- qemu output:\n{err}\n--- guest console (tail):\n{con}"

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise GuestFailed(f"qemu exited ({self.proc.returncode}) early"
                              + self.diagnostics())

    def _connect(self, deadline: float) -> socket.socket:
        if self.conn is None:
            self.listener.settimeout(0.2)
            while True:
                self._check_alive()
                try:
                    self.conn, _ = self.listener.accept()
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise GuestFailed("qemu did not connect its control channel"
                                          + self.diagnostics()) from None
            self.conn.settimeout(0.2)
        return self.conn

    def readline(self, deadline: float) -> str:
        conn = self._connect(deadline)
        while b"\n" not in self.buf:
            if time.monotonic() > deadline:
                raise GuestFailed(f"timed out waiting for the guest; it said {self.lines}"
                                  + self.diagnostics())
            try:
                chunk = conn.recv(4096)
            except TimeoutError:
                self._check_alive()
                continue
            if not chunk:
                self._check_alive()
                time.sleep(0.1)
                continue
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode(errors="replace").strip("\r\x00 ")
        self.lines.append(text)
        return text

    def expect(self, word: str, timeout: float) -> list[list[str]]:
        """Read MFS lines up to the one starting with ``word``; returns all of them split
        (the last one is ``word``'s)."""
        deadline = time.monotonic() + timeout
        got: list[list[str]] = []
        while True:
            line = self.readline(deadline)
            if not line.startswith("MFS "):
                continue
            parts = line.split()[1:]
            if parts[0] == "FAIL":
                raise GuestFailed(f"the guest failed: {line}" + self.diagnostics())
            got.append(parts)
            if parts[0] == word:
                return got

    def send(self, line: str) -> None:
        assert self.conn is not None
        self.conn.sendall(line.encode() + b"\n")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestFailed("the guest did not power off" + self.diagnostics()) from None

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self.stderr.close()


def open_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every descriptor that process ``pid`` holds on ``path``."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    for line in f:
                        if line.startswith("flags:"):
                            flags.append(int(line.split()[1], 8))
    return flags


def debugfs_cat(image: Path, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                       timeout=60)
    assert r.returncode == 0, f"debugfs cat {path}: {r.stderr!r}"
    return r.stdout


def debugfs_files(image: Path) -> set[str]:
    """Every regular file in the ext4 on ``image`` (but lost+found), by debugfs."""
    files: set[str] = set()
    todo = ["/"]
    while todo:
        d = todo.pop()
        r = subprocess.run(["debugfs", "-R", f"ls -p {d}", str(image)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            # /inode/mode/uid/gid/name/size/
            f = line.strip().split("/")
            if len(f) < 7 or f[5] in (".", "..", "") or f[1] == "0":
                continue
            path = d.rstrip("/") + "/" + f[5]
            mode = int(f[2], 8)
            if mode & 0o170000 == 0o040000:
                if path != "/lost+found":
                    todo.append(path)
            else:
                files.add(path)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_guest_writes_across_the_pivot(tmp_path: Path, mirrorfs: Any,
                                       guest_files: tuple[Path, Path], cache: str) -> None:
    kernel, initrd = guest_files
    src = make_image(tmp_path / "disk.img", DISK * MiB)
    tail_before = sha256_file(src, TAIL * MiB)
    m = mirrorfs.mount(src, None, "--speed", SPEED)
    g = Guest(tmp_path, kernel, initrd, m.img, cache)
    t0 = time.monotonic()
    try:
        booted = g.expect("BOOTED", timeout=240)[-1]
        assert int(booted[1]) * 512 == DISK * MiB, f"the guest sees {booted}"
        flags = open_flags(g.proc.pid, m.img)
        assert flags, "qemu has not opened the image"
        direct = [bool(f & os.O_DIRECT) for f in flags]
        assert all(direct) if cache == "none" else not any(direct), (cache, flags)
        phase1 = g.expect("PHASE1", timeout=300)
        t_phase1 = time.monotonic() - t0
        st = m.status()
        # The guest's raw and ext4 writes so far raced the bulk copy.
        assert st["state"] == "copying" and st["remaining_bytes"] > 0, st

        # Complete while the guest's writer creates and fsyncs files.
        m.command("speed 0")
        m.wait("ready", timeout=180)
        m.command("complete")
        st = m.wait("completed", timeout=180)
        assert st["serving"] == "target" and st["target_consistent"] is True, st
        copied = st["copied_bytes"]
        src_at_pivot = sha256_file(src)
        time.sleep(3)  # the writer goes on, now on the target
        g.send("go")
        rest = g.expect("DONE", timeout=300)
        rc = g.wait_exit(timeout=60)
        assert rc == 0, f"qemu exited with {rc}" + g.diagnostics()
        names = m.event_names()
    finally:
        g.close()
    runtime = time.monotonic() - t0
    m.umount()

    lines = phase1 + rest
    live = next(int(p[1]) for p in lines if p[0] == "LIVE")
    wrote = {p[1]: p[2] for p in lines if p[0] == "WROTE"}
    sums = {p[1]: p[2] for p in lines if p[0] == "SUM"}
    print(f"\n[{cache}] phase 1 done at {t_phase1:.0f} s, guest done at {runtime:.0f} s, "
          f"{live} live files, {len(sums)} checksums, {copied / MiB:.1f} MiB copied")
    assert live > 0, "the guest wrote nothing while the mirror completed"

    # The source was not written after the pivot.
    assert sha256_file(src) == src_at_pivot, "the source changed after the pivot"

    # The guest read back what it wrote (through mirrorfs, from the target).
    assert set(wrote) == {"raw:A", "raw:B"}, lines
    for name, digest in wrote.items():
        assert sums[name] == digest, f"the guest read back {name} differently"
    # ... and the target holds it.
    tgt = m.tgt
    assert sha256_file(tgt, PA * MiB, PLEN * MiB) == wrote["raw:A"], "target: pattern A"
    assert sha256_file(tgt, PB * MiB, PLEN * MiB) == wrote["raw:B"], "target: pattern B"
    assert sha256_file(src, PA * MiB, PLEN * MiB) == wrote["raw:A"], "source: pattern A"
    assert sha256_file(src, PB * MiB, PLEN * MiB) != wrote["raw:B"], "source: pattern B"
    assert sha256_file(tgt, TAIL * MiB) == tail_before, "target: the untouched tail"
    assert sha256_file(src, TAIL * MiB) == tail_before, "source: the untouched tail"

    # The file system on the target: clean, holding exactly the guest's files.
    r = subprocess.run(["e2fsck", "-fn", str(tgt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"e2fsck -fn on the target: {r.returncode}\n{r.stdout}{r.stderr}"
    files = {name for name in sums if not name.startswith("raw:")}
    assert any(f.startswith("/live/") for f in files)
    assert {"/d1/sub/big", "/d2/moved", "/d2/g0"} <= files and "/d1/f1" not in files
    assert debugfs_files(tgt) == files
    for name in sorted(files):
        data = debugfs_cat(tgt, name)
        assert hashlib.sha256(data).hexdigest() == sums[name], f"target: {name} differs"

    assert "error" not in names and names[-1] == "completed", names
