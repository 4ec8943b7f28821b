"""The command line's grammar: the verbs, their options and how each value is checked.

Apart from cli.py, which imports it only once it runs: the verbs that merely read or write
the mount's files pay for nothing else at import.
"""

import argparse
import enum
from collections.abc import Callable
from typing import Any

from mirrorfs.sizes import format_size, parse_size

GRANULARITY_MIN, GRANULARITY_MAX = 4 << 10, 64 << 20


# ====================================================================== option types
def _size_arg(lo: int, hi: int, power_of_two: bool = False) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if power_of_two and (v <= 0 or v & (v - 1)):
            raise argparse.ArgumentTypeError(f"{text} is not a power of two")
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range ({format_size(lo)} .. {format_size(hi)})")
        return v

    return parse


def _choice(enum_type: type[enum.StrEnum]) -> dict[str, Any]:
    """add_argument keywords for an enum option: argparse converts before it checks
    ``choices``, so ``type=SyncMode`` reports "invalid SyncMode value: 'bogus'"."""
    names = [str(x) for x in enum_type]

    def parse(text: str) -> Any:
        try:
            return enum_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid choice {text!r} (choose from {', '.join(names)})") from None

    return {"type": parse, "metavar": "{" + ",".join(names) + "}"}


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return v


def _poll_us(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of microseconds {text!r}") from None
    if not 0 <= v <= 1000:
        raise argparse.ArgumentTypeError("the poll time must be 0 to 1000 microseconds")
    return v


def build_parser() -> argparse.ArgumentParser:
    from mirrorfs.params import CopyMode, ErrorPolicy, MountOptions, SyncMode

    d = MountOptions.default  # the defaults live with the options themselves

    ap = argparse.ArgumentParser(prog="mirrorfs", description=(
        "Mirror a live raw disk image to a new target through a FUSE mount."))
    sp = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    m = sp.add_parser("mount", help="mount SOURCE at MOUNTPOINT and mirror it to TARGET")
    m.add_argument("source", metavar="SOURCE", help="raw image: regular file or block device")
    m.add_argument("target", metavar="TARGET",
                   help="file (created sparse if missing), block device, or NBD URI "
                        "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...)")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
    m.add_argument("--sync", **_choice(SyncMode), default=d("sync"))
    m.add_argument("--granularity", type=_size_arg(GRANULARITY_MIN, GRANULARITY_MAX, True),
                   default=d("granularity"), metavar="SIZE",
                   help="bytes per dirty bit (default 64K)")
    m.add_argument("--speed", type=_size_arg(0, 1 << 50), default=d("speed"), metavar="RATE",
                   help="copy rate limit in bytes/s, 0 = unlimited (default)")
    m.add_argument("--buf-size", type=_size_arg(GRANULARITY_MIN, 1 << 30),
                   default=d("buf_size"), metavar="SIZE",
                   help="bytes in flight at once (default 16M)")
    m.add_argument("--copy-mode", **_choice(CopyMode), default=d("copy_mode"))
    m.add_argument("--on-source-error", **_choice(ErrorPolicy), default=d("on_source_error"))
    m.add_argument("--on-target-error", **_choice(ErrorPolicy), default=d("on_target_error"))
    m.add_argument("--name", help="the image's file name in the mount (default: SOURCE's)")
    m.add_argument("--foreground", action="store_true", help="do not daemonize")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users use the image (by its mode)")
    m.add_argument("--debug", action="store_true", help="log debug messages")
    m.add_argument("--log", dest="log_file", metavar="FILE", help="log to FILE")
    state = m.add_mutually_exclusive_group()
    state.add_argument("--state", metavar="FILE",
                       help="the job's state file (default: TARGET.mirrorfs)")
    state.add_argument("--no-state", action="store_true",
                       help="keep no state file (a crash or restart then means a full copy)")
    m.add_argument("--checkpoint-interval", dest="checkpoint_s", type=_seconds,
                   default=d("checkpoint_s"), metavar="S",
                   help="save the copy's progress in the state file every S seconds "
                        "(default 10; also at ready and when the activity log fills)")
    m.add_argument("--poll-us", type=_poll_us, default=d("poll_us"), metavar="US",
                   help="after a reply, poll up to US microseconds for the next request "
                        "before sleeping (adaptive, as QEMU's poll-max-ns; 0 = never; "
                        "default 50)")
    m.add_argument("--fresh", action="store_true",
                   help="ignore a saved state and start a new mirror")
    m.add_argument("--tls-ca", metavar="FILE", help="nbds:// targets: the CA certificate")
    m.add_argument("--tls-cert", metavar="FILE", help="nbds:// targets: a client certificate")
    m.add_argument("--tls-key", metavar="FILE", help="nbds:// targets: the client key")
    m.add_argument("--notify-fd", type=int, help=argparse.SUPPRESS)

    s = sp.add_parser("status", help="show the job's status")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--json", action="store_true", help="print the raw ctl object")
    s.add_argument("--watch", action="store_true", help="refresh every second until done")

    w = sp.add_parser("wait", help="wait until the job is ready or done")
    w.add_argument("mountpoint", metavar="MOUNTPOINT")
    w.add_argument("until", choices=["ready", "done"])
    w.add_argument("--timeout", type=_seconds, help="give up after S seconds (exit 2)")

    for verb, text in (("complete", "pivot onto the target"),
                       ("cancel", "stop the job (after ready: a consistent copy)")):
        c = sp.add_parser(verb, help=text)
        c.add_argument("mountpoint", metavar="MOUNTPOINT")
        if verb == "cancel":
            c.add_argument("--force", action="store_true", help="abandon at once")
        c.add_argument("--no-wait", action="store_true", help="return once accepted")
        c.add_argument("--timeout", type=_seconds, help="stop waiting after S seconds")

    for verb, text in (("pause", "stop starting copies"), ("resume", "continue copying")):
        sp.add_parser(verb, help=text).add_argument("mountpoint", metavar="MOUNTPOINT")

    sv = sp.add_parser("speed", help="change the copy rate limit (0 = unlimited)")
    sv.add_argument("mountpoint", metavar="MOUNTPOINT")
    sv.add_argument("rate", type=_size_arg(0, 1 << 50), metavar="RATE")

    cm = sp.add_parser("copy-mode", help="switch a running job to write-blocking")
    cm.add_argument("mountpoint", metavar="MOUNTPOINT")
    cm.add_argument("mode", choices=[str(CopyMode.WRITE_BLOCKING)])

    ev = sp.add_parser("events", help="print the job's events")
    ev.add_argument("mountpoint", metavar="MOUNTPOINT")

    u = sp.add_parser("umount", help="unmount (the image must be closed)")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--timeout", type=_seconds, default=30.0,
                   help="wait this long for the daemon to exit")
    return ap


# ====================================================================== the ctl file
