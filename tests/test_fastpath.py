"""The numpy page fast path is byte-identical to the construct definitions in protocol.wire.

Encoding: every record the encoder writes for a run equals ``wire.RamRecord.build`` of that
record. Decoding: parsing the encoded run record by record with ``wire.RamRecord`` gives the
same blocks, offsets, fills and page bytes as the decoder's vectorised runs.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import wire
from protocol.decoder import MainDecoder
from protocol.encoder import MainEncoder
from protocol.events import (
    Pages,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RamFlag,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    ZeroPages,
    coalesce,
)

PAGE = 4096
BLOCK_PAGES = 512

runs = st.lists(
    st.tuples(
        st.sampled_from(["pc.ram", "/rom@etc/acpi/tables", "vga.vram"]),
        st.booleans(),  # zero run?
        st.lists(st.integers(0, BLOCK_PAGES - 1), min_size=1, max_size=40),
        st.integers(0, 2**32 - 1),  # content seed
        st.sampled_from([0, 0, 0x5A]),  # fill
    ),
    min_size=1,
    max_size=8,
)


def _materialise(run: tuple[str, bool, list[int], int, int]) -> tuple[str, bool, np.ndarray, np.ndarray, int]:
    block, zero, pages, seed, fill = run
    offsets = np.array(pages, dtype=np.uint64) * PAGE
    data = np.random.default_rng(seed).integers(0, 256, (len(pages), PAGE), dtype=np.uint8)
    return block, zero, offsets, data, fill


def _construct_records(materialised: list[tuple[str, bool, np.ndarray, np.ndarray, int]]) -> bytes:
    """The same runs, one record at a time through wire.RamRecord.build."""
    out = []
    last = None
    for block, zero, offsets, data, fill in materialised:
        for i, off in enumerate(offsets):
            flags = int(RamFlag.ZERO if zero else RamFlag.PAGE)
            name = None
            if block == last:
                flags |= RamFlag.CONTINUE
            else:
                name = block
                last = block
            payload = {"fill": fill} if zero else {"data": data[i].tobytes()}
            out.append(
                wire.RamRecord.build(
                    {"header": {"offset": int(off), "flags": flags}, "block": name, "payload": payload}
                )
            )
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(runs)
def test_encoder_fast_path_equals_construct(run_list: list) -> None:
    mats = [_materialise(r) for r in run_list]
    enc = MainEncoder()
    fast = b"".join(
        (enc.zero_pages(b, o, f) if z else enc.pages(b, o, d)).tobytes() for b, z, o, d, f in mats
    )
    assert fast == _construct_records(mats)


@settings(max_examples=200, deadline=None)
@given(runs, st.integers(1, 9000))
def test_decoder_fast_path_equals_construct(run_list: list, chunk: int) -> None:
    mats = [_materialise(r) for r in run_list]
    records = _construct_records(mats)
    # what construct sees, record by record
    expected = []
    pos = 0
    current = None
    while pos < len(records):
        rec = wire.RamRecord.parse(records[pos:])
        size = len(wire.RamRecord.build(rec))
        current = rec.block if rec.block is not None else current
        off = np.array([rec.header.offset], dtype=np.uint64)
        if rec.kind == RamFlag.ZERO:
            expected.append(ZeroPages(current, off, rec.payload.fill))
        else:
            expected.append(Pages(current, off, np.frombuffer(rec.payload.data, np.uint8).reshape(1, PAGE)))
        pos += size
    enc = MainEncoder()
    blocks = RamBlockList(
        tuple(RamBlockInfo(n, BLOCK_PAGES * PAGE) for n in ("pc.ram", "/rom@etc/acpi/tables", "vga.vram"))
    )
    stream = (
        b"".join(
            enc.encode(e)
            for e in (
                StreamHeader(),
                SectionStart(2, "ram", 0, 4),
                blocks,
                RamEos(),
                SectionFooter(2),
                SectionPart(2),
            )
        )
        + records
        + enc.encode(RamEos())
        + enc.encode(SectionFooter(2))
    )
    dec = MainDecoder()
    got = []
    for a in range(0, len(stream), chunk):
        dec.feed(stream[a : a + chunk])
        got.extend(e for e in dec.events() if isinstance(e, (Pages, ZeroPages)))
    dec.end_of_input()
    assert coalesce(got) == coalesce(expected)


gather_runs = st.lists(
    st.tuples(
        st.sampled_from(["pc.ram", "/rom@etc/acpi/tables", "vga.vram"]),
        st.booleans(),  # zero run (encoded buffer) or gathered PAGE run?
        st.lists(st.integers(0, BLOCK_PAGES - 1), min_size=1, max_size=40),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(gather_runs, st.integers(0, 2**32 - 1))
def test_gathered_pages_equal_construct(run_list: list, seed: int) -> None:
    """pages_iov (the source's sendmsg path: headers + addresses in guest RAM) describes the
    same bytes as wire.RamRecord.build, record by record, and keeps the CONTINUE rule."""
    rng = np.random.default_rng(seed)
    ram = {
        b: rng.integers(0, 256, (BLOCK_PAGES, PAGE), dtype=np.uint8)
        for b in ("pc.ram", "/rom@etc/acpi/tables", "vga.vram")
    }
    mats = []
    enc = MainEncoder()
    fast = []
    for block, zero, pages in run_list:
        rows = np.array(pages, dtype=np.intp)
        offsets = rows.astype(np.uint64) * PAGE
        if zero:
            fast.append(enc.zero_pages(block, offsets).tobytes())
        else:
            piov = enc.pages_iov(block, ram[block], rows)
            got = piov.tobytes()
            assert len(got) == piov.nbytes
            fast.append(got)
        mats.append((block, zero, offsets, ram[block][rows], 0))
    assert b"".join(fast) == _construct_records(mats)
