"""construct definitions of protocol.wire: round trips, real captures, and rejections."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import construct as c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import wire as w
from protocol.events import ColoMessage, Command, RamFlag, RpMessage

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures"

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
names = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
page_offsets = st.integers(0, (1 << 52) - 1).map(lambda p: p << 12)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(con: c.Construct, obj: Any, **ctx: Any) -> Any:
    """build -> parse -> build gives the same bytes; returns the parsed object."""
    data = con.build(obj, **ctx)
    parsed = con.parse(data, **ctx)
    assert con.build(parsed, **ctx) == data
    return parsed


def public(container: Any, drop: tuple[str, ...] = ()) -> Any:
    """A Container/ListContainer as plain data without construct's private keys (nor ``drop``)."""
    if isinstance(container, dict):
        return {
            k: public(v, drop) for k, v in container.items() if not str(k).startswith("_") and k not in drop
        }
    if isinstance(container, list):
        return [public(v, drop) for v in container]
    return container


# ---------------------------------------------------------------- framing


def test_stream_header() -> None:
    assert w.StreamHeader.build({}) == b"QEVM\x00\x00\x00\x03"
    w.StreamHeader.parse(b"QEVM\x00\x00\x00\x03")
    for bad in (b"QEVM\x00\x00\x00\x02", b"QEVM\x00\x00\x00\x04", b"QEVN\x00\x00\x00\x03", b"QEVM\x00"):
        with pytest.raises(c.ConstructError):
            w.StreamHeader.parse(bad)


@SETTINGS
@given(st.sampled_from([1, 4]), u32, names, u32, u32)
def test_full_section_header(t: int, sid: int, idstr: str, inst: int, ver: int) -> None:
    obj = dict(type=t, section_id=sid, idstr=idstr, instance_id=inst, version_id=ver)
    assert public(roundtrip(w.FullSectionHeader, obj)) == obj


@SETTINGS
@given(st.sampled_from([2, 3]), u32)
def test_short_header_footer(t: int, sid: int) -> None:
    assert public(roundtrip(w.ShortSectionHeader, dict(type=t, section_id=sid))) == dict(
        type=t, section_id=sid
    )
    assert roundtrip(w.SectionFooter, dict(section_id=sid)).section_id == sid
    assert w.SectionFooter.build(dict(section_id=sid))[0] == 0x7E


def test_section_header_types_rejected() -> None:
    with pytest.raises(c.ConstructError):
        w.FullSectionHeader.parse(b"\x02" + bytes(4) + b"\x03ram" + bytes(8))
    with pytest.raises(c.ConstructError):
        w.ShortSectionHeader.parse(b"\x01" + bytes(4))
    with pytest.raises(c.ConstructError):
        w.SectionFooter.parse(b"\x7f" + bytes(4))
    # an idstr that is not UTF-8 is a construct error, never a UnicodeDecodeError
    with pytest.raises(c.StringError):
        w.FullSectionHeader.parse(b"\x01" + bytes(4) + b"\x02\xff\xfe" + bytes(8))


@SETTINGS
@given(st.binary(max_size=300), u16, st.binary(max_size=300))
def test_eof_vmdesc_command_frame(js: bytes, cmd: int, payload: bytes) -> None:
    assert w.EofRecord.build({}) == b"\x00"
    assert roundtrip(w.VmDescriptionRecord, dict(json=js)).json == js
    frame = roundtrip(w.CommandFrame, dict(cmd=cmd, payload=payload))
    assert (frame.cmd, frame.payload) == (cmd, payload)


# ---------------------------------------------------------------- configuration


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, Any]:
    subs = []
    if draw(st.booleans()):
        subs.append(
            dict(name="configuration/target-page-bits", version_id=1, body=dict(target_page_bits=draw(u32)))
        )
    if draw(st.booleans()):
        caps = draw(st.lists(names, max_size=4))
        subs.append(dict(name="configuration/capabilities", version_id=1, body=dict(capabilities=caps)))
    if draw(st.booleans()):
        subs.append(
            dict(
                name="configuration/uuid",
                version_id=draw(u32),
                body=dict(uuid=draw(st.binary(min_size=16, max_size=16))),
            )
        )
    return dict(machine_type=draw(st.text(max_size=30)), subsections=subs)


