"""Image locks, as QEMU takes them (mirrorfs/locks.py): while a mount runs, neither a qemu
tool nor a second mirrorfs can open its source or its target for writing behind the
mirror's back (the refusal names the process that holds the image); a running qemu that
has an image open for writing keeps mirrorfs from mounting it; after the unmount the locks
are gone."""

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.mounted import MiB, MirrorFactory, Mount, assert_same, make_image, run_mirrorfs

from mirrorfs.system import mounted

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-img") is None,
    reason="qemu-io and qemu-img (scripts/setup.sh installs qemu-utils)")

SIZE = 8 * MiB
WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


def qemu_io_write(image: Path, pattern: int = 0x5A) -> subprocess.CompletedProcess[str]:
    """qemu-io opens the image read-write and writes 4 KiB of ``pattern`` at offset 0."""
    return subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} 0 4k",
                           str(image)], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def assert_locked(image: Path) -> None:
    before = image.read_bytes()
    r = qemu_io_write(image)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and WRITE_LOCK in out, f"qemu-io wrote to {image}: {out}"
    # qemu-img opening it for writing (a resize to the same size), and reading it for a
    # copy that must not change under it (convert: a read that does not share write)
    r = qemu_img("resize", "-f", "raw", str(image), str(SIZE))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and WRITE_LOCK in out, f"qemu-img resize: {out}"
    r = qemu_img("convert", "-f", "raw", "-O", "raw", str(image), str(image) + ".copy")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and SHARED_WRITE_LOCK in out, f"qemu-img convert: {out}"
    assert image.read_bytes() == before, f"{image} changed behind the mirror's back"


def mount_refused(mirrorfs: MirrorFactory, source: Path, target: Path,
                  mnt: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """``mirrorfs mount`` that should be refused; if it mounts, the fixture cleans it up."""
    r = run_mirrorfs("mount", str(source), str(target), str(mnt), timeout=60)
    if r.returncode == 0:
        m = Mount(source, target, mnt, source.name)
        m.pid = m.status()["pid"]
        mirrorfs.mounts.append(m)
    return r, (r.stdout + r.stderr).strip()


def assert_second_mount_refused(mirrorfs: MirrorFactory, m: Mount, source: Path,
                                target: Path) -> None:
    """A second mirrorfs on an image that the mount holds: one line naming the daemon, no
    mount, no target created."""
    mnt = target.parent / "second-mnt"
    mnt.mkdir(exist_ok=True)
    created = not target.exists()
    r, out = mount_refused(mirrorfs, source, target, mnt)
    assert r.returncode != 0, f"a second mount of {source} -> {target} was accepted: {out}"
    assert len(out.splitlines()) == 1, out
    assert "locked" in out and f"pid {m.pid}" in out, \
        f"the refusal does not name the holder (pid {m.pid}): {out}"
    assert not mounted(mnt), "the refused mount left a mount"
    if created:
        assert not target.exists(), "the refused mount left a target"


def test_images_are_locked_while_mounted(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    m = mirrorfs.mount(src, None)
    m.wait("ready")
    assert_locked(src)
    assert_locked(m.tgt)
    # a second mirrorfs: the same source to another target, and the target as a source
    assert_second_mount_refused(mirrorfs, m, src, tmp_path / "other.img")
    assert_second_mount_refused(mirrorfs, m, m.tgt, tmp_path / "other2.img")
    st = m.status()
    assert st["state"] == "ready" and st["error"] is None, st
    m.command("cancel")
    assert m.wait("cancelled")["target_consistent"] is True
    m.umount()
    assert_same(src, m.tgt)
    # the unmount let go: qemu-io writes both, the same 4 KiB
    for image in (src, m.tgt):
        r = qemu_io_write(image)
        assert r.returncode == 0, f"still locked after the unmount: {r.stdout}{r.stderr}"
        with open(image, "rb") as f:
            assert f.read(4096) == b"\x5a" * 4096
    assert_same(src, m.tgt)


def test_an_image_open_in_qemu_is_refused(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    """qemu-io holds the source open for writing (as a running qemu does): mirrorfs refuses
    it, naming qemu-io, and changes nothing; once qemu-io has quit, the same mount works."""
    src = make_image(tmp_path / "disk.img", SIZE)
    before = tmp_path / "before.img"
    shutil.copyfile(src, before)
    tgt, mnt = tmp_path / "disk.target.img", tmp_path / "mnt"
    mnt.mkdir()
    qemu = subprocess.Popen(["qemu-io", "-f", "raw", str(src)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert qemu.stdin is not None and qemu.stdout is not None
        qemu.stdin.write("write -P 0x33 1M 4k\n")  # it really has it open for writing
        qemu.stdin.flush()
        line = qemu.stdout.readline()
        assert "wrote 4096/4096 bytes at offset 1048576" in line, line
        r, out = mount_refused(mirrorfs, src, tgt, mnt)
        assert r.returncode != 0, f"mounted an image that qemu-io has open: {out}"
        assert len(out.splitlines()) == 1, out
        assert "locked" in out and f"qemu-io pid {qemu.pid}" in out, out
        assert not mounted(mnt) and not tgt.exists(), "the refused mount changed something"
    finally:
        if qemu.stdin is not None:
            qemu.stdin.close()  # qemu-io quits at the end of its input
        qemu.wait(30)
    with open(before, "r+b") as f:  # qemu-io's write, and nothing else
        f.seek(MiB)
        f.write(b"\x33" * 4096)
    assert_same(before, src)
    m = mirrorfs.mount(src, tgt, mnt=mnt)
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()
    assert_same(src, tgt)
