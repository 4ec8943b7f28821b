"""A guest's change to the disk (a write, a punch-hole or zero-range) and how it is applied
to one image: inline for a local file (a syscall on the trio thread costs microseconds),
awaited for an NBD export, retried once on a new connection if the connection was lost.
"""

import dataclasses
import errno
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mirrorfs.images import Image
from mirrorfs.nbd import NBDImage

_T = TypeVar("_T")
Target = Image | NBDImage  # a local file or device (blocking calls), or an NBD export (async)


@dataclasses.dataclass(slots=True)
class Write:
    """A guest's write, to be applied to one or more images, in parts [lo, hi)."""

    offset: int
    data: memoryview

    def local(self, img: Image, lo: int, hi: int) -> None:
        img.pwrite(self.data[lo - self.offset:hi - self.offset], lo)

    async def remote(self, img: NBDImage, lo: int, hi: int) -> None:
        await img.pwrite(self.data[lo - self.offset:hi - self.offset], lo)


@dataclasses.dataclass(slots=True)
class Fallocate:
    """A guest's punch-hole or zero-range."""

    mode: int

    def local(self, img: Image, lo: int, hi: int) -> None:
        img.fallocate(self.mode, lo, hi - lo)

    async def remote(self, img: NBDImage, lo: int, hi: int) -> None:
        await img.fallocate(self.mode, lo, hi - lo)


Change = Write | Fallocate


async def apply(img: Target, change: Change, lo: int, hi: int) -> None:
    if isinstance(img, NBDImage):
        await retried(img, lambda: change.remote(img, lo, hi))
    else:
        change.local(img, lo, hi)


async def retried(img: NBDImage, call: Callable[[], Awaitable[_T]]) -> _T:
    """``call``, and once more on a new connection if the connection was lost. Reads and
    writes are idempotent, so a request that may or may not have been done can be redone.
    If the server cannot be reached, the error is the caller's (guest I/O after the pivot:
    EIO; an active write: the target's error policy)."""
    generation = img.generation
    try:
        return await call()
    except OSError as e:
        if e.errno != errno.ECONNRESET:
            raise
    try:
        if img.generation == generation:  # else another task has reconnected already
            await img.reconnect()
        return await call()
    except OSError as e:  # the guest sees EIO, not the network's errno
        raise OSError(errno.EIO, f"{img.path}: {e.strerror or e}") from e
