"""Guest model: RAM blocks, devices, digest, self-check, vCPU control (pause, throttle, crash)."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from guest import (
    DeviceLoadError,
    DeviceState,
    Guest,
    GuestStateError,
    RamBlock,
    VcpuCrashed,
    WorkloadSpec,
    page_image,
    parse_workload,
)
from guest.check import check_block
from guest.ram import Fill, RamPool

MiB = 1 << 20
GiB = 1 << 30
QEMU_LIKE = [("pc.ram", 32 * MiB), ("/rom@etc/acpi/tables", 128 * 1024), ("0000:00:02.0/vga.vram", 4 * MiB)]


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    """Collects guests made by a test and closes them all, even on failure."""
    made: list[Guest] = []
    yield made
    for g in made:
        g.close()


def make(guests: list[Guest], *args: object, **kw: object) -> Guest:
    g = Guest.create(*args, **kw)  # type: ignore[arg-type]
    guests.append(g)
    return g


def migrate_offline(src: Guest, guests: list[Guest]) -> Guest:
    """What a migration does to a stopped source: same blocks, same bytes, same device state."""
    dst = Guest.from_block_list(src.block_list(), prespawn_vcpu=True)
    guests.append(dst)
    for name, block in src.blocks.items():
        for start, stop in block.data_ranges():  # holes stay holes, like zero pages
            dst.blocks[name].array[start:stop] = block.array[start:stop]
    for st in src.save_devices():
        dst.load_device(st.idstr, st.instance_id, st.version_id, st.body)
    return dst


# ---------------------------------------------------------------------- RAM blocks


def test_ram_block_views_and_fills() -> None:
    with (
        RamBlock("pc.ram", 8 * MiB) as b,
        RamBlock("pc.ram", 8 * MiB) as same,
        RamBlock("other", 8 * MiB) as o,
    ):
        assert b.n_pages == 2048
        assert b.array.shape == (8 * MiB,) and b.array.dtype == np.uint8
        assert b.pages.shape == (2048, 4096) and b.words.shape == (2048, 512)
        assert not b.array.any()
        b.fill_random(7)
        same.fill_random(7)
        o.fill_random(7)
        assert np.array_equal(b.array, same.array)  # deterministic in (name, seed)
        assert not np.array_equal(b.array, o.array)  # and the name matters
        same.fill_random(8)
        assert not np.array_equal(b.array, same.array)
        assert np.count_nonzero(b.words) > 0.99 * b.words.size
        b.fill_zero()
        assert b.allocated_bytes() == 0  # a hole again: memory given back
        assert list(b.data_ranges()) == []
        assert not b.array.any()  # (reading a hole allocates it, hence the order of these asserts)


def test_ram_block_1gib_is_lazy() -> None:
    with RamBlock("pc.ram", GiB) as b:
        assert b.n_pages == 262144
        assert b.allocated_bytes() == 0
        b.pages[1000, :16] = 1
        b.pages[200000, -1] = 2
        assert b.allocated_bytes() == 2 * 4096
        assert list(b.data_ranges()) == [(1000 * 4096, 1001 * 4096), (200000 * 4096, 200001 * 4096)]
        with Guest.from_block_list([], prespawn_vcpu=False) as g:
            g.add_block("pc.ram", GiB)
            g.blocks["pc.ram"].pages[5] = 1
            g.digest()
            g.check()
            assert g.blocks["pc.ram"].allocated_bytes() == 4096  # readers skip holes


def test_ram_block_names_and_sizes() -> None:
    for name in ("pc.ram", "/rom@etc/acpi/tables", "0000:00:02.0/vga.vram", "x" * 255):
        with RamBlock(name, 4096) as b:
            assert b.name == name
    for bad in ("", "a\0b", "x" * 256):
        with pytest.raises(ValueError):
            RamBlock(bad, 4096)
    for size in (0, 4095, 4097, -4096):
        with pytest.raises(ValueError, match="multiple of 4096"):
            RamBlock("b", size)


def test_ram_block_resize() -> None:
    with RamBlock("/rom@etc/acpi/tables", 128 * 1024, max_size=2 * MiB) as b:
        assert b.resizable and b.n_pages == 32
        b.array[:] = 0xAB
        b.resize(64 * 1024)
        assert b.size == 64 * 1024 and b.pages.shape == (16, 4096)
        b.resize(256 * 1024)
        assert (b.array[: 64 * 1024] == 0xAB).all() and not b.array[64 * 1024 :].any()  # tail discarded
        with pytest.raises(ValueError, match="max_size"):
            b.resize(4 * MiB)
    with RamBlock("pc.ram", MiB) as fixed, pytest.raises(ValueError, match="not resizable"):
        fixed.resize(2 * MiB)


def test_ram_block_close_with_live_view() -> None:
    b = RamBlock("pc.ram", MiB)
    view = b.pages
    view[3, 0] = 9
    b.close()
    b.close()  # idempotent
    assert b.closed and view[3, 0] == 9  # the view keeps the mapping alive: no dangling pointer
    with pytest.raises(ValueError, match="closed"):
        _ = b.fd


def test_ram_pool_huge_pages_and_block_from_it() -> None:
    """A preallocated pool sits 2 MiB-aligned (so huge pages can back it), and a block made of it
    sees the memfd's bytes at the right place: through the fd, a second mapping and discard."""
    size = 8 * MiB + 4096  # a partial 2 MiB range at the end stays on 4 KiB pages
    pool = RamPool(size)
    pool.populate(chunk=4 * MiB)
    # 0 where the kernel has no MADV_COLLAPSE; whole 2 MiB ranges only, never the partial tail
    assert pool.ready and pool.huge_bytes <= 8 * MiB and pool.huge_bytes % (2 * MiB) == 0
    with RamBlock.from_pool("pc.ram", size, pool) as b:
        assert b.array.ctypes.data % (2 * MiB) == 0
        assert b.allocated_bytes() >= size  # populated, not lazy
        b.pages[5] = 7
        b.pages[-1] = 9
        assert os.pread(b.fd, 4096, 5 * 4096) == b"\x07" * 4096  # the block starts at file offset 0
        with RamBlock.attach("pc.ram", os.dup(b.fd), size) as other:  # the vCPU's view
            assert (other.pages[5] == 7).all() and (other.pages[-1] == 9).all()
            b.discard(5 * 4096, 4096)
            assert not other.pages[5].any() and (other.pages[-1] == 9).all()
    with pytest.raises(ValueError, match="already used"):
        RamBlock.from_pool("pc.ram", size, pool)
    pool.close()


