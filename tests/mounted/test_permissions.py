"""Who may do what with --allow-other.

The daemon runs as root with ``allow_other`` and the kernel's permission checks
(default_permissions): the image carries the source's mode and owner, the control file is
the mounting user's alone (0600). A second local user (``mirrorfs-test``, created if
missing) may read and write the image when its mode allows (0666) and gets EACCES when it
does not (0600, owned by root); it never gets to read or write ``.mirror/ctl``. Without
--allow-other nobody but the mounting user gets in at all.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.mounted import MiB, MirrorFactory, Mount, assert_same, make_image

USER = "mirrorfs-test"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, allow_other)")

# Runs as the other user: tries one operation, prints OK or the errno's name.
PROBE = r"""
import errno, os, sys
op, path = sys.argv[1], sys.argv[2]
try:
    if op == "read":
        fd = os.open(path, os.O_RDONLY)
        os.pread(fd, 4096, 0)
    elif op == "write":
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, bytes.fromhex(sys.argv[4]), int(sys.argv[3]))
        os.fsync(fd)
    elif op == "command":
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, sys.argv[3].encode() + b"\n")
    elif op == "stat":
        os.stat(path)
        fd = -1
    else:
        raise SystemExit("bad op")
    if fd >= 0:
        os.close(fd)
    print("OK")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if shutil.which("useradd") is None:
        pytest.skip("useradd is missing")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    USER], check=True, capture_output=True)
    return pwd.getpwnam(USER)


@pytest.fixture
def open_dir(mirrorfs: MirrorFactory) -> Iterator[Path]:
    """A mountpoint's parent that the other user can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="mirrorfs-perm-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        mirrorfs.cleanup()  # nothing mounted in it any more, even after a failure
        for p in d.iterdir():
            if p.is_dir() and not os.path.ismount(p):
                p.rmdir()
        if not any(d.iterdir()):
            d.rmdir()


def as_user(user: pwd.struct_passwd, op: str, path: Path, *args: str) -> str:
    r = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                        "--clear-groups", "--reset-env", "--", sys.executable, "-c", PROBE,
                        op, str(path), *args],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, f"probe as {user.pw_name} failed: {r.stderr}"
    return r.stdout.strip()


def mount_with_mode(tmp_path: Path, mirrorfs: MirrorFactory, open_dir: Path, mode: int,
                    *opts: str) -> Mount:
    src = make_image(tmp_path / "disk.img", 4 * MiB)
    os.chown(src, 0, 0)
    src.chmod(mode)
    return mirrorfs.mount(src, None, *opts, mnt=open_dir / "mnt")


def finish(m: Mount) -> None:
    m.wait("ready")
    m.command("complete")
    m.wait("completed")
    m.umount()
    assert_same(m.src, m.tgt)


def test_other_user_writes_a_0666_image_but_not_ctl(tmp_path: Path, mirrorfs: MirrorFactory,
                                                    open_dir: Path,
                                                    other_user: pwd.struct_passwd) -> None:
    m = mount_with_mode(tmp_path, mirrorfs, open_dir, 0o666, "--allow-other", "--speed", "2M")
    assert os.stat(m.img).st_mode & 0o777 == 0o666
    assert as_user(other_user, "read", m.img) == "OK"
    marker = b"written by another user"
    assert as_user(other_user, "write", m.img, str(3 * MiB + 5), marker.hex()) == "OK"
    with open(m.img, "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(len(marker)) == marker
    for op in ("read", "write"):
        got = as_user(other_user, op, m.ctl_path, "0", b"x".hex()) if op == "write" else \
            as_user(other_user, op, m.ctl_path)
        assert got == "EACCES", f"the other user could {op} .mirror/ctl: {got}"
    assert as_user(other_user, "command", m.ctl_path, "speed 0") == "EACCES"
    assert as_user(other_user, "command", m.ctl_path, "cancel force") == "EACCES"
    st = m.status()
    assert st["state"] == "copying" and st["speed"] == 2 * MiB, "the other user's command ran"
    m.command("speed 0")
    finish(m)
    with open(m.tgt, "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(len(marker)) == marker


def test_other_user_gets_eacces_on_a_0600_image(tmp_path: Path, mirrorfs: MirrorFactory,
                                                open_dir: Path,
                                                other_user: pwd.struct_passwd) -> None:
    m = mount_with_mode(tmp_path, mirrorfs, open_dir, 0o600, "--allow-other")
    before = m.src.read_bytes()
    assert as_user(other_user, "stat", m.img) == "OK"  # allow_other: it may look
    assert as_user(other_user, "read", m.img) == "EACCES"
    assert as_user(other_user, "write", m.img, "0", b"intruder".hex()) == "EACCES"
    assert as_user(other_user, "read", m.ctl_path) == "EACCES"
    assert as_user(other_user, "command", m.ctl_path, "complete") == "EACCES"
    assert m.src.read_bytes() == before
    finish(m)


def test_without_allow_other_the_other_user_is_shut_out(tmp_path: Path,
                                                        mirrorfs: MirrorFactory,
                                                        open_dir: Path,
                                                        other_user: pwd.struct_passwd) -> None:
    m = mount_with_mode(tmp_path, mirrorfs, open_dir, 0o666)
    assert as_user(other_user, "stat", m.img) == "EACCES"
    assert as_user(other_user, "read", m.img) == "EACCES"
    assert as_user(other_user, "write", m.img, "0", b"intruder".hex()) == "EACCES"
    assert as_user(other_user, "read", m.ctl_path) == "EACCES"
    finish(m)
