"""Real QEMU 7.2 precopy streams against our protocol package.

A boot-sector guest of our own (tests/qemu_guest) keeps incrementing the first byte of every page
from 1 MiB to 100 MiB under TCG. We migrate it with a real QEMU source to ``exec:cat > FILE`` and
over TCP to a recording listener (with and without the return path, answering PONG/SHUT like
mig_dest), and check that:

* our MainDecoder decodes the stream completely (device sections delimited from the vmdesc);
* its record counts equal QEMU's own query-migrate ``ram.normal`` / ``ram.duplicate`` (and
  ``xbzrle-cache.pages`` with XBZRLE);
* the RAM rebuilt from the stream equals a pmemsave of the stopped source (``pc.ram`` at guest
  addresses 0..0xA0000 and 1 MiB..RAM end, ``pc.bios`` at 4 GiB - 256 KiB) and satisfies the
  guest's invariant;
* re-encoding the decoded events with MainEncoder gives the original bytes back;
* the other direction: a stream synthesized by us from an on-disk image (guest/image.py) is
  accepted by a real QEMU destination, whose guest then carries on with its invariant intact.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from guest.image import Image, read_image, write_image
from protocol.decoder import MainDecoder
from protocol.encoder import MainEncoder
from protocol.events import (
    Configuration,
    DeviceSection,
    EndOfStream,
    OpenReturnPath,
    Ping,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RpPong,
    RpShut,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
)
from tests.qemu_guest import bootsector
from tests.qemu_guest.bootsector import GUEST_MEMORY_MIB
from tests.qemu_guest.invariant import check_invariant, pass_counter
from tests.qemu_harness import (
    Loader,
    QemuOptions,
    QemuVM,
    RecordingListener,
    StreamImage,
    decode_stream_file,
    qemu_binary,
    wait_file_stable,
)

# the fixtures (boot_disk, booted_guest, qemu_binary_path); harmless once tests/conftest.py
# registers the same plugin
pytest_plugins = ["tests.qemu_fixtures"]

# not imported from tests.qemu_fixtures: importing it before pytest registers it as a plugin
# would defeat its assertion rewriting
requires_qemu = pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed")

RAM_BYTES = GUEST_MEMORY_MIB << 20
BIOS_ADDR = 0xFFFC0000
BIOS_SIZE = 0x40000
VGA_HOLE = (0xA0000, 0x100000)  # not plain RAM in general (VGA window, shadowed option ROMs)
MACHINE_NAMES = {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
# a quick converging precopy: QEMU's default 128 MiB/s would take ~1 s per pass of 128 MiB
FAST = {"max-bandwidth": 4 << 30, "downtime-limit": 2000}


# ==================================================================== the guest itself (no QEMU)


def test_bootsector_image() -> None:
    sector = bootsector.SECTOR_BYTES
    assert len(sector) == 512 and sector[510:] == b"\x55\xaa"
    assert sector[0] == 0xFA  # cli first: interrupts stay off for good


def test_build_disk_is_padded(tmp_path: Path) -> None:
    p = bootsector.build_disk(tmp_path / "d.img")
    data = p.read_bytes()
    assert len(data) == 1 << 20 and data[:512] == bootsector.SECTOR_BYTES and not any(data[512:])


def _synthetic_ram(counter: int, boundary: int) -> np.ndarray:
    ram = np.zeros(bootsector.DIRTY_END, dtype=np.uint8)
    ram[bootsector.PASS_COUNTER_ADDR : bootsector.PASS_COUNTER_ADDR + 4] = np.frombuffer(
        counter.to_bytes(4, "little"), dtype=np.uint8
    )
    fb = ram[bootsector.DIRTY_START : bootsector.DIRTY_END : bootsector.PAGE]
    fb[:] = counter & 0xFF
    fb[:boundary] = (counter + 1) & 0xFF
    return ram


@pytest.mark.parametrize(("counter", "boundary"), [(0, 0), (7, 100), (255, 25344), (256 * 3 + 5, 1)])
def test_invariant_synthetic(counter: int, boundary: int) -> None:
    ram = _synthetic_ram(counter, boundary)
    res = check_invariant(ram)
    assert res.ok, res.summary()
    assert (res.counter, res.boundary) == (counter, boundary)
    # a lost write after the boundary, a spurious one before it, a wrong counter: all caught
    for addr in (bootsector.DIRTY_END - bootsector.PAGE, bootsector.DIRTY_START + 5 * bootsector.PAGE):
        bad = ram.copy()
        bad[addr] ^= 0x40
        assert not check_invariant(bad).ok
    bad = ram.copy()
    bad[bootsector.PASS_COUNTER_ADDR] ^= 0x10
    res = check_invariant(bad)
    assert not res.ok and "VIOLATED" in res.summary()


def test_invariant_rejects_short_dump() -> None:
    assert not check_invariant(np.zeros(4096, dtype=np.uint8)).ok


# ==================================================================== a live guest


@pytest.mark.parametrize("booted_guest", ["pc", "q35"], indirect=True)
@pytest.mark.qemu
@requires_qemu
async def test_guest_runs_and_keeps_its_invariant(booted_guest: QemuVM) -> None:
    vm = booted_guest
    await vm.wait_serial_markers(50)
    await vm.stop()
    assert await vm.run_state() == "paused"
    ram = await vm.dump_memory(0, RAM_BYTES)
    res = check_invariant(ram)
    assert res.ok, res.summary()
    # one marker per pass, written after the counter increment
    markers = vm.serial_output()
    assert res.counter - 1 <= len(markers) <= res.counter
    assert markers[-1] == ord("A") + len(markers) % 26
    # a single flipped first byte breaks it
    i = bootsector.DIRTY_START + 1234 * bootsector.PAGE
    ram[i] ^= 0x01
    assert not check_invariant(ram).ok


# ==================================================================== source streams


@dataclass
class Migrated:
    """A finished outgoing migration of the boot-sector guest, seen from both ends."""

    machine: str
    info: dict[str, Any]  # the source's final query-migrate
    image: StreamImage  # what the stream carried
    stream_path: Path
    ram: np.ndarray  # pmemsave 0..RAM end of the stopped source
    bios: np.ndarray  # pmemsave of the BIOS window
    source_state: str
    listener: RecordingListener | None = None


async def migrate_out(
    vm: QemuVM,
    tmp_path: Path,
    *,
    transport: str,
    caps: dict[str, bool] | None = None,
    params: dict[str, Any] | None = None,
    before_completion: Any = None,
) -> Migrated:
    """Migrate ``vm`` to a file (``exec``) or to a RecordingListener (``tcp``); then dump the
    stopped source's memory. ``before_completion(vm)`` runs while the migration is active."""
    await vm.set_parameters(params or FAST)
    if caps:
        await vm.set_capabilities(caps)
    path = tmp_path / f"{vm.options.machine}-{transport}.bin"
    listener: RecordingListener | None = None
    async with trio.open_nursery() as nursery:
        if transport == "exec":
            await vm.migrate(f"exec:cat > {path}")
        else:
            listener = RecordingListener(path)
            port = await nursery.start(listener.serve)
            await vm.migrate(f"tcp:127.0.0.1:{port}")
        if before_completion is not None:
            await before_completion(vm)
        info = await vm.wait_migration(timeout=30)
        if listener is not None:
            with trio.fail_after(10):
                await listener.done.wait()
    if listener is not None:
        assert listener.error is None, listener.error
        img = listener.image
        assert path.stat().st_size == listener.bytes_received
    else:
        await wait_file_stable(path)
        img = decode_stream_file(path)
    state = await vm.run_state()
    ram = await vm.dump_memory(0, RAM_BYTES)
    bios = await vm.dump_memory(BIOS_ADDR, BIOS_SIZE)
    return Migrated(vm.options.machine, info, img, path, ram, bios, state, listener)