def test_ram_pool_close_while_populating() -> None:
    pool = RamPool(GiB)  # populating it takes 0.1-2 s here; close comes at once
    t = threading.Thread(target=pool.populate, kwargs={"chunk": 2 * MiB})
    t.start()
    pool.close()  # waits for the chunk in progress; populate then stops
    t.join(10)
    assert not t.is_alive() and not pool.ready


# ---------------------------------------------------------------------- digest


def test_digest_equality_and_inequality(guests: list[Guest]) -> None:
    a = make(guests, QEMU_LIKE, fill="random", seed=5)
    b = make(guests, QEMU_LIKE, fill="random", seed=5)
    c = make(guests, QEMU_LIKE, fill="random", seed=6)
    z = make(guests, QEMU_LIKE, fill="zero", seed=5)
    assert a.digest() == b.digest()
    assert len({a.digest(), c.digest(), z.digest()}) == 3
    b.blocks["0000:00:02.0/vga.vram"].array[12345] ^= 1
    assert a.digest() != b.digest()
    b.blocks["0000:00:02.0/vga.vram"].array[12345] ^= 1
    assert a.digest() == b.digest()
    b.stop("paused")  # device bodies count too: globalstate now says "paused"
    assert a.digest() != b.digest()
    # holes hash like zeros: a written-then-zeroed page equals a never-written one
    z2 = make(guests, QEMU_LIKE, fill="zero", seed=5)
    z2.blocks["pc.ram"].pages[17] = 0
    assert z2.digest() == z.digest()


