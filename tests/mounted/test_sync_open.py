"""A write through an O_DSYNC / O_SYNC descriptor of the mounted image is durable before
the write returns: the daemon's flush of the image(s) completes before its reply.

The observable is the daemon itself, traced with strace: its pwrite of the guest's data,
its fsync/fdatasync of the image, and the write(2) of its reply to /dev/fuse (a write's
reply is 24 bytes: fuse_out_header + fuse_write_out). strace sees the flush's return before
the reply starts because the handler awaits the flush before it replies. The kernel itself
sends no FSYNC after such a write on a direct_io file (checked on 6.18), so without the
daemon's own flush the trace shows none.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.mounted import MiB, MirrorFactory, Mount, assert_same, make_image

SIZE = 16 * MiB
LEN = 20 * 1024  # an unusual length: the daemon's pwrite of it is the guest's write
REPLY_LEN = 24  # fuse_out_header (16) + fuse_write_out (8)
FLUSHES = ("fsync", "fdatasync")


@dataclass
class Call:
    tid: int
    name: str
    args: str
    ret: int | None = None
    entry: int = 0  # line of the trace where the call started
    exit: int = -1  # ... and where it returned

    @property
    def fd(self) -> int:
        return int(re.match(r"\d+", self.args).group())  # type: ignore[union-attr]

    @property
    def offset(self) -> int:
        if self.name == "pwrite64":  # fd, buf, count, offset
            return int(self.args.rsplit(", ", 1)[1])
        m = re.search(r"\], \d+, (\d+)", self.args)  # pwritev(2): fd, iov, iovcnt, offset
        assert m, self.args
        return int(m.group(1))


_DONE = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+= (-?\d+)")
_START = re.compile(r"^(\d+)\s+(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*= (-?\d+)")


def parse(text: str) -> list[Call]:
    """strace -f output: each call with the lines of its start and of its return."""
    calls: list[Call] = []
    pending: dict[int, Call] = {}
    for i, line in enumerate(text.splitlines()):
        if m := _DONE.match(line):
            calls.append(Call(int(m[1]), m[2], m[3], int(m[4]), i, i))
        elif m := _START.match(line):
            c = Call(int(m[1]), m[2], m[3], None, i)
            pending[c.tid] = c
            calls.append(c)
        elif (m := _RESUMED.match(line)) and int(m[1]) in pending:
            c = pending.pop(int(m[1]))
            c.ret, c.exit = int(m[3]), i
    return calls


class Trace:
    """The daemon's writes, flushes and FUSE replies while the block runs."""

    def __init__(self, mount: Mount) -> None:
        assert mount.pid
        self.pid, self.mount = mount.pid, mount
        self.calls: list[Call] = []
        self.text = ""

    def fds_of(self, path: Path | str) -> set[int]:
        """The daemon's descriptors of that file (an O_TMPFILE target has no name in /proc)."""
        want = os.stat(path)
        fds = set()
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{self.pid}/fd/{name}")
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                    fds.add(int(name))
        assert fds, f"the daemon has no descriptor of {path}"
        return fds

    @contextlib.contextmanager
    def run(self, tmp: Path) -> Iterator[None]:
        strace = shutil.which("strace")
        assert strace, "strace is missing (scripts/setup.sh installs it)"
        out, err = tmp / "strace.out", tmp / "strace.err"
        with open(err, "wb") as errf:
            proc = subprocess.Popen(
                [strace, "-f", "-y", "-s", "0", "-e", "signal=none", "-o", str(out),
                 "-e", "trace=pwrite64,pwritev,pwritev2,fsync,fdatasync,writev",
                 "-p", str(self.pid)], stderr=errf, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while b"attached" not in err.read_bytes():
                assert proc.poll() is None, f"strace failed: {err.read_text()}"
                assert time.monotonic() < deadline, "strace did not attach"
                time.sleep(0.02)
            yield
        finally:
            proc.send_signal(signal.SIGINT)  # detaches from the daemon and writes it all
            proc.wait(timeout=20)
        self.text = out.read_text()
        self.calls = parse(self.text)

    def fuse_fds(self) -> set[int]:
        return {int(m[1]) for m in re.finditer(r"\b(\d+)</dev/fuse>", self.text)}

    def check_write(self, offset: int, image: Path, flushed: Sequence[Path],
                    not_flushed: Sequence[Path] = ()) -> None:
        """The guest's write of LEN bytes at ``offset`` reached ``image``, and between that
        and the daemon's reply every file in ``flushed`` was flushed (the flush returned)
        and none in ``not_flushed`` was."""
        c = self.calls
        img = self.fds_of(image)
        writes = [x for x in c if x.name.startswith("pwrite") and x.fd in img
                  and x.offset == offset and x.ret == LEN]
        assert len(writes) == 1, f"no single write of {LEN} at {offset}:\n{self.text}"
        w = writes[0]
        fuse = self.fuse_fds()
        replies = [x for x in c if x.name == "writev" and x.fd in fuse and x.ret == REPLY_LEN
                   and x.entry > w.exit]
        assert replies, f"no reply after the write at {offset}:\n{self.text}"
        reply = replies[0]
        for path in flushed:
            fds = self.fds_of(path)
            assert any(x.name in FLUSHES and x.fd in fds and x.ret == 0
                       and w.entry < x.entry and x.exit < reply.entry for x in c), (
                f"{path.name} was not flushed before the reply to the write at "
                f"{offset}:\n{self.text}")
        for path in not_flushed:
            fds = self.fds_of(path)
            assert not any(x.name in FLUSHES and x.fd in fds and w.entry < x.entry < reply.entry
                           for x in c), f"{path.name} flushed for a plain write:\n{self.text}"


def write(path: Path, flags: int, offset: int) -> bytes:
    data = os.urandom(LEN)
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        assert os.pwrite(fd, data, offset) == LEN
    finally:
        os.close(fd)
    return data


def start(tmp_path: Path, mirrorfs: MirrorFactory, *opts: str) -> Mount:
    src = make_image(tmp_path / "disk.img", SIZE)
    # no checkpoint during the test: it flushes the source too, and could hide a missing flush
    m = mirrorfs.mount(src, None, "--checkpoint-interval", "3600", *opts)
    m.wait("ready")
    return m


@pytest.mark.parametrize("flag", [os.O_DSYNC, os.O_SYNC], ids=["O_DSYNC", "O_SYNC"])
def test_sync_write_is_flushed_on_the_source_before_it_returns(
        tmp_path: Path, mirrorfs: MirrorFactory, flag: int) -> None:
    m = start(tmp_path, mirrorfs)
    t = Trace(m)
    with t.run(tmp_path):
        write(m.img, flag, 1 * MiB)
        write(m.img, 0, 2 * MiB)  # a plain write is not flushed: the trace can tell
        write(m.img, flag, 3 * MiB + 4096)
    t.check_write(1 * MiB, m.src, flushed=[m.src])
    t.check_write(2 * MiB, m.src, flushed=[], not_flushed=[m.src])
    t.check_write(3 * MiB + 4096, m.src, flushed=[m.src])
    m.command("complete")
    m.wait("completed")
    assert_same(m.src, m.tgt)


def test_sync_write_is_flushed_on_the_target_in_write_blocking_mode_and_after_the_pivot(
        tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    m = start(tmp_path, mirrorfs, "--copy-mode", "write-blocking")
    t = Trace(m)
    with t.run(tmp_path):
        write(m.img, os.O_DSYNC, 5 * MiB)
    t.check_write(5 * MiB, m.src, flushed=[m.src, m.tgt])
    t.check_write(5 * MiB, m.tgt, flushed=[m.src, m.tgt])
    m.command("complete")
    m.wait("completed")
    assert_same(m.src, m.tgt)

    # after the pivot the target is the disk: the write and its flush go there only
    expected = bytearray(m.tgt.read_bytes())
    t = Trace(m)
    with t.run(tmp_path):
        data = write(m.img, os.O_DSYNC, 7 * MiB)
    expected[7 * MiB:7 * MiB + LEN] = data
    t.check_write(7 * MiB, m.tgt, flushed=[m.tgt])
    assert not [x for x in t.calls if x.name.startswith("pwrite") and x.fd in t.fds_of(m.src)]
    assert m.tgt.read_bytes() == bytes(expected)
