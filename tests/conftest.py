"""Fixtures for every test directory. Helpers are plain modules in tests/helpers/."""

from pathlib import Path

import pytest
from helpers import nbd_servers


@pytest.fixture(scope="session")
def nbd_tools() -> None:
    """qemu-nbd, nbdkit, certtool and nbdcopy, installed if they are missing."""
    nbd_servers.install_tools()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory, nbd_tools: None) -> Path:
    """A test PKI for NBD over TLS (see ``nbd_servers.make_pki``)."""
    return nbd_servers.make_pki(tmp_path_factory.mktemp("pki"))
