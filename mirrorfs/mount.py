"""``mirrorfs mount``: check everything, open and lock the images, mount, run the job.

Without --foreground the command starts the daemon (this same code with --foreground and a
notification pipe) and returns only when the daemon reports that the mount is live and the
job runs, or prints the daemon's one-line error. Every check happens before anything is
created; if a later step fails, what was created (the target file) is removed again.
"""

import contextlib
import dataclasses
import errno
import logging
import logging.handlers
import os
import signal
import stat
import subprocess
import sys
from typing import Any

import pyfuse3
import trio
from bitarray import bitarray

from mirrorfs.fs import MirrorOperations
from mirrorfs.images import FileImage
from mirrorfs.job import Job
from mirrorfs.locks import ImageLocked, lock_image
from mirrorfs.mirror import Mirror, MirrorConfig, Target
from mirrorfs.nbd import NBDAddress, NBDError, NBDImage, TLSConfig, parse_nbd_uri
from mirrorfs.params import CopyMode, ErrorPolicy, SyncMode
from mirrorfs.pivots import PivotRegistry, source_identity
from mirrorfs.state import (
    DEFAULT_EXTENT,
    ActivityLog,
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
class MountOptions:
    source: str
    target: str
    mountpoint: str
    sync: SyncMode = SyncMode.FULL
    granularity: int = 64 << 10
    speed: int = 0
    buf_size: int = 16 << 20
    copy_mode: CopyMode = CopyMode.BACKGROUND
    on_source_error: ErrorPolicy = ErrorPolicy.REPORT
    on_target_error: ErrorPolicy = ErrorPolicy.REPORT
    name: str | None = None
    foreground: bool = False
    allow_other: bool = False
    debug: bool = False
    log_file: str | None = None
    notify_fd: int | None = None
    state: str | None = None  # the state file (default: TARGET.mirrorfs for a file target)
    fresh: bool = False  # ignore an existing state file
    tls_ca: str | None = None  # nbds:// targets
    tls_cert: str | None = None
    tls_key: str | None = None
    checkpoint_s: float = 10.0
    no_state: bool = False
    poll_us: int = 50  # adaptive polling for the next FUSE request (0: off)


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


def _image_id(img: Target) -> dict[str, Any]:
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
              "source": _image_id(prep.source), "target": _image_id(prep.target)}
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
        plan = plan_resume(sf, _image_id(prep.source), _image_id(prep.target),
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


# ====================================================================== the daemon
def setup_logging(opts: MountOptions) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    fmt = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
    if opts.log_file:
        h: logging.Handler = logging.FileHandler(opts.log_file)
    elif opts.notify_fd is None:
        h = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        h = logging.handlers.SysLogHandler("/dev/log")
        fmt = "mirrorfs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        h = logging.NullHandler()
    h.setFormatter(logging.Formatter(fmt))
    root.addHandler(h)


class _Notifier:
    """The daemon's line to the waiting ``mirrorfs mount``: NOTE/OK/ERROR lines."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.done = False  # OK or ERROR was sent

    def send(self, kind: str, msg: str = "") -> None:
        if self.done:
            return
        if kind in ("OK", "ERROR"):
            self.done = True
        if self.fd is None:
            if kind == "ERROR":
                print(f"mirrorfs: error: {msg}", file=sys.stderr)
            elif kind == "NOTE":
                print(f"mirrorfs: {msg}", file=sys.stderr)
            return
        line = f"{kind} {msg}".strip().replace("\n", " ") + "\n"
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode())
        if kind in ("OK", "ERROR"):
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def run_daemon(opts: MountOptions) -> int:
    """Mount and serve in this process until unmounted. Returns the exit status."""
    try:
        setup_logging(opts)
    except OSError as e:
        _Notifier(opts.notify_fd).send("ERROR", f"cannot open the log file {opts.log_file}: "
                                                f"{e.strerror or e}")
        return 1
    try:
        return trio.run(_daemon, opts, _Notifier(opts.notify_fd))
    except BaseExceptionGroup as group:  # one error (Ctrl-C, a crash): itself, for the CLI
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _daemon(opts: MountOptions, notify: _Notifier) -> int:
    async with trio.open_nursery() as io:  # an NBD target's reader task lives here
        try:
            prep = await prepare(opts, io)
        except MountError as e:
            notify.send("ERROR", str(e))
            return 1
        try:
            return await _mounted(prep, opts, notify)
        finally:
            await prep.aclose()
            io.cancel_scope.cancel()
    raise AssertionError("unreachable")  # for type checkers: the nursery swallows nothing


async def _mounted(prep: Prepared, opts: MountOptions, notify: _Notifier) -> int:
    for note in prep.notes:
        notify.send("NOTE", note)
    ops = MirrorOperations(prep.name, os.getuid(), os.getgid())
    fuse_opts = set(pyfuse3.default_options)
    fuse_opts |= {"fsname=mirrorfs", "subtype=mirrorfs"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    _set_polling(opts.poll_us)
    try:
        pyfuse3.init(ops, prep.mountpoint, fuse_opts)
    except Exception as e:  # pyfuse3 raises RuntimeError with little detail
        why = "is /dev/fuse available and the fuse3 package installed?"
        notify.send("ERROR", f"cannot mount FUSE at {prep.mountpoint} ({e}): {why}")
        return 1
    log.info("mounted %s at %s (source %s, target %s)", prep.name, prep.mountpoint,
             prep.source.path, prep.target.path)
    crashed = True
    try:
        await _serve(ops, prep, opts, notify)
        crashed = False
    except MountError as e:  # before the first request was served: undo it all
        crashed = False
        notify.send("ERROR", str(e))
        return 1
    except BaseException:
        log.exception("the daemon failed")
        raise
    finally:
        # After a crash, leave the mount as it is: an unmount would make the mountpoint
        # look like an empty directory to whatever still uses it (s3ql does the same).
        pyfuse3.close(unmount=not crashed)
        notify.send("ERROR", "the daemon stopped before the mount was ready")
    return 0


def _set_polling(poll_us: int) -> None:
    """Adaptive polling (third_party/pyfuse3.patch): right after a reply the next request
    is often tens of microseconds away, about what a trio wait costs, so polling for it
    halves the latency at queue depth 1. It only polls while requests keep coming that
    soon, so an idle mount does not spin."""
    set_poll = getattr(pyfuse3, "set_poll_max_ns", None)
    if set_poll is not None:
        set_poll(poll_us * 1000)
    elif poll_us:
        log.warning("pyfuse3 lacks mirrorfs's adaptive-poll patch: run scripts/setup.sh")


READ_AHEAD_MIN_BYTES = 128 * 1024


def _set_read_ahead(mirror: Mirror) -> None:
    """Write read-ahead (third_party/pyfuse3.patch): while a large write is copied into
    the source, a helper thread receives the next request, so that the two copies of a
    stream of large writes run on two cores (1 MiB O_DIRECT writes: +25-45%, README).
    The mirror arms it only right before a copy that cannot suspend (pyfuse3's rule)."""
    set_read_ahead = getattr(pyfuse3, "set_read_ahead", None)
    if set_read_ahead is None:
        return
    set_read_ahead(True)
    read_ahead = pyfuse3.read_ahead

    def before_inline_write(length: int) -> None:
        if length >= READ_AHEAD_MIN_BYTES:
            read_ahead()

    mirror.before_inline_write = before_inline_write


def _log_fuse_stats() -> None:
    stats = getattr(pyfuse3, "poll_stats", None)
    if stats is not None:
        caught, waited = stats()
        log.info("adaptive poll: %d requests caught, %d polls ended in a wait", caught, waited)
    read_ahead = getattr(pyfuse3, "read_ahead_stats", None)
    if read_ahead is not None:
        log.info("write read-ahead: %d requests received while a write was handled",
                 read_ahead())


async def _serve(ops: MirrorOperations, prep: Prepared, opts: MountOptions,
                 notify: _Notifier) -> None:
    cfg = MirrorConfig(granularity=prep.granularity, buf_size=opts.buf_size, speed=opts.speed,
                       sync=opts.sync, copy_mode=opts.copy_mode,
                       on_source_error=opts.on_source_error,
                       on_target_error=opts.on_target_error,
                       target_fresh=prep.fresh, checkpoint_s=opts.checkpoint_s)
    persist = None
    if prep.statefile is not None:
        sf = prep.statefile
        persist = ActivityLog(sf, bitarray(sf.nchunks, endian="little"), prep.granularity,
                              sf.header["extent_bytes"])
    registry = PivotRegistry()
    source, target_path = prep.source, prep.target.path

    def record_pivot() -> None:
        registry.record(source_identity(source.path, source.fd), target_path)

    def forget_pivot() -> None:
        registry.clear(source_identity(source.path, source.fd))

    mirror = Mirror(prep.source, prep.target, cfg, Job(), persist=persist,
                    resume=prep.resume, resume_info=prep.resume_info,
                    record_pivot=record_pivot,
                    forget_pivot=forget_pivot)
    prep.resume = None  # merged into the mirror's bitmap: do not keep a second copy
    if persist is not None:
        # the initial bitmap is on disk before the first guest write; no flush of the
        # images (nothing is claimed clean that was not)
        try:
            await mirror.checkpoint(flush=False, phase="running", clean=False)
        except OSError as e:  # e.g. no room next to the target: refuse, as prepare() would
            raise MountError(f"cannot write the state file {persist.sf.path}: "
                             f"{e.strerror}") from None
        log.debug("initial state saved in %s", persist.sf.path)
    if opts.fresh:  # served again: no longer the stale side of an earlier pivot
        try:
            await trio.to_thread.run_sync(forget_pivot)
        except OSError as e:
            log.warning("cannot remove the pivot record of %s: %s", source.path, e)
    prep.state_created = False  # the job owns it now
    prep.target_created = False  # from here on the target is the job's, even on failure
    ops.mirror = mirror
    _set_read_ahead(mirror)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_signals, nursery.cancel_scope)
        nursery.start_soon(mirror.run)
        notify.send("OK")
        log.debug("reported the mount ready")
        await pyfuse3.main()
        _log_fuse_stats()
        if not mirror.job.ended:
            log.info("unmounted while the job was %s: saving its state", mirror.job.state)
        nursery.cancel_scope.cancel()
    await mirror.save_final_state(_image_id(mirror.source), _image_id(mirror.target))


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