def check_against_source(m: Migrated, *, globalstate: str = "running") -> None:
    img, info = m.image, m.info
    # framing
    assert img.header and img.eof and img.vmdesc is not None
    assert img.config == Configuration(MACHINE_NAMES[m.machine])
    names = [b.name for b in img.block_list]
    assert names[0] == "pc.ram" and img.block_list[0].used_length == RAM_BYTES
    assert set(names) >= {"pc.ram", "pc.bios", "pc.rom"}
    assert sum(b.used_length for b in img.block_list) == info["ram"]["total"]
    # device sections: delimited from the vmdesc, which lists exactly them in stream order
    desc = json.loads(img.vmdesc)
    assert [(d["name"], d["instance_id"]) for d in desc["devices"]] == [
        (d.idstr, d.instance_id) for d in img.devices
    ]
    assert img.devices[-1].idstr == "globalstate"
    assert img.globalstate() == globalstate
    # QEMU's own counters
    ram_info = info["ram"]
    assert img.normal_pages == ram_info["normal"]
    assert img.zero_pages == ram_info["duplicate"]
    assert img.xbzrle_pages == info.get("xbzrle-cache", {}).get("pages", 0)
    assert ram_info["normal-bytes"] == ram_info["normal"] * 4096
    # the first pass sends every page of every block
    for name, sent in img.pages_sent.items():
        assert sent.min() >= 1, f"{name}: {int((sent == 0).sum())} pages never sent"
    # the RAM the stream carried is the stopped source's RAM
    assert m.source_state == "postmigrate"
    pcram = img.blocks["pc.ram"]
    for lo, hi in ((0, VGA_HOLE[0]), (VGA_HOLE[1], RAM_BYTES)):
        diff = np.flatnonzero((pcram[lo:hi] != m.ram[lo:hi]).reshape(-1, 4096).any(axis=1))
        assert len(diff) == 0, f"{len(diff)} pages differ, first at {lo + int(diff[0]) * 4096:#x}"
    assert np.array_equal(img.blocks["pc.bios"], m.bios)
    res = check_invariant(pcram)
    assert res.ok, res.summary()
    assert res.counter == pass_counter(m.ram)


