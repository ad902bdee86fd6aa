"""Multifd channel decoder/encoders: captures byte-identical, chunking, round trips, errors, fuzz."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.events import Event, MultifdInit, MultifdPacket
from protocol.multifd import MultifdChannelDecoder, encode_multifd_init, encode_multifd_packet

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures"
PAGE = 4096
HDR = 1344

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

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def capture(name: str) -> bytes:
    return (CAPTURES / name).read_bytes()


def decode(
    data: bytes,
    cuts: Sequence[int] = (),
    make: Callable[[], MultifdChannelDecoder] = MultifdChannelDecoder,
) -> list[Event]:
    dec = make()
    out: list[Event] = []
    points = [0, *sorted(set(cuts)), len(data)]
    for a, b in itertools.pairwise(points):
        dec.feed(data[a:b])
        out.extend(dec.events())
    out.extend(dec.end_of_input())
    return out


def encode(events: Sequence[Event]) -> bytes:
    parts = []
    for ev in events:
        if isinstance(ev, MultifdInit):
            parts.append(encode_multifd_init(ev))
        else:
            assert isinstance(ev, MultifdPacket)
            parts.append(encode_multifd_packet(ev))
    return b"".join(parts)


def same_packet(a: MultifdPacket, b: MultifdPacket) -> bool:
    """Equality including the raw fields MultifdPacket.__eq__ leaves out."""

    def size(p: MultifdPacket) -> int:
        return p.normal_pages * PAGE if p.next_packet_size == -1 else p.next_packet_size

    def stale(p: MultifdPacket) -> np.ndarray:
        n = p.pages_alloc - p.normal_pages
        return np.zeros(n, np.uint64) if p.stale_offsets is None else np.asarray(p.stale_offsets, np.uint64)

    return a == b and size(a) == size(b) and np.array_equal(stale(a), stale(b))


def error_of(data: bytes, make: Callable[[], MultifdChannelDecoder] = MultifdChannelDecoder) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(data, make=make)
    assert info.value.channel == "multifd"
    return info.value


# ---------------------------------------------------------------- captures

# (flags, normal_pages, packet_num, block, next_packet_size) per packet, as captured
CHAN_A = [
    (1, 0, 1, "", 0),
    (0, 2, 3, "/rom@etc/acpi/tables", 8192),
    (1, 1, 8, "/rom@etc/table-loader", 4096),
    (0, 0, 8, "/rom@etc/table-loader", 4096),  # 7.2 quirk: stale size, block and number
    (1, 0, 10, "/rom@etc/table-loader", 4096),
]
CHAN_B = [
    (1, 0, 0, "", 0),
    (0, 58, 2, "pc.ram", 58 * PAGE),
    (0, 46, 4, "pc.bios", 46 * PAGE),
    (1, 1, 7, "/rom@etc/acpi/rsdp", 4096),
    (0, 0, 7, "/rom@etc/acpi/rsdp", 4096),
    (1, 0, 9, "/rom@etc/acpi/rsdp", 4096),
]


@pytest.mark.parametrize(
    "name, chan, pages, table",
    [("multifd-chan-a.bin", 1, 3, CHAN_A), ("multifd-chan-b.bin", 0, 105, CHAN_B)],
)
def test_capture(name: str, chan: int, pages: int, table: list[tuple[int, int, int, str, int]]) -> None:
    data = capture(name)
    evs = decode(
        data,
        make=lambda: MultifdChannelDecoder(channels=2, expected_uuid=bytes(16), block_sizes=BLOCK_SIZES),
    )
    assert evs[0] == MultifdInit(uuid=bytes(16), channel_id=chan, version=1)
    packets = evs[1:]
    assert all(isinstance(p, MultifdPacket) for p in packets)
    got = [(p.flags, p.normal_pages, p.packet_num, p.block, p.next_packet_size) for p in packets]  # type: ignore[attr-defined]
    assert got == table
    assert sum(p.normal_pages for p in packets) == pages  # type: ignore[attr-defined]
    # page data and offsets are what the capture holds
    pos = 64
    for p in packets:
        assert isinstance(p, MultifdPacket)
        assert p.offsets.dtype == np.uint64 and p.data.dtype == np.uint8
        assert p.data.shape == (p.normal_pages, PAGE)
        slots = np.frombuffer(data, ">u8", count=128, offset=pos + 320)
        assert np.array_equal(p.offsets, slots[: p.normal_pages])
        assert p.data.tobytes() == data[pos + HDR : pos + HDR + p.normal_pages * PAGE]
        pos += HDR + p.normal_pages * PAGE
    assert pos == len(data)
    # re-encoding is byte-identical, stale offset slots included
    assert encode(evs) == data


def test_capture_stale_offsets_kept() -> None:
    evs = decode(capture("multifd-chan-b.bin"))
    bios = evs[3]
    assert isinstance(bios, MultifdPacket) and bios.block == "pc.bios"
    assert bios.stale_offsets is not None and len(bios.stale_offsets) == 128 - 46
    # slots 46..57 still hold the pc.ram offsets of the previous packet
    ram = evs[2]
    assert isinstance(ram, MultifdPacket)
    assert np.array_equal(bios.stale_offsets[:12], ram.offsets[46:58])
    assert not bios.stale_offsets[12:].any()


@pytest.mark.parametrize("name", ["multifd-chan-a.bin"])
def test_capture_one_byte_chunks(name: str) -> None:
    data = capture(name)
    one = decode(data, range(1, len(data)))
    whole = decode(data)
    assert one[0] == whole[0]
    assert all(same_packet(a, b) for a, b in zip(one[1:], whole[1:], strict=True))  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["multifd-chan-a.bin", "multifd-chan-b.bin"]), st.data())
def test_capture_random_chunks(name: str, data: st.DataObject) -> None:
    raw = capture(name)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=200))
    evs = decode(raw, cuts)
    assert encode(evs) == raw


# ---------------------------------------------------------------- round trips


@st.composite
def packets(draw: st.DrawFn) -> MultifdPacket:
    alloc = draw(st.sampled_from([0, 1, 3, 8, 128]))
    n = draw(st.integers(0, min(alloc, 4)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, 1 << 40, size=n, dtype=np.uint64) * np.uint64(PAGE)
    data = rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
    stale = None
    if draw(st.booleans()) and alloc > n:
        stale = rng.integers(0, 1 << 63, size=alloc - n, dtype=np.uint64)
    return MultifdPacket(
        flags=draw(st.integers(0, 0xFFFF_FFFF).map(lambda f: f & ~0xE)),
        pages_alloc=alloc,
        packet_num=draw(st.integers(0, 2**64 - 1)),
        block=draw(st.text(max_size=20).filter(lambda s: "\0" not in s and len(s.encode()) < 256)),
        offsets=offsets,
        data=data,
        next_packet_size=draw(st.sampled_from([-1, 0, 4096, 0xFFFF_FFFF])),
        stale_offsets=stale,
    )


@SETTINGS
@given(st.binary(min_size=16, max_size=16), st.integers(0, 255), st.lists(packets(), max_size=4), st.data())
def test_roundtrip(uuid: bytes, chan: int, pkts: list[MultifdPacket], data: st.DataObject) -> None:
    events: list[Event] = [MultifdInit(uuid=uuid, channel_id=chan), *pkts]
    raw = encode(events)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30))
    back = decode(raw, cuts)
    assert back[0] == events[0]
    assert len(back) == len(events)
    assert all(same_packet(a, b) for a, b in zip(back[1:], pkts, strict=True))  # type: ignore[arg-type]
    assert encode(back) == raw


def test_encode_layout() -> None:
    assert encode_multifd_init(MultifdInit(uuid=bytes(range(16)), channel_id=3)) == (
        bytes.fromhex("1122334400000001") + bytes(range(16)) + b"\x03" + bytes(39)
    )
    pkt = MultifdPacket(
        flags=1,
        pages_alloc=128,
        packet_num=5,
        block="pc.ram",
        offsets=np.array([0x1000], np.uint64),
        data=np.full((1, PAGE), 7, np.uint8),
    )
    raw = encode_multifd_packet(pkt)
    assert len(raw) == HDR + PAGE
    assert raw[:32] == bytes.fromhex("11223344 00000001 00000001 00000080 00000001 00001000 0000000000000005")
    assert raw[32:64] == bytes(32) and raw[64:320] == b"pc.ram" + bytes(250)
    assert raw[320:328] == (0x1000).to_bytes(8, "big") and raw[328:HDR] == bytes(127 * 8)
    assert raw[HDR:] == b"\x07" * PAGE


@pytest.mark.parametrize(
    "kw",
    [
        dict(data=np.zeros((2, PAGE), np.uint8)),  # shape does not match the offsets
        dict(pages_alloc=0),  # more pages than slots
        dict(flags=0x2),  # zlib
        dict(block="x" * 256),
        dict(stale_offsets=np.zeros(3, np.uint64)),
        dict(packet_num=-1),
    ],
)
def test_encode_rejects(kw: dict[str, object]) -> None:
    base: dict[str, object] = dict(
        flags=0,
        pages_alloc=128,
        packet_num=0,
        block="pc.ram",
        offsets=np.zeros(1, np.uint64),
        data=np.zeros((1, PAGE), np.uint8),
    )
    base.update(kw)
    with pytest.raises(ValueError):
        encode_multifd_packet(MultifdPacket(**base))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_multifd_init(MultifdInit(uuid=bytes(15), channel_id=0))
    with pytest.raises(TypeError):
        encode_multifd_init(MultifdPacket(**base))  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors


def init(chan: int = 0, uuid: bytes = bytes(16)) -> bytes:
    return encode_multifd_init(MultifdInit(uuid=uuid, channel_id=chan))


def header(**kw: int) -> bytearray:
    """An empty packet's header with raw field overrides (byte offsets of §9.2)."""
    raw = bytearray(
        encode_multifd_packet(
            MultifdPacket(
                flags=0,
                pages_alloc=128,
                packet_num=0,
                block="pc.ram",
                offsets=np.zeros(0, np.uint64),
                data=np.zeros((0, PAGE), np.uint8),
            )
        )
    )
    where = dict(magic=0, version=4, flags=8, pages_alloc=12, normal_pages=16, next_packet_size=20)
    for k, v in kw.items():
        raw[where[k] : where[k] + 4] = v.to_bytes(4, "big")
    return raw


