"""The foundation, mounted: mirror under writes, complete, post-pivot writes, umount."""

import os
from pathlib import Path

from conftest import MiB, MirrorFactory, assert_same, make_image


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