@SETTINGS
@given(configurations(), st.sampled_from([b"", b"\x01", b"\x08\x00\x01\x00\x00"]))
def test_configuration_roundtrip(cfg: dict[str, Any], tail: bytes) -> None:
    data = w.ConfigurationSection.build(cfg)
    # what follows the section (next record) is not taken for a subsection
    parsed = w.ConfigurationSection.parse(data + tail)
    assert public(parsed, drop=("type",)) == cfg
    assert w.ConfigurationSection.build(parsed) == data


def test_configuration_bytes() -> None:
    cfg = dict(
        machine_type="pc-i440fx-7.2",
        subsections=[
            dict(name="configuration/capabilities", version_id=1, body=dict(capabilities=["x-ignore-shared"]))
        ],
    )
    assert w.ConfigurationSection.build(cfg) == (
        b"\x07\x00\x00\x00\x0dpc-i440fx-7.2"
        + b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01"
        + b"\x00\x00\x00\x01\x0fx-ignore-shared"
    )
    one = w.ConfigSubsection.build(
        dict(name="configuration/uuid", version_id=1, body=dict(uuid=bytes(range(16))))
    )
    assert one == b"\x05\x12configuration/uuid\x00\x00\x00\x01" + bytes(range(16))


def test_configuration_rejects_unknown_subsection() -> None:
    data = b"\x07\x00\x00\x00\x02pc" + b"\x05\x11configuration/foo\x00\x00\x00\x01"
    with pytest.raises(c.ConstructError):
        w.ConfigurationSection.parse(data)
    with pytest.raises(c.ConstructError):  # truncated subsection
        w.ConfigurationSection.parse(b"\x07\x00\x00\x00\x02pc\x05\x12configuration/uu")


# ---------------------------------------------------------------- RAM records


def test_ram_header_adapter() -> None:
    h = w.RamRecordHeader.parse(bytes.fromhex("0000000002082004"))
    assert (h.offset, h.flags) == (0x2082000, RamFlag.MEM_SIZE)
    assert w.RamRecordHeader.build(dict(offset=0x1000, flags=0x22)) == bytes.fromhex("0000000000001022")
    with pytest.raises(c.ConstructError):
        w.RamRecordHeader.build(dict(offset=0x1001, flags=2))
    with pytest.raises(c.ConstructError):
        w.RamRecordHeader.build(dict(offset=0, flags=0x1000))


@st.composite
def ram_records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([RamFlag.ZERO, RamFlag.PAGE, RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE]))
    cont = draw(st.booleans())
    block = None if cont else draw(names)
    flags = int(kind) | (RamFlag.CONTINUE if cont else 0)
    if kind == RamFlag.ZERO:
        payload: dict[str, Any] = dict(fill=draw(u8))
    elif kind == RamFlag.PAGE:
        payload = dict(data=draw(st.binary(min_size=16, max_size=16)) * 256)
    elif kind == RamFlag.XBZRLE:
        payload = dict(data=draw(st.binary(max_size=4096)))
    else:
        payload = dict(data=draw(st.binary(max_size=w.COMPRESS_BOUND)))
    return dict(header=dict(offset=draw(page_offsets), flags=flags), block=block, payload=payload)


