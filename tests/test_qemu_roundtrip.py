"""Real QEMU 7.2 through both daemons: QEMU A runs our boot-sector guest, migrates into mig-dest,
which stores it as an image; mig-source loads the image and migrates it into QEMU B, where the
guest runs on (new serial markers) with its memory invariant intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio

from guest.image import read_image
from tests.daemons import Daemons, daemons  # noqa: F401 - fixture
from tests.qemu_fixtures import requires_qemu
from tests.qemu_guest.invariant import check_invariant
from tests.qemu_harness import QemuOptions, QemuVM

pytestmark = [pytest.mark.qemu, requires_qemu]

WARMUP = 10
LOW_RAM_END = 0xA0000  # pc.ram offsets equal guest physical addresses below the 640K hole


async def _dest_completed(dest, timeout: float = 120) -> dict:
    info = await dest.wait_migration(timeout=timeout)
    assert info["status"] == "completed", info
    return info


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("memory_mib", [128, 1024])
@pytest.mark.parametrize("return_path", [False, True])
async def test_round_trip_through_both_daemons(
    daemons: Daemons,  # noqa: F811
    boot_disk: Path,
    tmp_path: Path,
    machine: str,
    memory_mib: int,
    return_path: bool,
) -> None:
    store = tmp_path / "images"
    async with daemons.dest(extra=["--store", str(store)]) as dest:
        opts_a = QemuOptions(machine=machine, memory_mib=memory_mib, disk=boot_disk, name="qemu-a")
        async with QemuVM.start(opts_a, workdir=tmp_path) as vm_a:
            await vm_a.wait_serial_markers(WARMUP, 30)
            await vm_a.set_capabilities({"return-path": return_path})
            await vm_a.set_parameters({"max-bandwidth": 10 << 30})
            await vm_a.migrate(f"tcp:127.0.0.1:{dest.port}")
            qemu_info = await vm_a.wait_migration(timeout=120)
            dinfo = await _dest_completed(dest)
            # what QEMU counted is what mig-dest received
            assert dinfo["ram"]["normal"] == qemu_info["ram"]["normal"]
            assert dinfo["ram"]["duplicate"] == qemu_info["ram"]["duplicate"]
        image_path = Path(dinfo["x-stored-image"])
        image = read_image(image_path)
        assert image.machine_type.startswith("pc-q35-" if machine == "q35" else "pc-i440fx-")
        assert check_invariant(image.blocks["pc.ram"]).ok

    opts_b = QemuOptions(
        machine=machine, memory_mib=memory_mib, disk=boot_disk, incoming="defer", name="qemu-b"
    )
    async with (
        daemons.source(extra=["--image", str(image_path)], paused=True) as src,
        QemuVM.start(opts_b, workdir=tmp_path) as vm_b,
    ):
        await vm_b.migrate_incoming("tcp:127.0.0.1:0")
        port = await vm_b.incoming_port()
        if return_path:
            await src.set_capabilities(**{"return-path": True})
        await src.set_parameters(**{"max-bandwidth": 10 << 30})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        sinfo = await src.wait_migration(timeout=120)
        assert sinfo["status"] == "completed", sinfo
        await vm_b.wait_run_state("running", 30)
        # the guest runs on at B: new passes print new markers
        await vm_b.wait_serial_markers(WARMUP, 30)
        await vm_b.stop()
        dump = await vm_b.pmemsave(0, memory_mib << 20, tmp_path / "b.mem")
        result = check_invariant(np.fromfile(dump, dtype=np.uint8))
        assert result.ok, result.summary()


@pytest.mark.parametrize("machine", ["pc", "q35"])
async def test_paused_1g_guest_ram_identical_to_pmemsave(
    daemons: Daemons,  # noqa: F811
    tmp_path: Path,
    machine: str,
) -> None:
    """A paused 1 GiB guest with 768 MiB of random data loaded: mig-dest's RAM equals pmemsave."""
    blob = tmp_path / "random.bin"
    np.random.default_rng(5).integers(0, 256, 768 << 20, dtype=np.uint8).tofile(blob)
    from tests.qemu_harness import Loader

    store = tmp_path / "images"
    opts = QemuOptions(
        machine=machine, memory_mib=1024, paused=True, loaders=[Loader(blob, 0x1000000)], name="qemu-a"
    )
    async with (
        daemons.dest(extra=["--store", str(store)]) as dest,
        QemuVM.start(opts, workdir=tmp_path) as vm,
    ):
        await vm.set_parameters({"max-bandwidth": 10 << 30})
        await vm.migrate(f"tcp:127.0.0.1:{dest.port}")
        await vm.wait_migration(timeout=120)
        dinfo = await _dest_completed(dest)
        dump = np.fromfile(await vm.pmemsave(0, 1 << 30, tmp_path / "a.mem"), dtype=np.uint8)
    ram = read_image(Path(dinfo["x-stored-image"])).blocks["pc.ram"]
    # below 4 GiB, pc.ram offsets are guest physical addresses; 640K-1M is ROM/VGA space
    assert np.array_equal(ram[:LOW_RAM_END], dump[:LOW_RAM_END])
    assert np.array_equal(ram[1 << 20 :], dump[1 << 20 :])
    assert np.array_equal(ram[16 << 20 : (16 << 20) + (768 << 20)], np.fromfile(blob, dtype=np.uint8))


async def test_truncated_stream_never_stores_an_image(daemons: Daemons, tmp_path: Path) -> None:  # noqa: F811
    """A stream cut in the middle fails the migration and leaves the store empty."""
    capture = Path(__file__).resolve().parents[1].parent / "shared" / "captures" / "precopy-paused-pc32m.bin"
    raw = capture.read_bytes()
    store = tmp_path / "images"
    async with daemons.dest(extra=["--store", str(store)]) as dest:
        for cut in (100_000, 288_000, len(raw) - 10):
            stream = await trio.open_tcp_stream("127.0.0.1", dest.port)
            await stream.send_all(raw[:cut])
            await stream.aclose()
            info = await dest.wait_migration(timeout=30)
            assert info["status"] == "failed", info
        assert not store.exists() or not any(store.iterdir())
        # and the complete capture does store one (a 32 MiB pc guest)
        stream = await trio.open_tcp_stream("127.0.0.1", dest.port)
        await stream.send_all(raw)
        await stream.aclose()
        info = await dest.wait_migration(timeout=30)
        assert info["status"] == "completed", info
        assert read_image(Path(info["x-stored-image"])).blocks["pc.ram"].shape == (32 << 20,)
