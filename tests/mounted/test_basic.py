"""The foundation, mounted: mirror under writes, complete, post-pivot writes, umount."""

import os
import select
from pathlib import Path

from helpers.mounted import MiB, MirrorFactory, assert_same, make_image

from mirrorfs.system import alive


def test_complete_under_writes(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 32 * MiB)
    m = mirrorfs.mount(src, None, "--speed", "8M")
    st = m.status()
    assert st["state"] == "copying" and st["serving"] == "source"
    fd = os.open(m.img, os.O_RDWR)
    try:
        for i in range(64):  # unaligned writes racing the copier
            os.pwrite(fd, os.urandom(7000 + i), (i * 499_979) % (32 * MiB - 8000))
        m.command("speed 0")
        m.wait("ready")
        m.command("complete")
        st = m.wait("completed")
        assert st["serving"] == "target" and st["target_consistent"] is True
        assert st["remaining_bytes"] == 0 and st["progress"] == 100
        assert_same(src, m.tgt)
        src_before = src.read_bytes()
        expected = bytearray(src_before)
        expected[12345:12360] = b"after the pivot"
        os.pwrite(fd, b"after the pivot", 12345)
    finally:
        os.close(fd)
    assert src.read_bytes() == src_before, "a write after the pivot reached the source"
    names = m.event_names()
    assert names[0] == "started" and names.index("ready") < names.index("completed")
    m.umount()
    assert m.tgt.read_bytes() == bytes(expected), "the target lacks the post-pivot write"


def test_the_daemon_holds_none_of_the_callers_files(tmp_path: Path,
                                                    mirrorfs: MirrorFactory) -> None:
    """The daemon is forked from the mount command: a caller that gave the command a pipe
    (a shell's redirection, a supervisor's log pipe) sees its end when the command returns,
    not when the daemon exits."""
    src = make_image(tmp_path / "disk.img", 8 * MiB)
    r, w = os.pipe()
    try:
        m = mirrorfs.mount(src, None, pass_fds=(w,))
        os.close(w)
        w = -1
        assert select.select([r], [], [], 10)[0], "something still holds the pipe's write end"
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert m.pid is not None and alive(m.pid)
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()
    assert_same(src, m.tgt)