@SETTINGS
@given(ram_records())
def test_ram_record_roundtrip(rec: dict[str, Any]) -> None:
    data = w.RamRecord.build(rec)
    parsed = w.RamRecord.parse(data)
    assert parsed.block == rec["block"]
    assert (parsed.header.offset, parsed.header.flags) == (rec["header"]["offset"], rec["header"]["flags"])
    assert parsed.payload.get("fill") == rec["payload"].get("fill")
    assert parsed.payload.get("data") == rec["payload"].get("data")
    assert w.RamRecord.build(parsed) == data
    # the block name is on the wire iff CONTINUE is clear
    name_len = 0 if rec["block"] is None else 1 + len(rec["block"].encode())
    assert data[8 : 8 + name_len] == (b"" if rec["block"] is None else w.CStr8.build(rec["block"]))


@st.composite
def mem_size_lists(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    blocks = draw(st.lists(names, min_size=0, max_size=4, unique=True))
    hugepage = draw(st.sets(st.sampled_from(blocks))) if blocks else set()
    has_guest_addr = draw(st.booleans())
    has_page_size: bool | set[str] = draw(st.sampled_from([True, False, hugepage]))
    entries = []
    for b in blocks:
        with_ps = has_page_size if isinstance(has_page_size, bool) else b in has_page_size
        entries.append(
            dict(
                name=b,
                used_length=draw(st.integers(1, 1 << 20)) << 12,
                page_size=draw(u64) if with_ps else None,
                guest_addr=draw(u64) if has_guest_addr else None,
            )
        )
    return entries, dict(has_page_size=has_page_size, has_guest_addr=has_guest_addr)


@SETTINGS
@given(mem_size_lists())
def test_mem_size_roundtrip(arg: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    entries, ctx = arg
    total = sum(e["used_length"] for e in entries)
    rec = dict(header=dict(offset=total, flags=RamFlag.MEM_SIZE), block=None, payload=entries)
    parsed = roundtrip(w.RamRecord, rec, **ctx)
    assert public(parsed.payload) == entries
    for e in entries:
        assert public(roundtrip(w.MemSizeEntry, e, **ctx)) == e


def test_mem_size_total_must_match() -> None:
    entry = w.MemSizeEntry.build(dict(name="pc.ram", used_length=0x2000, page_size=None, guest_addr=None))
    with pytest.raises(c.ConstructError):  # overruns the total
        w.RamRecord.parse(bytes.fromhex("0000000000001004") + entry)
    with pytest.raises(c.ConstructError):  # total needs more entries than present
        w.RamRecord.parse(bytes.fromhex("0000000000003004") + entry)
    with pytest.raises(c.ConstructError):
        w.RamRecord.build(
            dict(header=dict(offset=0x1000, flags=4), block=None, payload=[w.MemSizeEntry.parse(entry)])
        )


@pytest.mark.parametrize("flags", [0x10, 0x80])
def test_ram_bare_records(flags: int) -> None:
    rec = w.RamRecord.parse(flags.to_bytes(8, "big"))
    assert rec.block is None and rec.payload is None
    assert w.RamRecord.build(rec) == flags.to_bytes(8, "big")


@pytest.mark.parametrize(
    "flags",
    [0x000, 0x001, 0x003, 0x00A, 0x030, 0x024, 0x0A0, 0x200, 0x400, 0x800, 0x018, 0x102],
)
def test_ram_invalid_flags(flags: int) -> None:
    with pytest.raises(c.ConstructError):
        w.RamRecord.parse(flags.to_bytes(8, "big") + bytes(5000))


def test_ram_payload_limits() -> None:
    hdr = (0x40 | 0x20).to_bytes(8, "big")
    w.RamRecord.parse(hdr + b"\x01\x10\x00" + bytes(4096))
    with pytest.raises(c.ConstructError):  # XBZRLE longer than a page
        w.RamRecord.parse(hdr + b"\x01\x10\x01" + bytes(4097))
    with pytest.raises(c.ConstructError):  # XBZRLE encoding flag must be 1
        w.RamRecord.parse(hdr + b"\x02\x00\x01\x00")
    hdr = (0x100 | 0x20).to_bytes(8, "big")
    w.RamRecord.parse(hdr + w.COMPRESS_BOUND.to_bytes(4, "big") + bytes(w.COMPRESS_BOUND))
    with pytest.raises(c.ConstructError):
        w.RamRecord.parse(hdr + (w.COMPRESS_BOUND + 1).to_bytes(4, "big") + bytes(w.COMPRESS_BOUND + 1))
    with pytest.raises(c.ConstructError):  # short page
        w.RamRecord.parse((0x28).to_bytes(8, "big") + bytes(4095))
    with pytest.raises(c.ConstructError):  # CONTINUE clear but no block name
        w.RamRecord.parse((0x02).to_bytes(8, "big"))


# ---------------------------------------------------------------- commands


def test_command_lengths_table() -> None:
    assert set(w.COMMAND_LENGTHS) == set(w.COMMAND_PAYLOADS) == set(Command) - {Command.INVALID}
    assert w.COMMAND_LENGTHS[Command.ENABLE_COLO] == 0
    samples: dict[int, dict[str, Any]] = {Command.PING: dict(value=7), Command.PACKAGED: dict(length=9)}
    for cmd, length in w.COMMAND_LENGTHS.items():
        if length is not None:
            assert len(w.COMMAND_PAYLOADS[cmd].build(samples.get(cmd, {}))) == length
    with pytest.raises(TypeError):
        w.COMMAND_LENGTHS[Command.PING] = 5  # type: ignore[index]


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    cmd = draw(st.sampled_from(sorted(w.COMMAND_PAYLOADS)))
    payload: dict[str, Any] = {}
    if cmd == Command.PING:
        payload = dict(value=draw(u32))
    elif cmd == Command.POSTCOPY_ADVISE:
        payload = draw(
            st.sampled_from([dict(host_page_summary=None, target_page_size=None)])
            | st.builds(lambda a, b: dict(host_page_summary=a, target_page_size=b), u64, u64)
        )
    elif cmd == Command.POSTCOPY_RAM_DISCARD:
        ranges = draw(
            st.lists(st.builds(lambda s, n: dict(start=s, length=n), u64, u64), min_size=1, max_size=12)
        )
        payload = dict(block=draw(names), ranges=ranges)
    elif cmd == Command.PACKAGED:
        payload = dict(length=draw(u32))
    elif cmd == Command.RECV_BITMAP:
        payload = dict(block=draw(names))
    return dict(cmd=int(cmd), payload=payload)


@SETTINGS
@given(commands())
def test_command_roundtrip(cmd: dict[str, Any]) -> None:
    parsed = roundtrip(w.CommandRecord, cmd)
    got = public(parsed.payload)
    for k in ("version", "terminator"):
        got.pop(k, None)
    assert got == cmd["payload"]
    data = w.CommandRecord.build(cmd)
    frame = w.CommandFrame.parse(data)
    assert frame.cmd == cmd["cmd"]
    fixed = w.COMMAND_LENGTHS[cmd["cmd"]]
    assert fixed is None or len(frame.payload) == fixed
    assert public(w.COMMAND_PAYLOADS[cmd["cmd"]].parse(frame.payload)) == public(parsed.payload)


def test_discard_bytes() -> None:
    data = w.PostcopyRamDiscardPayload.build(dict(block="pc.ram", ranges=[dict(start=0, length=0x2000000)]))
    assert data == b"\x00\x06pc.ram\x00" + bytes(8) + (0x2000000).to_bytes(8, "big")
    assert len(data) == 3 + 6 + 16


@pytest.mark.parametrize(
    "cmd, payload",
    [
        (0, b""),
        (11, b""),
        (0xFFFF, b""),
        (Command.OPEN_RETURN_PATH, b"\x00"),
        (Command.PING, b"\x00\x00\x01"),
        (Command.PING, b"\x00\x00\x00\x01\x00"),
        (Command.POSTCOPY_ADVISE, bytes(8)),
        (Command.POSTCOPY_ADVISE, bytes(24)),
        (Command.POSTCOPY_RAM_DISCARD, b"\x00\x06pc.ram\x00"),  # no range
        (Command.POSTCOPY_RAM_DISCARD, b"\x00\x06pc.ram\x00" + bytes(17)),  # partial range
        (Command.POSTCOPY_RAM_DISCARD, b"\x01\x06pc.ram\x00" + bytes(16)),  # version 1
        (Command.POSTCOPY_RAM_DISCARD, b"\x00\x06pc.ram\x01" + bytes(16)),  # no terminator
        (Command.PACKAGED, bytes(8)),
        (Command.RECV_BITMAP, b"\x06pc.ram\x00"),
        (Command.RECV_BITMAP, b"\x07pc.ram"),
        (Command.ENABLE_COLO, b"\x00"),
        (Command.POSTCOPY_RESUME, b"\x00\x00"),
    ],
)
def test_command_rejected(cmd: int, payload: bytes) -> None:
    data = b"\x08" + int(cmd).to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload
    with pytest.raises(c.ConstructError):
        w.CommandRecord.parse(data)


# ---------------------------------------------------------------- return path / COLO


@st.composite
def rp_records(draw: st.DrawFn) -> dict[str, Any]:
    t = draw(st.sampled_from(sorted(w.RP_PAYLOADS)))
    bitmap = None
    if t == RpMessage.SHUT:
        payload: dict[str, Any] = dict(status=draw(u32))
    elif t in (RpMessage.PONG, RpMessage.RESUME_ACK):
        payload = dict(value=draw(u32))
    elif t == RpMessage.REQ_PAGES:
        payload = dict(start=draw(u64), length=draw(u32))
    elif t == RpMessage.REQ_PAGES_ID:
        payload = dict(start=draw(u64), length=draw(u32), block=draw(names))
    else:
        payload = dict(block=draw(names))
        bitmap = dict(bitmap=draw(st.binary(max_size=64)))
    return dict(type=int(t), payload=payload, bitmap_data=bitmap)


@SETTINGS
@given(rp_records())
def test_rp_record_roundtrip(rec: dict[str, Any]) -> None:
    parsed = roundtrip(w.RpRecord, rec)
    assert public(parsed.payload) == rec["payload"]
    data = w.RpRecord.build(rec)
    hdr = w.RpHeader.parse(data)
    fixed = w.RP_LENGTHS[rec["type"]]
    assert fixed is None or hdr.length == fixed
    if rec["bitmap_data"] is not None:
        assert parsed.bitmap_data.bitmap == rec["bitmap_data"]["bitmap"]
        assert data.endswith(bytes.fromhex("0123456789abcdef"))
    frame = w.RpFrame.parse(data)
    assert public(w.RP_PAYLOADS[frame.type].parse(frame.payload)) == rec["payload"]


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("0000 0004 00000000"),
        bytes.fromhex("0007 0004 00000000"),
        bytes.fromhex("0001 0005 0000000000"),
        bytes.fromhex("0004 000b 0000000000000000000000"),
        bytes.fromhex("0003 0010 0000000000000000 00001000 02 61"),  # name longer than the message
        bytes.fromhex("0005 0002 01 61") + bytes(8) + bytes.fromhex("0123456789abcdee"),  # bad end mark
        bytes.fromhex("0003") + (513).to_bytes(2, "big") + bytes(513),
    ],
)
def test_rp_record_rejected(data: bytes) -> None:
    with pytest.raises(c.ConstructError):
        w.RpRecord.parse(data)


