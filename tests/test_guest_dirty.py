"""Dirty logging: no write is ever lost by a sync racing the vCPU, and a precopy loop built on
it converges to an identical copy."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from guest import Guest

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    made: list[Guest] = []
    yield made
    for g in made:
        g.close()


def make(guests: list[Guest], *args: object, **kw: object) -> Guest:
    g = Guest.create(*args, **kw)  # type: ignore[arg-type]
    guests.append(g)
    return g


@pytest.mark.parametrize("spec", ["uniform:rate=max", "hotset:rate=200000,size=2M", "sweep:rate=max"])
def test_no_write_is_lost(guests: list[Guest], spec: str) -> None:
    """Generations only grow, and each write bumps its page's generation before its dirty bit is
    set (same batch). So with snapshots of the generation table taken around every sync:

    * a page whose generation changed between the snapshot after sync a and the snapshot before
      sync b was written in between, and must be in sync b's result (nothing lost);
    * a page in sync b's result must have changed between the snapshot before sync a and the one
      after sync b (nothing invented).
    """
    g = make(guests, [("pc.ram", 64 * MiB), ("pc.bios", 256 * 1024)], workload=spec)
    gens = g.generations("pc.ram")
    assert gens is not None
    g.start()
    time.sleep(0.05)
    prev_before = gens.copy()
    g.start_dirty_log()
    prev_after = gens.copy()
    raced = syncs = 0
    reported = np.zeros(len(gens), bool)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        before = gens.copy()
        dirty = g.sync_dirty()
        after = gens.copy()
        d = dirty["pc.ram"]
        assert d.dtype == np.bool_ and d.shape == gens.shape
        assert not dirty["pc.bios"].any() and dirty["pc.bios"].shape == (64,)
        lost = (before != prev_after) & ~d
        assert not lost.any(), f"sync {syncs}: writes lost for pages {np.flatnonzero(lost)[:10]}"
        invented = d & (after == prev_before)
        assert not invented.any(), (
            f"sync {syncs}: pages reported but never written {np.flatnonzero(invented)[:10]}"
        )
        raced += bool((after != before).any())  # writes landed while this sync ran
        reported |= d
        syncs += 1
        prev_before, prev_after = before, after
        if syncs % 7 == 0:  # pause/resume and throttle changes interleaved with syncs
            g.stop()
            g.sync_dirty()["pc.ram"]  # stopped: a direct swap, still get-and-clear
            prev_before, prev_after = gens.copy(), gens.copy()
            g.set_throttle(50 if syncs % 2 else 0)
            g.start()
    g.stop()
    assert syncs > 50 and raced > 10, (syncs, raced)
    assert reported.any()


def test_concurrent_syncs_from_threads(guests: list[Guest]) -> None:
    """Syncs from several threads at once are serialised; the union of what they return equals
    every page written while logging."""
    g = make(guests, [("pc.ram", 32 * MiB)], workload="uniform:rate=max")
    gens = g.generations("pc.ram")
    assert gens is not None
    g.start()
    before_start = gens.copy()
    g.start_dirty_log()
    start = gens.copy()
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(100):
            d = g.sync_dirty()["pc.ram"]
            with lock:
                results.append(d)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g.stop()
    results.append(g.sync_dirty()["pc.ram"])
    union = np.logical_or.reduce(results)
    assert not ((gens != start) & ~union).any()  # nothing lost
    assert not (union & (gens == before_start)).any()  # nothing invented
    assert len(results) == 301 and union.sum() > 1000


@pytest.mark.parametrize("fill", ["zero", "random"])
def test_precopy_loop_converges_to_identical_copy(guests: list[Guest], fill: str) -> None:
    """The migration's use: copy everything, then only what sync reports, while the vCPU
    writes; after the final stop + sync + copy the copy equals the source byte for byte."""
    g = make(guests, [("pc.ram", 64 * MiB)], fill=fill, seed=4, workload="hotset:rate=max,size=16M,offset=8M")
    ram = g.blocks["pc.ram"].pages
    g.start()
    g.start_dirty_log()
    copy = ram.copy()  # the "first pass": all pages, read after logging started
    for _ in range(30):
        idx = np.flatnonzero(g.sync_dirty()["pc.ram"])
        copy[idx] = ram[idx]
        time.sleep(0.005)
    g.stop()
    idx = np.flatnonzero(g.sync_dirty()["pc.ram"])
    copy[idx] = ram[idx]
    assert np.array_equal(copy, ram)
    assert g.check()["bad-count"] == 0


def test_logging_start_stop(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", 16 * MiB)], workload="uniform:rate=max")
    g.start()
    time.sleep(0.05)
    g.start_dirty_log()  # clears what was logged before (nothing: logging was off)
    time.sleep(0.05)
    assert g.sync_dirty()["pc.ram"].any()
    g.stop_dirty_log()
    g.sync_dirty()  # drains a batch that was in flight when logging stopped
    time.sleep(0.05)
    assert not g.sync_dirty()["pc.ram"].any()
    assert not g.dirty_logging
    g.start_dirty_log()
    time.sleep(0.02)
    assert g.sync_dirty()["pc.ram"].any()


def test_sync_while_stopped_needs_no_vcpu(guests: list[Guest]) -> None:
    """A stopped vCPU is not asked anything: even a frozen process cannot delay the sync."""
    g = make(guests, [("pc.ram", 16 * MiB)], workload="uniform:rate=max", control_timeout=0.5)
    g.start()
    g.start_dirty_log()
    time.sleep(0.05)
    g.stop()
    pid = g.vcpu_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        first = g.sync_dirty()["pc.ram"]
        second = g.sync_dirty()["pc.ram"]
        assert time.perf_counter() - t0 < 0.1
        assert first.any() and not second.any()
    finally:
        os.kill(pid, signal.SIGCONT)
    g.start()  # still healthy
    time.sleep(0.02)
    assert g.sync_dirty()["pc.ram"].any()


def test_sync_of_1gib_is_fast(guests: list[Guest]) -> None:
    g = make(guests, [("pc.ram", GiB), ("pc.bios", 256 * 1024)], workload="uniform:rate=100000")
    g.start()
    g.start_dirty_log()
    time.sleep(0.1)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        d = g.sync_dirty()
        times.append(time.perf_counter() - t0)
        np.flatnonzero(d["pc.ram"])
        time.sleep(0.005)
    assert d["pc.ram"].shape == (262144,)
    assert sorted(times)[len(times) // 2] < 0.01, times  # median: well under 10 ms
