"""Mounted tests: the real daemon in its own process, a real FUSE mount, real files.

The ``mirrorfs`` fixture mounts and always cleans up (fusermount3 -u -z, then SIGTERM, then
SIGKILL), even when a test fails. Every mounted test ends by comparing images byte for byte
(``assert_same``). The helpers are in tests/helpers/mounted.py.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.mounted import MirrorFactory


@pytest.fixture(autouse=True, scope="session")
def _pivot_registry(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The pivots that tests record go to a registry of their own, not the machine's
    (/var/lib/mirrorfs): a test's refusal must come from what that test did."""
    os.environ.setdefault("MIRRORFS_STATE_DIR", str(tmp_path_factory.mktemp("registry")))


@pytest.fixture
def mirrorfs(tmp_path: Path) -> Iterator[MirrorFactory]:
    f = MirrorFactory(tmp_path)
    try:
        yield f
    finally:
        f.cleanup()