def test_recv_bitmap_sizes() -> None:
    assert w.recv_bitmap_size(0x2000000) == 1024
    assert w.recv_bitmap_size(0x20000) == 8  # 32 pages: 4 bytes rounded up to 8
    assert w.recv_bitmap_size(0x1000) == 8
    assert w.recv_bitmap_size(65 * 4096) == 16
    assert w.recv_bitmap_size(0) == 0


@SETTINGS
@given(st.sampled_from(list(ColoMessage)), u64)
def test_colo_record(msg: ColoMessage, value: int) -> None:
    v = value if msg == ColoMessage.VMSTATE_SIZE else None
    parsed = roundtrip(w.ColoRecord, dict(message=int(msg), value=v))
    assert (parsed.message, parsed.value) == (msg, v)
    assert len(w.ColoRecord.build(dict(message=int(msg), value=v))) == (12 if v is not None else 4)


def test_colo_record_rejected() -> None:
    with pytest.raises(c.ConstructError):
        w.ColoRecord.parse(bytes.fromhex("00000007"))
    with pytest.raises(c.ConstructError):
        w.ColoRecord.parse(bytes.fromhex("00000004 0000"))


# ---------------------------------------------------------------- multifd


@SETTINGS
@given(st.binary(min_size=16, max_size=16), u8)
def test_multifd_init_packet(uuid: bytes, chan: int) -> None:
    data = w.MultifdInitPacket.build(dict(uuid=uuid, id=chan))
    assert len(data) == w.MULTIFD_INIT_SIZE == 64
    assert data[:8] == bytes.fromhex("1122334400000001") and data[24] == chan and data[25:] == bytes(39)
    parsed = roundtrip(w.MultifdInitPacket, dict(uuid=uuid, id=chan))
    assert (parsed.uuid, parsed.id) == (uuid, chan)


