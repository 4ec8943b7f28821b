"""The control protocol of ``.mirror/ctl``: parse one command, apply it, render the status.

No I/O here. One write(2) carries one command: ``complete``, ``cancel``, ``cancel force``,
``pause``, ``resume``, ``speed RATE``, ``copy-mode write-blocking``; a trailing newline is
allowed (``echo`` adds one), anything else is malformed (EINVAL at the FUSE boundary). A
well-formed command that the job's state does not accept raises VerbRefused (EBUSY).
"""

import dataclasses
import json
from typing import Any

from mirrorfs.job import Verb
from mirrorfs.mirror import Mirror
from mirrorfs.params import CopyMode
from mirrorfs.sizes import parse_size

MAX_COMMAND_BYTES = 256


class CommandError(ValueError):
    """A malformed command."""


@dataclasses.dataclass(frozen=True)
class Command:
    verb: Verb
    speed: int | None = None
    copy_mode: CopyMode | None = None


def parse_command(data: bytes) -> Command:
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"command too long ({len(data)} bytes)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CommandError("command is not ASCII text") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text.isprintable():
        raise CommandError("one command per write, printable text only")
    words = text.split()
    if not words:
        raise CommandError("empty command")
    name, args = words[0], words[1:]
    if name in ("complete", "pause", "resume") and not args:
        return Command(Verb(name))
    if name == "cancel" and not args:
        return Command(Verb.CANCEL)
    if name == "cancel" and args == ["force"]:
        return Command(Verb.CANCEL_FORCE)
    if name == "speed" and len(args) == 1:
        try:
            return Command(Verb.SPEED, speed=parse_size(args[0]))
        except ValueError as e:
            raise CommandError(str(e)) from None
    if name == "copy-mode" and len(args) == 1:
        try:
            return Command(Verb.COPY_MODE, copy_mode=CopyMode(args[0]))
        except ValueError:
            raise CommandError(f"unknown copy mode {args[0]!r}") from None
    raise CommandError(f"unknown command {text[:60]!r}")


def apply_command(mirror: Mirror, cmd: Command) -> None:
    """Act on a parsed command; VerbRefused if the state does not accept it."""
    if cmd.verb is Verb.COMPLETE:
        mirror.complete()
    elif cmd.verb is Verb.CANCEL:
        mirror.cancel()
    elif cmd.verb is Verb.CANCEL_FORCE:
        mirror.cancel(force=True)
    elif cmd.verb is Verb.PAUSE:
        mirror.pause()
    elif cmd.verb is Verb.RESUME:
        mirror.resume()
    elif cmd.verb is Verb.SPEED:
        assert cmd.speed is not None
        mirror.set_speed(cmd.speed)
    elif cmd.verb is Verb.COPY_MODE:
        assert cmd.copy_mode is not None
        mirror.set_copy_mode(cmd.copy_mode)


def render_status(status: dict[str, Any]) -> bytes:
    """One JSON object on one line."""
    return (json.dumps(status, separators=(", ", ": ")) + "\n").encode()
