"""Image locks that QEMU honours, so nobody writes an image behind the mirror's back.

QEMU (block/file-posix.c) locks single bytes with OFD locks: byte 100+i, shared, means "I
hold permission i"; byte 200+i, shared, means "I do not let others have permission i". Before
taking a permission, QEMU tests whether anyone holds the "not shared" byte for it, and before
refusing to share one, whether anyone holds it. mirrorfs holds read, write and
write-unchanged, and shares neither write nor resize: a qemu, qemu-io, qemu-img or a second
mirrorfs that wants to write the image is refused with "Failed to get "write" lock".
OFD locks belong to the open file description, so they live as long as the daemon's fd.
"""

import fcntl
import os
import struct

PERM_BASE = 100
SHARED_BASE = 200
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 0, 1, 2, 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
HELD = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED)
NOT_SHARED = (PERM_WRITE, PERM_RESIZE)

_FLOCK = "hhqqi4x"  # struct flock on 64-bit Linux: type, whence, start, len, pid


class ImageLocked(Exception):
    pass


def _lock_byte(fd: int, offset: int, ltype: int, cmd: int) -> int:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, offset, 1, 0)
    res = fcntl.fcntl(fd, cmd, arg)
    return int(struct.unpack(_FLOCK, res)[0])


def _conflicts(fd: int, offset: int) -> bool:
    """Does another open file description hold a lock on that byte?"""
    return _lock_byte(fd, offset, fcntl.F_WRLCK, fcntl.F_OFD_GETLK) != fcntl.F_UNLCK


def lock_image(fd: int, path: str) -> None:
    """Take mirrorfs's locks on an open image, or raise ImageLocked saying who holds it."""
    for i in HELD:
        _lock_byte(fd, PERM_BASE + i, fcntl.F_RDLCK, fcntl.F_OFD_SETLK)
    for i in NOT_SHARED:
        _lock_byte(fd, SHARED_BASE + i, fcntl.F_RDLCK, fcntl.F_OFD_SETLK)
    # Lock first, then test (as QEMU does): two processes racing both see each other.
    for i in HELD:
        if _conflicts(fd, SHARED_BASE + i):
            unlock_image(fd)
            raise ImageLocked(f"{path} is locked: another process does not share the "
                              f"'{PERM_NAMES[i]}' permission{_holders(path)}")
    for i in NOT_SHARED:
        if _conflicts(fd, PERM_BASE + i):
            unlock_image(fd)
            raise ImageLocked(f"{path} is locked: another process has it open for "
                              f"{PERM_NAMES[i]}{_holders(path)}")


def unlock_image(fd: int) -> None:
    for off in range(PERM_BASE, PERM_BASE + 4):
        _lock_byte(fd, off, fcntl.F_UNLCK, fcntl.F_OFD_SETLK)
    for off in range(SHARED_BASE, SHARED_BASE + 4):
        _lock_byte(fd, off, fcntl.F_UNLCK, fcntl.F_OFD_SETLK)


def _holders(path: str) -> str:
    """' (held by qemu-system-x86 pid 123)': the other processes that have the file open.
    OFD locks carry no owner pid, so this names who has it open, which is what an operator
    needs to find the culprit."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    me = os.getpid()
    found: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    s = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                    with open(f"/proc/{pid}/comm") as f:
                        found.append(f"{f.read().strip()} pid {pid}")
                    break
        except OSError:
            continue
    return f" (held by {', '.join(found)})" if found else ""
