"""The head start (headstart.py): its helper process on real files, and the mirror taking
over from it. Guest writes that arrive while it copies must never be lost."""

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from mirrorfs import headstart
from mirrorfs.images import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FileImage, fallocate
from mirrorfs.job import State
from mirrorfs.mirror import Mirror, MirrorConfig

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def reports(fd: int) -> list[tuple[int, int]]:
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return list(headstart.REPORT.iter_unpack(data))


def run_helper(src: Path, tgt: Path, g: int, stopped: bool = False
               ) -> tuple[int, list[tuple[int, int]]]:
    """copy_extents in this process from src to a new sparse tgt: its exit status and
    reports. The report pipe does not block: a helper that spins fails, it does not hang."""
    size = os.path.getsize(src)
    with open(tgt, "wb") as f:
        f.truncate(size)
    s, t = os.open(src, os.O_RDONLY), os.open(tgt, os.O_RDWR)
    rr, rw = os.pipe()
    sr, sw = os.pipe()
    os.set_blocking(rw, False)
    if stopped:
        os.close(sw)  # as the daemon does to stop it, or as its death does
    try:
        code = headstart.copy_extents(s, t, size, g, rw, sr)
        os.close(rw)
        return code, reports(rr)
    finally:
        for fd in (s, t, rr, sr) + (() if stopped else (sw,)):
            os.close(fd)


def mirror_over_head_start(src: Path, tgt: Path, target_type: type[FileImage] = FileImage,
                           ) -> tuple[headstart.HeadStart, FileImage, FileImage, Mirror]:
    """A head start from src to a new tgt, and a mirror taking it over as the daemon's does
    (prepare() takes the images and names the target once every check has passed)."""
    hs = headstart.start(str(src), str(tgt), "full", 0, G)
    assert hs is not None
    sfd, tfd = hs.take_images()
    hs.link()
    source, target = FileImage(str(src), sfd), target_type(str(tgt), tfd)
    m = Mirror(source, target, MirrorConfig(granularity=G, target_fresh=True), head_start=hs)
    return hs, source, target, m


async def wait_state(m: Mirror, state: State) -> None:
    with trio.fail_after(60):
        while m.job.state is not state:
            await trio.sleep(0.01)


async def ready_then_complete(m: Mirror) -> None:
    await wait_state(m, State.READY)
    m.complete()
    await wait_state(m, State.COMPLETED)


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))


async def freeze_mid_copy(m: Mirror, hs: headstart.HeadStart, size: int) -> int:
    """Once the mirror has applied a first report, SIGSTOP the helper: the bytes copied."""
    with trio.fail_after(30):
        while m.copied_bytes == 0:
            await trio.lowlevel.checkpoint()
    os.kill(hs.pid, signal.SIGSTOP)
    copied = m.copied_bytes
    assert 0 < copied < size, "the helper was not caught in the middle"
    return copied


def test_the_helper_copies_the_data_and_skips_zeros(tmp_path: Path) -> None:
    size = 64 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(1 * MiB + 4096)  # an extent that starts and ends inside chunks
        f.write(os.urandom(5 * MiB))
        f.seek(20 * MiB)
        f.write(bytes(2 * G) + os.urandom(G) + bytes(G - 1) + b"x")  # zero chunks as data
        f.seek(size - 100)
        f.write(os.urandom(100))
    code, got = run_helper(src, tgt, G)
    assert code == 0
    assert src.read_bytes() == tgt.read_bytes()
    positions = [p for p, _ in got]
    assert positions == sorted(positions) and positions[-1] == size
    assert got[-1][1] == 2 * G  # the two all-zero chunks, not the one ending in "x"
    assert allocated(tgt) <= 5 * MiB + 4096 + 2 * G + 4096 + 64 * KiB


def test_the_helper_stops_when_asked(tmp_path: Path) -> None:
    size = 16 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(size))
    assert run_helper(src, tgt, G, stopped=True) == (1, [])
    assert allocated(tgt) == 0


def test_no_head_start_for_an_existing_target_a_uri_or_a_speed_limit(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(MiB))
    tgt.write_bytes(bytes(MiB))
    assert headstart.start(str(src), str(tgt), "full", 0, G) is None
    assert tgt.read_bytes() == bytes(MiB)
    new = str(tmp_path / "new.img")
    assert headstart.start(str(src), new, "full", 1 * MiB, G) is None
    assert headstart.start(str(src), new, "none", 0, G) is None
    assert headstart.start(str(src), "nbd://localhost/x", "full", 0, G) is None
    assert not os.path.exists(new)


