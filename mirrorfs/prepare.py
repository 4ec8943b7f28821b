"""Before mounting: check everything, open and lock the images, decide about the state
file (resume, start anew, or refuse), refuse a stale source (the pivot registry).

Every check happens before anything is created; if a later step fails, what was created
(the target file, the state file) is removed again: a refused mount changes nothing.
No FUSE here: this is the part of ``mirrorfs mount`` that tests can drive without a kernel.
"""

import dataclasses
import errno
import logging
import os
import stat
import subprocess
from typing import Any

import trio
from bitarray import bitarray

from mirrorfs.changes import Target
from mirrorfs.images import FileImage
from mirrorfs.locks import ImageLocked, lock_image
from mirrorfs.nbd import NBDAddress, NBDError, NBDImage, TLSConfig, parse_nbd_uri
from mirrorfs.params import MountOptions
from mirrorfs.pivots import PivotRegistry, source_identity
from mirrorfs.state import (
    DEFAULT_EXTENT,
    StateError,
    StateFile,
    identity,
    plan_resume,
    remove_quietly,
)
from mirrorfs.system import mount_points

log = logging.getLogger(__name__)


class MountError(Exception):
    """A reason not to mount, as one line for the user."""


@dataclasses.dataclass
class Prepared:
    source: FileImage
    target: Target
    target_created: bool
    mountpoint: str
    name: str
    notes: list[str]
    fresh: bool = False  # the target was created here, sparse: it reads as zeros
    statefile: StateFile | None = None
    state_created: bool = False
    resume: bitarray | None = None  # chunks to copy, from the state file
    resume_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    granularity: int = 0

    async def aclose(self) -> None:
        self.source.close()
        await _close_target(self.target)
        if self.statefile is not None:
            self.statefile.close()
            if self.state_created:
                remove_quietly(self.statefile.path)
        if self.target_created:
            remove_quietly(self.target.path)


# ====================================================================== checks
def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise MountError(f"{what} {path}: {e.strerror}") from None


def check_mountpoint(path: str, notes: list[str]) -> str:
    mnt = os.path.abspath(path)
    if mnt in mount_points():
        try:
            os.stat(mnt)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise MountError(f"mountpoint {mnt}: {e.strerror}") from None
            # A daemon that died (kill -9, crash) leaves a dead FUSE mount behind.
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
            if mnt in mount_points():
                raise MountError(f"mountpoint {mnt} holds a dead mount that could not be "
                                 "removed (try: umount -l)") from None
            notes.append(f"removed the dead mount left at {mnt} by a daemon that had died")
        else:
            raise MountError(f"mountpoint {mnt} is busy: something is already mounted there")
    st = _stat(mnt, "mountpoint")
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {mnt} is not a directory")
    return mnt


def check_images(opts: MountOptions) -> tuple[str, os.stat_result, str, os.stat_result | None]:
    src = os.path.abspath(opts.source)
    sst = _stat(src, "source")
    if stat.S_ISDIR(sst.st_mode):
        raise MountError(f"source {src} is a directory, not a disk image")
    if not (stat.S_ISREG(sst.st_mode) or stat.S_ISBLK(sst.st_mode)):
        raise MountError(f"source {src} is neither a regular file nor a block device")
    if _nbd_address(opts) is not None:
        return src, sst, opts.target, None
    tgt = os.path.abspath(opts.target)
    try:
        tst: os.stat_result | None = os.stat(tgt)
    except FileNotFoundError:
        tst = None
        parent = os.path.dirname(tgt)
        if not os.path.isdir(parent):
            raise MountError(f"target directory {parent} does not exist") from None
    except OSError as e:
        raise MountError(f"target {tgt}: {e.strerror}") from None
    if tst is not None:
        if (tst.st_dev, tst.st_ino) == (sst.st_dev, sst.st_ino) or (
                stat.S_ISBLK(tst.st_mode) and tst.st_rdev == sst.st_rdev
                and stat.S_ISBLK(sst.st_mode)):
            raise MountError(f"source and target are the same file ({src}, {tgt})")
        if stat.S_ISDIR(tst.st_mode):
            raise MountError(f"target {tgt} is a directory")
        if not (stat.S_ISREG(tst.st_mode) or stat.S_ISBLK(tst.st_mode)):
            raise MountError(f"target {tgt} is neither a regular file nor a block device")
    return src, sst, tgt, tst


