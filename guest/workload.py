"""The vCPU workload: what pages it writes, how fast, and the batch that writes them.

Spec strings (CLI flags)::

    none
    uniform:rate=20000               random pages of the whole block
    hotset:rate=50000,size=64M       random pages of a hot range (default 64M at offset 0)
    sweep:rate=100000                sequential pages, wrapping
    ...,offset=128M,block=pc.ram,seed=7     options of every pattern; rate=max: unthrottled

The page stream is counter-based: page number ``i`` of the stream is a pure function of
(pattern, range, seed, i). The stream position lives in the shared state, so a destination
continues the exact stream from the migrated position, with no RNG object to serialise.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .check import splitmix64, write_pages
from .ram import PAGE_SIZE
from .shared import H_ACTIVE, H_LOGGING, H_POSTCOPY, H_RNG_POS, H_WRITES, SharedState

PATTERNS = ("none", "uniform", "hotset", "sweep")
DEFAULT_HOTSET = 64 << 20
MAX_RATE = 100_000_000
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)(?:i?B)?$", re.IGNORECASE)
_RATE_RE = re.compile(r"^(\d+)\s*([KM]?)$", re.IGNORECASE)
_RATE_UNIT: Mapping[str, int] = MappingProxyType({"": 1, "K": 1000, "M": 1_000_000})
_SHIFT: Mapping[str, int] = MappingProxyType({"": 0, "K": 10, "M": 20, "G": 30, "T": 40})


def parse_size(text: str, what: str = "size") -> int:
    """``4096``, ``64K``, ``64M``, ``1G``, ``1GiB`` (binary units) -> bytes."""
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad {what} {text!r}: expected a number of bytes with optional K/M/G/T suffix")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def format_size(n: int) -> str:
    for suffix, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _parse_rate(text: str) -> int | None:
    if text.strip().lower() == "max":
        return None
    m = _RATE_RE.match(text.strip())
    if not m:
        raise ValueError(f"bad rate {text!r}: expected pages per second (e.g. 20000, 100k) or 'max'")
    rate = int(m.group(1)) * _RATE_UNIT[m.group(2).upper()]
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be between 1 and {MAX_RATE} pages/s, got {rate}")
    return rate


@dataclass(frozen=True)
class WorkloadSpec:
    """What the vCPU does. ``rate`` None means as fast as it can; ``size`` None means the rest
    of the block after ``offset`` (``hotset``: 64 MiB); ``block`` None means the largest block;
    ``seed`` None means derived from the guest's seed."""

    pattern: str = "none"
    rate: int | None = None
    size: int | None = None
    offset: int = 0
    block: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(
                f"unknown workload pattern {self.pattern!r}; expected one of {', '.join(PATTERNS)}"
            )
        if self.rate is not None and not 0 < self.rate <= MAX_RATE:
            raise ValueError(f"rate must be between 1 and {MAX_RATE} pages/s, got {self.rate}")
        for what, v in (("size", self.size), ("offset", self.offset)):
            if v is not None and (v < 0 or v % PAGE_SIZE):
                raise ValueError(f"workload {what} must be a non-negative multiple of {PAGE_SIZE}, got {v}")
        if self.size == 0:
            raise ValueError("workload size must not be zero")
        if self.block is not None and (not self.block or any(c in self.block for c in ",=")):
            raise ValueError(f"workload block name {self.block!r} is empty or contains ',' or '='")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError(f"workload seed must fit in 64 bits unsigned, got {self.seed}")

    @property
    def active(self) -> bool:
        return self.pattern != "none"

    def __str__(self) -> str:
        """Canonical spec string; ``parse_workload(str(spec)) == spec``."""
        if not self.active:
            return "none"
        opts = [f"rate={'max' if self.rate is None else self.rate}"]
        if self.size is not None:
            opts.append(f"size={format_size(self.size)}")
        if self.offset:
            opts.append(f"offset={format_size(self.offset)}")
        if self.block is not None:
            opts.append(f"block={self.block}")
        if self.seed is not None:
            opts.append(f"seed={self.seed}")
        return f"{self.pattern}:{','.join(opts)}"

    def target_block(self, block_sizes: Mapping[str, int]) -> str:
        """The block the workload writes: ``block`` or the largest one (first of equals)."""
        if self.block is not None:
            if self.block not in block_sizes:
                raise ValueError(f"workload block {self.block!r} is not a RAM block of this guest")
            return self.block
        if not block_sizes:
            raise ValueError("the guest has no RAM block for the workload")
        return max(block_sizes, key=lambda n: block_sizes[n])

    def resolve(self, block_sizes: Mapping[str, int], default_seed: int = 0) -> WorkloadPlan:
        """Bind the spec to a concrete block: page range and seed, validated."""
        if not self.active:
            raise ValueError("workload 'none' writes nothing")
        block = self.target_block(block_sizes)
        bsize = block_sizes[block]
        size = self.size
        if size is None:
            size = (
                min(DEFAULT_HOTSET, bsize - self.offset) if self.pattern == "hotset" else bsize - self.offset
            )
        if size <= 0 or self.offset + size > bsize:
            raise ValueError(
                f"workload range offset={format_size(self.offset)} size={format_size(max(size, 0))} "
                f"does not fit in block {block!r} of {format_size(bsize)}"
            )
        seed = default_seed if self.seed is None else self.seed
        return WorkloadPlan(
            self.pattern, self.rate, block, self.offset // PAGE_SIZE, size // PAGE_SIZE, seed % (1 << 64)
        )


