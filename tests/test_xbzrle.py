"""XBZRLE delta codec and the source-side cache (protocol/xbzrle.py, WIRE.md §3.5)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.decoder import MainDecoder
from protocol.errors import ProtocolError
from protocol.events import Pages, XbzrlePage, ZeroPages
from protocol.xbzrle import XbzrleCache, decode_xbzrle, encode_xbzrle, parse_xbzrle, ram_addr_bases

CAPTURES = Path("/work/shared/captures")
PAGE = 4096
WIRE_EXAMPLE = bytes.fromhex("C1 08 01 01 2A 01 D0 07 01 01")
# the four XBZRLE records of xbzrle-main.bin (be64 offset|0x60, u8 1, be16 len, delta)
XBZRLE_RECORDS = [829_084, 829_105, 829_705, 829_723]

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- literal ports of QEMU's C


def _uleb_enc(n: int) -> bytes:
    assert n <= 0x3FFF
    return bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])


def qemu_encode(old: bytes, new: bytes, dlen: int) -> int | bytes:
    """xbzrle_encode_buffer (7.2, generic), word loops included; -1 on overflow."""
    slen, long = len(old), 8
    dst = bytearray()
    i = zrun = nzrun = 0

    def word(b: bytes, k: int) -> int:
        return int.from_bytes(b[k : k + long], "little")

    while i < slen:
        if len(dst) + 2 > dlen:
            return -1
        res = (slen - i) % long
        while res and old[i] == new[i]:
            zrun += 1
            i += 1
            res -= 1
        if not res:
            while i < slen and word(old, i) == word(new, i):
                i += long
                zrun += long
            while i < slen and old[i] == new[i]:
                zrun += 1
                i += 1
        if zrun == slen:
            return 0
        if i == slen:
            return bytes(dst)
        dst += _uleb_enc(zrun)
        zrun = 0
        start = i
        if len(dst) + 2 > dlen:
            return -1
        res = (slen - i) % long
        while res and old[i] != new[i]:
            i += 1
            nzrun += 1
            res -= 1
        if not res:
            mask = 0x0101010101010101
            while i < slen:
                xor = word(old, i) ^ word(new, i)
                if ((xor - mask) & ~xor & (mask << 7)) & 0xFFFFFFFFFFFFFFFF:
                    while old[i] != new[i]:
                        nzrun += 1
                        i += 1
                    break
                i += long
                nzrun += long
        dst += _uleb_enc(nzrun)
        if len(dst) + nzrun > dlen:
            return -1
        dst += new[start : start + nzrun]
        nzrun = 0
    return bytes(dst)


def qemu_decode(src: bytes, dst: bytearray) -> int:
    """xbzrle_decode_buffer; -1 on error (dst may then be partially written, like QEMU)."""
    i = d = 0
    slen, dlen = len(src), len(dst)

    def uleb(k: int) -> tuple[int, int]:
        if not src[k] & 0x80:
            return src[k], 1
        if src[k + 1] & 0x80:
            return -1, -1
        return (src[k] & 0x7F) | (src[k + 1] << 7), 2

    while i < slen:
        if slen - i < 2:
            return -1
        count, ret = uleb(i)
        if ret < 0 or (i and not count):
            return -1
        i += ret
        d += count
        if d > dlen:
            return -1
        if slen - i < 2:
            return -1
        count, ret = uleb(i)
        if ret < 0 or not count:
            return -1
        i += ret
        if d + count > dlen or i + count > slen:
            return -1
        dst[d : d + count] = src[i : i + count]
        d += count
        i += count
    return d


# ---------------------------------------------------------------- the real example and captures


def test_wire_example_decodes() -> None:
    page = bytearray(PAGE)
    decode_xbzrle(WIRE_EXAMPLE, page)
    assert [i for i, b in enumerate(page) if b] == [0x441, 0x46C, 0x474]
    assert (page[0x441], page[0x46C], page[0x474]) == (0x01, 0xD0, 0x01)
    assert parse_xbzrle(WIRE_EXAMPLE) == [(0x441, 3, 1), (0x46C, 6, 1), (0x474, 9, 1)]
    # on top of arbitrary content only those three bytes change
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, PAGE, dtype=np.uint8)
    arr = base.copy()
    decode_xbzrle(WIRE_EXAMPLE, arr)
    assert np.flatnonzero(arr != base).tolist() == [i for i in (0x441, 0x46C, 0x474) if base[i] != arr[i]]
    assert (arr[0x441], arr[0x46C], arr[0x474]) == (0x01, 0xD0, 0x01)


def test_wire_example_encodes_identically() -> None:
    page = bytearray(PAGE)
    decode_xbzrle(WIRE_EXAMPLE, page)
    assert encode_xbzrle(bytes(PAGE), page) == WIRE_EXAMPLE


def test_capture_records_decode() -> None:
    raw = (CAPTURES / "xbzrle-main.bin").read_bytes()
    for at in XBZRLE_RECORDS:
        (hdr,) = struct.unpack_from(">Q", raw, at)
        assert hdr & 0xFFF == 0x60  # XBZRLE | CONTINUE
        assert raw[at + 8] == 0x01
        (n,) = struct.unpack_from(">H", raw, at + 9)
        assert 0 < n <= PAGE
        delta = raw[at + 11 : at + 11 + n]
        for page in (bytearray(PAGE), np.full(PAGE, 0xAA, dtype=np.uint8)):
            decode_xbzrle(delta, page, offset=at + 11)
            assert len(page) == PAGE
    # the first record's header: page 0 of the current block, ten bytes
    assert (
        raw[XBZRLE_RECORDS[0] : XBZRLE_RECORDS[0] + 21]
        == bytes.fromhex("0000000000000060 01 000A") + WIRE_EXAMPLE
    )


def test_capture_deltas_reencode_byte_for_byte() -> None:
    """Replay pc.ram from the stream; QEMU's deltas equal ours for the same (old, new) pages."""
    raw = (CAPTURES / "xbzrle-main.bin").read_bytes()
    dec = MainDecoder()
    dec.feed(raw)
    events = [*dec.events(), *dec.end_of_input()]
    ram = np.zeros((0x2000000 // PAGE, PAGE), dtype=np.uint8)
    seen = 0
    for ev in events:
        if isinstance(ev, Pages) and ev.block == "pc.ram":
            ram[(ev.offsets // PAGE).astype(np.intp)] = ev.data
        elif isinstance(ev, ZeroPages) and ev.block == "pc.ram":
            ram[(ev.offsets // PAGE).astype(np.intp)] = ev.fill
        elif isinstance(ev, XbzrlePage):
            assert ev.block == "pc.ram"
            old = ram[ev.offset // PAGE].copy()
            decode_xbzrle(ev.delta, ram[ev.offset // PAGE])
            assert encode_xbzrle(old, ram[ev.offset // PAGE]) == ev.delta
            seen += 1
    assert seen == 4


# ---------------------------------------------------------------- encoder properties


class PagePair(tuple[bytes, bytes]):
    """(old, new) with a short repr, so that hypothesis reports stay readable."""

    def __repr__(self) -> str:
        old, new = self
        diff = [i for i in range(len(old)) if old[i] != new[i]]
        return f"PagePair(old[:16]={old[:16].hex()}, changed={len(diff)} at {diff[:20]})"


@st.composite
def page_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, PAGE, dtype=np.uint8)
    if draw(st.booleans()):
        old[:] = 0
    new = old.copy()
    mode = draw(st.sampled_from(["edits", "sparse", "dense", "random", "same", "blocks"]))
    if mode == "edits":  # explicit, shrinkable runs
        for pos, length, val in draw(
            st.lists(
                st.tuples(st.integers(0, PAGE - 1), st.integers(1, 300), st.integers(0, 255)), max_size=12
            )
        ):
            new[pos : pos + length] = val
    elif mode == "sparse":
        k = draw(st.integers(1, 64))
        new[rng.integers(0, PAGE, k)] ^= rng.integers(1, 256, k, dtype=np.uint8)
    elif mode == "dense":
        p = draw(st.floats(0.05, 0.95))
        flip = rng.random(PAGE) < p
        new[flip] ^= rng.integers(1, 256, int(flip.sum()), dtype=np.uint8)
    elif mode == "random":
        new = rng.integers(0, 256, PAGE, dtype=np.uint8)
    elif mode == "blocks":
        for _ in range(draw(st.integers(1, 40))):
            a = int(rng.integers(0, PAGE))
            new[a : a + int(rng.integers(1, 200))] ^= 0xFF
    return PagePair((old.tobytes(), new.tobytes()))


@FAST
@given(page_pairs())
def test_round_trip_and_matches_qemu(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    enc = encode_xbzrle(old, new)
    ref = qemu_encode(old, new, PAGE)
    if ref == 0:
        assert enc == b""
        assert old == new
        return
    if ref == -1:
        assert enc is None
        return
    assert enc == ref
    assert len(enc) <= PAGE
    page = bytearray(old)
    decode_xbzrle(enc, page)
    assert page == new


@FAST
@given(page_pairs(), st.integers(0, PAGE))
def test_overflow_rule_matches_qemu(pair: tuple[bytes, bytes], limit: int) -> None:
    old, new = pair
    enc = encode_xbzrle(old, new, limit)
    ref = qemu_encode(old, new, limit)
    expected = {0: b"", -1: None}[ref] if isinstance(ref, int) else ref
    assert enc == expected


def test_encode_edges() -> None:
    z = bytes(PAGE)
    assert encode_xbzrle(z, z) == b""
    full = bytes([1]) * PAGE
    assert encode_xbzrle(z, full) is None  # 4096 data bytes + lengths do not fit
    first = bytearray(z)
    first[0] = 9
    assert encode_xbzrle(z, first) == b"\x00\x01\x09"  # zrun 0 is legal first
    last = bytearray(z)
    last[-1] = 7
    assert encode_xbzrle(z, last) == _uleb_enc(PAGE - 1) + b"\x01\x07"
    # numpy and memoryview inputs
    assert encode_xbzrle(np.zeros(PAGE, np.uint8), memoryview(bytes(last))) == encode_xbzrle(z, last)
    with pytest.raises(ValueError):
        encode_xbzrle(z, z[:100])


# ---------------------------------------------------------------- malformed deltas


@pytest.mark.parametrize(
    ("delta", "match"),
    [
        (b"\x01\x01\xaa\x00\x01\xbb", "zero-run length 0 after the first"),
        (b"\x01\x00\xaa", "changed-run length 0"),
        (b"\x01\x00", "truncated"),  # QEMU wants 2 bytes before every length
        (b"\x01\x80\x00", "changed-run length 0"),  # non-canonical 2-byte zero is still zero
        (b"\x80\x80\x01\x01\xaa", "longer than 2 bytes"),
        (b"\x01\xff\xff\x01", "longer than 2 bytes"),
        (b"\x05", "truncated"),
        (b"\x05\x03\xaa", "truncated"),
        (b"\x01\x01\xaa\x01", "truncated"),
        (b"\x80\x20\x01\xaa", "past the end"),  # skip to 4096, then one more byte
        (b"\xff\x1f\x02\xaa\xbb", "past the end"),  # 4095 + 2
        (b"\xff\x7f\x01\xaa", "past the end"),  # 16383: the largest 2-byte value
        (b"\x00\x81\x20" + b"\x00" * 4097, "past the end"),  # nzrun 4097
    ],
)
def test_malformed_deltas(delta: bytes, match: str) -> None:
    page = bytearray(b"\x55" * PAGE)
    with pytest.raises(ProtocolError, match=match) as info:
        decode_xbzrle(delta, page, offset=1000)
    assert info.value.offset is not None and info.value.offset >= 1000
    assert page == b"\x55" * PAGE  # validated before writing
    assert qemu_decode(delta, bytearray(PAGE)) == -1


def test_valid_edges() -> None:
    page = bytearray(PAGE)
    decode_xbzrle(b"", page)  # empty delta: no-op (QEMU returns 0)
    assert page == bytes(PAGE)
    decode_xbzrle(b"\xff\x1f\x01\xaa", page)  # write the very last byte
    assert page[-1] == 0xAA and not any(page[:-1])
    decode_xbzrle(b"\x00\x80\x20" + b"\x01" * PAGE, page)  # whole page
    assert page == b"\x01" * PAGE
    with pytest.raises(ValueError):
        decode_xbzrle(b"", np.zeros((2, PAGE), np.uint8)[:, 0])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.lists(st.integers(0, 255), max_size=40).map(bytes)))
def test_random_deltas_only_raise_protocol_error(delta: bytes) -> None:
    page = bytearray(b"\x33" * PAGE)
    ref = bytearray(page)
    ok = qemu_decode(delta, ref) != -1
    try:
        decode_xbzrle(delta, page)
    except ProtocolError:
        assert not ok
        assert page == b"\x33" * PAGE
    else:
        assert ok
        assert page == ref
    assert len(page) == PAGE


# ---------------------------------------------------------------- the source-side cache


def _page(val: int) -> bytes:
    return bytes([val]) * PAGE


def test_cache_geometry() -> None:
    assert XbzrleCache().entries == 16384
    assert XbzrleCache(5 * PAGE).entries == 4  # QEMU rounds down to a power of two
    assert XbzrleCache(5 * PAGE).stats()["cache-size"] == 5 * PAGE
    c = XbzrleCache(4 * PAGE)
    assert c.data.shape == (4, PAGE) and c.data.dtype == np.uint8
    assert c.slot(0) == c.slot(4 * PAGE) != c.slot(PAGE)
    with pytest.raises(ValueError):
        XbzrleCache(100)


def test_miss_hit_skip_overflow() -> None:
    c = XbzrleCache(16 * PAGE)
    a = 3 * PAGE
    page = bytearray(_page(1))
    assert c.save_page(a, page, 1) == ("page", bytes(page))  # miss: inserted, sent from cache
    assert c.cache_miss == 1 and c.pages == 0
    assert bytes(c.cached(a)) == bytes(page)
    assert c.save_page(a, page, 2) == ("skip",)  # unchanged
    assert c.pages == 1 and c.skipped == 1
    page[100] = 9
    kind, delta = c.save_page(a, page, 2)
    assert kind == "xbzrle"
    assert delta == encode_xbzrle(_page(1), page)
    assert bytes(c.cached(a)) == bytes(page)  # cache follows the destination
    assert c.bytes == len(delta) + 3 and c.xbzrle_pages == 1
    noise = np.random.default_rng(0).integers(1, 256, PAGE, dtype=np.uint8).tobytes()
    assert c.save_page(a, noise, 3) == ("page", noise)  # overflow
    assert c.overflow == 1 and c.bytes == len(delta) + 3 + PAGE
    assert bytes(c.cached(a)) == noise
    assert c.pages == 3 and c.cache_miss == 1
    assert c.bytes_saved == 3 * PAGE - c.bytes


def test_last_stage_keeps_cache() -> None:
    c = XbzrleCache(16 * PAGE)
    assert c.save_page(0, _page(1), 1, last_stage=True) == ("page", _page(1))
    assert c.cached(0) is None  # no insert in the final stage
    c.save_page(0, _page(1), 1)
    new = bytearray(_page(1))
    new[5] = 2
    kind, _ = c.save_page(0, new, 2, last_stage=True)
    assert kind == "xbzrle"
    assert bytes(c.cached(0)) == _page(1)  # not updated in the final stage


def test_collision_and_age() -> None:
    c = XbzrleCache(4 * PAGE)
    a, b = 0, 4 * PAGE  # same slot
    c.save_page(a, _page(1), 1)
    assert c.save_page(b, _page(2), 2) == ("page", _page(2))  # a is fresh (1 + 2 > 2): kept
    assert c.cached(a) is not None and c.cached(b) is None
    assert c.save_page(a, _page(1), 5) == ("skip",)  # a hit refreshes the age to 5
    c.save_page(b, _page(2), 6)
    assert c.cached(a) is not None  # 5 + 2 > 6
    c.save_page(b, _page(2), 7)
    assert c.cached(b) is not None and c.cached(a) is None  # 5 + 2 <= 7: evicted
    assert c.cache_miss == 4
    assert c.num_items == 1


def test_zero_pages() -> None:
    c = XbzrleCache(16 * PAGE)
    c.save_page(PAGE, _page(7), 1)
    assert c.save_page(PAGE, bytes(PAGE), 2) == ("zero",)
    assert bytes(c.cached(PAGE)) == bytes(PAGE)  # the cache must not keep the stale page
    new = bytearray(PAGE)
    new[10] = 1
    assert c.save_page(PAGE, new, 3) == ("xbzrle", encode_xbzrle(bytes(PAGE), new))
    # a zero page on an empty slot inserts zeros too; on a fresh foreign slot it does not
    assert c.cache_zero_page(2 * PAGE, 3) and c.cached(2 * PAGE) is not None
    d = XbzrleCache(4 * PAGE)
    d.save_page(0, _page(1), 1)
    assert not d.cache_zero_page(4 * PAGE, 2)


def test_block_layout_and_zero_runs() -> None:
    bases = ram_addr_bases(
        {"pc.ram": 0x2000000, "/rom@etc/acpi/rsdp": 0x1000, "odd": 100, "pc.bios": 0x40000}
    )
    assert bases == {"pc.ram": 0, "/rom@etc/acpi/rsdp": 0x2000000, "odd": 0x2001000, "pc.bios": 0x2002000}
    c = XbzrleCache(16 * PAGE)
    for i in range(3):
        c.save_page(bases["pc.bios"] + i * PAGE, _page(i + 1), 1)
    assert c.cache_zero_pages(np.arange(3) * PAGE + bases["pc.bios"], 2) == 3
    assert all(not c.cached(bases["pc.bios"] + i * PAGE).any() for i in range(3))


def test_rates() -> None:
    c = XbzrleCache(16 * PAGE)
    for i in range(4):
        c.save_page(i * PAGE, _page(i + 1), 1)  # 4 misses
    new = bytearray(_page(1))
    new[0] = 0
    c.save_page(0, new, 2)  # hit: 3-byte delta + 3
    c.save_page(PAGE, _page(2), 2)  # hit: skip
    c.update_rates(6)
    assert c.cache_miss_rate == pytest.approx(4 / 6)
    assert c.encoding_rate == pytest.approx(2 * PAGE / 6)
    st_ = c.stats()
    assert set(st_) == {
        "cache-size",
        "bytes",
        "pages",
        "cache-miss",
        "cache-miss-rate",
        "encoding-rate",
        "overflow",
    }
    assert (st_["pages"], st_["cache-miss"], st_["bytes"], st_["overflow"]) == (2, 4, 6, 0)
    c.update_rates(3)  # nothing happened in this period
    assert c.cache_miss_rate == 0 and c.encoding_rate == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from([4, 8, 64]))
def test_destination_mirrors_source(seed: int, cache_pages: int) -> None:
    """Whatever the cache decides, applying its output keeps the destination equal to the source."""
    rng = np.random.default_rng(seed)
    npages = 24
    src = rng.integers(0, 4, (npages, PAGE), dtype=np.uint8)  # low entropy: xbzrle-friendly
    dst = np.full((npages, PAGE), 0xEE, dtype=np.uint8)
    dst[:] = src  # first pass: everything went out as ZERO/PAGE
    cache = XbzrleCache(cache_pages * PAGE)
    for rnd in range(2, 9):
        for p in range(npages):  # the guest dirties some pages
            r = rng.random()
            if r < 0.2:
                src[p, rng.integers(0, PAGE, 5)] = rng.integers(0, 256, 5)
            elif r < 0.25:
                src[p] = rng.integers(0, 256, PAGE)
            elif r < 0.3:
                src[p] = 0
        last = rnd == 8
        for p in rng.permutation(npages):
            res = cache.save_page(int(p) * PAGE, src[p], rnd, last)
            if res[0] == "xbzrle":
                decode_xbzrle(res[1], dst[p])
            elif res[0] == "page":
                dst[p] = np.frombuffer(res[1], np.uint8)
            elif res[0] == "zero":
                dst[p] = 0
            assert np.array_equal(dst[p], src[p]), (rnd, p, res[0])
            cached = cache.cached(int(p) * PAGE)
            if cached is not None and not last:
                assert np.array_equal(cached, dst[p])
