"""Hostile input: the control file and the mount command.

1. Malformed and odd writes to ``.mirror/ctl`` (empty, garbage, binary, 1 MiB, extra
   arguments, bad and absurd speeds) are answered EINVAL and change nothing; the daemon
   stays up and the job still completes to an identical target. Absurd but well-formed
   speeds are taken literally; a tiny one (1 B/s) is slow, not a stopped job.
2. Every state x every command, one fresh job per pair: the errno the contract prescribes
   (complete needs ready and not paused; pause while paused and resume while not paused are
   EBUSY; every command is EBUSY once the job has ended; garbage is EINVAL everywhere; the
   rest per the verb table in mirrorfs/job.py), the state the command leads to, then the job
   is finished and the images compared byte for byte.
3. Bad ``mirrorfs mount`` invocations: each exits non-zero with one clear line (argparse's
   usage block aside), leaves no mount and no daemon, and creates or modifies no file.
"""

import contextlib
import errno
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.mounted import (
    MiB,
    MirrorFactory,
    Mount,
    alive,
    assert_same,
    make_image,
    mounted,
    run_mirrorfs,
)
from helpers.writers import small_tmpfs

OK, EBUSY, EINVAL = 0, errno.EBUSY, errno.EINVAL
ENDED = ("completed", "cancelled", "failed")


def send(m: Mount, data: bytes) -> int:
    """One write(2) of ``data`` to ctl; 0 or the errno."""
    fd = os.open(m.ctl_path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)


def _unless_ended(m: Mount, cmd: str) -> None:
    """``cmd``, which the job may refuse (EBUSY) only because it ended since its status
    was read (a cancel force in flight): anything else is a failure."""
    try:
        m.command(cmd)
    except OSError as e:
        if e.errno != errno.EBUSY or m.status()["state"] not in ENDED:
            raise


def finish(m: Mount, *, want_target_consistent: bool | None = None) -> dict[str, Any]:
    """Drive the job to its end (resume, unlimited speed, complete once ready), check the
    daemon is alive, compare the images as the end state says they must be, unmount."""
    st = m.status()
    if st["state"] == "paused":
        _unless_ended(m, "resume")
    if st["state"] not in ENDED:
        _unless_ended(m, "speed 0")
        st = m.wait("ready", *ENDED, timeout=60)
        if st["state"] == "ready":
            m.command("complete")
            st = m.wait("completed", timeout=60)
    assert m.pid is not None and alive(m.pid), "the daemon died"
    if st["state"] == "completed":
        assert st["serving"] == "target" and st["target_consistent"] is True
        assert_same(m.src, m.tgt)
        assert_same(m.img, m.tgt)
    elif st["state"] == "cancelled" and st["target_consistent"]:
        assert_same(m.src, m.tgt)  # a point-in-time copy, no write since
        assert_same(m.img, m.src)
    else:
        assert st["serving"] == "source"
        assert_same(m.img, m.src)
    if want_target_consistent is not None:
        assert st["target_consistent"] is want_target_consistent, st
    m.umount()
    return st


