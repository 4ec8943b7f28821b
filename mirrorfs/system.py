"""Facts about processes and mounts, read from /proc, and the placing of a file descriptor.
A light module (no trio, no pyfuse3): the CLI, the daemon and the tests share it (the
benchmark keeps standard-library copies, to measure trees that lack it)."""

import fcntl
import os


def above_stdio(fd: int) -> int:
    """``fd``, moved above stdio if it took a closed stdio's place (close-on-exec). A
    command started with stdin closed opens its first file as fd 0, where a daemon (or a
    helper) puts /dev/null."""
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def detach(keep: tuple[int, ...]) -> None:
    """A forked daemon or helper: its own session (the terminal's ^C and ^Z are for the
    command), /dev/null for stdio, and none of the caller's other files but ``keep``, which
    must be above stdio (``above_stdio``). A caller waiting for the end of a pipe it gave
    the command (a supervisor reading its output) must not wait for what it forked."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    lo = 3
    for fd in sorted(keep):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, os.sysconf("SC_OPEN_MAX"))


def alive(pid: int) -> bool:
    """Does the process exist (and is not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def mounted(path: str | os.PathLike[str]) -> bool:
    """Is something mounted at ``path``?"""
    return os.path.abspath(path) in mount_points()
