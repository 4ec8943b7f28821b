"""NBD targets, mounted: qemu-nbd over TCP, nbdkit over a Unix socket, qemu-nbd with TLS, and
a server killed and restarted mid-copy. Each ends by comparing the export's backing file (the
server stopped, so everything is on disk) with the source, byte for byte."""

import os
import time
from pathlib import Path

from helpers import nbd_servers as srv
from helpers.loadgen import Writers
from helpers.mounted import MiB, MirrorFactory, assert_same, make_image, run_mirrorfs

SIZE = 32 * MiB


def export_file(tmp: Path) -> Path:
    p = tmp / "export.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return p


def mirror_with_writes(mirrorfs: MirrorFactory, src: Path, uri: str, *opts: str) -> None:
    model = bytearray(src.read_bytes())
    m = mirrorfs.mount(src, None, *opts, "--speed", "16M", target_uri=uri)
    st = m.status()
    assert st["target"] == uri and st["state"] == "copying"
    w = Writers(m.img, model, threads=2, seed=4, max_size=256 << 10).start()
    time.sleep(1)
    w.stop()
    m.command("speed 0")
    m.wait("ready")
    m.command("complete")
    st = m.wait("completed")
    assert st["serving"] == "target"
    assert m.img.read_bytes() == bytes(model), "the export does not hold every write"
    m.umount()
    assert src.read_bytes() == bytes(model)


def test_qemu_nbd_over_tcp(tmp_path: Path, mirrorfs: MirrorFactory, nbd_tools: None) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    exp = export_file(tmp_path)
    port = srv.free_port()
    with srv.qemu_nbd(exp, tmp_path, port=port, export="disk"):
        mirror_with_writes(mirrorfs, src, f"nbd://127.0.0.1:{port}/disk")
    assert_same(src, exp)


def test_nbdkit_over_unix_socket_cancel_in_ready(tmp_path: Path, mirrorfs: MirrorFactory,
                                                 nbd_tools: None) -> None:
    src = make_image(tmp_path / "disk.img", SIZE, data_ranges=[(0, 5 * MiB),
                                                              (20 * MiB, 3 * MiB)])
    exp = export_file(tmp_path)
    sock = tmp_path / "nbdkit.sock"
    with srv.nbdkit(exp, sock, tmp_path):
        m = mirrorfs.mount(src, None, "--sync", "top", target_uri=f"nbd+unix:///?socket={sock}")
        m.wait("ready")
        m.command("cancel")
        st = m.wait("cancelled")
        assert st["target_consistent"] is True and st["serving"] == "source"
        m.umount()
    assert_same(src, exp)


def test_qemu_nbd_with_tls(tmp_path: Path, mirrorfs: MirrorFactory, pki: Path) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    exp = export_file(tmp_path)
    port = srv.free_port()
    tls = ("--tls-ca", str(pki / "ca-cert.pem"), "--tls-cert", str(pki / "client-cert.pem"),
           "--tls-key", str(pki / "client-key.pem"))
    with srv.qemu_nbd(exp, tmp_path, port=port, export="disk", extra=srv.qemu_tls_args(pki)):
        mirror_with_writes(mirrorfs, src, f"nbds://localhost:{port}/disk", *tls)
    assert_same(src, exp)
    # a server without TLS is refused, never used in clear text
    exp2 = tmp_path / "plain.img"
    exp2.write_bytes(bytes(SIZE))
    port2 = srv.free_port()
    mnt = tmp_path / "refused"
    mnt.mkdir()
    with srv.qemu_nbd(exp2, tmp_path, port=port2, export="disk"):
        # --fresh: the source is stale since the pivot above, and this is about TLS
        r = run_mirrorfs("mount", str(src), f"nbds://localhost:{port2}/disk", str(mnt), *tls,
                         "--fresh")
    assert r.returncode != 0 and "TLS" in r.stderr, r.stderr
    assert exp2.read_bytes() == bytes(SIZE), "a refused mount wrote to the export"


def test_server_killed_and_restarted_mid_copy(tmp_path: Path, mirrorfs: MirrorFactory,
                                              nbd_tools: None) -> None:
    src = make_image(tmp_path / "disk.img", SIZE)
    exp = export_file(tmp_path)
    sock = tmp_path / "q.sock"
    uri = f"nbd+unix:///disk?socket={sock}"
    with srv.qemu_nbd(exp, tmp_path, sock=sock, export="disk"):
        m = mirrorfs.mount(src, None, "--speed", "8M", "--on-target-error", "stop",
                           "--state", str(tmp_path / "job.state"), target_uri=uri)
        time.sleep(1)
    # the server is gone: the job stops with the error, the guest does not notice
    st = m.wait("paused", timeout=30)
    assert st["error"] and "target" in st["error"], st
    fd = os.open(m.img, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"written while the server is down", 3 * MiB + 5) == 32
    finally:
        os.close(fd)
    os.unlink(sock)
    with srv.qemu_nbd(exp, tmp_path, sock=sock, export="disk"):
        m.command("resume")
        m.command("speed 0")
        m.wait("ready", timeout=60)
        m.command("complete")
        m.wait("completed")
        errors = [e for e in m.events() if e["event"] == "error"]
        assert errors and errors[0]["side"] == "target" and errors[0]["action"] == "stop"
        m.umount()
    assert_same(src, exp)