@pytest.mark.parametrize(
    "data, what, offset",
    [
        (b"\x11\x22\x33\x45" + init()[4:], "magic", 0),
        (init()[:4] + b"\x00\x00\x00\x02" + init()[8:], "version 2", 0),
        (init() + header(magic=0x11223345), "magic", 64),
        (init() + header(version=0), "version 0", 64),
        (init() + header(flags=0x2), "compression not supported", 64),
        (init() + header(flags=0x5), "compression not supported", 64),
        (init() + header(pages_alloc=129), "pages_alloc 129", 64),
        (init() + header(normal_pages=129), "more than its pages_alloc", 64),
        (init() + header(pages_alloc=4, normal_pages=5), "more than its pages_alloc", 64),
        (init() + header() + header(normal_pages=1), "closed inside the page data", 64 + HDR),
        (init() + header()[:100], "closed inside a multifd packet header", 64),
        (init()[:10], "closed inside the multifd initial packet", 0),
    ],
)
def test_errors(data: bytes, what: str, offset: int) -> None:
    err = error_of(bytes(data))
    assert what in err.reason and err.offset == offset


def test_pages_alloc_refused_before_buffering() -> None:
    dec = MultifdChannelDecoder()
    dec.feed(init() + header(pages_alloc=0x7FFF_FFFF)[:320])
    assert isinstance(dec.next_event(), MultifdInit)
    with pytest.raises(ProtocolError, match="pages_alloc"):
        dec.next_event()
    dec = MultifdChannelDecoder(max_pages_alloc=16)
    with pytest.raises(ProtocolError, match="maximum 16"):
        dec.feed(init() + header())
        list(dec.events())