# ---------------------------------------------------------------------- devices


def test_device_save_load_round_trip(guests: list[Guest]) -> None:
    src = make(guests, QEMU_LIKE, fill="random", seed=2, workload="hotset:rate=max,size=1M,offset=4M")
    src.start()
    time.sleep(0.1)
    src.store_global_state()
    src.stop("finish-migrate")
    states = src.save_devices()
    assert [s.idstr for s in states] == ["timer", "cpu", "globalstate"]
    for s in states:
        e = s.vmdesc_entry
        assert e is not None
        assert list(e) == ["name", "instance_id", "vmsd_name", "version", "fields"]
        assert (e["name"], e["instance_id"], e["version"]) == (s.idstr, s.instance_id, s.version_id)
        assert sum(f["size"] for f in e["fields"]) == len(s.body)
        assert all(set(f) == {"name", "type", "size"} for f in e["fields"])
    cpu = states[1]
    assert len(cpu.body) > 4 * src.blocks["pc.ram"].n_pages  # the generation table travels
    dst = migrate_offline(src, guests)
    assert [s.body for s in dst.save_devices()] == [s.body for s in states]
    assert dst.received_global_state == "running"
    assert dst.workload == src.workload and dst.workload_block == "pc.ram"
    assert dst.fill == src.fill
    assert dst.digest() == src.digest()