@st.composite
def multifd_headers(draw: st.DrawFn) -> dict[str, Any]:
    alloc = draw(st.sampled_from([0, 1, 5, 16, 128]))
    return dict(
        flags=draw(u32),
        pages_alloc=alloc,
        normal_pages=draw(st.integers(0, alloc)),
        next_packet_size=draw(u32),
        packet_num=draw(u64),
        # a C string of the 256-byte field: no NUL inside, room for the terminator
        ramblock=draw(names.filter(lambda s: "\0" not in s)),
        offsets=draw(st.lists(u64, min_size=alloc, max_size=alloc)),
    )


@SETTINGS
@given(multifd_headers())
def test_multifd_packet_header(hdr: dict[str, Any]) -> None:
    data = w.MultifdPacketHeader.build(hdr)
    assert len(data) == w.multifd_header_size(hdr["pages_alloc"])
    parsed = roundtrip(w.MultifdPacketHeader, hdr)
    got = public(parsed)
    del got["magic"], got["version"]
    assert got == hdr
    assert w.MultifdPacketFixedHeader.build(hdr) == data[: w.MULTIFD_HEADER_FIXED_SIZE]


def test_multifd_header_size_and_rejections() -> None:
    assert w.multifd_header_size(128) == 1344 == w.multifd_header_size(w.MULTIFD_PAGES_ALLOC)
    good = w.MultifdPacketHeader.build(
        dict(
            flags=1,
            pages_alloc=2,
            normal_pages=2,
            next_packet_size=0,
            packet_num=0,
            ramblock="",
            offsets=[0, 1],
        )
    )
    w.MultifdPacketHeader.parse(good)
    for i, bad in ((0, b"\x11\x22\x33\x45"), (4, b"\x00\x00\x00\x02"), (16, b"\x00\x00\x00\x03")):
        with pytest.raises(c.ConstructError):
            w.MultifdPacketHeader.parse(good[:i] + bad + good[i + 4 :])
    with pytest.raises(c.ConstructError):
        w.MultifdPacketHeader.build(
            dict(
                flags=0,
                pages_alloc=0,
                normal_pages=0,
                next_packet_size=0,
                packet_num=0,
                ramblock="x" * 256,
                offsets=[],
            )
        )


