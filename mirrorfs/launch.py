"""Starting the daemon: ``mirrorfs mount`` without --foreground.

Kept apart from mount.py so that the waiting parent does not import trio and pyfuse3 (about
0.15 s): the daemon is this same command with --foreground and a notification pipe, and the
parent returns only when the daemon reports that the mount is live and the job runs, or
prints the daemon's one-line error.
"""

import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator

DAEMON_START_TIMEOUT_S = 60


def spawn_daemon(argv: list[str]) -> int:
    """Start ``mirrorfs mount ... --foreground`` as a daemon and wait for its word."""
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "mirrorfs", *argv, "--foreground", "--notify-fd", str(wfd)]
    with open(os.devnull, "r+b") as devnull:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=devnull, stderr=devnull,
                                pass_fds=(wfd,), start_new_session=True, close_fds=True)
    os.close(wfd)
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
        if proc.poll() is None:
            proc.kill()
            error = f"the daemon did not report within {DAEMON_START_TIMEOUT_S} s"
        else:
            error = f"the daemon exited with status {proc.wait()} before mounting"
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    print(f"mirrorfs: error: {error}", file=sys.stderr)
    return 1


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