def test_globalstate_exact_layout(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", MiB)])
    g.start()
    g.store_global_state()
    g.stop("finish-migrate")
    gs = next(s for s in g.save_devices() if s.idstr == "globalstate")
    assert (gs.instance_id, gs.version_id) == (0, 1)
    assert gs.body == struct.pack(">I", 8) + b"running" + bytes(93)
    assert len(gs.body) == 104
    assert gs.vmdesc_entry == {
        "name": "globalstate",
        "instance_id": 0,
        "vmsd_name": "globalstate",
        "version": 1,
        "fields": [
            {"name": "size", "type": "uint32", "size": 4},
            {"name": "runstate", "type": "buffer", "size": 100},
        ],
    }
    # without a stored state, the current one goes out
    p = make(guests, [("pc.ram", MiB)])
    body = next(s for s in p.save_devices() if s.idstr == "globalstate").body
    assert body == struct.pack(">I", 10) + b"prelaunch".ljust(100, b"\0")
    # a destination reads it back
    d = Guest.from_block_list([("pc.ram", MiB)], prespawn_vcpu=False)
    guests.append(d)
    d.load_device("globalstate", 0, 1, struct.pack(">I", 7) + b"paused".ljust(100, b"\0"))
    assert d.received_global_state == "paused"
    with pytest.raises(DeviceLoadError, match="invalid run state"):
        d.load_device("globalstate", 0, 1, struct.pack(">I", 5) + b"dance".ljust(100, b"\0"))


def test_timer_is_qemu_layout(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", MiB)])
    g.start()
    time.sleep(0.02)
    g.stop()
    t = next(s for s in g.save_devices() if s.idstr == "timer")
    ticks, unused, clock = struct.unpack(">q8sq", t.body)
    assert ticks == clock >= 20_000_000 and unused == bytes(8) and t.version_id == 2
    assert g.vm_clock_ns() == clock  # frozen while stopped
    d = Guest.from_block_list([("pc.ram", MiB)], prespawn_vcpu=False)
    guests.append(d)
    d.load_device("timer", 0, 2, t.body)
    assert d.vm_clock_ns() == clock


def test_device_load_errors(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", MiB)])
    cpu = next(s for s in g.save_devices() if s.idstr == "cpu")
    with pytest.raises(DeviceLoadError, match="unknown device") as ei:
        g.load_device("e1000", 0, 1, b"\0" * 10)
    assert isinstance(ei.value, ValueError) and ei.value.idstr == "e1000"
    with pytest.raises(DeviceLoadError, match="newer than ours"):
        g.load_device("cpu", 0, 2, cpu.body)
    with pytest.raises(DeviceLoadError, match="older than"):
        g.load_device("timer", 0, 1, bytes(16))
    with pytest.raises(DeviceLoadError, match="expected 24"):
        g.load_device("timer", 0, 2, bytes(25))
    with pytest.raises(DeviceLoadError, match="too short"):
        g.load_device("globalstate", 0, 1, bytes(50))
    with pytest.raises(DeviceLoadError, match="too short"):
        g.load_device("cpu", 0, 1, cpu.body[:-1])
    with pytest.raises(DeviceLoadError, match="expected"):
        g.load_device("cpu", 0, 1, cpu.body + b"\0")
    # a cpu state for a block this guest does not have
    other = make(guests, [("pc.ram", 2 * MiB)], workload="uniform:rate=1000")
    body = next(s for s in other.save_devices() if s.idstr == "cpu").body
    with pytest.raises(DeviceLoadError, match="generation table has 512 pages"):
        g.load_device("cpu", 0, 1, body)
    assert g.workload_block is None  # nothing applied
    g.start()
    with pytest.raises(DeviceLoadError, match="runs"):
        g.load_device("timer", 0, 2, bytes(24))


def test_opaque_devices_resent_verbatim(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", MiB)])
    entry = {"name": "apic", "instance_id": 0, "vmsd_name": "apic", "version": 3, "fields": []}
    body = bytes(range(256)) * 3
    g.load_device("apic", 0, 3, body, vmdesc_entry=entry, unknown="opaque")
    g.store_opaque_device(DeviceState("kvmclock", 0, 1, b"\x01" * 9))
    states = {s.idstr: s for s in g.save_devices()}
    assert states["apic"] == DeviceState("apic", 0, 3, body) and states["apic"].vmdesc_entry is entry
    kc = states["kvmclock"]
    assert kc.body == b"\x01" * 9
    assert kc.vmdesc_entry is not None and sum(f["size"] for f in kc.vmdesc_entry["fields"]) == 9
    g.load_device("apic", 0, 4, b"new")  # a later section replaces it, any version
    assert {s.idstr: s for s in g.save_devices()}["apic"].body == b"new"
    with pytest.raises(ValueError, match="native"):
        g.store_opaque_device(DeviceState("timer", 0, 2, bytes(24)))


# ---------------------------------------------------------------------- workload specs


def test_parse_workload() -> None:
    assert parse_workload("none") == WorkloadSpec()
    assert not parse_workload(" none ").active
    assert parse_workload("uniform:rate=20000") == WorkloadSpec("uniform", rate=20000)
    h = parse_workload("hotset:rate=50000,size=64M")
    assert h == WorkloadSpec("hotset", rate=50000, size=64 * MiB)
    assert parse_workload("sweep:rate=100k") == WorkloadSpec("sweep", rate=100_000)
    full = parse_workload("hotset:rate=max,size=1GiB,offset=128M,block=/rom@etc/acpi/tables,seed=0x10")
    assert full == WorkloadSpec("hotset", None, GiB, 128 * MiB, "/rom@etc/acpi/tables", 16)
    for spec in (h, full, parse_workload("sweep:rate=3")):
        assert parse_workload(str(spec)) == spec
    bad = {
        "": "empty",
        "random:rate=1": "unknown workload pattern",
        "uniform": "needs options",
        "uniform:size=1M": "needs rate",
        "uniform:rate=0": "between 1 and",
        "uniform:rate=fast": "bad rate",
        "uniform:rate=1,rate=2": "twice",
        "uniform:rate=1,speed=2": "unknown workload option",
        "uniform:rate=1,size=1000": "multiple of 4096",
        "uniform:rate=1,size=lots": "bad workload size",
        "uniform:rate=1,seed=x": "bad workload seed",
        "uniform:rate": "key=value",
        "none:rate=1": "takes no options",
    }
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            parse_workload(spec)
    sizes = {"pc.ram": 128 * MiB, "small": MiB}
    plan = parse_workload("hotset:rate=10").resolve(sizes)
    assert (plan.block, plan.first_page, plan.n_pages) == ("pc.ram", 0, 16384)
    with pytest.raises(ValueError, match="does not fit"):
        parse_workload("hotset:rate=10,size=64M,offset=100M").resolve(sizes)
    with pytest.raises(ValueError, match="not a RAM block"):
        parse_workload("sweep:rate=10,block=nope").resolve(sizes)


# ---------------------------------------------------------------------- self-check


@pytest.mark.parametrize("fill", ["zero", "random"])
def test_check_clean_after_workload(guests: list[Guest], fill: str) -> None:
    g = make(guests, QEMU_LIKE, fill=fill, seed=11, workload="uniform:rate=max")
    g.start()
    time.sleep(0.3)
    with pytest.raises(GuestStateError):
        g.check()  # pages and table race while the vCPU runs
    g.stop()
    gens = g.generations("pc.ram")
    assert gens is not None and int((gens > 0).sum()) > 1000
    r = g.check()
    assert r == {"pages-checked": sum(b.n_pages for b in g.blocks.values()), "bad-pages": [], "bad-count": 0}


@pytest.mark.parametrize("fill", ["zero", "random"])
def test_check_detects_corrupt_and_stale_pages(guests: list[Guest], fill: str) -> None:
    g = make(guests, QEMU_LIKE, fill=fill, seed=3, workload="hotset:rate=max,size=1M")
    g.start()
    time.sleep(0.3)
    g.stop()
    gens = g.generations("pc.ram")
    assert gens is not None
    ram = g.blocks["pc.ram"]
    stale = int(np.flatnonzero(gens >= 2)[0])
    corrupt = int(np.flatnonzero(gens >= 1)[-1])
    untouched = int(np.flatnonzero(gens == 0)[-1])
    assert ram.pages[stale].tobytes() == page_image("pc.ram", stale, int(gens[stale]))
    ram.pages[stale] = np.frombuffer(page_image("pc.ram", stale, int(gens[stale]) - 1), np.uint8)
    ram.pages[corrupt, 2000] ^= 0x40
    ram.pages[untouched, 7] ^= 1
    g.blocks["/rom@etc/acpi/tables"].pages[3] = np.frombuffer(page_image("pc.ram", 3, 1), np.uint8)
    r = g.check()
    assert r["bad-count"] == 4
    by_page = {(b["block"], b["page"]): b["reason"] for b in r["bad-pages"]}
    assert by_page[("pc.ram", stale)] == f"stale: holds generation {gens[stale] - 1}, expected {gens[stale]}"
    assert by_page[("pc.ram", corrupt)] == f"corrupt body (generation {gens[corrupt]})"
    assert by_page[("pc.ram", untouched)] == f"not the initial {fill} fill"
    assert "never written" in by_page[("/rom@etc/acpi/tables", 3)]


def test_check_reports_lost_page_and_caps_list() -> None:
    with RamBlock("pc.ram", 4 * MiB) as b:
        gens = np.zeros(b.n_pages, np.uint32)
        gens[:300] = 5  # the table says written, the memory is still a hole
        r = check_block(b, gens, Fill("zero")).to_dict()
        assert r["bad-count"] == 300 and len(r["bad-pages"]) == 100
        assert r["bad-pages"][0] == {
            "block": "pc.ram",
            "page": 0,
            "reason": "zero page, expected generation 5",
        }


def test_destination_continues_the_workload(guests: list[Guest]) -> None:
    src = make(guests, QEMU_LIKE, fill="random", seed=9, workload="sweep:rate=max,size=8M")
    src.start()
    time.sleep(0.2)
    src.store_global_state()
    src.stop("finish-migrate")
    written = src.stats()["pages-written"]
    assert written > 2048  # the sweep wrapped at least once
    dst = migrate_offline(src, guests)
    assert dst.digest() == src.digest()
    assert dst.check()["bad-count"] == 0
    src_gens = src.generations("pc.ram")
    assert src_gens is not None
    before = src_gens.copy()
    assert dst.received_global_state == "running"
    dst.start()
    time.sleep(0.2)
    dst.stop()
    dst_gens = dst.generations("pc.ram")
    assert dst_gens is not None
    assert dst.stats()["pages-written"] > written
    assert (dst_gens >= before).all() and (dst_gens > before).any()
    # the sweep continued from where it stopped: it advances every page in turn, so all
    # generations of its range stay within 1 of each other
    assert int(dst_gens[:2048].max()) - int(dst_gens[:2048].min()) <= 1
    assert dst.check()["bad-count"] == 0


# ---------------------------------------------------------------------- vCPU control


def test_pause_really_stops_writes(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", 16 * MiB)], workload="uniform:rate=max")
    for _ in range(3):
        g.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        g.stop()
        assert time.perf_counter() - t0 < 0.5
        d1, n1 = g.digest(), g.stats()["pages-written"]
        time.sleep(0.1)
        assert (g.digest(), g.stats()["pages-written"]) == (d1, n1)
        assert g.run_state == "paused"
    assert n1 > 0


def test_rate_and_throttle(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", 64 * MiB)], workload="uniform:rate=40000")
    g.start()

    def rate(seconds: float) -> float:
        n0, t0 = g.stats()["pages-written"], time.perf_counter()
        time.sleep(seconds)
        return (g.stats()["pages-written"] - n0) / (time.perf_counter() - t0)

    rate(0.1)  # warm up (first touch of the pages)
    full = rate(0.5)
    assert 25000 < full < 44000  # 40000 asked (slack for a busy machine)
    g.set_throttle(75)
    rate(0.05)
    throttled = rate(0.5)
    assert throttled < 0.45 * full  # ~25% expected
    stats = g.vcpu_stats()
    assert stats["throttle-pct"] == 75 and stats["throttle-seconds"] > 0.2
    g.set_throttle(0)
    rate(0.05)
    assert rate(0.3) > 0.7 * full
    with pytest.raises(ValueError):
        g.set_throttle(100)


@pytest.mark.parametrize("when", ["running", "paused"])
def test_vcpu_crash_is_reported(guests: list[Guest], when: str) -> None:
    g = make(guests, [("pc.ram", 16 * MiB)], workload="uniform:rate=10000", control_timeout=2.0)
    g.start()
    if when == "paused":
        g.stop()
    pid = g.vcpu_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while g.run_state != "crashed" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert g.run_state == "crashed"
    t0 = time.perf_counter()
    for call in (g.sync_dirty, g.start, g.stop, lambda: g.set_throttle(5)):
        with pytest.raises(VcpuCrashed, match=r"crashed|exited"):
            call()
    assert time.perf_counter() - t0 < 1
    g.close()  # no exception, no hang


def test_hung_vcpu_times_out(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", 16 * MiB)], workload="uniform:rate=10000", control_timeout=0.5)
    g.start()
    pid = g.vcpu_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # alive but silent
    t0 = time.perf_counter()
    with pytest.raises(VcpuCrashed, match="no reply"):
        g.sync_dirty()
    assert 0.4 < time.perf_counter() - t0 < 3
    assert g.run_state == "crashed"
    with pytest.raises(OSError):
        os.kill(pid, 0)  # it was killed: a vCPU that may still write cannot be trusted