def test_multifd_ramblock_is_a_c_string() -> None:
    raw = bytearray(
        w.MultifdPacketFixedHeader.build(
            dict(flags=0, pages_alloc=0, normal_pages=0, next_packet_size=0, packet_num=0, ramblock="pc.ram")
        )
    )
    assert raw[64:70] == b"pc.ram" and raw[70:320] == bytes(250)
    raw[75] = 0x41  # bytes after the NUL are ignored, as QEMU does
    assert w.MultifdPacketFixedHeader.parse(bytes(raw)).ramblock == "pc.ram"


# ---------------------------------------------------------------- real captures


def walk_main(data: bytes, *, header: bool = True) -> tuple[int, str, Counter[str], list[tuple[int, Any]]]:
    """Parse a main stream with the constructs only, until its first device (FULL) section or EOF.

    Every parsed item is rebuilt and must equal the bytes it came from. PACKAGED blobs are
    skipped. Returns (position, what stopped the walk, record counts, commands).
    """
    counts: Counter[str] = Counter()
    cmds: list[tuple[int, Any]] = []
    mv = memoryview(data)
    pos = 0

    def take(con: c.Construct, limit: int) -> Any:
        nonlocal pos
        obj = con.parse(mv[pos : pos + limit])
        raw = con.build(obj)
        assert raw == data[pos : pos + len(raw)], f"rebuild differs at {pos}"
        pos += len(raw)
        return obj

    if header:
        take(w.StreamHeader, 8)
        take(w.ConfigurationSection, 4096)
    while pos < len(data):
        t = data[pos]
        if t in (1, 4):
            hdr = w.FullSectionHeader.parse(mv[pos : pos + 300])
            if hdr.idstr != "ram":
                return pos, "FULL", counts, cmds
            take(w.FullSectionHeader, 300)
        elif t in (2, 3):
            hdr = take(w.ShortSectionHeader, 5)
        elif t == 8:
            cmd = take(w.CommandRecord, 70000)
            cmds.append((cmd.cmd, public(cmd.payload)))
            if cmd.cmd == Command.PACKAGED:
                pos += cmd.payload.length
            continue
        elif t == 0:
            return pos, "EOF", counts, cmds
        else:
            raise AssertionError(f"unexpected record type {t:#x} at {pos}")
        while True:
            rec = take(w.RamRecord, 5000)
            counts[RamFlag(rec.kind).name] += 1
            if rec.kind == RamFlag.EOS:
                break
        assert take(w.SectionFooter, 5).section_id == hdr.section_id
    return pos, "END", counts, cmds


