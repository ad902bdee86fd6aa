"""Postcopy into mig-dest (WIRE.md §6): a real QEMU 7.2 source switches to postcopy mid-pass;
mig-dest, whose guest cannot execute, requests every page it lacks over the return path while
QEMU's background pages arrive, and stores the complete image. Plus hand-made streams that
break the postcopy state machine (§6.3) over TCP."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import trio

from guest.image import read_image
from protocol.encoder import MainEncoder
from protocol.events import (
    Configuration,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RecvBitmapRequest,
    SectionFooter,
    SectionStart,
    StreamHeader,
)
from tests.daemons import Daemons, daemons  # noqa: F401 - fixture
from tests.qemu_fixtures import requires_qemu
from tests.qemu_guest.invariant import check_invariant
from tests.qemu_harness import QemuOptions, QemuVM

WARMUP_B = 10

CAPTURE = Path(__file__).resolve().parents[1].parent / "shared" / "captures" / "postcopy-main.bin"


@pytest.mark.qemu
@requires_qemu
async def test_qemu_postcopy_into_mig_dest(
    daemons: Daemons,  # noqa: F811
    booted_guest: QemuVM,
    tmp_path: Path,
) -> None:
    vm = booted_guest
    store = tmp_path / "images"
    async with daemons.dest(extra=["--store", str(store)]) as dest:
        await dest.set_capabilities(postcopy_ram=True)
        await vm.set_capabilities({"postcopy-ram": True})
        # ~99 MiB of dirtied pages at 20 MB/s: the first pass takes ~5 s
        await vm.set_parameters({"max-bandwidth": 20_000_000})
        await vm.migrate(f"tcp:127.0.0.1:{dest.port}")
        await trio.sleep(0.5)
        assert (await vm.query_migrate())["status"] == "active"
        await vm.execute("migrate-start-postcopy")
        qinfo = await vm.wait_migration(timeout=120)
        assert qinfo["status"] == "completed", qinfo
        dinfo = await dest.wait_migration(timeout=60)
        assert dinfo["status"] == "completed", dinfo
        assert dinfo["x-postcopy-state"] == "end"
        assert dinfo["x-postcopy-requests"] > 0, dinfo
        # QEMU served (at least some of) our requests
        assert qinfo["ram"]["postcopy-requests"] > 0, qinfo
    image = read_image(Path(dinfo["x-stored-image"]))
    # the guest ran on the source until the switchover, then stopped: a consistent snapshot
    result = check_invariant(image.blocks["pc.ram"])
    assert result.ok, result.summary()


def _stream_until_advise() -> bytes:
    enc = MainEncoder()
    blocks = RamBlockList((RamBlockInfo("pc.ram", 4 * 4096),))
    evs = [
        StreamHeader(),
        Configuration("pc-i440fx-7.2"),
        OpenReturnPath(),
        Ping(1),
        PostcopyAdvise(4096, 4096),
        SectionStart(2, "ram", 0, 4),
        blocks,
        RamEos(),
        SectionFooter(2),
    ]
    return b"".join(enc.encode(ev) for ev in evs)


async def _send_and_read_rp(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    rp = b""
    async with stream:
        await stream.send_all(data)
        with trio.move_on_after(10):
            while chunk := await stream.receive_some():
                rp += chunk
    return rp


@pytest.mark.parametrize(
    ("tail", "words"),
    [
        ([PostcopyRun()], ["POSTCOPY_RUN", "ADVISE", "LISTENING"]),
        ([PostcopyAdvise(4096, 4096)], ["POSTCOPY_ADVISE", "ADVISE", "NONE"]),
        ([PostcopyListen(), PostcopyListen()], ["POSTCOPY_LISTEN", "LISTENING", "ADVISE or DISCARD"]),
        ([RecvBitmapRequest("pc.ram")], ["RECV_BITMAP", "active", "only valid in postcopy-recover"]),
        ([PostcopyResume()], ["POSTCOPY_RESUME", "active", "only valid in postcopy-recover"]),
    ],
)
async def test_postcopy_command_in_wrong_state_fails(
    daemons: Daemons,  # noqa: F811
    tail: list,
    words: list[str],
) -> None:
    """E.g. POSTCOPY_RUN before LISTEN fails the migration naming the state; the RP ends SHUT 1."""
    async with daemons.dest() as dest:
        await dest.set_capabilities(postcopy_ram=True)
        data = _stream_until_advise() + b"".join(MainEncoder().encode(ev) for ev in tail)
        rp = await _send_and_read_rp(dest.port, data)
        info = await dest.wait_migration(timeout=20)
        assert info["status"] == "failed", info
        for w in words:
            assert w in info["error-desc"], info
        assert rp.endswith(struct.pack(">HHI", 1, 4, 1)), rp.hex()


async def test_postcopy_advise_needs_postcopy_ram_here(daemons: Daemons) -> None:  # noqa: F811
    async with daemons.dest() as dest:
        await _send_and_read_rp(dest.port, _stream_until_advise())
        info = await dest.wait_migration(timeout=20)
        assert info["status"] == "failed", info
        assert "PostcopyAdvise" in info["error-desc"], info


async def test_postcopy_capture_replay(daemons: Daemons, tmp_path: Path) -> None:  # noqa: F811
    """The postcopy capture (the pages QEMU sent after the switch included) completes here too:
    mig-dest requests the pages it lacks, the (replayed) stream supplies them anyway."""
    store = tmp_path / "images"
    async with daemons.dest(extra=["--store", str(store)]) as dest:
        await dest.set_capabilities(postcopy_ram=True)
        rp = await _send_and_read_rp(dest.port, CAPTURE.read_bytes())
        info = await dest.wait_migration(timeout=20)
        assert info["status"] == "completed", info
        assert info["x-postcopy-state"] == "end"
        assert info["x-postcopy-requests"] > 0
    assert rp.endswith(struct.pack(">HHI", 1, 4, 0)), rp[-16:].hex()
    assert struct.pack(">HHI", 2, 4, 3) in rp  # PONG 3, from inside the package
    image = read_image(Path(info["x-stored-image"]))
    assert image.blocks["pc.ram"].shape == (32 << 20,)
    assert np.any(image.blocks["pc.ram"])


@pytest.mark.qemu
@requires_qemu
async def test_mig_source_postcopy_into_qemu(
    daemons: Daemons,  # noqa: F811
    booted_guest: QemuVM,
    boot_disk: Path,
    tmp_path: Path,
) -> None:
    """mig-source runs a stored QEMU guest and migrates it in postcopy into a real QEMU: QEMU's
    userfaultfd faults request pages from us while we stream the rest; the guest runs on there
    (new serial markers) and its memory invariant holds."""
    vm_a = booted_guest
    store = tmp_path / "images"
    async with daemons.dest(extra=["--store", str(store)]) as dest:
        await vm_a.set_parameters({"max-bandwidth": 10 << 30})
        await vm_a.migrate(f"tcp:127.0.0.1:{dest.port}")
        assert (await vm_a.wait_migration(timeout=120))["status"] == "completed"
        dinfo = await dest.wait_migration(timeout=60)
        assert dinfo["status"] == "completed", dinfo
    image_path = Path(dinfo["x-stored-image"])

    opts_b = QemuOptions(machine="pc", memory_mib=128, disk=boot_disk, incoming="defer", name="qemu-b")
    async with (
        daemons.source(extra=["--image", str(image_path)], paused=True) as src,
        QemuVM.start(opts_b, workdir=tmp_path) as vm_b,
    ):
        await vm_b.set_capabilities({"postcopy-ram": True})
        await vm_b.migrate_incoming("tcp:127.0.0.1:0")
        port = await vm_b.incoming_port()
        await src.set_capabilities(postcopy_ram=True)
        # slow precopy (~5 s for the guest's ~100 MiB of dirtied pages), then switch: most pages
        # move in postcopy, faulted in by QEMU's vCPU or streamed in the background
        await src.set_parameters(max_bandwidth=20_000_000, max_postcopy_bandwidth=40_000_000)
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await trio.sleep(0.5)
        await src.execute("migrate-start-postcopy")
        await vm_b.wait_run_state("running", 30)  # QEMU runs the guest before it has its RAM
        sinfo = await src.wait_migration(timeout=120)
        assert sinfo["status"] == "completed", sinfo
        assert sinfo["ram"]["postcopy-requests"] > 0, sinfo  # QEMU's faults reached us
        assert sorted(sinfo["x-pongs"]) == [1, 2, 3, 4], sinfo
        qinfo = await vm_b.query_migrate()
        assert qinfo["status"] == "completed", qinfo
        await vm_b.wait_serial_markers(WARMUP_B, 30)  # it runs on at B
        await vm_b.stop()
        dump = await vm_b.pmemsave(0, 128 << 20, tmp_path / "b.mem")
        result = check_invariant(np.fromfile(dump, dtype=np.uint8))
        assert result.ok, result.summary()
