"""mirrorfs.nbd without a server process: NBD URIs, and the client against a scripted fake
server on a Unix socket in the test's own trio run (cancelled reads, slow flushes, a slow
link). The client against real qemu-nbd and nbdkit: tests/integration/test_nbd_servers.py."""

import contextlib
import struct
from pathlib import Path

import pytest
import trio

from mirrorfs.nbd import NBDImage, TLSConfig, parse_nbd_uri

MiB = 1 << 20


# ------------------------------------------------------------------------------ URIs
@pytest.mark.parametrize("uri, expect", [
    ("nbd://example.com/disk", dict(host="example.com", port=10809, export="disk", tls=False)),
    ("nbd://example.com", dict(host="example.com", export="")),
    ("nbd://example.com/", dict(export="")),
    ("nbd://example.com:1234//disk", dict(port=1234, export="/disk")),
    ("nbd://[::1]:99/hello%20world", dict(host="::1", port=99, export="hello world")),
    ("nbd+tcp://h/x", dict(host="h", export="x")),
    ("nbd+unix:///disk?socket=/tmp/s.sock", dict(socket_path="/tmp/s.sock", export="disk",
                                                 host=None, tls=False)),
    ("nbd+unix:///?socket=rel.sock", dict(socket_path="rel.sock", export="")),
    ("nbds://h:5/e", dict(tls=True, host="h", port=5, export="e", tls_verify=True)),
    ("nbds+unix:///e?socket=/s&tls-hostname=srv", dict(tls=True, socket_path="/s",
                                                       tls_hostname="srv")),
    ("nbds://h/e?tls-verify-peer=0&tls-type=x509", dict(tls_verify=False)),
    ("NBD://Host/E", dict(host="host", export="E")),
])
def test_parse_nbd_uri(uri: str, expect: dict[str, object]) -> None:
    addr = parse_nbd_uri(uri)
    assert addr is not None and addr.uri == uri and str(addr) == uri
    for k, v in expect.items():
        assert getattr(addr, k) == v, k


@pytest.mark.parametrize("text", ["/tmp/disk.img", "disk.img", "./nbd:x", "nbdisk.img",
                                  "http://h/x", "file:///x", ""])
def test_parse_not_nbd(text: str) -> None:
    assert parse_nbd_uri(text) is None


@pytest.mark.parametrize("uri, words", [
    ("nbd:/x", "//"), ("nbd:x", "./nbd:x"), ("nbd+vsock://1/x", "scheme"),
    ("nbd+unix:///x", "socket"), ("nbd+unix://host/x?socket=s", "no host"),
    ("nbd://h/x?socket=s", "socket"), ("nbd://:10809/x", "no host"),
    ("nbd://h:99999/x", "port"), ("nbd://h:abc/x", "port"), ("nbd://h/x?foo=1", "foo"),
    ("nbd://h/x?tls-hostname=a", "TLS"), ("nbds://h/x?tls-type=psk", "psk"),
    ("nbds://h/x?tls-verify-peer=2", "0 or 1"), ("nbd://u@h/x", "user"),
    ("nbd://h/x#frag", "fragment"), ("nbd://h/a%00b", "NUL"),
    ("nbd://h/x?socket=a&socket=b", "twice"),
])
def test_parse_malformed(uri: str, words: str) -> None:
    with pytest.raises(ValueError, match="invalid NBD URI") as info:
        parse_nbd_uri(uri)
    assert words in str(info.value)


def test_tls_config_rejects_key_without_cert() -> None:
    with pytest.raises(ValueError):
        TLSConfig(ca=None, cert=None, key="k.pem")