def _open_image(path: str, what: str) -> FileImage:
    try:
        return FileImage.open(path)
    except OSError as e:
        raise MountError(f"cannot open {what} {path} for writing: {e.strerror}") from None


def _nbd_address(opts: MountOptions) -> NBDAddress | None:
    try:
        return parse_nbd_uri(opts.target)
    except ValueError as e:
        raise MountError(str(e)) from None


async def _open_nbd(addr: NBDAddress, opts: MountOptions, size: int,
                    nursery: trio.Nursery) -> NBDImage:
    tls = None
    if addr.tls:
        try:
            tls = TLSConfig(ca=opts.tls_ca, cert=opts.tls_cert, key=opts.tls_key)
        except (ValueError, OSError) as e:
            raise MountError(f"TLS settings: {e}") from None
    elif opts.tls_ca or opts.tls_cert or opts.tls_key:
        raise MountError(f"--tls-* options need an nbds:// target, not {addr}")
    try:
        img = await NBDImage.connect(addr, nursery, tls=tls)
    except (NBDError, OSError) as e:
        raise MountError(f"target {addr}: {e}") from None
    if img.read_only or img.size < size:
        why = "is read-only" if img.read_only else (
            f"has {img.size} bytes, less than the source's {size}")
        await img.close()
        raise MountError(f"target {addr} {why}")
    return img


def _lock(img: FileImage, what: str) -> None:
    try:
        lock_image(img.fd, img.path)
    except ImageLocked as e:
        raise MountError(f"{what} {e}") from None


async def prepare(opts: MountOptions, nursery: trio.Nursery) -> Prepared:
    """Everything short of mounting. On error nothing is left changed. An NBD target's
    reader task runs in ``nursery``."""
    notes: list[str] = []
    src, _sst, tgt, tst = check_images(opts)
    mnt = check_mountpoint(opts.mountpoint, notes)
    for path in (src, tgt):
        if path == mnt or path.startswith(mnt + os.sep):
            raise MountError(f"{path} lies inside the mountpoint {mnt}")
    name = opts.name or os.path.basename(src)
    if not name or "/" in name or name in (".", "..", ".mirror"):
        raise MountError(f"invalid image name {name!r}")
    target: Target | None = None
    source = _open_image(src, "source")
    created = False
    nbd = _nbd_address(opts)
    try:
        _lock(source, "source")
        if source.size == 0:
            raise MountError(f"source {src} is empty")
        _check_not_pivoted(source, opts)
        if nbd is not None:
            target = await _open_nbd(nbd, opts, source.size, nursery)
        elif tst is not None:
            ftarget = _open_image(tgt, "target")
            target = ftarget
            _lock(ftarget, "target")
            _check_target_size(ftarget, source.size)
        else:
            ftarget = _create_target(tgt, source.size, source.fd)
            target = ftarget
            created = True
            _lock(ftarget, "target")
        assert target is not None  # every branch above opened one
        prep = Prepared(source, target, created, mnt, name, notes, fresh=created,
                        granularity=opts.granularity)
        _prepare_state(prep, opts)
    except BaseException:
        source.close()
        if target is not None:
            await _close_target(target)
        if created:
            remove_quietly(tgt)
        raise
    return prep


def _check_not_pivoted(source: FileImage, opts: MountOptions) -> None:
    """Invariant 9: a source that a mirror pivoted away from is stale; copying it again
    would overwrite the live image with old data. Only --fresh says that is meant."""
    if opts.fresh:
        return
    try:
        rec = PivotRegistry().find(source_identity(source.path, source.fd))
    except OSError as e:
        raise MountError(f"cannot read the pivot registry: {e.strerror or e}") from None
    if rec is not None:
        raise MountError(f"{source.path} is stale: a mirror completed onto {rec['target']} "
                         f"at {rec['time']}, which is the live image since; mirroring it "
                         "again would copy old data (use --fresh if that is what you want)")


