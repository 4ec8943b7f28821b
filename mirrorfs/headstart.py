"""The head start: the bulk copy begins before the daemon has imported trio and pyfuse3.

A new mount spends about 0.15 s starting Python, reading its arguments, importing its
modules and mounting before the mirror can copy anything, more than half of what ``cp``
takes for a 1 GiB image. So when the mount creates the target (it then reads as zeros),
``mirrorfs mount`` opens and locks both images first thing, before argparse is imported
(``early``: 12 ms after the command starts, most of it Python's own start), and a forked
helper process copies the source's data extents in order while the command reads its
arguments and the daemon starts, with no GIL to share. It reports after every step how far
the target equals the source: ``[0, P)``. The mirror applies those reports to its bitmap
and leaves the bulk copy to the helper until it ends. Where the early start does not
apply (arguments in a form it does not read), the daemon begins the head start itself.

Why that is safe: until the helper has stopped, no guest write reaches the source. The
mirror stops it (closes the stop pipe, waits for the end of the report pipe) before it
handles the first guest write or fallocate, and before anything else that is not the plain
bulk copy (pause, a speed limit, complete, cancel, unmount). So every report describes
source data that no guest has changed since. A report applied counts as written, not
flushed (invariant 7), exactly like a copy batch.

The helper never decides anything: on any error, or when its daemon dies (the stop pipe
ends), it stops and the mirror copies the rest under its own error policies. It skips what
is already zeros on the new target: holes, and chunks whose data is all zeros.

This module imports nothing heavy (not even typing, re or contextlib): the command uses it
before its other imports.
"""

import errno
import os
import select
import stat
import struct
from collections.abc import Iterator

from mirrorfs.locks import ImageLocked, lock_image
from mirrorfs.system import above_stdio, detach

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing before the copy
if TYPE_CHECKING:
    from mirrorfs.images import FileImage

STEP = 4 << 20  # bytes between two looks at the stop pipe (~1 ms of copying)
REPORT = struct.Struct("<QQ")  # equal up to this offset, zero bytes skipped so far
Args = tuple[str, str, str, int, int]  # source, target, sync, speed, granularity


class HeadStart:
    """The daemon's handle on the helper and the two images it opened for the mount.

    The helper is the daemon's child, or its sibling when ``mirrorfs mount`` began the copy
    before it forked the daemon (see ``early``): it is signalled and awaited through a
    pidfd, which stays right whoever reaps it."""

    def __init__(self, args: Args, source_fd: int, target_fd: int, pid: int, pidfd: int,
                 report_fd: int, stop_fd: int) -> None:
        self.args = args
        self.source_fd, self.target_fd, self.target_path = source_fd, target_fd, args[1]
        self.pid, self._pidfd, self.report_fd, self._stop_fd = pid, pidfd, report_fd, stop_fd
        self.images_taken = False  # prepare() wrapped the fds: they are its to close
        self.status: int | None = None  # the helper's exit status once reaped (-1: unknown)

    def matches(self, source: str, target: str, sync: str, speed: int, granularity: int,
                ) -> bool:
        """Was it started for these arguments (as argparse read them)?"""
        return self.args == (source, target, str(sync), speed, granularity)

    def fds(self) -> tuple[int, ...]:
        """The files a daemon forked off the command keeps for it."""
        return (self.source_fd, self.target_fd, self._pidfd, self.report_fd, self._stop_fd)

    def release(self) -> None:
        """The command, once it has forked the daemon: the daemon owns everything now. Only
        the copies of the files go (the locks belong to the open files, which the daemon
        shares): the helper must see its stop pipe end when the daemon closes it."""
        for fd in self.fds():
            if fd >= 0:
                os.close(fd)
        self.source_fd = self.target_fd = self._pidfd = self.report_fd = self._stop_fd = -1
        self.images_taken = True
        self.status = -1  # nothing left to end or to wait for, here

    def take_images(self) -> tuple[int, int]:
        self.images_taken = True
        return self.source_fd, self.target_fd

    def link(self) -> None:
        """Give the target its name, once the mount has passed every check: until then it
        is an unnamed file (O_TMPFILE), so a refused mount changes nothing, not even the
        directory's mtime. Raises FileExistsError if the name was taken meanwhile."""
        from mirrorfs.images import link_fd  # ctypes: not before the helper has forked

        link_fd(self.target_fd, os.path.abspath(self.target_path))

    def stop(self) -> None:
        """Ask the helper to stop after its current step (idempotent)."""
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def reap(self) -> None:
        """Wait for the helper to exit (after the end of its reports: at once)."""
        if self.status is not None:
            return
        try:  # by its pidfd: right even if its pid were used again
            res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
            assert res is not None
            self.status = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        except ChildProcessError:  # a sibling, or SIGCHLD ignored: its pidfd tells the exit
            exited = select.poll()
            exited.register(self._pidfd, select.POLLIN)
            exited.poll()
            self.status = -1
        os.close(self._pidfd)
        self._pidfd = -1

    def terminate(self) -> None:
        """SIGKILL the helper without waiting (its reports then end): for a helper that
        did not stop when asked."""
        import signal  # imports enum: not before the copy

        if self.status is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it has exited: reap() collects it
                pass

    def kill(self) -> None:
        """End the helper now, whatever it was doing (idempotent); then nothing writes the
        target behind the daemon's back."""
        self.stop()
        self.terminate()
        self.reap()
        if self.report_fd >= 0:
            os.close(self.report_fd)
            self.report_fd = -1

    def abort(self) -> None:
        """The mount failed before prepare() took the images: undo everything (the target
        has no name yet: closing it is removing it)."""
        self.kill()
        if not self.images_taken:
            self.images_taken = True
            _undo(self.source_fd, self.target_fd)


