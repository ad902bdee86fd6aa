"""Pytest fixtures for tests that run real QEMU (see tests/qemu_harness.py).

Register them for every test module by adding to tests/conftest.py::

    pytest_plugins = ["tests.qemu_fixtures"]

(until then a module can import them: ``from tests.qemu_fixtures import boot_disk, ...``).

Tests that need QEMU carry ``@pytest.mark.qemu`` and ``@requires_qemu`` (or use a fixture
below, which skips the same way): without ``qemu-system-x86_64`` they are skipped, not failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.qemu_guest.bootsector import GUEST_MEMORY_MIB, build_disk
from tests.qemu_harness import QemuOptions, QemuVM, qemu_binary

requires_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed")

BOOT_TIMEOUT = 20.0
WARMUP_PASSES = 20  # passes of the dirtying loop seen before a booted guest is handed out


@pytest.fixture
def qemu_binary_path() -> str:
    """Path of qemu-system-x86_64; skips the test when it is missing."""
    path = qemu_binary()
    if path is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return path


@pytest.fixture
def boot_disk(tmp_path: Path) -> Path:
    """The boot-sector guest's raw disk (1 MiB)."""
    return build_disk(tmp_path / "bootsector.img")


@pytest.fixture(params=["pc"])
async def booted_guest(
    request: pytest.FixtureRequest, qemu_binary_path: str, boot_disk: Path, tmp_path: Path
) -> AsyncIterator[QemuVM]:
    """A running boot-sector guest (128 MiB, TCG) that has completed a few passes.

    Machine type: ``pc`` by default; parametrize with
    ``@pytest.mark.parametrize("booted_guest", ["pc", "q35"], indirect=True)``."""
    opts = QemuOptions(machine=request.param, memory_mib=GUEST_MEMORY_MIB, disk=boot_disk, name="source")
    async with QemuVM.start(opts, workdir=tmp_path) as vm:
        await vm.wait_serial_markers(WARMUP_PASSES, BOOT_TIMEOUT)
        yield vm
