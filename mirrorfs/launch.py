"""Starting the daemon: ``mirrorfs mount`` without --foreground.

Kept apart from mount.py so that the waiting parent does not import trio and pyfuse3 (about
0.1 s): the daemon is a forked child of the command (no second start of Python, which cost
20 ms of each mount) that runs the foreground mount with a notification pipe, and the
parent returns only when the daemon reports that the mount is live and the job runs, or
prints the daemon's one-line error.
"""

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator

from mirrorfs.system import above_stdio, detach

DAEMON_START_TIMEOUT_S = 60


def spawn_daemon(run: Callable[[int], int], keep: tuple[int, ...] = (),
                 in_parent: Callable[[], None] | None = None) -> int:
    """Fork ``run(notify_fd)`` off as a daemon and wait for its word. In the child this
    returns ``run``'s exit status, in the parent the command's. The daemon keeps the files
    ``keep`` too (and no others); the parent calls ``in_parent`` right after the fork."""
    rfd, wfd = map(above_stdio, os.pipe())  # detach puts /dev/null on stdio
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        detach((wfd, *keep))
        return run(wfd)
    os.close(wfd)
    if in_parent is not None:
        in_parent()
    ok = False
    error = None
    with _reader(rfd) as lines:
        for kind, msg in lines:
            if kind == "NOTE":
                print(f"mirrorfs: {msg}", file=sys.stderr)
            elif kind == "OK":
                ok = True
                break
            elif kind == "ERROR":
                error = msg
                break
    if ok:
        return 0
    if error is None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            error = f"the daemon did not report within {DAEMON_START_TIMEOUT_S} s"
        else:
            error = (f"the daemon exited with status {os.waitstatus_to_exitcode(status)} "
                     "before mounting")
    else:
        _reap(pid, timeout_s=10)
    print(f"mirrorfs: error: {error}", file=sys.stderr)
    return 1


def _reap(pid: int, timeout_s: float) -> None:
    """Wait for a daemon that reported an error to exit (it unwinds, then exits)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)


@contextlib.contextmanager
def _reader(fd: int) -> Iterator[Iterator[tuple[str, str]]]:
    def lines() -> Iterator[tuple[str, str]]:
        buf = b""
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, _, msg = line.decode(errors="replace").partition(" ")
                yield kind, msg

    try:
        yield lines()
    finally:
        os.close(fd)
