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
