"""``mirrorfs mount``'s daemon: mount, serve, run the job, unmount.

Without --foreground the command starts the daemon (launch.py: this same code with a
notification pipe) and returns only when the daemon reports that the mount is live and the
job runs, or prints the daemon's one-line error. The checks and the opening of the images
are in prepare.py; pyfuse3 is imported here and in fs.py only.
"""

import contextlib
import logging
import logging.handlers
import os
import signal
import sys

import pyfuse3
import trio
from bitarray import bitarray

from mirrorfs.config import MirrorConfig
from mirrorfs.fs import MirrorOperations
from mirrorfs.job import Job
from mirrorfs.mirror import Mirror
from mirrorfs.params import MountOptions
from mirrorfs.pivots import PivotRegistry, source_identity
from mirrorfs.prepare import MountError, Prepared, image_id, prepare
from mirrorfs.state import ActivityLog

log = logging.getLogger(__name__)


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
    """Adaptive polling (third_party/pyfuse3/0004-adaptive-poll.patch): right after a
    reply the next request is often tens of microseconds away, about what a trio wait
    costs, so polling for it halves the latency at queue depth 1. It only polls while
    requests keep coming that soon, so an idle mount does not spin."""
    set_poll = getattr(pyfuse3, "set_poll_max_ns", None)
    if set_poll is not None:
        set_poll(poll_us * 1000)
    elif poll_us:
        log.warning("pyfuse3 lacks mirrorfs's adaptive-poll patch: run scripts/setup.sh")


READ_AHEAD_MIN_BYTES = 128 * 1024


def _set_read_ahead(mirror: Mirror) -> None:
    """Write read-ahead (third_party/pyfuse3/0007-write-read-ahead.patch): while a large
    write is copied into the source, a helper thread receives the next request, so that
    the two copies of a stream of large writes run on two cores (1 MiB O_DIRECT writes:
    +25-45%, docs/performance.md).
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
    await mirror.save_final_state(image_id(mirror.source), image_id(mirror.target))


async def _signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %s: unmounting", signal.Signals(sig).name)
            pyfuse3.terminate()