def test_an_aborted_head_start_leaves_nothing(tmp_path: Path) -> None:
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(32 * MiB))
    hs = headstart.start(str(src), str(tgt), "full", 0, G)
    assert hs is not None
    assert os.listdir(tmp_path) == ["src.img"], "the target has a name before the mount took it"
    hs.abort()
    assert os.listdir(tmp_path) == ["src.img"] and hs.status is not None
    # its locks went with it: the source can be locked again
    again = headstart.start(str(src), str(tgt), "full", 0, G)
    assert again is not None
    again.abort()


async def test_guest_writes_during_the_head_start_are_not_lost(tmp_path: Path) -> None:
    """The helper is frozen (SIGSTOP) after its first reports; guest writes then land
    before, inside and after what it copied. Each waits until the helper has stopped and
    its reports are applied; the mirror copies the rest, and the target ends equal."""
    size = 256 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    random_image(src, size)
    hs, source, target, m = mirror_over_head_start(src, tgt)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(m.run)
            copied = await freeze_mid_copy(m, hs, size)
            writes = [(0, os.urandom(4096)), (copied - 3 * G, os.urandom(3 * G + 5)),
                      (size - 4096, os.urandom(4096))]

            async def thaw() -> None:
                await trio.sleep(0.05)
                assert not m._head_done.is_set(), "a write did not wait for the helper"
                os.kill(hs.pid, signal.SIGCONT)

            n.start_soon(thaw)
            for off, data in writes:
                await m.write(off, data)
            assert hs.status == 1, "the helper did not stop at the first write"
            await ready_then_complete(m)
    finally:
        hs.kill()
        source.close()
        target.close()
    data = src.read_bytes()
    for off, d in writes:
        assert data[off:off + len(d)] == d
    assert data == tgt.read_bytes()


def test_chunks_larger_than_a_step(tmp_path: Path) -> None:
    """At 8 MiB granularity (above the 4 MiB step) every step is whole chunks; an extent
    that starts 5 MiB into a chunk must not send the copy backwards (a review found it
    spinning on one report)."""
    g = 8 * MiB
    size = 40 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(5 * MiB)
        f.write(os.urandom(20 * MiB))
    code, got = run_helper(src, tgt, g)
    assert code == 0
    assert src.read_bytes() == tgt.read_bytes()
    positions = [p for p, _ in got]
    assert positions == sorted(positions) and len(got) <= 6, got


class LosingTarget(FileImage):
    """Its next flush fails and loses everything written so far (all reads as zeros)."""

    fail_next_flush = False

    def flush(self) -> None:
        if self.fail_next_flush:
            self.fail_next_flush = False
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, self.size)
            raise OSError(errno.EIO, "Input/output error")
        super().flush()


async def test_reports_after_a_failed_target_flush_are_not_trusted(tmp_path: Path) -> None:
    """The helper copies, its reports wait in the pipe; then a flush of the target fails
    and loses what it wrote. Those reports describe lost writes: the mirror must not clear
    their chunks (as it discards a batch in flight across a loss), and copies them itself."""
    size = 64 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(size))
    hs, source, target, m = mirror_over_head_start(src, tgt, LosingTarget)
    try:
        with trio.fail_after(30):
            while allocated(tgt) < 8 * MiB:  # some steps copied and reported, none applied
                await trio.sleep(0.001)
        target.fail_next_flush = True
        with pytest.raises(OSError):
            await m._flush_target()
        async with trio.open_nursery() as n:
            n.start_soon(m.run)
            await wait_state(m, State.READY)
            assert m.copied_bytes == size  # all of it by the mirror, none by the reports
            m.complete()
            await wait_state(m, State.COMPLETED)
    finally:
        hs.kill()
        source.close()
        target.close()
    assert src.read_bytes() == tgt.read_bytes()


