"""Return-path and COLO decoders/encoders: captures, chunking, round trips, errors, fuzz."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.events import (
    ColoEvent,
    ColoMessage,
    Event,
    Ping,
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpResumeAck,
    RpShut,
)
from protocol.return_path import ColoDecoder, ReturnPathDecoder, encode_colo, encode_rp

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures"

BLOCK_SIZES = MappingProxyType(
    {
        "pc.ram": 0x2000000,
        "/rom@etc/acpi/tables": 0x20000,
        "pc.bios": 0x40000,
        "pc.rom": 0x20000,
        "/rom@etc/table-loader": 0x1000,
        "/rom@etc/acpi/rsdp": 0x1000,
    }
)
RP_CAPTURES = (
    "postcopy-return.bin",
    "postcopy-recovery-first-return.bin",
    "postcopy-recovery-resume-return.bin",
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
names = st.text(max_size=30).filter(lambda s: len(s.encode()) <= 255)


def capture(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def decode(
    data: bytes,
    cuts: Sequence[int] = (),
    make: Callable[[], ReturnPathDecoder | ColoDecoder] = ReturnPathDecoder,
) -> list[Event]:
    """Feed ``data`` split at ``cuts``, drain after every chunk, then end the input."""
    dec = make()
    out: list[Event] = []
    points = [0, *sorted(set(cuts)), len(data)]
    for a, b in itertools.pairwise(points):
        dec.feed(data[a:b])
        out.extend(dec.events())
    out.extend(dec.end_of_input())
    return out


def error_of(
    data: bytes, make: Callable[[], ReturnPathDecoder | ColoDecoder] = ReturnPathDecoder
) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, make=make)
    return info.value


def rp(msg_type: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return msg_type.to_bytes(2, "big") + n.to_bytes(2, "big") + payload


PONG1 = rp(2, (1).to_bytes(4, "big"))


# ---------------------------------------------------------------- captures


def test_capture_postcopy_return() -> None:
    data = capture("postcopy-return.bin")
    assert len(data) == 415
    evs = decode(data)
    assert evs[:5] == [RpPong(1), RpPong(2), RpPong(4), RpReqPages(0xC0000, 4096, "pc.ram"), RpPong(3)]
    reqs = evs[5:-1]
    assert len(reqs) == 22 and all(isinstance(e, RpReqPages) and e.block is None for e in reqs)
    assert all(e.length == 4096 and e.start % 4096 == 0 for e in reqs)
    assert evs[-1] == RpShut(0)


def test_capture_first_return() -> None:
    evs = decode(capture("postcopy-recovery-first-return.bin"))
    assert evs[:5] == [RpPong(1), RpPong(2), RpPong(4), RpReqPages(0xC0000, 4096, "pc.ram"), RpPong(3)]
    assert len(evs) == 10 and all(isinstance(e, RpReqPages) and e.block is None for e in evs[5:])
    assert not any(isinstance(e, RpShut) for e in evs)  # the connection was cut


def test_capture_resume_return() -> None:
    evs = decode(
        capture("postcopy-recovery-resume-return.bin"),
        make=lambda: ReturnPathDecoder(block_sizes=BLOCK_SIZES),
    )
    bitmaps = evs[:6]
    assert [e.block for e in bitmaps] == list(BLOCK_SIZES)  # type: ignore[attr-defined]
    assert [len(e.bitmap) for e in bitmaps] == [1024, 8, 8, 8, 8, 8]  # type: ignore[attr-defined]
    assert evs[6:] == [RpResumeAck(1), RpReqPages(0x33000, 4096, "pc.ram"), RpShut(0)]
    by_name = {e.block: e.bitmap for e in bitmaps}  # type: ignore[attr-defined]
    # little-endian bit order: bit k of byte j is page 8j+k. pc.bios was discarded from
    # 0x1A000 (page 26) on, so exactly pages 0..25 are received.
    bios = int.from_bytes(by_name["pc.bios"], "little")
    assert bios == (1 << 26) - 1
    assert by_name["/rom@etc/acpi/tables"] == b"\xff\xff\xff\xff" + bytes(4)  # 32 pages, padded
    assert by_name["/rom@etc/acpi/rsdp"] == bytes(8)


@pytest.mark.parametrize("name", RP_CAPTURES)
def test_capture_reencodes_identically(name: str) -> None:
    data = capture(name)
    evs = decode(data, make=lambda: ReturnPathDecoder(block_sizes=BLOCK_SIZES))
    assert b"".join(encode_rp(e) for e in evs) == data


@pytest.mark.parametrize("name", RP_CAPTURES)
def test_capture_one_byte_chunks(name: str) -> None:
    data = capture(name)
    assert decode(data, range(1, len(data))) == decode(data)


@SETTINGS
@given(st.sampled_from(RP_CAPTURES), st.data())
def test_capture_random_chunks(name: str, data: st.DataObject) -> None:
    raw = capture(name)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40))
    assert decode(raw, cuts) == decode(raw)


# ---------------------------------------------------------------- round trips


rp_events = st.one_of(
    st.builds(RpShut, u32),
    st.builds(RpPong, u32),
    st.builds(RpResumeAck, u32),
    st.builds(RpReqPages, u64, u32, st.none() | names),
    st.builds(RpRecvBitmap, names, st.binary(max_size=200)),
)


@SETTINGS
@given(st.lists(rp_events, max_size=12), st.data())
def test_rp_roundtrip(events: list[Event], data: st.DataObject) -> None:
    # REQ_PAGES needs an earlier REQ_PAGES_ID to name its block
    events = [RpReqPages(0, 4096, "pc.ram"), *events]
    raw = b"".join(encode_rp(e) for e in events)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    assert decode(raw, cuts) == events
    assert b"".join(encode_rp(e) for e in decode(raw)) == raw


def test_encode_rp_bytes() -> None:
    assert encode_rp(RpShut(1)) == bytes.fromhex("0001 0004 00000001")
    assert encode_rp(RpReqPages(0x1000, 0x1000)) == bytes.fromhex("0004 000c 0000000000001000 00001000")
    assert encode_rp(RpReqPages(0, 1, "ab")) == bytes.fromhex("0003 000f 0000000000000000 00000001 02 6162")
    assert encode_rp(RpRecvBitmap("a", b"\x01" * 8)) == bytes.fromhex(
        "0005 0002 01 61 0000000000000008 0101010101010101 0123456789abcdef"
    )
    assert encode_rp(RpResumeAck()) == bytes.fromhex("0006 0004 00000001")


@pytest.mark.parametrize(
    "event, exc",
    [
        (Ping(1), TypeError),
        (RpShut(-1), ValueError),
        (RpPong(1 << 32), ValueError),
        (RpReqPages(1 << 64, 0), ValueError),
        (RpReqPages(0, 0, "x" * 256), ValueError),
        (RpRecvBitmap("é" * 128, b""), ValueError),
    ],
)
def test_encode_rp_rejects(event: Event, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        encode_rp(event)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("msg_type", [0, 7, 8, 0xFFFF])
def test_bad_type(msg_type: int) -> None:
    # detected from the header alone, at the offset where the message starts
    dec = ReturnPathDecoder()
    dec.feed(PONG1 + rp(msg_type, b"", length=4))
    assert next(dec.events()) == RpPong(1)
    with pytest.raises(ProtocolError) as info:
        dec.next_event()
    err = info.value
    assert (err.channel, err.offset) == ("return-path", 8)
    assert f"type {msg_type}" in err.reason
    with pytest.raises(ProtocolError) as again:  # sticky
        dec.feed(b"x")
    assert again.value is err


@pytest.mark.parametrize(
    "msg_type, length",
    [(1, 0), (1, 3), (1, 5), (2, 8), (4, 11), (4, 13), (4, 16), (6, 0), (6, 5)],
)
def test_fixed_length_mismatch(msg_type: int, length: int) -> None:
    err = error_of(PONG1 + rp(msg_type, bytes(length)))
    assert err.offset == 8 and f"length {length}" in err.reason


def test_oversized_message_rejected_from_header() -> None:
    for msg_type in (3, 5):
        dec = ReturnPathDecoder()
        dec.feed(rp(msg_type, b"", length=513))  # payload never arrives: refused at once
        with pytest.raises(ProtocolError, match="maximum 512"):
            dec.next_event()


@pytest.mark.parametrize(
    "payload, what",
    [
        (bytes(12), "shorter than 13"),
        (bytes(12) + b"\x03ab", "needs length 16"),
        (bytes(12) + b"\x01ab", "needs length 14"),
        (bytes(12) + b"\x00", None),  # empty name is well-formed
        (bytes(12) + b"\x02\xff\xfe", "UTF-8"),
    ],
)
def test_req_pages_id_lengths(payload: bytes, what: str | None) -> None:
    data = PONG1 + rp(3, payload)
    if what is None:
        assert decode(data)[1] == RpReqPages(0, 0, "")
        return
    err = error_of(data)
    assert err.offset == 8 and what in err.reason


def test_req_pages_needs_a_block() -> None:
    err = error_of(rp(4, bytes(12)))
    assert err.offset == 0 and "before any REQ_PAGES_ID" in err.reason


def test_recv_bitmap_lengths() -> None:
    assert "missing" in error_of(rp(5, b"")).reason
    assert "needs length 3" in error_of(rp(5, b"\x02a")).reason
    assert "needs length 2" in error_of(rp(5, b"\x01ab")).reason


def test_recv_bitmap_cap_checked_before_buffering() -> None:
    head = rp(5, b"\x06pc.ram") + (1 << 40).to_bytes(8, "big")
    dec = ReturnPathDecoder()
    dec.feed(PONG1 + head)  # only the size: the bitmap itself is never waited for
    assert dec.next_event() == RpPong(1)
    with pytest.raises(ProtocolError, match="limit") as info:
        dec.next_event()
    assert info.value.offset == 8
    small = rp(5, b"\x01a") + (64).to_bytes(8, "big")
    err = error_of(small, make=lambda: ReturnPathDecoder(max_bitmap_bytes=63))
    assert "64-byte bitmap" in err.reason
    ok = encode_rp(RpRecvBitmap("a", bytes(64)))
    assert decode(ok, make=lambda: ReturnPathDecoder(max_bitmap_bytes=64)) == [RpRecvBitmap("a", bytes(64))]


def test_recv_bitmap_block_sizes() -> None:
    def make() -> ReturnPathDecoder:
        return ReturnPathDecoder(block_sizes=BLOCK_SIZES)

    good = encode_rp(RpRecvBitmap("pc.bios", bytes(8)))
    assert decode(good, make=make) == [RpRecvBitmap("pc.bios", bytes(8))]
    err = error_of(encode_rp(RpRecvBitmap("pc.bios", bytes(16))), make=make)
    assert "expected 8" in err.reason
    err = error_of(encode_rp(RpRecvBitmap("pc.ram", bytes(1016))), make=make)
    assert "expected 1024" in err.reason
    err = error_of(encode_rp(RpRecvBitmap("nope", bytes(8))), make=make)
    assert "unknown RAM block 'nope'" in err.reason


def test_req_pages_block_sizes() -> None:
    def make() -> ReturnPathDecoder:
        return ReturnPathDecoder(block_sizes=BLOCK_SIZES)

    assert "unknown RAM block" in error_of(encode_rp(RpReqPages(0, 4096, "x")), make=make).reason
    last = encode_rp(RpReqPages(0x3F000, 4096, "pc.bios"))
    assert len(decode(last, make=make)) == 1
    err = error_of(last + encode_rp(RpReqPages(0x40000, 4096)), make=make)
    assert "beyond the end of block 'pc.bios'" in err.reason and err.offset == len(last)


def test_recv_bitmap_end_mark() -> None:
    raw = bytearray(encode_rp(RpRecvBitmap("pc.rom", bytes(8))))
    raw[-1] ^= 1
    err = error_of(PONG1 + bytes(raw))
    assert err.offset == 8 and "end mark" in err.reason


def test_resume_ack_value_left_to_consumer() -> None:
    assert decode(rp(6, (2).to_bytes(4, "big"))) == [RpResumeAck(2)]


@pytest.mark.parametrize("name", RP_CAPTURES)
def test_truncations(name: str) -> None:
    data = capture(name)
    evs = decode(data)
    boundaries = {0}
    pos = 0
    for ev in evs:
        pos += len(encode_rp(ev))
        boundaries.add(pos)
    for n in range(len(data)):
        dec = ReturnPathDecoder()
        dec.feed(data[:n])
        list(dec.events())
        if n in boundaries:
            dec.end_of_input()
        else:
            with pytest.raises(ProtocolError) as info:
                dec.end_of_input()
            assert info.value.offset == max(b for b in boundaries if b <= n)
            assert "closed inside" in info.value.reason


# ---------------------------------------------------------------- fuzz


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(capture(draw(st.sampled_from(RP_CAPTURES))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        else:
            del data[i:]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans(), st.data())
def test_fuzz_only_protocol_errors(data: bytes, strict: bool, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=10))

    def make() -> ReturnPathDecoder:
        if strict:
            return ReturnPathDecoder(block_sizes=BLOCK_SIZES, max_bitmap_bytes=4096)
        return ReturnPathDecoder()

    try:
        evs = decode(data, cuts, make=make)
    except ProtocolError as e:
        assert e.channel == "return-path" and e.offset is not None and 0 <= e.offset <= len(data)
        return
    # what decodes re-encodes to the same bytes
    assert b"".join(encode_rp(e) for e in evs) == data


# ---------------------------------------------------------------- COLO


colo_events = st.sampled_from(list(ColoMessage)).flatmap(
    lambda m: st.builds(ColoEvent, st.just(m), u64 if m == ColoMessage.VMSTATE_SIZE else st.none())
)


@SETTINGS
@given(st.lists(colo_events, max_size=10), st.data())
def test_colo_roundtrip(events: list[ColoEvent], data: st.DataObject) -> None:
    raw = b"".join(encode_colo(e) for e in events)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    assert decode(raw, cuts, make=ColoDecoder) == events
    assert decode(raw, range(1, len(raw)), make=ColoDecoder) == events


def test_colo_bytes() -> None:
    assert encode_colo(ColoEvent(ColoMessage.CHECKPOINT_READY)) == bytes(4)
    assert encode_colo(ColoEvent(ColoMessage.VMSTATE_SIZE, 0x1234)) == bytes.fromhex(
        "00000004 0000000000001234"
    )


def test_colo_errors() -> None:
    err = error_of(bytes.fromhex("00000001 00000007"), make=ColoDecoder)
    assert (err.channel, err.offset) == ("colo", 4) and "invalid COLO message 7" in err.reason
    err = error_of(bytes.fromhex("00000004 00000000"), make=ColoDecoder)
    assert err.offset == 0 and "closed inside" in err.reason
    err = error_of(bytes.fromhex("000000"), make=ColoDecoder)
    assert err.offset == 0
    with pytest.raises(ValueError):
        encode_colo(ColoEvent(ColoMessage.VMSTATE_SIZE))
    with pytest.raises(ValueError):
        encode_colo(ColoEvent(ColoMessage.VMSTATE_SEND, 5))
    with pytest.raises(ValueError):
        encode_colo(ColoEvent(ColoMessage.VMSTATE_SIZE, -1))
    with pytest.raises(TypeError):
        encode_colo(RpShut(0))  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_colo_fuzz(data: bytes) -> None:
    try:
        evs = decode(data, make=ColoDecoder)
    except ProtocolError as e:
        assert e.channel == "colo"
        return
    assert b"".join(encode_colo(e) for e in evs) == data  # type: ignore[arg-type]


def test_end_of_input_returns_pending_events_and_closes() -> None:
    dec = ReturnPathDecoder()
    dec.feed(PONG1 + encode_rp(RpShut(0)))  # nothing drained yet
    assert dec.end_of_input() == [RpPong(1), RpShut(0)]
    assert dec.offset == 16 and dec.pending == 0
    with pytest.raises(RuntimeError):
        dec.feed(PONG1)


# ---- the REQ_PAGES fast path (struct) against the construct definitions


@given(
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.one_of(st.none(), st.text(min_size=1, max_size=40).filter(lambda t: len(t.encode()) <= 255)),
)
def test_req_pages_fast_encode_is_byte_identical(start: int, length: int, block: str | None) -> None:
    from protocol.return_path import encode_req_pages, encode_rp_construct

    ev = RpReqPages(start, length, block)
    assert encode_req_pages(start, length, block) == encode_rp_construct(ev) == encode_rp(ev)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 32) - 1), st.binary(max_size=8))
def test_req_pages_fast_decode_matches_construct(start: int, length: int, junk: bytes) -> None:
    from protocol.return_path import encode_rp_construct
    from protocol.wire import RP_PAYLOADS, RpMessage

    first = encode_rp_construct(RpReqPages(0, 4096, "b"))
    msg = encode_rp_construct(RpReqPages(start, length, None))
    dec = ReturnPathDecoder()
    dec.feed(first + msg)
    evs = list(dec.events())
    ref = RP_PAYLOADS[RpMessage.REQ_PAGES].parse(msg[4:])
    assert evs[1] == RpReqPages(ref.start, ref.length, None)
    # a REQ_PAGES whose length field lies is refused before the payload is read
    bad = ReturnPathDecoder()
    bad.feed(first + msg[:2] + (12 + len(junk) + 1).to_bytes(2, "big") + msg[4:] + junk + b"x")
    with pytest.raises(ProtocolError):
        list(bad.events())