# ====================================================================== 1. malformed input
def test_malformed_ctl_writes(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    src = make_image(tmp_path / "disk.img", 16 * MiB)
    m = mirrorfs.mount(src, None, "--speed", "1M")
    before = m.status()

    def unchanged(what: str) -> None:
        assert m.pid is not None and alive(m.pid), f"the daemon died after {what}"
        st = m.status()
        for k in ("state", "speed", "copy_mode", "ready", "error"):
            assert st[k] == before[k], f"{k} changed after {what}: {before[k]!r} -> {st[k]!r}"

    # A zero-length write does not reach the daemon on Linux; it must just not hurt.
    fd = os.open(m.ctl_path, os.O_WRONLY)
    try:
        try:
            os.write(fd, b"")
        except OSError:
            pass
    finally:
        os.close(fd)
    unchanged("a zero-length write")

    malformed: list[tuple[str, bytes]] = [
        ("blank line", b"\n"),
        ("spaces", b"   \n"),
        ("garbage", b"frobnicate\n"),
        ("upper case", b"COMPLETE\n"),
        ("binary", b"\x00\x01\x02\xff\xfe\x80\x1b[2J\n"),
        ("NUL inside", b"pause\x00\n"),
        ("carriage return", b"pause\r\n"),
        ("two commands in one write", b"pause\nresume\n"),
        ("leading newline", b"\npause"),
        ("1 MiB of text", b"A" * MiB),
        ("1 MiB of random bytes", os.urandom(MiB)),
        ("1 MiB of 'complete '", b"complete " * (MiB // 9)),
        ("300 bytes", b"speed " + b"1" * 294),
        ("complete + argument", b"complete now\n"),
        ("cancel + argument", b"cancel now\n"),
        ("cancel force + argument", b"cancel force now\n"),
        ("pause + argument", b"pause 5\n"),
        ("resume + argument", b"resume please\n"),
        ("speed without a value", b"speed\n"),
        ("speed with two values", b"speed 10M 20M\n"),
        ("negative speed", b"speed -5\n"),
        ("speed not a number", b"speed abc\n"),
        ("fractional speed", b"speed 1.5M\n"),
        ("hex speed", b"speed 0x10\n"),
        ("speed unit unknown", b"speed 10Q\n"),
        ("speed per second", b"speed 1M/s\n"),
        ("absurd speed", b"speed 99999999999999999999999999999999G\n"),
        ("speed just over 2^62", f"speed {(1 << 62) + 1}\n".encode()),
        ("copy-mode without a value", b"copy-mode\n"),
        ("copy-mode bogus", b"copy-mode bogus\n"),
        ("copy-mode with two values", b"copy-mode write-blocking now\n"),
    ]
    for what, data in malformed:
        got = send(m, data)
        assert got == EINVAL, f"{what}: expected EINVAL, got {errno.errorcode.get(got, got)}"
        unchanged(what)

    # The mode it has already: a no-op at most.
    got = send(m, b"copy-mode background\n")
    assert got in (OK, EINVAL, EBUSY), f"copy-mode background: {errno.errorcode.get(got, got)}"
    unchanged("copy-mode background while background")

    # Files that are not for writing, an image that does not change size or mode.
    with pytest.raises(OSError):
        os.open(m.mnt / ".mirror" / "events", os.O_WRONLY)
    with pytest.raises(OSError):
        os.truncate(m.img, 4096)
    with pytest.raises(OSError):
        os.chmod(m.img, 0o777)
    assert os.path.getsize(m.img) == 16 * MiB and os.path.getsize(src) == 16 * MiB
    unchanged("writes to events, truncate and chmod of the image")

    # Absurd but well-formed speeds are taken literally: reported exactly.
    for rate in (1 << 50, 1 << 62, 1):
        assert send(m, f"speed {rate}\n".encode()) == OK
        assert m.status()["speed"] == rate
        assert send(m, b"speed 1M\n") == OK
    # Write-blocking is a one-way switch (as in QEMU): back to background is refused.
    assert send(m, b"copy-mode write-blocking\n") == OK
    got = send(m, b"copy-mode background\n")
    assert got in (EINVAL, EBUSY), f"copy-mode background: {errno.errorcode.get(got, got)}"
    assert m.status()["copy_mode"] == "write-blocking"
    assert send(m, b"speed 1P\n") == OK
    st = m.status()
    assert st["speed"] == 1 << 50
    m.wait("ready", timeout=30)  # a petabyte per second is no limit at all
    finish(m, want_target_consistent=True)


def test_tiny_speed_still_copies(tmp_path: Path, mirrorfs: MirrorFactory) -> None:
    """``speed 1`` is one byte per second on average: slow, but not a stopped job. The
    copier takes at least one chunk at a time, so the first chunk must move within seconds
    (and then the next only after granularity / rate seconds)."""
    src = make_image(tmp_path / "disk.img", 8 * MiB)
    m = mirrorfs.mount(src, None, "--granularity", "4K", "--speed", "1")
    deadline = time.monotonic() + 5
    while (st := m.status())["copied_bytes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert st["speed"] == 1
    assert st["copied_bytes"] > 0, f"nothing copied in 5 s at speed 1: the job is stuck: {st}"
    assert st["copied_bytes"] <= 64 * 1024, f"speed 1 copies far too fast: {st}"
    for rate in (3, 9):  # below 10 B/s too (one token per 100 ms slice is not reached)
        m.command(f"speed {rate}")
    finish(m, want_target_consistent=True)


# ====================================================================== 2. states x commands
SIZE = 16 * MiB
BACKLOG = 12 * MiB  # dirty bytes when complete/cancel is sent: the drain gate waits for 4 MiB

COMMANDS = ["complete", "cancel", "cancel force", "pause", "resume", "speed 1M",
            "copy-mode write-blocking", "frobnicate"]

# state -> command -> (errno, states the command leads to at once, target consistent at end)
T, F = True, False
EXPECT: dict[str, dict[str, tuple[int, tuple[str, ...], bool | None]]] = {
    "copying": {
        "complete": (EBUSY, ("copying",), T),
        "cancel": (OK, ("cancelling", "cancelled"), F),  # before ready: abandon
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (OK, ("paused",), T),
        "resume": (EBUSY, ("copying",), T),
        "speed 1M": (OK, ("copying",), T),
        "copy-mode write-blocking": (OK, ("copying",), T),
    },
    "paused-copying": {
        "complete": (EBUSY, ("paused",), T),
        "cancel": (OK, ("cancelling", "cancelled"), F),
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (EBUSY, ("paused",), T),
        "resume": (OK, ("copying",), T),
        "speed 1M": (OK, ("paused",), T),
        "copy-mode write-blocking": (OK, ("paused",), T),
    },
    "ready": {
        "complete": (OK, ("completing", "completed"), T),
        "cancel": (OK, ("cancelling", "cancelled"), T),  # a point-in-time copy
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (OK, ("paused",), T),
        "resume": (EBUSY, ("ready",), T),
        "speed 1M": (OK, ("ready",), T),
        "copy-mode write-blocking": (OK, ("ready",), T),
    },
    "paused-ready": {
        "complete": (EBUSY, ("paused",), T),
        "cancel": (OK, ("cancelling", "cancelled"), T),
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (EBUSY, ("paused",), T),
        "resume": (OK, ("ready",), T),
        "speed 1M": (OK, ("paused",), T),
        "copy-mode write-blocking": (OK, ("paused",), T),
    },
    "completing": {  # per VERBS: only cancel force, speed and copy-mode
        "complete": (EBUSY, ("completing",), T),
        "cancel": (EBUSY, ("completing",), T),
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (EBUSY, ("completing",), T),
        "resume": (EBUSY, ("completing",), T),
        "speed 1M": (OK, ("completing",), T),
        "copy-mode write-blocking": (OK, ("completing",), T),
    },
    "cancelling": {  # a soft cancel in ready, draining: only cancel force and speed
        "complete": (EBUSY, ("cancelling",), T),
        "cancel": (EBUSY, ("cancelling",), T),
        "cancel force": (OK, ("cancelling", "cancelled"), F),
        "pause": (EBUSY, ("cancelling",), T),
        "resume": (EBUSY, ("cancelling",), T),
        "speed 1M": (OK, ("cancelling",), T),
        "copy-mode write-blocking": (EBUSY, ("cancelling",), T),
    },
    "completed": {c: (EBUSY, ("completed",), T) for c in COMMANDS},
    "cancelled": {c: (EBUSY, ("cancelled",), T) for c in COMMANDS},  # after a soft cancel
    "failed": {c: (EBUSY, ("failed",), F) for c in COMMANDS},
}
for _state, _table in EXPECT.items():  # garbage: EINVAL everywhere, and nothing changes
    _stays = "paused" if _state.startswith("paused-") else _state
    _table["frobnicate"] = (EINVAL, (_stays,), _state != "failed")
CASES = [(s, c) for s in EXPECT for c in COMMANDS]


def enter_state(state: str, tmp_path: Path, mirrorfs: MirrorFactory,
                stack: contextlib.ExitStack) -> Mount:
    src = make_image(tmp_path / "disk.img", SIZE)
    if state in ("copying", "paused-copying"):
        m = mirrorfs.mount(src, None, "--speed", "1M")
        if state == "paused-copying":
            m.command("pause")
        return m
    if state == "failed":
        # the target's filesystem is full after 2 MiB: with ``report`` the job fails
        small = stack.enter_context(small_tmpfs(tmp_path / "small", "2m",
                                                before_umount=mirrorfs.cleanup))
        m = mirrorfs.mount(src, small / "target.img", "--on-target-error", "report")
        _wait_ended(m, "failed")
        return m
    m = mirrorfs.mount(src, None)
    m.wait("ready")
    if state == "paused-ready":
        m.command("pause")
    elif state in ("completing", "cancelling"):
        m.command("speed 64K")
        with open(m.img, "r+b", buffering=0) as f:
            f.seek(2 * MiB)
            for _ in range(BACKLOG // MiB):
                f.write(os.urandom(MiB))
        m.command("complete" if state == "completing" else "cancel")
        st = m.wait(state)
        assert st["remaining_bytes"] > 8 * MiB, st
    elif state == "completed":
        m.command("complete")
        m.wait("completed")
    elif state == "cancelled":
        m.command("cancel")
        _wait_ended(m, "cancelled")
    return m


def _wait_ended(m: Mount, state: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = m.status()
        if st["state"] == state:
            return st
        assert st["state"] not in ENDED and time.monotonic() < deadline, \
            f"expected {state}: {st}"
        time.sleep(0.05)


def state_name(st: dict[str, Any]) -> str:
    if st["state"] == "paused":
        return "paused-ready" if st["ready"] else "paused-copying"
    return str(st["state"])


@pytest.mark.parametrize(("state", "command"), CASES, ids=[f"{s}-{c.replace(' ', '_')}"
                                                           for s, c in CASES])
def test_state_command(state: str, command: str, tmp_path: Path,
                       mirrorfs: MirrorFactory) -> None:
    want_errno, leads_to, consistent = EXPECT[state][command]
    with contextlib.ExitStack() as stack:
        m = enter_state(state, tmp_path, mirrorfs, stack)
        before = m.status()
        assert state_name(before) == state, f"setup reached {state_name(before)}: {before}"
        got = send(m, (command + "\n").encode())
        assert got == want_errno, (f"'{command}' in {state}: expected "
                                   f"{errno.errorcode.get(want_errno, 'success')}, got "
                                   f"{errno.errorcode.get(got, 'success')}")
        assert m.pid is not None and alive(m.pid)
        after = m.status()
        assert after["state"] in leads_to, f"'{command}' in {state} led to {after}"
        if got != OK:
            for k in ("speed", "copy_mode", "ready", "serving"):
                assert after[k] == before[k], f"refused '{command}' changed {k}: {after}"
        elif command == "speed 1M":
            assert after["speed"] == MiB
        elif command == "copy-mode write-blocking":
            assert after["copy_mode"] == "write-blocking"
        finish(m, want_target_consistent=consistent)


# ====================================================================== 3. bad mount arguments
class Scene:
    """Files for the bad mounts, and a snapshot of everything a mount could change."""

    IMAGES = ("src.img", "small.img", "ro/existing.img")  # the existing images, by content

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.src = make_image(root / "src.img", 8 * MiB)
        make_image(root / "small.img", 4 * MiB)
        (root / "dir").mkdir()
        (root / "m").mkdir()
        (root / "busy").mkdir()
        (root / "symlink.img").symlink_to(self.src)
        os.link(self.src, root / "hardlink.img")
        (root / "not-a-dir").write_bytes(b"")
        (root / "ro").mkdir()
        make_image(root / "ro" / "existing.img", 8 * MiB)
        # Copies of the images' bytes, outside the scene (not links: a link to an image would
        # change with it), for the byte-for-byte comparison after each refused mount.
        self.expected = root.parent / (root.name + ".expected")
        self.expected.mkdir()
        for rel in self.IMAGES:
            shutil.copyfile(root / rel, self.expected / rel.replace("/", "_"))

    def assert_images_unchanged(self) -> None:
        for rel in self.IMAGES:
            assert_same(self.root / rel, self.expected / rel.replace("/", "_"))

    def snapshot(self) -> list[tuple[str, int, int, int, int]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            for name in sorted(dirnames + filenames):
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                out.append((os.path.relpath(p, self.root), st.st_mode, st.st_size,
                            st.st_mtime_ns, st.st_ctime_ns))
        return sorted(out)


BAD_MOUNTS: list[tuple[str, list[str], str]] = [
    # id, arguments (relative to the scene), what the message must say (a regex, lower case)
    ("missing-source", ["nope.img", "t.img", "m"], r"does not exist"),
    ("source-is-a-directory", ["dir", "t.img", "m"], r"directory"),
    ("target-read-only-fs-new", ["src.img", "ro/t.img", "m"], r"read-only"),
    ("target-read-only-fs-existing", ["src.img", "ro/existing.img", "m"], r"read-only"),
    ("target-too-small", ["src.img", "small.img", "m"], r"size|bytes"),
    ("source-is-target-same-path", ["src.img", "src.img", "m"], r"same"),
    ("source-is-target-symlink", ["src.img", "symlink.img", "m"], r"same"),
    ("source-is-target-hard-link", ["src.img", "hardlink.img", "m"], r"same"),
    ("mountpoint-missing", ["src.img", "t.img", "nomnt"], r"does not exist"),
    ("mountpoint-not-a-directory", ["src.img", "t.img", "not-a-dir"], r"not a directory"),
    ("mountpoint-busy", ["src.img", "t.img", "busy"], r"busy|mounted"),
    # the daemon fails at its start (a new target would be created): nothing is left
    ("log-file-in-a-missing-directory", ["src.img", "t.img", "m", "--log", "/nonexistent/l"],
     r"log file"),
    ("granularity-not-power-of-two", ["src.img", "t.img", "m", "--granularity", "3000"],
     r"power of two"),
    ("granularity-too-small", ["src.img", "t.img", "m", "--granularity", "2K"], r"range"),
    ("granularity-too-large", ["src.img", "t.img", "m", "--granularity", "128M"], r"range"),
    ("buf-size-too-small", ["src.img", "t.img", "m", "--buf-size", "1K"], r"range"),
    ("speed-negative", ["src.img", "t.img", "m", "--speed", "-5"], r"speed"),
    ("speed-garbage", ["src.img", "t.img", "m", "--speed", "abc"], r"invalid size"),
    ("poll-us-too-large", ["src.img", "t.img", "m", "--poll-us", "5000"], r"0 to 1000"),
    ("poll-us-garbage", ["src.img", "t.img", "m", "--poll-us", "1.5"], r"invalid number"),
    ("poll-us-negative", ["src.img", "t.img", "m", "--poll-us", "-1"], r"0 to 1000"),
    # a bad choice: the message names the choices (not the program's internal type names)
    ("sync-bogus", ["src.img", "t.img", "m", "--sync", "bogus"], r"bogus.*full.*top.*none"),
    ("copy-mode-bogus", ["src.img", "t.img", "m", "--copy-mode", "fast"],
     r"fast.*background.*write-blocking"),
    ("on-target-error-bogus", ["src.img", "t.img", "m", "--on-target-error", "retry"],
     r"retry.*report.*ignore.*stop"),
]


def mount_count(under: Path) -> int:
    with open("/proc/self/mountinfo") as f:
        return f.read().count(str(under))


def daemons_naming(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (a daemon left behind)."""
    found = []
    needle = str(path).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(("args", "says"), [(a, s) for _, a, s in BAD_MOUNTS],
                         ids=[i for i, _, _ in BAD_MOUNTS])
def test_bad_mount(args: list[str], says: str, tmp_path: Path) -> None:
    scene = Scene(tmp_path / "scene")
    root = scene.root
    ro_mounted = busy_mounted = False
    try:
        subprocess.run(["mount", "--bind", str(root / "ro"), str(root / "ro")], check=True)
        ro_mounted = True
        subprocess.run(["mount", "-o", "remount,ro,bind", str(root / "ro")], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "busy")],
                       check=True)
        busy_mounted = True
        before = scene.snapshot()
        mounts_before = mount_count(root)
        argv = [str(root / a) if i < 3 else a for i, a in enumerate(args)]
        r = run_mirrorfs("mount", *argv, timeout=60)
        out = r.stdout + r.stderr
        assert r.returncode != 0, f"mount succeeded: {out}"
        lines = [ln for ln in out.splitlines()
                 if ln.strip() and not ln.startswith("usage:") and not ln.startswith(" ")]
        assert len(lines) == 1, f"expected one line of error, got {len(lines)}: {out!r}"
        assert re.search(says, lines[0].lower()), f"message does not say /{says}/: {lines[0]}"
        assert "Traceback" not in out, out
        target_mnt = Path(argv[2])
        assert not mounted(target_mnt) or target_mnt.name == "busy"
        assert mount_count(root) == mounts_before, "the mount table changed"
        assert daemons_naming(root) == [], "a daemon is left running"
        assert scene.snapshot() == before, "the refused mount changed files"
    finally:
        if busy_mounted:
            subprocess.run(["umount", str(root / "busy")], capture_output=True)
        if ro_mounted:
            subprocess.run(["umount", str(root / "ro")], capture_output=True)
    scene.assert_images_unchanged()  # the source and the existing targets, byte for byte
