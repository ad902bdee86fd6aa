"""XBZRLE: QEMU's XOR-based zero-run-length page delta (WIRE.md §3.5), and the source-side cache.

Delta format: pairs of ``uleb128 zrun`` (unchanged bytes to skip), ``uleb128 nzrun`` (changed
bytes, >= 1) and ``nzrun`` new bytes; a trailing unchanged run is not encoded. The varints are
QEMU's ``uleb128_{en,de}code_small``: at most 2 bytes, values < 2**14. Decoding rules mirror
``xbzrle_decode_buffer`` (migration/xbzrle.c) so that we reject exactly what QEMU rejects.

The encoder reproduces ``xbzrle_encode_buffer`` byte for byte: QEMU compares word-at-a-time only
for speed, every run it emits ends exactly at the first byte whose equality changes (the
"has a zero byte" word test is exact about existence), so its runs are the plain byte-diff runs.
Its overflow rule is reproduced too (it gives up as soon as fewer than 2 bytes of room are left
before a length, even when the rest of the page would have fit).

:class:`XbzrleCache` is QEMU's ``PageCache`` (migration/page_cache.c) plus ``save_xbzrle_page``
(migration/ram.c): a direct-mapped table of page copies, backed by one numpy array.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np

from .errors import ProtocolError
from .events import TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE
ULEB_MAX = (1 << 14) - 1  # uleb128_encode_small asserts n <= 0x3fff
CACHED_PAGE_LIFETIME = 2  # page_cache.c: a slot younger than this is not evicted
DEFAULT_CACHE_SIZE = 64 << 20  # parameter xbzrle-cache-size default

BytesLike = bytes | bytearray | memoryview | np.ndarray


def _as_u8(buf: BytesLike) -> np.ndarray:
    """A flat uint8 view of ``buf`` (no copy for contiguous buffers)."""
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8) if buf.dtype != np.uint8 else buf.reshape(-1)
    return np.frombuffer(buf, dtype=np.uint8)


# ---------------------------------------------------------------- decoding


def _uleb(src: memoryview, i: int, end: int, what: str, at: int | None) -> tuple[int, int]:
    """QEMU's uleb128_decode_small at ``src[i]``: returns (value, new index)."""
    # QEMU checks that 2 bytes remain before *every* length, even a 1-byte one; a valid
    # delta always satisfies that (a length is followed by at least one more byte).
    if end - i < 2:
        raise ProtocolError(
            f"XBZRLE delta truncated: {end - i} byte(s) left where the {what} length is expected",
            offset=None if at is None else at + i,
            section="ram",
        )
    b0 = src[i]
    if not b0 & 0x80:
        return b0, i + 1
    b1 = src[i + 1]
    if b1 & 0x80:
        raise ProtocolError(
            f"XBZRLE {what} length is a varint longer than 2 bytes (QEMU limit: values < 2**14)",
            offset=None if at is None else at + i,
            section="ram",
        )
    return (b0 & 0x7F) | (b1 << 7), i + 2


def parse_xbzrle(
    delta: bytes | bytearray | memoryview, page_size: int = PAGE, *, offset: int | None = None
) -> list[tuple[int, int, int]]:
    """Validate a delta completely; return its writes as (page offset, delta offset, length).

    ``offset`` is the absolute stream offset of the delta's first byte (for error messages).
    """
    src = memoryview(delta).cast("B")
    end = len(src)
    i = 0
    d = 0
    writes: list[tuple[int, int, int]] = []
    while i < end:
        at_pair = i
        zrun, i = _uleb(src, i, end, "zero-run", offset)
        if at_pair and not zrun:
            raise ProtocolError(
                "XBZRLE zero-run length 0 after the first pair",
                offset=None if offset is None else offset + at_pair,
                section="ram",
            )
        d += zrun
        if d > page_size:
            raise ProtocolError(
                f"XBZRLE delta skips to byte {d}, past the end of the {page_size}-byte page",
                offset=None if offset is None else offset + at_pair,
                section="ram",
            )
        at_nz = i
        nzrun, i = _uleb(src, i, end, "changed-run", offset)
        if not nzrun:
            raise ProtocolError(
                "XBZRLE changed-run length 0",
                offset=None if offset is None else offset + at_nz,
                section="ram",
            )
        if d + nzrun > page_size:
            raise ProtocolError(
                f"XBZRLE delta writes bytes {d}..{d + nzrun - 1}, past the end of the {page_size}-byte page",
                offset=None if offset is None else offset + at_nz,
                section="ram",
            )
        if i + nzrun > end:
            raise ProtocolError(
                f"XBZRLE delta truncated: changed run of {nzrun} bytes but only {end - i} left",
                offset=None if offset is None else offset + at_nz,
                section="ram",
            )
        writes.append((d, i, nzrun))
        d += nzrun
        i += nzrun
    return writes