def reencode(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(original chunk, re-encoded bytes) per decoded event of the file, in order."""
    data = path.read_bytes()
    dec = MainDecoder()
    enc = MainEncoder()
    dec.feed(data)
    pos = 0
    for ev in [*dec.events(), *dec.end_of_input()]:
        out = enc.encode(ev)
        yield data[pos : pos + len(out)], out
        pos += len(out)
    assert pos == len(data), f"re-encoded {pos} of {len(data)} bytes"


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("transport", ["exec", "tcp", "tcp-return-path"])
@pytest.mark.qemu
@requires_qemu
async def test_precopy_stream_of_running_guest(
    machine: str, transport: str, tmp_path: Path, boot_disk: Path, qemu_binary_path: str
) -> None:
    rp = transport == "tcp-return-path"
    opts = QemuOptions(machine=machine, memory_mib=GUEST_MEMORY_MIB, disk=boot_disk, name="source")
    async with QemuVM.start(opts, workdir=tmp_path) as vm:
        await vm.wait_serial_markers(20)
        m = await migrate_out(
            vm,
            tmp_path,
            transport="exec" if transport == "exec" else "tcp",
            caps={"return-path": True} if rp else None,
        )
    check_against_source(m)
    img = m.image
    if rp:
        # OPEN_RETURN_PATH + PING 1 right after the configuration; we answered PONG 1, SHUT 0
        assert img.commands == [OpenReturnPath(), Ping(1)]
        assert m.listener is not None and m.listener.rp_sent == [RpPong(1), RpShut(0)]
    else:
        assert img.commands == []
        assert m.listener is None or m.listener.rp_sent == []
    if transport == "exec":
        for orig, out in reencode(m.stream_path):
            assert orig == out
        # and the analyzer CLI agrees with QEMU's counters
        proc = await trio.run_process(
            [sys.executable, "-m", "protocol.analyze", "--json", str(m.stream_path)], capture_stdout=True
        )
        report = json.loads(proc.stdout)
        assert report["totals"]["normal"] == m.info["ram"]["normal"]
        assert report["totals"]["zero"] == m.info["ram"]["duplicate"]
        assert report["bytes"] == m.stream_path.stat().st_size


@pytest.mark.qemu
@requires_qemu
async def test_precopy_xbzrle_stream(tmp_path: Path, boot_disk: Path, qemu_binary_path: str) -> None:
    """Several dirty-sync rounds with XBZRLE: every page of the dirty region changes one byte per
    pass, so after the first pass QEMU sends them as tiny XBZRLE deltas."""

    async def iterate_then_converge(vm: QemuVM) -> None:
        # downtime-limit 1 ms never converges while 100 MiB stay dirty; once XBZRLE pages went
        # out, allow 20 s of downtime so that the next check completes the migration
        with trio.fail_after(20):
            while True:
                q = await vm.query_migrate()
                assert q.get("status") in ("setup", "active"), f"migration ended too early: {q}"
                if q.get("ram", {}).get("dirty-sync-count", 0) >= 4 and q.get("xbzrle-cache", {}).get(
                    "pages"
                ):
                    break
                await trio.sleep(0.05)
        await vm.set_parameters({"downtime-limit": 20000})

    opts = QemuOptions(machine="pc", memory_mib=GUEST_MEMORY_MIB, disk=boot_disk, name="source")
    async with QemuVM.start(opts, workdir=tmp_path) as vm:
        await vm.wait_serial_markers(20)
        m = await migrate_out(
            vm,
            tmp_path,
            transport="tcp",
            caps={"xbzrle": True},
            # a first pass shorter than ~100 ms makes 7.2 complete at once whatever the downtime
            # limit (see shared/notes/qemu.md): 256 MiB/s makes it take ~0.5 s
            params={"max-bandwidth": 256 << 20, "downtime-limit": 1},
            before_completion=iterate_then_converge,
        )
    check_against_source(m)
    assert m.image.xbzrle_pages > 0
    assert max(int(s.max()) for s in m.image.pages_sent.values()) >= 3
    # the 64 MiB default cache has 16384 direct-mapped slots: each round sends at most that many
    # of the 25344 dirty pages as XBZRLE (the rest miss and go as PAGE)
    assert all(x <= 16384 for _kind, _n, _z, x in m.image.ram_sections)


@pytest.mark.parametrize("how", ["stopped", "never-started"])
@pytest.mark.qemu
@requires_qemu
async def test_paused_source_globalstate(
    how: str, tmp_path: Path, boot_disk: Path, qemu_binary_path: str
) -> None:
    """A source stopped with ``stop`` sends globalstate "paused"; one started with -S and never
    run sends "prelaunch". Either way every page goes exactly once."""
    opts = QemuOptions(
        machine="pc",
        memory_mib=GUEST_MEMORY_MIB,
        disk=boot_disk,
        name="source",
        paused=how == "never-started",
    )
    async with QemuVM.start(opts, workdir=tmp_path) as vm:
        if how == "stopped":
            await vm.wait_serial_markers(20)
            await vm.stop()
        m = await migrate_out(vm, tmp_path, transport="exec")
    check_against_source(m, globalstate="paused" if how == "stopped" else "prelaunch")
    for name, sent in m.image.pages_sent.items():
        assert sent.max() == 1, name
    if how == "never-started":
        assert pass_counter(m.ram) == 0 and not m.image.blocks["pc.ram"][bootsector.DIRTY_START :].any()


# ==================================================================== the other direction


def image_from_stream(img: StreamImage, path: Path, source: str) -> Path:
    cfg = img.config
    assert cfg is not None and img.ram_section_id is not None
    return write_image(
        path,
        machine_type=cfg.machine_type,
        config={
            "machine_type": cfg.machine_type,
            "target_page_bits": cfg.target_page_bits,
            "capabilities": list(cfg.capabilities) if cfg.capabilities is not None else None,
            "uuid": cfg.uuid.hex() if cfg.uuid is not None else None,
        },
        blocks=[(b.name, img.blocks[b.name]) for b in img.block_list],
        devices=[(d.idstr, d.instance_id, d.version_id, d.body, d.section_id) for d in img.devices],
        vmdesc=img.vmdesc,
        extra={"ram_section_id": img.ram_section_id},
        source=source,
    )


def stream_from_image(image: Image) -> Iterator[bytes]:
    """A one-pass precopy stream of a stored guest, as mig_source --image will send it: block
    list, every page once (all-zero pages as ZERO records), an empty END, the devices."""
    enc = MainEncoder()
    ram_id = int(image.extra["ram_section_id"])
    cfg = image.config
    yield enc.encode(StreamHeader())
    yield enc.encode(
        Configuration(
            image.machine_type,
            cfg.get("target_page_bits"),
            tuple(cfg["capabilities"]) if cfg.get("capabilities") is not None else None,
            bytes.fromhex(cfg["uuid"]) if cfg.get("uuid") else None,
        )
    )
    yield enc.encode(SectionStart(ram_id, "ram", 0, 4))
    yield enc.encode(RamBlockList(tuple(RamBlockInfo(n, len(a)) for n, a in image.blocks.items())))
    yield enc.encode(RamEos()) + enc.encode(SectionFooter(ram_id))
    yield enc.encode(SectionPart(ram_id))
    for name, arr in image.blocks.items():
        pages = np.asarray(arr).reshape(-1, 4096)
        nonzero = pages.any(axis=1)
        rows = np.flatnonzero(nonzero)
        zeros = np.flatnonzero(~nonzero)
        yield enc.zero_pages(name, (zeros * 4096).astype(np.uint64)).tobytes()
        for i in range(0, len(rows), 4096):  # bounded chunks of page records
            r = rows[i : i + 4096]
            yield enc.pages_from(name, (r * 4096).astype(np.uint64), pages, r).tobytes()
    yield enc.encode(RamEos()) + enc.encode(SectionFooter(ram_id))
    yield enc.encode(SectionEnd(ram_id)) + enc.encode(RamEos()) + enc.encode(SectionFooter(ram_id))
    next_id = max([ram_id, *(d.section_id or 0 for d in image.devices)]) + 1
    for d in image.devices:
        sid = d.section_id if d.section_id is not None else next_id
        next_id += d.section_id is None
        yield enc.encode(DeviceSection(sid, d.idstr, d.instance_id, d.version_id, d.body))
        yield enc.encode(SectionFooter(sid))
    yield enc.encode(EndOfStream())
    if image.vmdesc is not None:
        yield enc.encode(VmDescription(image.vmdesc))


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.qemu
@requires_qemu
async def test_qemu_destination_accepts_stream_from_image(
    machine: str, tmp_path: Path, boot_disk: Path, qemu_binary_path: str
) -> None:
    """Real source -> our listener -> image on disk -> our encoder -> real destination."""
    opts = QemuOptions(machine=machine, memory_mib=GUEST_MEMORY_MIB, disk=boot_disk, name="source")
    async with QemuVM.start(opts, workdir=tmp_path) as vm:
        await vm.wait_serial_markers(20)
        m = await migrate_out(vm, tmp_path, transport="tcp", caps={"return-path": True})
    saved = image_from_stream(m.image, tmp_path / "image", source=f"test {machine}")
    image = read_image(saved)
    synth = tmp_path / "synth.bin"
    with synth.open("wb") as f:
        for chunk in stream_from_image(image):
            f.write(chunk)
    counter = pass_counter(image.blocks["pc.ram"])

    dest_disk = tmp_path / "dest-disk.img"  # the source's image file may still be locked
    shutil.copyfile(boot_disk, dest_disk)
    dopts = QemuOptions(
        machine=machine,
        memory_mib=GUEST_MEMORY_MIB,
        disk=dest_disk,
        name="dest",
        paused=True,
        incoming="defer",
    )
    async with QemuVM.start(dopts, workdir=tmp_path) as dest:
        await dest.migrate_incoming(f"exec:cat {synth}")
        info = await dest.wait_migration(timeout=30)
        assert info["status"] == "completed"
        # -S on the destination: loaded but not resumed, so memory is exactly the image's
        assert await dest.run_state() == "paused"
        ram = await dest.dump_memory(0, RAM_BYTES)
        want = np.asarray(image.blocks["pc.ram"])
        for lo, hi in ((0, VGA_HOLE[0]), (VGA_HOLE[1], RAM_BYTES)):
            assert np.array_equal(ram[lo:hi], want[lo:hi])
        await dest.cont()
        await dest.wait_serial_markers(30)
        await dest.stop()
        after = await dest.dump_memory(0, RAM_BYTES)
        res = check_invariant(after)
        assert res.ok, res.summary()
        assert res.counter >= counter + 30
        # the first marker on the destination continues the source's sequence
        first = dest.serial_output()[0]
        assert first in (ord("A") + counter % 26, ord("A") + (counter + 1) % 26)


@pytest.mark.qemu
@requires_qemu
async def test_harness_qemu_to_qemu_with_loader(
    tmp_path: Path, boot_disk: Path, qemu_binary_path: str
) -> None:
    """The harness end to end: -device loader content, -incoming defer + migrate-incoming on port 0,
    a real QEMU -> QEMU precopy over TCP, and the guest carrying on at the destination."""
    blob_addr = 0x7000000  # above the dirtied region, below SeaBIOS's data at the top of RAM
    blob = np.random.default_rng(7).integers(0, 256, 64 * 1024, dtype=np.uint8)
    blob_path = tmp_path / "blob.bin"
    blob.tofile(blob_path)
    src_opts = QemuOptions(
        machine="pc",
        memory_mib=GUEST_MEMORY_MIB,
        disk=boot_disk,
        name="source",
        loaders=[Loader(blob_path, blob_addr)],
    )
    dest_disk = tmp_path / "dest-disk.img"
    shutil.copyfile(boot_disk, dest_disk)
    dst_opts = QemuOptions(
        machine="pc", memory_mib=GUEST_MEMORY_MIB, disk=dest_disk, name="dest", incoming="defer"
    )
    async with (
        QemuVM.start(src_opts, workdir=tmp_path) as src,
        QemuVM.start(dst_opts, workdir=tmp_path) as dst,
    ):
        assert await dst.run_state() == "inmigrate"
        await dst.migrate_incoming("tcp:127.0.0.1:0")
        port = await dst.incoming_port()
        assert port > 0
        await src.wait_serial_markers(20)
        await src.set_parameters(FAST)
        await src.migrate(f"tcp:127.0.0.1:{port}")
        info = await src.wait_migration(timeout=30)
        dinfo = await dst.wait_migration(timeout=30)
        assert (info["status"], dinfo["status"]) == ("completed", "completed")
        src_counter = pass_counter(await src.dump_memory(0, RAM_BYTES))
        await dst.wait_run_state("running")
        await dst.wait_serial_markers(20)
        await dst.stop()
        ram = await dst.dump_memory(0, RAM_BYTES)
    assert np.array_equal(ram[blob_addr : blob_addr + len(blob)], blob)
    res = check_invariant(ram)
    assert res.ok, res.summary()
    assert res.counter >= src_counter + 20