def test_no_head_start_where_the_target_would_not_fit(tmp_path: Path) -> None:
    """The helper would fill the file system before the daemon writes its state file (the
    mount would then be refused): the ordinary path mounts and meets ENOSPC instead."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        assert headstart.start(str(src), str(small / "t.img"), "full", 0, G) is None
        assert not (small / "t.img").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_the_helper_copies_across_file_systems(tmp_path: Path) -> None:
    """copy_file_range cannot go from this file system to tmpfs: the helper copies through
    a buffer instead, and still skips the zero chunks."""
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(os.urandom(6 * MiB) + bytes(2 * G) + os.urandom(G))
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(other)], check=True)
    try:
        tgt = other / "tgt.img"
        code, got = run_helper(src, tgt, G)
        assert code == 0 and got[-1] == (32 * MiB, 2 * G)
        assert src.read_bytes() == tgt.read_bytes()
        assert allocated(tgt) <= 6 * MiB + G
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_a_planning_error_ends_the_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           ) -> None:
    """The planner thread fails (here a probe's read, on the third step): the helper ends
    with status 2 after reporting only what it copied, and the mirror copies the rest."""
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(32 * MiB))
    real = headstart._data_runs
    calls = 0

    def failing(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(headstart, "_data_runs", failing)
    code, got = run_helper(src, tgt, G)
    assert code == 2
    assert [p for p, _ in got] == [4 * MiB, 8 * MiB]
    assert src.read_bytes()[:8 * MiB] == tgt.read_bytes()[:8 * MiB]


def test_the_planner_stays_a_few_steps_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning is ~10x faster than copying: unbounded, it would hold a plan for every
    step of a 16 TiB image. It blocks at ``depth`` plans nobody has taken."""
    import threading
    import time

    made = 0

    def plans(*_: object) -> object:
        nonlocal made
        for i in range(10_000):
            made += 1
            yield (i, 0, [])

    monkeypatch.setattr(headstart, "_plan_steps", plans)
    plan = headstart._Plans(depth=4)
    threading.Thread(target=plan.make, args=(None, 0, 0, 0, b""), daemon=True).start()
    time.sleep(0.2)
    assert made <= 5  # four in the queue, one waiting for room
    it = iter(plan)
    assert [next(it)[0] for _ in range(3)] == [0, 1, 2]
    time.sleep(0.2)
    assert made <= 8


def test_preallocation_on_ext4_only(tmp_path: Path) -> None:
    """ext4 copies faster into allocated blocks (see FileImage.preallocate); tmpfs would
    zero the pages first, so there it does nothing."""
    from mirrorfs.images import EXT4_SUPER_MAGIC, fs_magic

    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if fs_magic(fd) != EXT4_SUPER_MAGIC:
            pytest.skip("the tests' directory is not on ext4")
    finally:
        os.close(fd)
    path = tmp_path / "t.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    img = FileImage.open(str(path))
    try:
        assert img.preallocate(1 * MiB, 2 * MiB)
        assert allocated(path) == 2 * MiB and os.path.getsize(path) == 8 * MiB
        assert path.read_bytes() == bytes(8 * MiB)
    finally:
        img.close()
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(other)], check=True)
    try:
        with open(other / "t.img", "wb") as f:
            f.truncate(8 * MiB)
        img = FileImage.open(str(other / "t.img"))
        assert not img.preallocate(0, 2 * MiB)
        img.close()
        assert allocated(other / "t.img") == 0
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_the_early_start_reads_the_usual_forms_only(tmp_path: Path) -> None:
    """``mirrorfs mount``'s head start begins before argparse: it reads the arguments as
    argparse will, or gives up and leaves them to it."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    s, t, mnt = str(src), str(tmp_path / "t.img"), str(tmp_path / "mnt")
    read = [
        ([s, t, mnt], (s, t, "full", 0, G)),
        (["--log", "/x.log", s, "--foreground", t, mnt, "--sync", "top"], (s, t, "top", 0, G)),
        ([s, t, mnt, "--granularity=1M", "--name", "disk"], (s, t, "full", 0, MiB)),
    ]
    for argv, args in read:
        hs = headstart.early(argv)
        assert hs is not None, argv
        try:
            assert hs.args == args
            assert hs.matches(args[0], args[1], args[2], args[3], args[4])
            assert not hs.matches(args[0], args[1], args[2], args[3], 2 * args[4])
        finally:
            hs.abort()
    left = [
        [s, t],  # too few words
        [s, t, mnt, "extra"],
        [s, t, mnt, "--gran", "1M"],  # argparse's abbreviation: not guessed
        [s, t, mnt, "--sync"],  # a value missing
        [s, t, mnt, "--name", "-x"],  # a value that argparse may read as an option
        ["--", s, t, mnt],
        [s, t, mnt, "-h"],
        [s, t, mnt, "--speed", "1M"],  # a speed limit: the job's own pace
        [s, t, mnt, "--granularity", "huge"],
    ]
    for argv in left:
        assert headstart.early(argv) is None, argv
    assert os.listdir(tmp_path) == ["src.img"]


def test_the_early_start_knows_every_mount_option() -> None:
    """Its lists of options are args.py's: one added there and not here would make the
    early start give up on every mount that uses it."""
    from mirrorfs.args import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    mount = sub.choices["mount"]  # type: ignore[index]
    valued, flags = set(), set()
    for action in mount._actions:
        for opt in action.option_strings:
            if opt in ("-h", "--help"):
                continue
            (flags if action.nargs == 0 else valued).add(opt)
    assert valued == headstart.MOUNT_VALUED
    assert flags == headstart.MOUNT_FLAGS


def test_no_pidfd_means_no_head_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel or a seccomp filter without pidfd_open: the ordinary path, nothing left
    behind (no helper, no target, the source's locks gone with its file)."""
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(8 * MiB))

    def refused(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", refused)
    before = set(os.listdir("/proc"))
    assert headstart.start(str(src), str(tgt), "full", 0, G) is None
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["src.img"]
    def parent_of(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return -1

    left = [p for p in set(os.listdir("/proc")) - before
            if p.isdigit() and parent_of(p) == os.getpid()]
    assert left == [], "a helper was left"
    again = headstart.start(str(src), str(tgt), "full", 0, G)
    assert again is not None
    again.abort()


def test_any_planner_failure_ends_the_helper(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only an OSError: a planner that dies of anything ends the copy (status 2); the
    copier must never wait for a plan that will not come."""
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(os.urandom(16 * MiB))

    def broken(*args: object) -> object:
        raise MemoryError

    monkeypatch.setattr(headstart, "_data_runs", broken)
    code, got = run_helper(src, tgt, G)
    assert (code, got) == (2, [])


def test_the_helper_has_a_session_of_its_own(tmp_path: Path) -> None:
    """Forked by the command, it must not be stopped by the terminal's ^Z (or ended by ^C)
    meant for the command: the daemon would wait for it at the first guest write."""
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(64 * MiB))
    hs = headstart.start(str(src), str(tmp_path / "t.img"), "full", 0, G)
    assert hs is not None
    try:
        deadline = time.monotonic() + 5  # it calls setsid right after the fork
        while os.getsid(hs.pid) != hs.pid and time.monotonic() < deadline:
            time.sleep(0.001)
        assert os.getsid(hs.pid) == hs.pid != os.getsid(0)
    except ProcessLookupError:
        pytest.skip("the helper finished before it could be looked at")
    finally:
        hs.abort()


def test_a_relative_target_is_named_as_the_ordinary_path_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    Path("src.img").write_bytes(os.urandom(MiB))
    hs = headstart.start("src.img", "sub/../t.img", "full", 0, G)
    assert hs is not None
    try:
        hs.take_images()
        hs.link()
        assert (tmp_path / "t.img").exists()
    finally:
        hs.kill()
        os.close(hs.source_fd)
        os.close(hs.target_fd)


async def test_a_helper_that_does_not_stop_is_killed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen (SIGSTOP) and never thawed: the guest's write must not wait for ever. After
    the grace time the mirror kills it and copies what it did not report."""
    import mirrorfs.mirror

    monkeypatch.setattr(mirrorfs.mirror, "HEAD_START_STOP_GRACE_S", 0.3)
    size = 256 * MiB
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    random_image(src, size)
    hs, source, target, m = mirror_over_head_start(src, tgt)
    data = os.urandom(4096)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(m.run)
            await freeze_mid_copy(m, hs, size)
            with trio.fail_after(20):
                await m.write(size // 2, data)
            assert hs.status is not None and hs.status != 0  # killed, not finished
            await ready_then_complete(m)
    finally:
        hs.kill()
        source.close()
        target.close()
    assert src.read_bytes()[size // 2:size // 2 + 4096] == data
    assert src.read_bytes() == tgt.read_bytes()