def _looks_like_uri(target: str) -> bool:
    """``scheme:...`` (RFC 3986's scheme), as an NBD URI: not ours to judge."""
    scheme, colon, _ = target.partition(":")
    return bool(colon) and scheme[:1].isalpha() and scheme.isascii() and all(
        c.isalnum() or c in "+.-" for c in scheme)


def eligible(target: str, sync: str, speed: int) -> bool:
    """A head start only for a new local target, a full or top sync and no speed limit
    (an NBD URI, an existing target or a resumed job take the ordinary way)."""
    if str(sync) not in ("full", "top") or speed or not os.path.isdir("/proc/self/fd"):
        return False
    return not _looks_like_uri(target) and not os.path.lexists(target)


# ``mirrorfs mount``'s options (args.py) as the early start reads them: those that take a
# value, and the flags. Any other word starting with "-" (an abbreviation, "--", -h) and
# the early start leaves it to argparse. A test keeps these in step with args.py.
MOUNT_VALUED = frozenset((
    "--sync", "--granularity", "--speed", "--buf-size", "--copy-mode", "--on-source-error",
    "--on-target-error", "--name", "--log", "--state", "--checkpoint-interval", "--poll-us",
    "--tls-ca", "--tls-cert", "--tls-key", "--notify-fd"))
MOUNT_FLAGS = frozenset(("--foreground", "--allow-other", "--debug", "--no-state", "--fresh"))


def early(argv: list[str]) -> "HeadStart | None":
    """The head start of ``mirrorfs mount ARGV``, begun before argparse is imported (some
    17 ms earlier). It reads only the usual forms of the arguments and gives up on anything
    else; the command then checks (``matches``) that argparse read the same, and aborts it
    if not. Until the mount takes it, nothing of it shows: the target has no name."""
    from mirrorfs.sizes import parse_size

    words: list[str] = []
    opts: dict[str, str] = {}
    it = iter(argv)
    for word in it:
        if not word.startswith("-") or word == "-":
            words.append(word)
            continue
        name, eq, value = word.partition("=")
        if name in MOUNT_FLAGS and not eq:
            continue
        if name not in MOUNT_VALUED:
            return None
        if not eq:
            value = next(it, "-")
            if value.startswith("-"):  # argparse might read it as an option
                return None
        opts[name] = value
    if len(words) != 3:
        return None
    try:
        speed = parse_size(opts.get("--speed", "0"))
        granularity = parse_size(opts.get("--granularity", "64K"))
    except ValueError:
        return None
    return start(words[0], words[1], opts.get("--sync", "full"), speed, granularity)