async def _close_target(target: Target) -> None:
    if isinstance(target, NBDImage):
        await target.close()  # NBD_CMD_DISC first
    else:
        target.close()


# ====================================================================== the state file
def _state_path(opts: MountOptions, target: Target) -> str | None:
    if opts.state:
        return os.path.abspath(opts.state)
    if target.is_block or target.fd < 0:
        return None  # no place next to a device or an export: --state keeps the job's state
    return target.path + ".mirrorfs"


def image_id(img: Target) -> dict[str, Any]:
    if img.fd < 0:  # an NBD export: its URI is all we know
        return {"path": img.path, "size": img.size}
    return {"path": img.path, "size": img.size, **identity(img.fd)}


def _prepare_state(prep: Prepared, opts: MountOptions) -> None:
    path = _state_path(opts, prep.target)
    if opts.no_state:  # the CLI refuses --state with it
        if path is not None and os.path.exists(path) and not opts.fresh and not prep.fresh:
            _refuse_if_pivoted(path)  # keeping no state is no reason to ignore this one
        return
    if path is None:
        what = "a block device" if prep.target.is_block else "an NBD export"
        prep.notes.append(f"the target is {what} and --state is not given: the job's state "
                          "is not saved (no resume after a crash)")
        return
    if os.path.exists(path) and not opts.fresh and not prep.fresh:
        sf = _open_state(path)
        try:
            if _resume_from(prep, sf, opts):
                prep.statefile = sf
                return
        except BaseException:
            sf.close()
            raise
        sf.close()
    elif os.path.exists(path) and prep.fresh and not opts.fresh:
        prep.notes.append(f"ignoring the state file {path}: the target was just created")
    g = prep.granularity
    nchunks = -(-prep.source.size // g)
    extent = max(DEFAULT_EXTENT, g)
    header = {"phase": "running", "clean": False, "size": prep.source.size,
              "granularity": g, "extent_bytes": extent, "nchunks": nchunks,
              "nextents": -(-prep.source.size // extent), "sync": str(opts.sync),
              "source": image_id(prep.source), "target": image_id(prep.target)}
    existed = os.path.exists(path)
    try:
        prep.statefile = StateFile.create(path, header)
    except OSError as e:
        raise MountError(f"cannot create the state file {path}: {e.strerror}") from None
    prep.state_created = not existed


def _refuse_if_pivoted(path: str) -> None:
    sf = _open_state(path)
    try:
        if sf.header.get("phase") == "completed":
            raise MountError(f"the state file {path} says the mirror completed: the target "
                             "is the live image and the source is stale (use --fresh to "
                             "start a new mirror from the source)")
    finally:
        sf.close()


def _open_state(path: str) -> StateFile:
    try:
        return StateFile.open(path)
    except StateError as e:
        raise MountError(str(e)) from None
    except OSError as e:
        raise MountError(f"cannot open the state file {path}: {e.strerror}") from None


def _resume_from(prep: Prepared, sf: StateFile, opts: MountOptions) -> bool:
    """Validate a saved job against the images. True: resume it; False: start anew."""
    try:
        plan = plan_resume(sf, image_id(prep.source), image_id(prep.target),
                           sync=str(opts.sync), granularity=opts.granularity)
    except StateError as e:
        raise MountError(str(e)) from None
    prep.notes.append(plan.note)
    if plan.bitmap is None:
        return False
    prep.resume = plan.bitmap
    prep.granularity = plan.granularity
    prep.resume_info = plan.info
    return True


def _check_target_size(target: FileImage, size: int) -> None:
    if target.is_block:
        if target.size < size:
            raise MountError(f"target device {target.path} has {target.size} bytes, "
                             f"less than the source's {size}")
    elif target.size != size:
        raise MountError(f"target {target.path} has {target.size} bytes but the source has "
                         f"{size}: they must be the same size")


def _create_target(path: str, size: int, source_fd: int) -> FileImage:
    mode = os.fstat(source_fd).st_mode & 0o666 or 0o600
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as e:
        raise MountError(f"cannot create target {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)  # sparse: reads as zeros, allocates nothing
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        raise MountError(f"cannot size target {path} to {size} bytes: {e.strerror}") from None
    return FileImage(path, fd)
