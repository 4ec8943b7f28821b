import pytest

from mirrorfs.control import Command, CommandError, parse_command, render_status
from mirrorfs.job import Verb
from mirrorfs.params import CopyMode
from mirrorfs.sizes import parse_size


@pytest.mark.parametrize("text,want", [
    (b"complete\n", Command(Verb.COMPLETE)),
    (b"complete", Command(Verb.COMPLETE)),
    (b"cancel\n", Command(Verb.CANCEL)),
    (b"cancel force\n", Command(Verb.CANCEL_FORCE)),
    (b"  pause  \n", Command(Verb.PAUSE)),
    (b"resume\n", Command(Verb.RESUME)),
    (b"speed 16M\n", Command(Verb.SPEED, speed=16 << 20)),
    (b"speed 0\n", Command(Verb.SPEED, speed=0)),
    (b"speed 1024\n", Command(Verb.SPEED, speed=1024)),
    (b"copy-mode write-blocking\n", Command(Verb.COPY_MODE,
                                            copy_mode=CopyMode.WRITE_BLOCKING)),
])
def test_valid_commands(text: bytes, want: Command) -> None:
    assert parse_command(text) == want


@pytest.mark.parametrize("text", [
    b"", b"\n", b"   \n", b"frobnicate\n", b"complete extra\n", b"cancel now\n",
    b"cancel force extra\n", b"pause 5\n", b"speed\n", b"speed -5\n", b"speed abc\n",
    b"speed 10M 20M\n", b"speed 1.5.5M\n", b"speed 99999999999999999999999999G\n",
    b"pause\nresume\n", b"complete\n\n", b"\x00\x01\xff\n", b"A" * 1048576,
    b"complete " * 1000, b"copy-mode sideways\n", b"COMPLETE\n", b"complete\r\n",
])
def test_malformed_commands(text: bytes) -> None:
    with pytest.raises(CommandError):
        parse_command(text)


def test_sizes() -> None:
    assert parse_size("64K") == 65536
    assert parse_size("1g") == 1 << 30
    assert parse_size("16MiB") == 16 << 20
    for bad in ("", "-1", "1.5M", "12Q", "K"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_status_is_one_line() -> None:
    out = render_status({"state": "ready", "error": "a\nb"})
    assert out.endswith(b"\n") and out.count(b"\n") == 1