def parse_workload(spec: str) -> WorkloadSpec:
    """Parse ``none`` / ``PATTERN:rate=N|max[,size=S][,offset=O][,block=NAME][,seed=N]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty workload spec; expected e.g. 'none' or 'uniform:rate=20000'")
    text = spec.strip()
    pattern, sep, rest = text.partition(":")
    pattern = pattern.strip().lower()
    if pattern not in PATTERNS:
        raise ValueError(
            f"unknown workload pattern {pattern!r} in {spec!r}; expected one of {', '.join(PATTERNS)}"
        )
    if pattern == "none":
        if rest.strip():
            raise ValueError(f"workload 'none' takes no options: {spec!r}")
        return WorkloadSpec()
    if not sep or not rest.strip():
        raise ValueError(f"workload {pattern!r} needs options, at least rate: e.g. '{pattern}:rate=20000'")
    opts: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not value.strip():
            raise ValueError(f"bad workload option {item!r} in {spec!r}: expected key=value")
        if key in opts:
            raise ValueError(f"workload option {key!r} given twice in {spec!r}")
        opts[key] = value.strip()
    unknown = set(opts) - {"rate", "size", "offset", "block", "seed"}
    if unknown:
        raise ValueError(
            f"unknown workload option(s) {', '.join(sorted(unknown))} in {spec!r}; "
            "known: rate, size, offset, block, seed"
        )
    if "rate" not in opts:
        raise ValueError(f"workload {pattern!r} needs rate=PAGES_PER_SECOND (or rate=max): {spec!r}")
    try:
        seed = int(opts["seed"], 0) if "seed" in opts else None
    except ValueError:
        raise ValueError(f"bad workload seed {opts['seed']!r}: expected an integer") from None
    return WorkloadSpec(
        pattern=pattern,
        rate=_parse_rate(opts["rate"]),
        size=parse_size(opts["size"], "workload size") if "size" in opts else None,
        offset=parse_size(opts["offset"], "workload offset") if "offset" in opts else 0,
        block=opts.get("block"),
        seed=seed,
    )


@dataclass(frozen=True)
class WorkloadPlan:
    """A spec bound to a block: pages ``[first_page, first_page + n_pages)``."""

    pattern: str
    rate: int | None
    block: str
    first_page: int
    n_pages: int
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @functools.cached_property
    def _seed_mix(self) -> np.uint64:
        return splitmix64(np.array([self.seed], np.uint64))[0]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WorkloadPlan:
        return cls(**d)

    def pages(self, pos: int, k: int) -> np.ndarray:
        """Pages ``pos .. pos+k-1`` of the stream (intp indexes into the block)."""
        i = np.arange(pos, pos + k, dtype=np.uint64)
        span = np.uint64(self.n_pages)
        if self.pattern == "sweep":
            rel = i % span
        else:  # uniform, hotset: hashed counter (the modulo bias is < n/2^64)
            rel = splitmix64(i ^ self._seed_mix) % span
        return (rel + np.uint64(self.first_page)).astype(np.intp)


def next_pages(shared: SharedState, plan: WorkloadPlan, k: int) -> np.ndarray:
    """The pages the next batch of ``k`` writes will touch (RNG_POS is not advanced)."""
    return plan.pages(int(shared.header[H_RNG_POS]), k)


def missing_pages(shared: SharedState, pages: np.ndarray) -> np.ndarray:
    """Postcopy: the pages of ``pages`` not present yet (unique, sorted); empty when not armed."""
    if not shared.header[H_POSTCOPY]:
        return pages[:0]
    return np.unique(pages[shared.present[pages] == 0])


class PageNotPresent(RuntimeError):
    """The vCPU was about to write a page that has not arrived: a bug, never data corruption."""


def write_batch(words: np.ndarray, shared: SharedState, plan: WorkloadPlan, salt: np.uint64, k: int) -> None:
    """Write the next ``k`` pages of the stream: contents, then generations, then dirty bits.

    ACTIVE and LOGGING are read once, first (see :mod:`guest.dirty`); duplicates within a batch
    get the same new generation, so the page and the table agree. In postcopy the caller passes a
    ``k`` whose pages are all present (the present prefix of the stream); a missing one raises
    rather than overwrite a page the daemon has yet to place (which would lose either write).
    """
    h = shared.header
    active = int(h[H_ACTIVE])
    logging = bool(h[H_LOGGING])
    pos = int(h[H_RNG_POS])
    pages = plan.pages(pos, k)
    if h[H_POSTCOPY] and not shared.present[pages].all():
        missing = np.unique(pages[shared.present[pages] == 0])
        raise PageNotPresent(f"batch at stream position {pos} would write {len(missing)} absent pages")
    gens = shared.generations[pages] + np.uint32(1)
    gens[gens == 0] = 1  # after 2^32 writes of one page, skip 0 (reserved: "initial fill")
    write_pages(words, pages, gens, salt)
    shared.generations[pages] = gens
    if logging:
        shared.bitmaps[active][pages] = 1
    h[H_RNG_POS] = pos + k
    h[H_WRITES] += np.uint64(k)