def decode_xbzrle(
    delta: bytes | bytearray | memoryview,
    page: bytearray | np.ndarray,
    *,
    offset: int | None = None,
) -> None:
    """Apply ``delta`` on top of ``page`` (modified in place; normally 4096 bytes).

    The whole delta is validated before the first byte is written, so on ProtocolError the
    page is untouched (QEMU itself would have patched it partially before failing).
    """
    if isinstance(page, np.ndarray):
        # a reshape of a non-contiguous array would be a copy and the writes would be lost
        if page.dtype != np.uint8 or not page.flags.c_contiguous or not page.flags.writeable:
            raise ValueError("page must be a writable, C-contiguous uint8 array")
        target: np.ndarray | memoryview = page.reshape(-1)
    else:
        target = memoryview(page).cast("B")
    writes = parse_xbzrle(delta, len(target), offset=offset)
    src = memoryview(delta).cast("B")
    if isinstance(target, np.ndarray):
        srcarr = np.frombuffer(src, dtype=np.uint8)
        for d, s, n in writes:
            target[d : d + n] = srcarr[s : s + n]
    else:
        for d, s, n in writes:
            target[d : d + n] = src[s : s + n]


# ---------------------------------------------------------------- encoding


SMALL_DIFF = 64  # up to this many changed bytes a plain loop beats a dozen numpy calls


def _uleb_bytes(v: int) -> bytes:
    return bytes((v,)) if v < 0x80 else bytes(((v & 0x7F) | 0x80, v >> 7))


def _encode_few(changed: list[int], new: np.ndarray, size: int, limit: int) -> bytes | None:
    """encode_xbzrle for a few changed bytes, same output and overflow rule."""
    data = new.tobytes()
    out = bytearray()
    prev_end = 0
    i = 0
    count = len(changed)
    while i < count:
        start = changed[i]
        while i + 1 < count and changed[i + 1] == changed[i] + 1:
            i += 1
        end = changed[i] + 1
        i += 1
        out += _uleb_bytes(start - prev_end)
        if len(out) + 2 > limit:  # also covers the check before the zero run
            return None
        out += _uleb_bytes(end - start)
        if len(out) + end - start > limit:
            return None
        out += data[start:end]
        prev_end = end
    if prev_end < size and len(out) + 2 > limit:
        return None
    return bytes(out)


def encode_xbzrle(old: BytesLike, new: BytesLike, limit: int = PAGE) -> bytes | None:
    """QEMU's xbzrle_encode_buffer(old, new, len, dst, limit).

    Returns b"" when the pages are identical (QEMU: 0, nothing is sent), None when the encoding
    does not fit in ``limit`` bytes by QEMU's overflow rule (-1: sent as a normal page), else
    the delta.
    """
    o = _as_u8(old)
    n = _as_u8(new)
    size = o.size
    if n.size != size:
        raise ValueError(f"pages differ in size: {size} and {n.size}")
    if size > ULEB_MAX + 1:
        raise ValueError(f"page of {size} bytes is too large for 14-bit run lengths")
    if size and limit < 2:  # QEMU checks for room before it even compares
        return None
    changed = np.flatnonzero(o != n)
    if changed.size == 0:
        return b""
    if changed.size <= SMALL_DIFF:
        return _encode_few(changed.tolist(), n, size, limit)
    # runs of consecutive changed indices
    breaks = np.flatnonzero(np.diff(changed) != 1)
    first = np.concatenate(([0], breaks + 1))
    last = np.concatenate((breaks, [changed.size - 1]))
    starts = changed[first]
    ends = changed[last] + 1
    prev_end = np.concatenate(([0], ends[:-1]))
    zrun = starts - prev_end
    nzrun = ends - starts
    zlen = np.where(zrun < 0x80, 1, 2)
    nlen = np.where(nzrun < 0x80, 1, 2)
    pair = zlen + nlen + nzrun
    after = np.cumsum(pair)  # d after each pair
    before = after - pair  # d at the top of QEMU's loop for each pair
    total = int(after[-1])
    # QEMU's three overflow checks per pair; the d+2 check before the zrun is implied by the
    # one after it (zlen >= 1)
    if bool(np.any(before + zlen + 2 > limit)) or bool(np.any(after > limit)):
        return None
    if int(ends[-1]) < size and total + 2 > limit:  # loop re-entered for the trailing zero run
        return None
    out = np.empty(total, dtype=np.uint8)
    zpos = before
    out[zpos] = np.where(zlen == 1, zrun, (zrun & 0x7F) | 0x80)
    two = zlen == 2
    out[zpos[two] + 1] = zrun[two] >> 7
    npos = before + zlen
    out[npos] = np.where(nlen == 1, nzrun, (nzrun & 0x7F) | 0x80)
    two = nlen == 2
    out[npos[two] + 1] = nzrun[two] >> 7
    data_start = npos + nlen
    # every changed byte lands at its run's data start plus its distance from the run start
    out[changed + np.repeat(data_start - starts, nzrun)] = n[changed]
    return out.tobytes()


