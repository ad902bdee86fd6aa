"""The memory invariant of the boot-sector guest (:mod:`tests.qemu_guest.bootsector`).

With ``c`` = the pass counter (dword at PASS_COUNTER_ADDR) mod 256, the first bytes of the pages
DIRTY_START..DIRTY_END are ``c + 1`` (mod 256) for a prefix of the pages and ``c`` for the rest:
one boundary, where the guest was stopped mid-pass. The prefix may be empty (stopped between
passes) or cover every page (stopped after the last page of a pass, before the counter
increment). Any lost, duplicated or misplaced page write breaks it (unless the lost write happens
to hit exactly the boundary, which no copy bug does consistently).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bootsector import DIRTY_END, DIRTY_PAGES, DIRTY_START, PAGE, PASS_COUNTER_ADDR

MAX_REPORTED = 20


@dataclass
class InvariantResult:
    ok: bool
    counter: int  # the full 32-bit pass counter
    boundary: int | None  # pages in the c+1 prefix (None when the invariant fails)
    violations: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        if self.ok:
            return (
                f"invariant holds: pass counter {self.counter}, {self.boundary} of {DIRTY_PAGES} pages "
                f"already in pass {self.counter + 1}"
            )
        return f"invariant VIOLATED (pass counter {self.counter}):\n  " + "\n  ".join(self.violations)


def _as_u8(ram: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(ram, np.ndarray):
        return ram.reshape(-1).view(np.uint8)
    return np.frombuffer(ram, dtype=np.uint8)


def first_bytes(ram: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """The first byte of every page DIRTY_START..DIRTY_END of a dump starting at guest address 0."""
    mem = _as_u8(ram)
    return mem[DIRTY_START:DIRTY_END:PAGE]


def pass_counter(ram: bytes | bytearray | memoryview | np.ndarray) -> int:
    mem = _as_u8(ram)
    return int(mem[PASS_COUNTER_ADDR : PASS_COUNTER_ADDR + 4].view("<u4")[0])


def check_invariant(ram: bytes | bytearray | memoryview | np.ndarray) -> InvariantResult:
    """Check the invariant on a memory dump starting at guest physical address 0.

    ``ram`` must cover at least DIRTY_END bytes (e.g. a pmemsave of 0..RAM end, or the
    reconstructed ``pc.ram`` block, whose offsets equal guest physical addresses below 4 GiB).
    """
    mem = _as_u8(ram)
    if len(mem) < DIRTY_END:
        return InvariantResult(
            False, -1, None, [f"dump is {len(mem):#x} bytes, needs at least {DIRTY_END:#x}"]
        )
    counter = pass_counter(mem)
    c = counter & 0xFF
    hi = (c + 1) & 0xFF
    fb = first_bytes(mem)
    # the prefix of pages already bumped in the running pass, then the rest
    is_hi = fb == hi
    boundary = len(fb) if is_hi.all() else int(np.argmin(is_hi))
    rest_ok = fb[boundary:] == c
    if rest_ok.all():
        return InvariantResult(True, counter, boundary)
    bad = boundary + np.flatnonzero(~rest_ok)
    violations = [
        f"{len(bad)} page(s) after the boundary at page {boundary} "
        f"(guest address {DIRTY_START + boundary * PAGE:#x}) hold neither c={c} nor (before it) c+1={hi}"
    ]
    for i in bad[:MAX_REPORTED]:
        i = int(i)
        violations.append(f"page {DIRTY_START + i * PAGE:#010x}: first byte {int(fb[i])}, expected {c}")
    if len(bad) > MAX_REPORTED:
        violations.append(f"... and {len(bad) - MAX_REPORTED} more")
    return InvariantResult(False, counter, None, violations)