def start(source: str, target: str, sync: str, speed: int, granularity: int,
          ) -> HeadStart | None:
    """Open and lock the source, create and lock the target, fork the helper. None where
    a head start does not apply or anything fails: the ordinary path then does (and
    reports) it all. Every file it opens is above stdio (a command started with stdin
    closed would open the source as fd 0, where a daemon puts /dev/null)."""
    if not eligible(target, sync, speed) or granularity <= 0:
        return None
    sfd = _open_source(source)
    if sfd < 0:  # the ordinary path finds and reports what is wrong
        return None
    st = os.fstat(sfd)
    if not _room_for(target, st, granularity):
        _undo(sfd)
        return None
    try:
        tfd = _create(target, st)
    except (OSError, ImageLocked):
        _undo(sfd)
        return None
    # The helper's modules, imported here: in the child each page they touch would be
    # copied first (copy on write), and its imports took 6-17 ms instead of about 5.
    import threading  # noqa: F401

    from mirrorfs import images  # noqa: F401

    pipes: list[int] = []
    try:
        pipes += map(above_stdio, os.pipe())
        pipes += map(above_stdio, os.pipe())
        pid = os.fork()
    except OSError:  # no fds or processes left: the ordinary path needs none
        for fd in pipes:
            os.close(fd)
        _undo(sfd, tfd)
        return None
    report_r, report_w, stop_r, stop_w = pipes
    if pid == 0:  # the helper
        code = 2
        try:
            detach((sfd, tfd, report_w, stop_r))  # all above stdio: see above_stdio
            code = copy_extents(sfd, tfd, st.st_size, granularity, report_w, stop_r)
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(stop_r)
    try:
        pidfd = above_stdio(os.pidfd_open(pid))  # before it can exit: it is not reaped yet
    except OSError:  # no pidfds (a kernel before 5.3, a seccomp filter): no head start
        os.kill(pid, 9)  # SIGKILL (the signal module imports enum: not before the copy)
        os.waitpid(pid, 0)
        for fd in (report_r, stop_w):
            os.close(fd)
        _undo(sfd, tfd)
        return None
    return HeadStart((source, target, str(sync), speed, granularity), sfd, tfd, pid, pidfd,
                     report_r, stop_w)


