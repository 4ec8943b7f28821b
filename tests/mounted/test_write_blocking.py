"""Write-blocking (active) mirroring converges under a writer faster than the copier;
background mode does not. Writers: several threads, random unaligned offsets over the whole
image, mixed sizes, overlapping, at full speed; the copier is limited to 1 MiB/s."""

import time
from pathlib import Path

import pytest
from helpers.loadgen import Writers, covered, differing_ranges
from helpers.mounted import MiB, MirrorFactory, Mount, assert_same, make_image

SIZE = 8 * MiB
SPEED = "1M"


def start(tmp_path: Path, mirrorfs: MirrorFactory, mode: str
          ) -> tuple[Path, bytearray, Writers, Mount]:
    src = make_image(tmp_path / "disk.img", SIZE)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", SPEED, "--granularity", "4K",
                       "--copy-mode", mode)
    w = Writers(m.img, model, threads=3, seed=7, min_size=512, max_size=128 << 10).start()
    return src, model, w, m


@pytest.mark.slow
def test_background_mode_does_not_converge(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src, model, w, m = start(tmp_path, mirrorfs, "background")
    samples = []
    try:
        deadline = time.monotonic() + 12  # 8 MiB at 1 MiB/s would take 8 s without writes
        while time.monotonic() < deadline:
            st = m.status()
            assert st["state"] == "copying", f"background mode converged: {st}"
            samples.append(st["remaining_bytes"])
            time.sleep(0.25)
    finally:
        w.stop()
    assert min(samples[len(samples) // 2:]) > SIZE // 4, (
        f"remaining bytes fell towards zero: {samples}")
    print(f"background: remaining bytes over 12 s: {samples[::8]}, "
          f"writers wrote {w.bytes_written / MiB:.0f} MiB")
    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    assert bytes(model) == m.tgt.read_bytes()
    assert_same(src, m.tgt)


@pytest.mark.slow
def test_write_blocking_converges_and_completes_under_writers(
        tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src, model, w, m = start(tmp_path, mirrorfs, "write-blocking")
    try:
        st = m.wait("ready", timeout=40)
        assert st["copy_mode"] == "write-blocking"
        rate = w.bytes_written
        time.sleep(1)
        assert w.bytes_written > rate, "the writers stalled"
        t_complete = time.monotonic()
        m.command("complete")
        st = m.wait("completed", timeout=30)
        assert st["actively_synced"] is True
        n_before = len(w.records)
        time.sleep(0.5)  # the writers keep going, now onto the target
        assert len(w.records) > n_before, "the writers stopped at the pivot"
    finally:
        w.stop()
    tgt_bytes = m.tgt.read_bytes()
    src_bytes = src.read_bytes()
    assert bytes(model) == tgt_bytes, "a guest write did not reach the served image"
    # At the pivot target == source; afterwards only the target changes. So wherever they
    # differ now, a write issued after `complete` must have written there.
    diff = differing_ranges(src_bytes, tgt_bytes)
    late = [r for r in w.records if r.end >= t_complete]
    bad = covered(diff, late, src_bytes, tgt_bytes)
    assert not bad, f"source and target differ at bytes no late write touched: {bad}"
    m.umount()
    assert bytes(model) == m.tgt.read_bytes(), "the target changed at umount"


def test_switch_to_write_blocking_while_running(tmp_path: Path,
                                                mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 4 * MiB)
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, "--speed", "1M", "--granularity", "4K")
    w = Writers(m.img, model, threads=2, seed=3, max_size=64 << 10).start()
    try:
        time.sleep(0.5)
        m.command("copy-mode write-blocking")
        st = m.status()
        assert st["copy_mode"] == "write-blocking" and st["actively_synced"] is False
        with pytest.raises(OSError):
            m.command("copy-mode background")  # one way, as in QEMU
        st = m.wait("ready", timeout=30)
        st = m.status()
        assert st["actively_synced"] is True
    finally:
        w.stop()
    m.command("complete")
    m.wait("completed")
    assert bytes(model) == m.tgt.read_bytes()
    m.umount()
    assert_same(src, m.tgt)