# ------------------------------------------------------------------------------ a fake server
async def _fake_server(stream: trio.SocketStream, size: int, slow: bool = False) -> None:
    """Fixed newstyle, NBD_OPT_GO, then: a read's payload comes in two halves 0.5 s apart
    (0xAA, then 0xBB); a flush is answered after 1.5 s; anything else at once. ``slow``: a
    slow link, 64 KiB every 0.1 s."""

    async def exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if slow:
                await trio.sleep(0.1)
            data = await stream.receive_some(min(n - len(out), 64 << 10))
            if not data:
                raise EOFError
            out += data
        return bytes(out)

    await stream.send_all(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    await exactly(4)
    while True:
        _, opt, n = struct.unpack(">QII", await exactly(16))
        await exactly(n)
        if opt == 7:  # NBD_OPT_GO: export size, flags HAS_FLAGS | SEND_FLUSH
            info = struct.pack(">HQH", 0, size, 1 | 4)
            await stream.send_all(struct.pack(">QIII", 0x3E889045565A9, 7, 3, len(info)) + info
                                  + struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0))
            break
    with contextlib.suppress(EOFError, trio.BrokenResourceError):
        while True:
            _, _, cmd, handle, _, length = struct.unpack(">IHHQQI", await exactly(28))
            ok = struct.pack(">IIQ", 0x67446698, 0, handle)
            if cmd == 0:
                await stream.send_all(ok + b"\xAA" * (length // 2))
                await trio.sleep(0.5)
                await stream.send_all(b"\xBB" * (length - length // 2))
            elif cmd == 3:
                await trio.sleep(1.5)
                await stream.send_all(ok)
            elif cmd == 2:
                return
            else:
                if cmd == 1:
                    await exactly(length)
                await stream.send_all(ok)


async def _fake_export(nursery: trio.Nursery, path: str, slow: bool = False) -> NBDImage:
    """``_fake_server`` listening on the Unix socket ``path``, and a client connected to it
    with a 1 s io_timeout."""
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen()

    async def serve(stream: trio.SocketStream) -> None:
        await _fake_server(stream, 16 * MiB, slow)

    nursery.start_soon(trio.serve_listeners, serve, [trio.SocketListener(listener)])
    return await NBDImage.connect(f"nbd+unix:///?socket={path}", nursery, io_timeout=1)


async def test_a_cancelled_read_never_writes_into_the_callers_buffer(tmp_path: Path) -> None:
    """The reply to a cancelled read arrives while the caller reuses its buffer: the rest of
    the payload is dropped. A flush slower than io_timeout is waited for (a flush may take
    long on a server with a big cache); the connection stays usable throughout."""
    path = str(tmp_path / "fake.sock")
    async with trio.open_nursery() as nursery:
        img = await _fake_export(nursery, path)
        buf = bytearray(MiB)
        with trio.move_on_after(0.2) as scope:
            await img.pread_into(memoryview(buf), 0)
        assert scope.cancelled_caught
        buf[:] = b"\x11" * MiB  # the caller moved on and reuses its buffer
        await trio.sleep(0.8)  # the late half of the payload has arrived by now
        assert buf == b"\x11" * MiB
        assert img.connected
        await img.flush()  # answered after 1.5 s, past io_timeout: still fine
        assert img.connected
        assert await img.pread(8, 0) == b"\xAA" * 4 + b"\xBB" * 4
        await img.close()
        nursery.cancel_scope.cancel()


async def test_a_slow_link_is_not_a_dead_server(tmp_path: Path) -> None:
    """Writes that take longer than io_timeout to go out, on a link that keeps moving,
    succeed: the limit is on the server taking no data at all."""
    path = str(tmp_path / "slow.sock")
    async with trio.open_nursery() as nursery:
        img = await _fake_export(nursery, path, slow=True)
        start = trio.current_time()
        async with trio.open_nursery() as writers:  # 2 MiB queued: about 3 s on this link
            for i in range(2):
                writers.start_soon(img.pwrite, bytes(MiB), i * MiB)
        assert trio.current_time() - start > 1.5  # longer than io_timeout, and still fine
        assert img.connected
        await img.close()
        nursery.cancel_scope.cancel()