@pytest.mark.parametrize(
    "name, header, stop, zero, normal, xbzrle",
    [
        ("precopy-paused-pc32m.bin", True, (275_869, "FULL"), 8273, 49, 0),
        ("xbzrle-main.bin", True, (None, "FULL"), 16387, 166, 4),
        ("postcopy-main.bin", True, (842_641, "EOF"), 16348, 166, 0),
        ("postcopy-recovery-resume-main.bin", False, (343_757, "EOF"), 6675, 69, 0),
        ("multifd-main.bin", True, (None, "FULL"), 8216, 0, 0),
        ("background-snapshot.bin", True, (None, "FULL"), 8214, 108, 0),
    ],
)
def test_capture_ram_records(
    name: str, header: bool, stop: tuple[int | None, str], zero: int, normal: int, xbzrle: int
) -> None:
    data = (CAPTURES / name).read_bytes()
    pos, what, counts, _ = walk_main(data, header=header)
    assert what == stop[1]
    if stop[0] is not None:
        assert pos == stop[0]
    assert (counts["ZERO"], counts["PAGE"], counts["XBZRLE"]) == (zero, normal, xbzrle)
    assert counts["MEM_SIZE"] == (0 if not header else 1)


def test_capture_precopy_framing() -> None:
    data = (CAPTURES / "precopy-paused-pc32m.bin").read_bytes()
    cfg = w.ConfigurationSection.parse(data[8:])
    assert cfg.machine_type == "pc-i440fx-7.2" and cfg.subsections == []
    mem = w.RamRecord.parse(data[0x2B:])
    assert mem.header.offset == 0x2082000
    assert [(e.name, e.used_length) for e in mem.payload] == [
        ("pc.ram", 0x2000000),
        ("/rom@etc/acpi/tables", 0x20000),
        ("pc.bios", 0x40000),
        ("pc.rom", 0x20000),
        ("/rom@etc/table-loader", 0x1000),
        ("/rom@etc/acpi/rsdp", 0x1000),
    ]
    timer = w.FullSectionHeader.parse(data[275_869:])
    assert (timer.type, timer.section_id, timer.idstr, timer.version_id) == (4, 0, "timer", 2)
    w.EofRecord.parse(data[288_726:288_727])
    desc = w.VmDescriptionRecord.parse(data[288_727:])
    assert len(desc.json) == 98_649 and len(data) == 288_732 + 98_649
    assert json.loads(desc.json)["page_size"] == 4096
    assert w.VmDescriptionRecord.build(desc) == data[288_727:]


