"""The whole job, mounted: sync modes on sparse sources, zero detection, the speed limit,
pause/resume under writes, overlapping writes at a small granularity."""

import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers.loadgen import Writers
from helpers.mounted import MiB, MirrorFactory, allocated, assert_same, make_image
from helpers.writers import falloc_unsupported

DATA = [(0, 3 * MiB), (17 * MiB + 4096, 2 * MiB + 123), (50 * MiB, 5 * MiB)]


def sparse_source(tmp_path: Path, size: int = 64 * MiB) -> Path:
    return make_image(tmp_path / "sparse.img", size, data_ranges=DATA)


@pytest.mark.parametrize("sync", ["full", "top"])
def test_sync_full_and_top_keep_the_target_sparse(tmp_path: Path, mirrorfs: MirrorFactory,
                                                  sync: str) -> None:
    src = sparse_source(tmp_path)
    with open(src, "r+b") as f:  # allocated but all zeros: must become a hole
        f.seek(30 * MiB)
        f.write(bytes(4 * MiB))
    m = mirrorfs.mount(src, None, "--sync", sync)
    st = m.wait("ready")
    assert st["sync"] == sync
    m.command("complete")
    m.wait("completed")
    data = sum(n for _, n in DATA)
    assert allocated(m.tgt) <= data + 2 * MiB, (
        f"target not sparse: {allocated(m.tgt)} bytes allocated for {data} of data")
    m.umount()
    assert_same(src, m.tgt)


def test_sync_top_zeroes_holes_of_an_existing_target(tmp_path: Path,
                                                     mirrorfs: MirrorFactory) -> None:
    src = sparse_source(tmp_path)
    tgt = make_image(tmp_path / "old-target.img", 64 * MiB)  # old random data everywhere
    m = mirrorfs.mount(src, tgt, "--sync", "top")
    m.wait("ready")
    m.command("cancel")
    st = m.wait("cancelled")
    assert st["target_consistent"] is True
    m.umount()
    assert_same(src, tgt)
    assert allocated(tgt) <= sum(n for _, n in DATA) + 2 * MiB, "holes were written as zeros"


def test_sync_none_copies_only_new_writes(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 16 * MiB)
    m = mirrorfs.mount(src, None, "--sync", "none", "--granularity", "64K")
    m.wait("ready")
    fd = os.open(m.img, os.O_RDWR)
    try:
        os.pwrite(fd, b"N" * 100_000, 5 * MiB + 77)
    finally:
        os.close(fd)
    deadline = time.monotonic() + 30
    while m.status()["remaining_bytes"] and time.monotonic() < deadline:
        time.sleep(0.05)
    m.command("cancel")
    m.wait("cancelled")
    m.umount()
    s, t = src.read_bytes(), m.tgt.read_bytes()
    lo = (5 * MiB + 77) // (64 << 10) * (64 << 10)
    hi = -(-(5 * MiB + 77 + 100_000) // (64 << 10)) * (64 << 10)
    assert t[lo:hi] == s[lo:hi], "the chunks written after the start were not mirrored"
    assert t[:lo] == bytes(lo) and t[hi:] == bytes(len(t) - hi), (
        "sync none copied data that was there before the start")


def test_speed_limit_within_ten_percent(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    rate = 8 * MiB
    src = make_image(tmp_path / "disk.img", 96 * MiB)
    m = mirrorfs.mount(src, None, "--speed", "8M")
    time.sleep(1)
    t0, c0 = time.monotonic(), m.status()["copied_bytes"]
    time.sleep(4)
    t1, c1 = time.monotonic(), m.status()["copied_bytes"]
    measured = (c1 - c0) / (t1 - t0)
    assert abs(measured - rate) <= 0.1 * rate, f"copy rate {measured / MiB:.2f} MiB/s"
    st = m.status()
    assert st["speed"] == rate and abs(st["rate"] - rate) <= 0.15 * rate, st
    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()
    assert_same(src, m.tgt)


def test_pause_resume_under_concurrent_writes(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 32 * MiB)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "8M")
    w = Writers(m.img, model, threads=2, seed=5).start()
    try:
        time.sleep(0.5)
        m.command("pause")
        st = m.wait("paused")
        assert st["ready"] is False
        time.sleep(0.3)  # in-flight copies finish
        c0 = m.status()["copied_bytes"]
        time.sleep(1.5)
        st = m.status()
        assert st["copied_bytes"] == c0, "a copy started while paused"
        assert st["state"] == "paused" and w.bytes_written > 0
        with pytest.raises(OSError) as e:
            m.command("complete")
        assert e.value.errno == 16  # EBUSY
        m.command("resume")
        m.command("speed 0")
        m.wait("ready", timeout=60)
    finally:
        w.stop()
    m.command("complete")
    m.wait("completed")
    assert bytes(model) == m.tgt.read_bytes(), "the target lost a guest write"
    names = m.event_names()
    assert names.index("paused") < names.index("resumed") < names.index("ready")
    m.umount()
    assert_same(src, m.tgt)


def test_overlapping_writes_at_4k_granularity(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 16 * MiB)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--granularity", "4K", "--speed", "4M")
    w = Writers(m.img, model, threads=4, seed=11, max_size=64 << 10).start()
    try:
        time.sleep(3)
    finally:
        w.stop()
    assert len(w.records) > 100
    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()
    assert bytes(model) == src.read_bytes(), "the source lost a guest write"
    assert_same(src, m.tgt)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_guest_punch_hole_and_zero_range_pass_through(tmp_path: Path, mirrorfs: MirrorFactory,
                                                      mode: str) -> None:
    missing = falloc_unsupported(tmp_path)
    if missing:
        pytest.skip(f"the filesystem of {tmp_path} does not support fallocate {missing} "
                    "(p: punch hole, z: zero range), which this test needs")
    src = make_image(tmp_path / "disk.img", 32 * MiB)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "16M", "--copy-mode", mode)

    def falloc(flag: str, offset: int, length: int) -> None:
        """A guest punch-hole (-p) or zero-range (-z): the image reads zeros there at once."""
        subprocess.run(["fallocate", flag, "-o", str(offset), "-l", str(length), m.img],
                       check=True)
        model[offset:offset + length] = bytes(length)
        with open(m.img, "rb") as f:
            f.seek(offset)
            assert f.read(length) == bytes(length), f"fallocate {flag}: not zeros"

    fd = os.open(m.img, os.O_RDWR)
    try:
        # during the bulk copy, then once in sync
        falloc("-p", MiB + 4096, 3 * MiB)
        m.command("speed 0")
        m.wait("ready")
        falloc("-p", 20 * MiB, 6 * MiB)
        falloc("-z", 10 * MiB + 7, 100000)  # unaligned: partial blocks are zeroed in place
        with pytest.raises(OSError) as e:
            os.truncate(m.img, 64 * MiB)  # a disk does not change size under a mirror
        assert e.value.errno == 1  # EPERM
        assert os.path.getsize(src) == 32 * MiB
    finally:
        os.close(fd)
    assert allocated(src) <= 24 * MiB, "the punch did not reach the source"
    m.command("complete")
    m.wait("completed")
    m.umount()
    expect = tmp_path / "model.img"  # the source's data with every punched or zeroed range
    expect.write_bytes(model)
    assert_same(expect, src)
    assert_same(src, m.tgt)
    assert allocated(m.tgt) <= 24 * MiB, "the holes did not reach the target"
