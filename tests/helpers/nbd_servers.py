"""Real NBD servers for tests: qemu-nbd and nbdkit as child processes on loopback TCP or
Unix sockets, their readiness checks, and a test PKI for TLS. Every server is killed when
its context ends. Synchronous, so that both the trio tests of the client and the mounted
tests use them. The fixtures ``nbd_tools`` and ``pki`` (tests/conftest.py) call
``install_tools`` and ``make_pki``."""

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TOOLS = {"qemu-nbd": "qemu-utils", "nbdkit": "nbdkit", "certtool": "gnutls-bin",
         "nbdcopy": "libnbd-bin"}


def install_tools() -> None:
    """Install the servers if they are missing (the suite's setup runs as root)."""
    if all(shutil.which(b) for b in TOOLS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *sorted(set(TOOLS.values()))]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    missing = [b for b in TOOLS if not shutil.which(b)]
    assert not missing, f"could not install {missing}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A"
                   for line in list(f)[1:])


def unix_listening(path: Path) -> bool:
    # /proc/net/unix: Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
    with open("/proc/net/unix") as f:
        for line in list(f)[1:]:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == str(path) and int(parts[3], 16) & 0x10000:
                return True
    return False


@contextlib.contextmanager
def serve(argv: list[str], ready: Callable[[], bool], log: Path
          ) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.01)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def qemu_nbd(image: Path, tmp: Path, *, port: int | None = None, sock: Path | None = None,
             export: str = "exp", extra: tuple[str, ...] = (), persistent: bool = True
             ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    argv = ["qemu-nbd", "-f", "raw", "-x", export, "-e", "8", "--discard=unmap", *extra]
    if persistent:
        argv.append("-t")
    if sock is not None:
        argv += ["-k", str(sock)]
        ready: Callable[[], bool] = lambda: unix_listening(sock)  # noqa: E731
    else:
        assert port is not None
        argv += ["--bind", "127.0.0.1", "--port", str(port)]
        ready = lambda: tcp_listening(port)  # noqa: E731
    return serve([*argv, str(image)], ready, tmp / "qemu-nbd.log")


def nbdkit(image: Path, sock: Path, tmp: Path, *args: str, plugin_args: tuple[str, ...] = ()
           ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), *args, "file", str(image),
            *plugin_args]
    return serve(argv, lambda: unix_listening(sock), tmp / "nbdkit.log")


def make_image(path: Path, size: int, data: bool = True) -> bytearray:
    content = bytearray(random.randbytes(size) if data else bytes(size))
    path.write_bytes(content)
    return content


def make_pki(d: Path) -> Path:
    """In ``d``: a CA, a server certificate (localhost, 127.0.0.1) and a client certificate,
    named as qemu's tls-creds-x509 and nbdkit --tls-certificates want them; plus an
    unrelated CA."""

    def certtool(*args: str) -> None:
        subprocess.run(["certtool", *args], cwd=d, check=True, capture_output=True)

    def key(name: str) -> None:
        certtool("--generate-privkey", "--key-type=ecdsa", "--no-text", "--outfile", name)

    (d / "ca.info").write_text("cn = mirrorfs test CA\nca\ncert_signing_key\n"
                               "expiration_days = 2\n")
    (d / "server.info").write_text("organization = mirrorfs\ncn = localhost\n"
                                   "dns_name = localhost\nip_address = 127.0.0.1\n"
                                   "tls_www_server\nencryption_key\nsigning_key\n"
                                   "expiration_days = 2\n")
    (d / "client.info").write_text("organization = mirrorfs\ncn = client\ntls_www_client\n"
                                   "encryption_key\nsigning_key\nexpiration_days = 2\n")
    for ca in ("ca", "other-ca"):
        key(f"{ca}-key.pem")
        certtool("--generate-self-signed", "--no-text", "--load-privkey", f"{ca}-key.pem",
                 "--template", "ca.info", "--outfile", f"{ca}-cert.pem")
    for who in ("server", "client"):
        key(f"{who}-key.pem")
        certtool("--generate-certificate", "--no-text", "--load-privkey", f"{who}-key.pem",
                 "--load-ca-certificate", "ca-cert.pem", "--load-ca-privkey", "ca-key.pem",
                 "--template", f"{who}.info", "--outfile", f"{who}-cert.pem")
    return d


def qemu_tls_args(pki: Path) -> tuple[str, ...]:
    return ("--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
            "--tls-creds", "tls0")
