"""The vCPU's shared state: one memfd mapped by the daemon and by the vCPU process.

Layout (all little-endian, native to both processes)::

    0       header: 64 uint64 words (see the H_* indexes)
    4096    generation table: uint32 per page of the workload's block (0 = never written)
    ...     dirty bitmap 0: uint8 per page (1 = written since the last sync)
    ...     dirty bitmap 1: the other half of the double buffer
    ...     present: uint8 per page (1 = the page has arrived here; postcopy only)
    ...     fault ring: FAULT_RING uint64, the blocked time (ns) of fault i at entry i % FAULT_RING

Each area starts on a 4096-byte boundary.

Ownership: the vCPU process writes page contents, generations, WRITES and RNG_POS, and sets
bytes in bitmap ``ACTIVE``. The daemon writes ACTIVE and LOGGING, clears the inactive bitmap, and
rewrites counters and generations only while the vCPU is stopped (e.g. loading migrated state).
The vCPU reads ACTIVE and LOGGING once per batch of page writes; see :mod:`guest.dirty` for why
that makes the log race-free.

Postcopy (see :meth:`guest.model.Guest.arm_postcopy`): the daemon sets ``present`` bytes (only
ever 0 -> 1, each after the page's contents are in place) and POSTCOPY; the vCPU only reads them.
While POSTCOPY is 1 the vCPU writes no page that is not present: it writes the present prefix of
a batch, blocks on the first missing page until it is present, and then records the time it was
blocked: ring entry first, then FAULT_NS and FAULT_MAX_NS, then FAULTS,
so a reader never counts an entry not yet written. The daemon resets the fault words only while
the vCPU is stopped.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

STATE_MAGIC = 0x3154534755504356  # "VCPUGST1"
HEADER_WORDS = 64
_ALIGN = 4096

H_MAGIC = 0
H_NPAGES = 1
H_ACTIVE = 2  # index (0/1) of the bitmap the vCPU marks
H_LOGGING = 3  # 1: the vCPU marks pages it writes
H_WRITES = 4  # total pages written by the workload since the guest was created
H_RNG_POS = 5  # position in the workload's counter-based page stream
H_RNG_SEED = 6  # seed of that stream
H_POSTCOPY = 7  # 1: the vCPU must find every page of a batch present before writing it
H_FAULTS = 8  # postcopy faults resolved (batches that had to wait for pages)
H_FAULT_NS = 9  # total time the vCPU was blocked on those faults
H_FAULT_MAX_NS = 10  # longest single fault

FAULT_RING = 65536  # per-fault blocked times kept for percentiles (the last ones)


def _round(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SharedState:
    """Header, generation table, double-buffered dirty bitmap, postcopy present map and fault
    ring of one RAM block."""

    def __init__(self, n_pages: int, *, fd: int | None = None) -> None:
        if n_pages <= 0:
            raise ValueError("shared vCPU state needs at least one page")
        self.n_pages = n_pages
        gen_off = _ALIGN
        bm_off = gen_off + _round(4 * n_pages)
        bm_len = _round(n_pages)
        present_off = bm_off + 2 * bm_len
        ring_off = present_off + bm_len
        size = ring_off + 8 * FAULT_RING
        created = fd is None
        if fd is None:
            fd = os.memfd_create("guest:vcpu-state", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
        elif os.fstat(fd).st_size != size:
            raise ValueError(f"vCPU state fd has {os.fstat(fd).st_size} bytes, expected {size}")
        self._fd = fd
        self._mmap: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self.header: np.ndarray = buf[: 8 * HEADER_WORDS].view(np.uint64)
        self.generations: np.ndarray = buf[gen_off : gen_off + 4 * n_pages].view(np.uint32)
        self.bitmaps: np.ndarray = buf[bm_off:present_off].reshape(2, bm_len)[:, :n_pages]
        self.present: np.ndarray = buf[present_off : present_off + n_pages]
        self.fault_ring: np.ndarray = buf[ring_off:].view(np.uint64)
        if created:
            self.header[H_MAGIC] = STATE_MAGIC
            self.header[H_NPAGES] = n_pages
        elif self.header[H_MAGIC] != STATE_MAGIC or self.header[H_NPAGES] != n_pages:
            raise ValueError("vCPU state fd has a bad header")

    @property
    def fd(self) -> int:
        if self._mmap is None:
            raise ValueError("vCPU state is closed")
        return self._fd

    def get(self, index: int) -> int:
        return int(self.header[index])

    def set(self, index: int, value: int) -> None:
        self.header[index] = value

    def record_fault(self, blocked_ns: int) -> None:
        """vCPU side: one resolved fault (ring entry before the count, see the module doc)."""
        h = self.header
        n = int(h[H_FAULTS])
        self.fault_ring[n % FAULT_RING] = blocked_ns
        h[H_FAULT_NS] += np.uint64(blocked_ns)
        if blocked_ns > int(h[H_FAULT_MAX_NS]):
            h[H_FAULT_MAX_NS] = blocked_ns
        h[H_FAULTS] = n + 1

    def reset_faults(self) -> None:
        """Daemon side, vCPU stopped: forget the fault statistics."""
        for i in (H_FAULTS, H_FAULT_NS, H_FAULT_MAX_NS):
            self.header[i] = 0

    def fault_stats(self) -> dict[str, int | float]:
        """Count, total and percentiles (µs) of the blocked times; zeros when no fault."""
        n = int(self.header[H_FAULTS])
        total = int(self.header[H_FAULT_NS])
        worst = int(self.header[H_FAULT_MAX_NS])
        if n == 0:
            return {"faults": 0, "blocked-ns": 0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0}
        times = self.fault_ring[: min(n, FAULT_RING)].astype(np.float64)
        p50, p99 = np.percentile(times, [50, 99]) / 1000.0
        return {
            "faults": n,
            "blocked-ns": total,
            "p50-us": round(float(p50), 3),
            "p99-us": round(float(p99), 3),
            "max-us": round(worst / 1000.0, 3),
        }

    def close(self) -> None:
        m, self._mmap = self._mmap, None
        if m is None:
            return
        empty = np.empty(0, np.uint8)
        self.header = self.generations = self.present = self.fault_ring = empty
        self.bitmaps = empty.reshape(2, 0)
        with contextlib.suppress(BufferError):  # a view still alive: unmapped when it is gone
            m.close()
        os.close(self._fd)
        self._fd = -1
