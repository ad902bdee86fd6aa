"""Main-channel decoder/encoder: round trips, chunking, captures and grammar errors."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.decoder import MainDecoder
from protocol.encoder import MainEncoder
from protocol.errors import ProtocolError
from protocol.events import (
    Configuration,
    DeviceSection,
    EndOfStream,
    Event,
    Packaged,
    Pages,
    Ping,
    PostcopyRamDiscard,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
    coalesce,
)

from .streamgen import precopy_streams

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"


def encode_all(events: list[Event]) -> bytes:
    enc = MainEncoder()
    return b"".join(enc.encode(e) for e in events)


def decode_all(data: bytes, cuts: list[int] | None = None, **kw: object) -> list[Event]:
    dec = MainDecoder(**kw)  # type: ignore[arg-type]
    out: list[Event] = []
    points = [0, *(cuts or []), len(data)]
    for a, b in itertools.pairwise(points):
        dec.feed(data[a:b])
        out.extend(dec.events())
    out.extend(dec.end_of_input())
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(precopy_streams(), st.data())
def test_round_trip_any_chunking(events: list[Event], data: st.DataObject) -> None:
    raw = encode_all(events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=25)))
    decoded = decode_all(raw, cuts)
    assert coalesce(decoded) == coalesce(events)
    # and the decoded events encode back to the very same bytes
    assert encode_all(decoded) == raw


@settings(max_examples=30, deadline=None)
@given(precopy_streams())
def test_one_byte_at_a_time(events: list[Event]) -> None:
    raw = encode_all(events)
    assert coalesce(decode_all(raw, list(range(1, len(raw))))) == coalesce(events)


def test_zero_copy_views_and_copy_mode_agree() -> None:
    enc = MainEncoder()
    blocks = RamBlockList((RamBlockInfo("pc.ram", 64 * 4096),))
    data = np.random.default_rng(3).integers(0, 256, (64, 4096), dtype=np.uint8)
    raw = b"".join(
        [
            enc.encode(StreamHeader()),
            enc.encode(SectionStart(1, "ram", 0, 4)),
            enc.encode(blocks),
            enc.encode(RamEos()),
            enc.encode(SectionFooter(1)),
            enc.encode(SectionPart(1)),
            enc.pages("pc.ram", np.arange(64, dtype=np.uint64) * 4096, data).tobytes(),
            enc.encode(RamEos()),
            enc.encode(SectionFooter(1)),
        ]
    )
    ram = np.zeros((64, 4096), np.uint8)
    dec = MainDecoder(zero_copy=True)
    dec.feed(raw)
    for ev in dec.events():
        if isinstance(ev, Pages):
            ram[(ev.offsets // 4096).astype(np.intp)] = ev.data
    assert np.array_equal(ram, data)


# ------------------------------------------------------------------ real captures

CAPTURE_COUNTS = {
    "precopy-paused-pc32m.bin": (8273, 49, 0),
    "background-snapshot.bin": (8214, 108, 0),
    "multifd-main.bin": (8216, 0, 0),
    "xbzrle-main.bin": (16387, 166, 4),
    "postcopy-main.bin": (16348, 166, 0),
}


def count_pages(events: list[Event]) -> tuple[int, int, int]:
    z = sum(len(e) for e in events if isinstance(e, ZeroPages))
    n = sum(len(e) for e in events if isinstance(e, Pages))
    x = sum(1 for e in events if isinstance(e, XbzrlePage))
    return z, n, x


@pytest.mark.parametrize("name", sorted(CAPTURE_COUNTS))
@pytest.mark.parametrize("chunk", [1 << 20, 4097, 13])
def test_capture_counts(name: str, chunk: int) -> None:
    raw = (CAPTURES / name).read_bytes()
    events = decode_all(raw, list(range(chunk, len(raw), chunk)))
    assert count_pages(events) == CAPTURE_COUNTS[name]
    assert any(isinstance(e, EndOfStream) for e in events)
    # byte-identical re-encoding of a real QEMU stream
    assert encode_all(events) == raw


def test_resumed_postcopy_capture() -> None:
    raw = (CAPTURES / "postcopy-recovery-resume-main.bin").read_bytes()
    events = decode_all(raw, expect_header=False, lenient_blocks=True, assume_ram_section=True)
    assert count_pages(events) == (6675, 69, 0)
    assert encode_all(events) == raw


def test_precopy_capture_devices() -> None:
    raw = (CAPTURES / "precopy-paused-pc32m.bin").read_bytes()
    events = decode_all(raw)
    devices = [e for e in events if isinstance(e, DeviceSection)]
    names = [d.idstr for d in devices]
    assert names[0] == "timer"
    gs = next(d for d in devices if d.idstr == "globalstate")
    assert gs.body[4:13] == b"prelaunch"
    assert isinstance(events[-1], VmDescription)
    assert len(events[-1].parsed()["devices"]) == len(devices)


def test_postcopy_capture_package() -> None:
    raw = (CAPTURES / "postcopy-main.bin").read_bytes()
    events = decode_all(raw)
    pkg = next(e for e in events if isinstance(e, Packaged))
    assert len(pkg.data) == 12935
    discards = [e for e in events if isinstance(e, PostcopyRamDiscard)]
    assert discards[0].block == "pc.ram" and discards[0].ranges == ((0, 0x2000000),)
    sub = MainDecoder(expect_header=False, known_blocks={"pc.ram": 0x2000000})
    sub.feed(pkg.data)
    inner = [*sub.events(), *sub.end_of_input()]
    assert type(inner[0]).__name__ == "PostcopyListen"
    assert type(inner[-1]).__name__ == "PostcopyRun"
    assert Ping(3) in inner
    assert sum(isinstance(e, DeviceSection) for e in inner) > 10


# ------------------------------------------------------------------ grammar errors


def _prefix() -> bytes:
    enc = MainEncoder()
    return b"".join(
        [
            enc.encode(StreamHeader()),
            enc.encode(Configuration("pc-i440fx-7.2")),
            enc.encode(SectionStart(2, "ram", 0, 4)),
            enc.encode(RamBlockList((RamBlockInfo("pc.ram", 16 * 4096),))),
            enc.encode(RamEos()),
            enc.encode(SectionFooter(2)),
        ]
    )


def expect_error(raw: bytes, match: str) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode_all(raw)
    assert info.value.offset is not None
    return info.value


def test_bad_magic_and_version() -> None:
    expect_error(b"QEVX\x00\x00\x00\x03", "bad magic")
    expect_error(b"QEVM\x00\x00\x00\x02", "version 2")
    expect_error(b"QEVM\x00\x00\x00\x07", "unsupported stream version 7")


def test_part_for_unknown_section() -> None:
    err = expect_error(_prefix() + b"\x02\x00\x00\x00\x09", "never started")
    assert err.offset == len(_prefix())


def test_footer_mismatch() -> None:
    raw = _prefix() + b"\x02\x00\x00\x00\x02" + struct.pack(">Q", 0x10) + b"\x7e\x00\x00\x00\x03"
    expect_error(raw, "footer names section id 3")


def test_command_length_lies() -> None:
    expect_error(_prefix() + b"\x08\x00\x02\x00\x05" + b"\x00" * 5, "PING with length 5")
    expect_error(_prefix() + b"\x08\x00\x01\x00\x01\x00", "OPEN_RETURN_PATH with length 1")
    expect_error(_prefix() + b"\x08\x00\x0b\x00\x00", "unknown command 11")
    expect_error(_prefix() + b"\x08\x00\x0a\x00\x05\x07pc.ram", "disagrees")


def test_unknown_flags_and_combinations() -> None:
    part = _prefix() + b"\x02\x00\x00\x00\x02"
    expect_error(part + struct.pack(">Q", 0x200), "unknown RAM flags 0x200")
    expect_error(part + struct.pack(">Q", 0x00A) + b"\x06pc.ram", "several page types")
    expect_error(part + struct.pack(">Q", 0x030), "CONTINUE flag on a non-page")
    expect_error(part + struct.pack(">Q", 0x001), "obsolete")


def test_block_never_announced_and_offset_out_of_range() -> None:
    part = _prefix() + b"\x02\x00\x00\x00\x02"
    expect_error(part + struct.pack(">Q", 0x002) + b"\x05other\x00", "never announced")
    expect_error(part + struct.pack(">Q", 16 * 4096 | 0x002) + b"\x06pc.ram\x00", "beyond the end")
    expect_error(part + struct.pack(">Q", 0x022) + b"\x00", "CONTINUE flag but no block")
    # the vectorised path checks offsets too
    runs = (
        struct.pack(">Q", 0x002)
        + b"\x06pc.ram\x00"
        + b"".join(struct.pack(">QB", (i * 4096) | 0x22, 0) for i in range(1, 40))
    )
    expect_error(part + runs, "beyond the end")


def test_lengths_over_caps() -> None:
    expect_error(_prefix() + b"\x08\x00\x07\x00\x04" + struct.pack(">I", (1 << 24) + 1), "exceeds the limit")
    part = _prefix() + b"\x02\x00\x00\x00\x02"
    expect_error(part + struct.pack(">Q", 0x042) + b"\x06pc.ram\x01" + struct.pack(">H", 5000), "two|several")
    expect_error(
        part + struct.pack(">Q", 0x040) + b"\x06pc.ram\x01" + struct.pack(">H", 5000), "exceeds the page"
    )
    expect_error(b"QEVM\x00\x00\x00\x03\x07" + struct.pack(">I", 1 << 30), "not sane")


def test_mem_size_lies() -> None:
    head = b"QEVM\x00\x00\x00\x03\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
    raw = head + struct.pack(">Q", 0x1000 | 4) + b"\x06pc.ram" + struct.pack(">Q", 0x2000)
    expect_error(raw, "exceeds the 0x1000 bytes left")


def test_truncated_stream() -> None:
    raw = _prefix() + b"\x02\x00\x00\x00\x02" + struct.pack(">Q", 0x008) + b"\x06pc.ram" + b"\x00" * 100
    expect_error(raw, "ends in the middle")


def test_errors_are_sticky() -> None:
    dec = MainDecoder()
    dec.feed(b"QEVX\x00\x00\x00\x03")
    with pytest.raises(ProtocolError):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.next_event()


# ---- postcopy-preempt channel: bare RAM records ended by EOS (WIRE.md 6.7)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=8), st.sampled_from([1, 7, 100, 4095, 4104, 9000]))
def test_preempt_channel_round_trip_any_chunking(pages: list[int], chunk: int) -> None:
    from protocol.encoder import MainEncoder
    from protocol.events import Pages, RamEos

    enc = MainEncoder()
    offsets = np.array(pages, np.uint64) * 4096
    data = np.repeat(np.arange(len(pages), dtype=np.uint8)[:, None] + 1, 4096, axis=1)
    stream = enc.pages("pc.ram", offsets, data).tobytes() + enc.encode(RamEos())
    dec = MainDecoder(expect_header=False, known_blocks={"pc.ram": 256 * 4096}, ram_channel=2)
    got: list = []
    for i in range(0, len(stream), chunk):
        dec.feed(stream[i : i + chunk])
        got += list(dec.events())
    got += dec.end_of_input()
    assert dec.finished
    assert isinstance(got[-1], RamEos)
    pages_evs = [e for e in got if isinstance(e, Pages)]
    assert np.concatenate([e.offsets for e in pages_evs]).tolist() == offsets.tolist()
    assert np.array_equal(np.concatenate([e.data for e in pages_evs]), data)


def test_preempt_channel_rejects_sections_and_trailing_data() -> None:
    from protocol.encoder import MainEncoder
    from protocol.errors import ProtocolError
    from protocol.events import RamEos, SectionPart

    enc = MainEncoder()
    for bad in (enc.encode(SectionPart(2)), enc.encode(RamEos()) + b"\x00"):
        dec = MainDecoder(expect_header=False, known_blocks={"pc.ram": 4096}, ram_channel=2)
        dec.feed(bad)
        with pytest.raises(ProtocolError):
            list(dec.events())
            dec.end_of_input()
    dec = MainDecoder(expect_header=False, known_blocks={"pc.ram": 4096}, ram_channel=2)
    dec.feed(enc.pages("pc.ram", np.array([0], np.uint64), np.zeros((1, 4096), np.uint8)).tobytes()[:100])
    list(dec.events())
    with pytest.raises(ProtocolError, match="RAM section"):
        dec.end_of_input()