# ---------------------------------------------------------------- source-side cache

SaveResult = (
    tuple[Literal["xbzrle"], bytes]
    | tuple[Literal["page"], bytes]
    | tuple[Literal["skip"]]
    | tuple[Literal["zero"]]
)


def ram_addr_bases(blocks: Mapping[str, int], page_size: int = PAGE) -> dict[str, int]:
    """A ram_addr_t layout for RAM blocks (name -> used length): consecutive, page aligned.

    QEMU keys the cache by ram_addr (block offset in its global RAM space + offset in the
    block); any injective layout keeps the semantics, only which pages share a slot differs.
    The address of a page is ``bases[block] + offset``.
    """
    bases: dict[str, int] = {}
    at = 0
    for name, size in blocks.items():
        bases[name] = at
        at += -(-size // page_size) * page_size
    return bases


def _pow2floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class XbzrleCache:
    """The source's XBZRLE page cache and per-page decision (QEMU 7.2 ``save_xbzrle_page``).

    ``size`` is the ``xbzrle-cache-size`` parameter in bytes. Like QEMU's ``cache_init`` the
    number of entries is ``size // page_size`` rounded *down to a power of two* (WIRE.md says
    ``size // 4096``; both agree for the 64 MiB default). Index = (ram_addr / page_size) mod
    entries. ``ram_addr`` is QEMU's ram_addr_t: the block's offset in the global RAM address
    space plus the page's offset in the block (any injective page numbering works).

    Use only once XBZRLE is active (after the first complete pass over RAM) and never in
    postcopy; ``sync_round`` is QEMU's dirty-sync count at the time of sending.

    Counters mirror query-migrate's ``xbzrle-cache``: ``pages`` (cache hits, including
    unchanged and overflowing pages), ``cache_miss``, ``overflow``, ``bytes`` (bytes of XBZRLE
    records not counting the 8-byte page header, plus 4096 per overflow), ``cache_miss_rate``
    and ``encoding_rate`` (per rate period, see :meth:`update_rates`).
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE, page_size: int = PAGE) -> None:
        if page_size <= 0 or page_size > ULEB_MAX + 1:
            raise ValueError(f"unsupported page size {page_size}")
        if size < page_size:
            raise ValueError(f"cache size {size} is smaller than one page ({page_size})")
        self.cache_size = size
        self.page_size = page_size
        self.entries = _pow2floor(size // page_size)
        # np.zeros maps lazily: untouched slots cost no memory
        self.data = np.zeros((self.entries, page_size), dtype=np.uint8)
        self.addr = np.full(self.entries, -1, dtype=np.int64)  # -1: slot never filled
        self.age = np.zeros(self.entries, dtype=np.int64)
        self.pages = 0
        self.cache_miss = 0
        self.overflow = 0
        self.bytes = 0
        self.skipped = 0  # hits whose page was unchanged (nothing sent)
        self.xbzrle_pages = 0  # XBZRLE records produced
        self.cache_miss_rate = 0.0
        self.encoding_rate = 0.0
        self._miss_prev = 0
        self._pages_prev = 0
        self._bytes_prev = 0

    # ---- PageCache primitives

    def slot(self, ram_addr: int) -> int:
        return (ram_addr // self.page_size) & (self.entries - 1)

    @property
    def num_items(self) -> int:
        """Slots holding a page (QEMU's cache->num_items)."""
        return int(np.count_nonzero(self.addr != -1))

    def is_cached(self, ram_addr: int, sync_round: int) -> bool:
        """cache_is_cached: a hit also refreshes the slot's age."""
        i = self.slot(ram_addr)
        if int(self.addr[i]) == ram_addr:
            self.age[i] = sync_round
            return True
        return False

    def insert(self, ram_addr: int, data: BytesLike, sync_round: int) -> bool:
        """cache_insert: False when the slot holds another, still fresh page (age < 2 rounds)."""
        i = self.slot(ram_addr)
        held = int(self.addr[i])
        if held != -1 and held != ram_addr and int(self.age[i]) + CACHED_PAGE_LIFETIME > sync_round:
            return False
        self.data[i] = _as_u8(data)
        self.age[i] = sync_round
        self.addr[i] = ram_addr
        return True

    def cached(self, ram_addr: int) -> np.ndarray | None:
        """The cached copy of a page (a view; valid until the slot is replaced)."""
        i = self.slot(ram_addr)
        return self.data[i] if int(self.addr[i]) == ram_addr else None

    def cache_zero_page(self, ram_addr: int, sync_round: int) -> bool:
        """A page went out as ZERO: overwrite its cached copy (xbzrle_cache_zero_page)."""
        i = self.slot(ram_addr)
        held = int(self.addr[i])
        if held != -1 and held != ram_addr and int(self.age[i]) + CACHED_PAGE_LIFETIME > sync_round:
            return False
        self.data[i] = 0
        self.age[i] = sync_round
        self.addr[i] = ram_addr
        return True

    def cache_zero_pages(self, ram_addrs: np.ndarray | list[int], sync_round: int) -> int:
        """cache_zero_page for a run of ZERO records, in order; returns how many slots took it."""
        return sum(self.cache_zero_page(int(a), sync_round) for a in np.asarray(ram_addrs).tolist())

    # ---- the per-page decision

    def save_page(
        self,
        ram_addr: int,
        page: BytesLike,
        sync_round: int,
        last_stage: bool = False,
        *,
        detect_zero: bool = True,
        header_bytes: int = 8,
    ) -> SaveResult:
        """What to send for one dirty page: QEMU's zero check, then save_xbzrle_page.

        Returns ("zero",) for an all-zero page (send a ZERO record; the cache entry is
        zeroed), ("skip",) when the page equals its cached copy (send nothing),
        ("xbzrle", delta) for an XBZRLE record, or ("page", data) for a normal PAGE record on
        a miss or an overflow. ``header_bytes`` is the size of the page header the caller will
        write (8, or 8 + 1 + len(block name) without CONTINUE); QEMU counts what exceeds 8.
        """
        cur = np.array(_as_u8(page), dtype=np.uint8, copy=True)  # snapshot: guest RAM may change
        if cur.size != self.page_size:
            raise ValueError(f"page of {cur.size} bytes, expected {self.page_size}")
        if detect_zero and not cur.any():
            self.cache_zero_page(ram_addr, sync_round)
            return ("zero",)
        i = self.slot(ram_addr)
        if not self.is_cached(ram_addr, sync_round):
            self.cache_miss += 1
            if not last_stage and self.insert(ram_addr, cur, sync_round):
                # QEMU sends from the cache copy once the page is in it
                return ("page", self.data[i].tobytes())
            return ("page", cur.tobytes())
        self.pages += 1
        prev = self.data[i]
        delta = encode_xbzrle(prev, cur, self.page_size)
        if not last_stage and delta != b"":
            prev[:] = cur  # the cache must equal what the destination will hold
        if delta == b"":
            self.skipped += 1
            return ("skip",)
        if delta is None:
            self.overflow += 1
            self.bytes += self.page_size
            return ("page", prev.tobytes() if not last_stage else cur.tobytes())
        self.xbzrle_pages += 1
        self.bytes += header_bytes - 8 + len(delta) + 3
        return ("xbzrle", delta)

    # ---- statistics

    def update_rates(self, pages_in_period: int) -> None:
        """migration_update_rates: ``pages_in_period`` pages of all kinds were sent since the
        previous call (QEMU calls it at a dirty sync once >= 1 s has passed)."""
        if pages_in_period <= 0:
            return
        self.cache_miss_rate = (self.cache_miss - self._miss_prev) / pages_in_period
        self._miss_prev = self.cache_miss
        unencoded = (self.pages - self._pages_prev) * self.page_size
        encoded = self.bytes - self._bytes_prev
        if self.pages == self._pages_prev or not encoded:
            self.encoding_rate = 0.0
        else:
            self.encoding_rate = unencoded / encoded
        self._pages_prev = self.pages
        self._bytes_prev = self.bytes

    @property
    def bytes_saved(self) -> int:
        """Page bytes not sent thanks to the cache hits (4096 per hit minus what went out)."""
        return self.pages * self.page_size - self.bytes

    def stats(self) -> dict[str, int | float]:
        """query-migrate's ``xbzrle-cache`` object."""
        return {
            "cache-size": self.cache_size,
            "bytes": self.bytes,
            "pages": self.pages,
            "cache-miss": self.cache_miss,
            "cache-miss-rate": self.cache_miss_rate,
            "encoding-rate": self.encoding_rate,
            "overflow": self.overflow,
        }
