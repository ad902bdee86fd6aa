"""Postcopy faults in the guest model: a vCPU touching a page not yet present blocks until the
daemon places it (write the bytes, set the present byte, wake), like userfaultfd."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator

import numpy as np
import pytest

from guest import Guest, GuestStateError
from guest.shared import FAULT_RING, H_POSTCOPY, H_RNG_POS, SharedState
from guest.workload import PageNotPresent, parse_workload, write_batch

MiB = 1 << 20
BLOCK = "pc.ram"
SPEC = "uniform:rate=max,size=4M"  # 1024 pages of an 8 MiB block: a 256-page batch hits ~230


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for g in made:
        g.close()


def source_and_dest(guests: list[Guest], spec: str = SPEC) -> tuple[Guest, Guest]:
    """A source that ran a little, and a destination that has its devices but none of its RAM
    (all zero), as at POSTCOPY_RUN with nothing sent in precopy."""
    src = Guest.create([(BLOCK, 8 * MiB), ("rom", 256 * 1024)], fill="random", seed=3, workload=spec)
    guests.append(src)
    src.start()
    time.sleep(0.05)
    src.stop()
    assert src.stats()["pages-written"] > 0
    dst = Guest.from_block_list(src.block_list())
    guests.append(dst)
    assert dst.postcopy_block() is None  # no workload state before the cpu device
    for name, block in src.blocks.items():
        if name != BLOCK:
            dst.blocks[name].array[:] = block.array
    for st in src.save_devices():
        dst.load_device(st.idstr, st.instance_id, st.version_id, st.body)
    assert dst.postcopy_block() == BLOCK
    return src, dst


def wait_faults(g: Guest, timeout: float = 1.0) -> np.ndarray:
    """The next non-empty set of faulted pages (fails the test after ``timeout``)."""
    fd = g.fault_fileno()
    assert fd is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([fd], [], [], left)
        pages = g.read_faults()
        if len(pages):
            return pages
    pytest.fail(f"no fault within {timeout} s")


def place(src: Guest, dst: Guest, present: np.ndarray, pages: np.ndarray) -> None:
    """What mig_dest does with an arrived page: contents first, then the present byte."""
    dst.blocks[BLOCK].pages[pages] = src.blocks[BLOCK].pages[pages]
    present[pages] = True
    dst.wake_vcpu()


def writes(g: Guest) -> int:
    return int(g.stats()["pages-written"])


def test_arm_errors_and_channel(guests: list[Guest]) -> None:
    src = Guest.create([(BLOCK, 8 * MiB)], workload=SPEC, prespawn_vcpu=False)
    guests.append(src)
    dst = Guest.from_block_list(src.block_list())
    guests.append(dst)
    with pytest.raises(GuestStateError, match="cpu device"):
        dst.arm_postcopy(np.zeros(2048, bool))
    assert dst.fault_fileno() is None and len(dst.read_faults()) == 0
    dst.wake_vcpu()  # no channel yet: a no-op
    for st in src.save_devices():
        dst.load_device(st.idstr, st.instance_id, st.version_id, st.body)
    with pytest.raises(GuestStateError, match="2048 pages"):
        dst.arm_postcopy(np.zeros(2047, bool))
    received = np.zeros(2048, bool)
    received[::3] = True
    present = dst.arm_postcopy(received)
    assert present.dtype == np.bool_ and np.array_equal(present, received)
    assert dst.postcopy_armed and dst.fault_fileno() is not None
    present[1] = True  # the view IS the shared map the vCPU reads
    assert dst._shared is not None and dst._shared.present[1] == 1
    dst.start()
    with pytest.raises(GuestStateError, match="stopped"):
        dst.arm_postcopy(received)
    dst.stop()
    dst.disarm_postcopy()
    assert not dst.postcopy_armed


def test_write_batch_refuses_absent_pages() -> None:
    shared = SharedState(256)
    try:
        plan = parse_workload("sweep:rate=max").resolve({BLOCK: 256 * 4096})
        words = np.zeros((256, 512), np.uint64)
        shared.set(H_POSTCOPY, 1)
        shared.present[:8] = 1
        write_batch(words, shared, plan, np.uint64(1), 8)  # pages 0..7: present
        assert shared.get(H_RNG_POS) == 8
        with pytest.raises(PageNotPresent):
            write_batch(words, shared, plan, np.uint64(1), 1)  # page 8 is not
        assert shared.get(H_RNG_POS) == 8 and not words[8:].any()
    finally:
        shared.close()


def test_faults_block_until_present_and_are_resent(guests: list[Guest]) -> None:
    _src, dst = source_and_dest(guests)
    gens_before = dst.generations(BLOCK).copy()  # type: ignore[union-attr]
    w0 = writes(dst)
    present = dst.arm_postcopy(np.zeros(dst.blocks[BLOCK].n_pages, bool))
    dst.start()
    faults = wait_faults(dst)
    assert faults.dtype == np.intp and np.array_equal(faults, np.unique(faults))
    assert 0 < len(faults) <= 1024 and faults.max() < 1024  # the workload's range, one batch at most
    # program order: the vCPU blocks on its next access, the stream's page at RNG_POS
    assert dst._shared is not None
    assert np.array_equal(faults, dst._plan().pages(dst._shared.get(H_RNG_POS), 1))
    t0 = time.monotonic()
    time.sleep(0.1)
    assert writes(dst) == w0
    assert not dst.blocks[BLOCK].array.any()  # not a byte written while nothing is present
    assert np.array_equal(dst.generations(BLOCK), gens_before)  # type: ignore[arg-type]
    # no wake: after a second the vCPU asks again for the same pages
    again = wait_faults(dst, timeout=1.5)
    assert time.monotonic() - t0 > 0.8
    assert np.array_equal(again, faults)
    assert dst.vcpu_stats()["fault-messages"] >= 2
    assert writes(dst) == w0 and not present.any()
    dst.stop()


def test_vcpu_progresses_only_over_present_pages(guests: list[Guest]) -> None:
    src, dst = source_and_dest(guests)
    n = dst.blocks[BLOCK].n_pages
    gens_before = dst.generations(BLOCK).copy()  # type: ignore[union-attr]
    w0 = writes(dst)
    present = dst.arm_postcopy(np.zeros(n, bool))
    dst.start()
    placed = np.zeros(n, bool)
    for _ in range(3):
        faults = wait_faults(dst)
        assert not present[faults].any()  # a fault names only absent pages
        place(src, dst, present, faults)
        placed[faults] = True
    wait_faults(dst)  # what the third placement allowed is written: the vCPU is blocked again
    dst.stop()
    assert writes(dst) - w0 >= 3  # every placement let at least the faulting access through
    gens = dst.generations(BLOCK)
    assert gens is not None
    touched = gens != gens_before
    assert touched.any() and not (touched & ~placed).any()  # written pages were all present
    untouched = dst.blocks[BLOCK].pages[~placed]
    assert not untouched.any()  # pages never placed: byte-for-byte what was there (zeros)
    # the rest arrives: the whole guest is consistent (placed pages hold src bytes or new writes)
    place(src, dst, present, np.flatnonzero(~placed))
    assert dst.check()["bad-count"] == 0


def test_pause_and_fence_while_blocked(guests: list[Guest]) -> None:
    src, dst = source_and_dest(guests)
    w0 = writes(dst)
    present = dst.arm_postcopy(np.zeros(dst.blocks[BLOCK].n_pages, bool))
    dst.start()
    faults = wait_faults(dst)
    t0 = time.monotonic()
    dst.start_dirty_log()  # two fences
    assert not dst.sync_dirty()[BLOCK].any()  # a fence, and nothing was written
    stats = dst.vcpu_stats()
    assert stats["running"] and stats["faults"] == 0
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    dst.stop()
    assert time.monotonic() - t0 < 0.5
    assert not dst.vcpu_stats()["running"]
    # placed while paused: the abandoned batch is not written behind our back
    place(src, dst, present, faults)
    time.sleep(0.05)
    assert writes(dst) == w0
    # running again recomputes the access from RNG_POS: now it is present and goes through
    dst.start()
    nxt = wait_faults(dst)
    assert writes(dst) > w0
    assert not present[nxt].any()
    dirty = dst.sync_dirty()[BLOCK]
    assert dirty.any() and present[dirty].all()
    dst.stop()


def test_disarm_runs_freely(guests: list[Guest]) -> None:
    src, dst = source_and_dest(guests)
    w0 = writes(dst)
    present = dst.arm_postcopy(np.zeros(dst.blocks[BLOCK].n_pages, bool))
    dst.start()
    wait_faults(dst)
    # the rest of RAM arrives in bulk, without flipping present bytes, then postcopy ends
    dst.blocks[BLOCK].array[:] = src.blocks[BLOCK].array
    dst.disarm_postcopy()
    deadline = time.monotonic() + 1.0
    while writes(dst) < w0 + 20 * 256 and time.monotonic() < deadline:
        time.sleep(0.01)
    dst.stop()
    assert writes(dst) >= w0 + 20 * 256
    assert len(dst.read_faults()) == 0 and not present.any()
    assert dst.fault_stats()["faults"] == 1  # the blocked batch, released by the disarm wake
    assert dst.check()["bad-count"] == 0


def test_fault_stats(guests: list[Guest]) -> None:
    src, dst = source_and_dest(guests)
    assert dst.fault_stats() == {"faults": 0, "blocked-ns": 0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0}
    present = dst.arm_postcopy(np.zeros(dst.blocks[BLOCK].n_pages, bool))
    dst.start()
    delay = 0.01
    n = 6
    for _ in range(n):
        faults = wait_faults(dst)
        time.sleep(delay)  # the "network": every fault waits at least this long
        place(src, dst, present, faults)
    deadline = time.monotonic() + 1.0
    while dst.fault_stats()["faults"] < n and time.monotonic() < deadline:
        time.sleep(0.005)
    dst.stop()
    st = dst.fault_stats()
    assert st["faults"] == n == dst.vcpu_stats()["faults"]
    assert delay * 1e6 <= st["p50-us"] <= st["p99-us"] <= st["max-us"] < 500_000
    assert n * delay * 1e9 <= st["blocked-ns"] <= n * st["max-us"] * 1000 + 1
    assert dst._shared is not None and not dst._shared.fault_ring[n:FAULT_RING].any()
    dst.arm_postcopy(present.copy())  # re-arming starts the statistics afresh
    assert dst.fault_stats()["faults"] == 0


def test_all_placed_guest_passes_check(guests: list[Guest]) -> None:
    src, dst = source_and_dest(guests, "hotset:rate=200000,size=2M")
    n = dst.blocks[BLOCK].n_pages
    received = np.zeros(n, bool)
    received[n // 2 :] = True  # precopy sent the upper half (outside the hot set)
    dst.blocks[BLOCK].pages[n // 2 :] = src.blocks[BLOCK].pages[n // 2 :]
    present = dst.arm_postcopy(received)
    dst.start()
    w0 = writes(dst)
    # a daemon serving faults first, while background pages stream in from the bottom
    fd = dst.fault_fileno()
    assert fd is not None
    background = iter(range(0, n // 2, 64))
    while not present.all():
        if select.select([fd], [], [], 0.002)[0]:
            faults = dst.read_faults()
            place(src, dst, present, faults[~present[faults]])
        lo = next(background, None)
        if lo is not None:
            chunk = np.arange(lo, lo + 64)
            place(src, dst, present, chunk[~present[chunk]])
    time.sleep(0.05)  # all present and still armed: the vCPU runs freely
    dst.stop()
    assert writes(dst) > w0 and dst.fault_stats()["faults"] > 0
    result = dst.check()
    assert result["bad-count"] == 0, result["bad-pages"][:5]
    assert result["pages-checked"] == sum(b.n_pages for b in dst.blocks.values())