def _open_source(path: str) -> int:
    """The source opened for the mount and locked, if it is a regular file with data
    (checked before it is opened: opening a device can have side effects); else -1."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return -1
        fd = above_stdio(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return -1
    try:
        now = os.fstat(fd)  # the file that was checked, and not empty
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and now.st_size:
            lock_image(fd, path)
            return fd
    except (OSError, ImageLocked):
        pass
    os.close(fd)
    return -1


def _room_for(target: str, st: os.stat_result, granularity: int) -> bool:
    """Does the target's file system hold the source's data and the state file? Else the
    helper would fill it before the daemon has created the state file, and the mount would
    be refused; the ordinary path mounts and meets ENOSPC under the error policy."""
    try:
        vfs = os.statvfs(os.path.dirname(os.path.abspath(target)))
    except OSError:
        return False
    state = 3 * (st.st_size // granularity // 8) + (1 << 20)  # two bitmaps and a log
    return st.st_blocks * 512 + state <= vfs.f_bavail * vfs.f_frsize


def _undo(sfd: int, tfd: int = -1) -> None:
    """Close the images. No unlocking: the locks belong to the open files and go with the
    last descriptor, and a daemon forked meanwhile may share them (and need its locks)."""
    for fd in (sfd, tfd):
        if fd >= 0:
            os.close(fd)


def _create(path: str, st: os.stat_result) -> int:
    """The new target, sparse, of the source's size and permissions, locked; unnamed in
    the target's directory until ``HeadStart.link`` (O_TMPFILE: where a file system has
    none, there is no head start)."""
    fd = above_stdio(os.open(os.path.dirname(os.path.abspath(path)),
                              os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC,
                              st.st_mode & 0o666 or 0o600))
    try:
        os.ftruncate(fd, st.st_size)  # reads as zeros, allocates nothing
        lock_image(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


# ====================================================================== the helper
LOOKAHEAD = 8  # steps planned ahead of the copy (32 MiB): each plan is a few small tuples


def copy_extents(src_fd: int, tgt_fd: int, size: int, g: int, report: int, stop: int) -> int:
    """Copy the source's data extents to a target that reads as zeros, in order, reporting
    ``[0, P)`` equal after each step. Returns the exit status: 0 once all is copied, 1 when
    stopped, 2 on an error (the mirror then meets it itself).

    A thread of its own plans the steps (where the data is, which chunks are all zeros)
    while this one copies: a zero probe is a 16-byte pread per chunk, about 25 ms per GiB
    at the default granularity, a tenth of the copy. Planned ahead, the probes run on the
    other core, while the copy is in the kernel and holds no GIL."""
    import threading  # after the fork: the daemon's start does not wait for it

    from mirrorfs.images import ZERO_BLOCK, FileImage  # ctypes: in the helper, after the fork

    src, tgt = FileImage("source", src_fd), FileImage("target", tgt_fd)
    stopped = select.poll()
    stopped.register(stop, select.POLLIN)
    plans = _Plans(LOOKAHEAD)
    threading.Thread(target=plans.make, args=(src, size, max(STEP, g), g, ZERO_BLOCK),
                     daemon=True).start()  # os._exit ends it with the helper

    buf = memoryview(bytearray(0))  # for a copy across file systems, made on first use
    prealloc = True
    try:
        for end, zeroed, runs in plans:
            if stopped.poll(0):  # the daemon closed it, or died
                return 1
            for lo, hi in runs:
                if prealloc:  # ext4: faster than its delayed allocation, see preallocate
                    prealloc = tgt.preallocate(lo, hi - lo)
                if not tgt.copy_in(src, lo, hi - lo):  # not in the kernel: a buffer
                    buf = buf or memoryview(bytearray(STEP))
                    _copy_through(src, tgt, lo, hi, buf)
            _report(report, end, zeroed)
        return 0
    except OSError:
        return 2


Plan = tuple[int, int, list[tuple[int, int]]]  # [.., end) planned, zeros so far, data runs


class _Plans:
    """The plans of the copy's steps, made by one thread and consumed in order by another,
    at most ``depth`` ahead. An error in the planner ends the iteration with it."""

    def __init__(self, depth: int) -> None:
        import threading
        from collections import deque

        self._queue: deque[Plan | OSError | None] = deque()
        self._ready = threading.Semaphore(0)  # plans in the queue
        self._room = threading.Semaphore(depth)  # free places for plans

    def make(self, src: "FileImage", size: int, step: int, g: int, zero: bytes) -> None:
        try:
            for plan in _plan_steps(src, size, step, g, zero):
                self._put(plan)
            self._put(None)
        except BaseException as e:  # whatever it is (MemoryError too): the copier ends
            self._put(e if isinstance(e, OSError) else OSError(errno.EIO, repr(e)))

    def _put(self, item: "Plan | OSError | None") -> None:
        self._room.acquire()
        self._queue.append(item)
        self._ready.release()

    def __iter__(self) -> Iterator[Plan]:
        while True:
            self._ready.acquire()
            item = self._queue.popleft()
            self._room.release()
            if item is None:
                return
            if isinstance(item, OSError):
                raise item
            yield item


def _plan_steps(src: "FileImage", size: int, step: int, g: int, zero: bytes,
                ) -> Iterator[Plan]:
    """The steps of the copy in order: each ends on a whole chunk (within a data extent)
    and carries the data runs to copy, the all-zero chunks and the holes left out. The
    last plan ends at ``size``."""
    fd = src.fd
    pos = zeroed = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        if hole <= data:  # not a file that SEEK_HOLE knows: never spin on it
            raise OSError(errno.EINVAL, "SEEK_HOLE does not advance")
        while data < hole:
            end = min(hole, (data // step + 1) * step)
            runs = list(_data_runs(src, data, end, g, zero))
            zeroed += end - data - sum(hi - lo for lo, hi in runs)
            data = end
            yield data, zeroed, runs
        pos = hole
    yield size, zeroed, []


def _report(fd: int, pos: int, zeroed: int) -> None:
    os.write(fd, REPORT.pack(pos, zeroed))  # 16 bytes: a pipe writes them whole


def _data_runs(src: "FileImage", lo: int, hi: int, g: int, zero: bytes,
               ) -> Iterator[tuple[int, int]]:
    """The runs of [lo, hi) (within one data extent) that are not all-zero chunks: those are
    skipped, the new target reads as zeros there already."""
    run = -1  # start of the pending run of data chunks
    pos = lo
    while pos < hi:
        nxt = min((pos // g + 1) * g, hi)
        if not _all_zero(src, pos, nxt, zero):
            if run < 0:
                run = pos
        elif run >= 0:
            yield run, pos
            run = -1
        pos = nxt
    if run >= 0:
        yield run, hi


def _all_zero(src: "FileImage", lo: int, hi: int, zero: bytes) -> bool:
    # Most data chunks are told by their first bytes. (A read-only mapping instead of a
    # pread per chunk was slower: each first touch of a page is a fault, and on this VM a
    # fault costs more than a syscall.)
    if src.pread(16, lo).strip(b"\0"):
        return False
    while lo < hi:
        n = min(len(zero), hi - lo)
        if src.pread(n, lo) != zero[:n]:
            return False
        lo += n
    return True


def _copy_through(src: "FileImage", tgt: "FileImage", lo: int, hi: int,
                  buf: memoryview) -> None:
    while lo < hi:
        view = buf[:min(len(buf), hi - lo)]
        src.pread_into(view, lo)
        tgt.pwrite(view, lo)
        lo += len(view)