def test_capture_postcopy_commands() -> None:
    data = (CAPTURES / "postcopy-main.bin").read_bytes()
    _, _, _, cmds = walk_main(data)
    assert [c_ for c_, _ in cmds] == [1, 2, 3, 6, 6, 6, 6, 6, 2, 7, 2]
    assert cmds[2][1] == dict(host_page_summary=4096, target_page_size=4096)
    discards = {p["block"]: [(r["start"], r["length"]) for r in p["ranges"]] for c_, p in cmds if c_ == 6}
    assert discards["pc.ram"] == [(0, 0x2000000)]
    assert discards["pc.bios"] == [(0x1A000, 0x26000)]
    assert discards["pc.rom"] == [(0, 0x20000)]
    assert "/rom@etc/acpi/tables" not in discards and len(discards) == 5
    assert [p["value"] for c_, p in cmds if c_ == Command.PING] == [1, 2, 4]
    pkg = w.CommandRecord.parse(data[353_362:])
    assert (pkg.cmd, pkg.payload.length) == (Command.PACKAGED, 12_935)
    blob = data[353_362 + 9 : 353_362 + 9 + 12_935]
    assert w.CommandRecord.parse(blob).cmd == Command.POSTCOPY_LISTEN
    tail = blob[-(9 + 5) :]
    assert w.CommandRecord.parse(tail[:9]).payload.value == 3
    assert w.CommandRecord.parse(tail[9:]).cmd == Command.POSTCOPY_RUN


def test_capture_resume_commands() -> None:
    data = (CAPTURES / "postcopy-recovery-resume-main.bin").read_bytes()
    _, _, _, cmds = walk_main(data, header=False)
    assert [c_ for c_, _ in cmds] == [Command.RECV_BITMAP] * 6 + [Command.POSTCOPY_RESUME]
    assert cmds[0][1] == dict(block="pc.ram")


def test_capture_return_path_records() -> None:
    data = (CAPTURES / "postcopy-recovery-resume-return.bin").read_bytes()
    pos, types = 0, []
    while pos < len(data):
        rec = w.RpRecord.parse(data[pos:])
        raw = w.RpRecord.build(rec)
        assert raw == data[pos : pos + len(raw)]
        types.append(rec.type)
        pos += len(raw)
    assert types == [5] * 6 + [6, 3, 1]


def test_capture_multifd_headers() -> None:
    for name, chan, pages in (("multifd-chan-a.bin", 1, 3), ("multifd-chan-b.bin", 0, 105)):
        data = (CAPTURES / name).read_bytes()
        assert w.MultifdInitPacket.parse(data).id == chan
        pos, total = 64, 0
        while pos < len(data):
            hdr = w.MultifdPacketHeader.parse(data[pos : pos + 1344])
            assert w.MultifdPacketHeader.build(hdr) == data[pos : pos + 1344]
            assert hdr.pages_alloc == 128
            total += hdr.normal_pages
            pos += 1344 + hdr.normal_pages * 4096
        assert pos == len(data) and total == pages