def test_optional_checks() -> None:
    assert (
        "UUID"
        in error_of(init(uuid=b"\1" * 16), make=lambda: MultifdChannelDecoder(expected_uuid=bytes(16))).reason
    )
    assert "channel id 2" in error_of(init(chan=2), make=lambda: MultifdChannelDecoder(channels=2)).reason

    def packet(block: str, offset: int) -> bytes:
        return encode_multifd_packet(
            MultifdPacket(
                flags=0,
                pages_alloc=128,
                packet_num=0,
                block=block,
                offsets=np.array([offset], np.uint64),
                data=np.zeros((1, PAGE), np.uint8),
            )
        )

    def make() -> MultifdChannelDecoder:
        return MultifdChannelDecoder(block_sizes=BLOCK_SIZES)

    assert len(decode(init() + packet("pc.rom", 0x1F000), make=make)) == 2
    assert "unknown RAM block 'x'" in error_of(init() + packet("x", 0), make=make).reason
    assert "0x20000" in error_of(init() + packet("pc.rom", 0x20000), make=make).reason
    assert "0x800" in error_of(init() + packet("pc.rom", 0x800), make=make).reason
    # an empty packet may name anything (stale block)
    assert len(decode(init() + header(), make=make)) == 2


def test_bad_ramblock_name() -> None:
    raw = header()
    raw[64:66] = b"\xff\xfe"
    assert "UTF-8" in error_of(init() + bytes(raw)).reason


def test_sticky_error() -> None:
    dec = MultifdChannelDecoder()
    dec.feed(b"\0" * 64)
    with pytest.raises(ProtocolError) as first:
        dec.next_event()
    with pytest.raises(ProtocolError) as second:
        dec.feed(b"x")
    assert first.value is second.value


# ---------------------------------------------------------------- fuzz


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(capture("multifd-chan-a.bin"))
    # aim most edits at the headers, where the structure is
    starts = [0, 64, 64 + HDR, 64 + 2 * HDR + 2 * PAGE, 64 + 3 * HDR + 3 * PAGE]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate"]))
        i = draw(st.sampled_from(starts)) + draw(st.integers(0, 330))
        i = min(i, len(data))
        if op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.booleans(), st.data())
def test_fuzz_only_protocol_errors(data: bytes, strict: bool, draw: st.DataObject) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=8))

    def make() -> MultifdChannelDecoder:
        if strict:
            return MultifdChannelDecoder(channels=2, expected_uuid=bytes(16), block_sizes=BLOCK_SIZES)
        return MultifdChannelDecoder()

    try:
        decode(data, cuts, make=make)
    except ProtocolError as e:
        assert e.channel == "multifd" and e.offset is not None and 0 <= e.offset <= len(data)
