"""`construct` definitions of every structure of QEMU 7.2's migration wire format.

One definition per structure of ``WIRE.md`` (section numbers in the comments). These are the
single source of truth for field order and sizes; the incremental decoders in
:mod:`protocol.return_path` and :mod:`protocol.multifd` parse with them and the encoders build
with them. Everything is big-endian unless noted.

Parsing with these raises :class:`construct.ConstructError` subclasses only (names that are not
UTF-8 raise :class:`construct.StringError`); decoders turn those into
:class:`protocol.errors.ProtocolError`.

Context parameters (pass as keyword arguments to ``parse``/``build``):

* ``has_page_size``: ``bool`` or a collection of block names. MEM_SIZE entries carry the
  optional ``page_size`` field (postcopy-ram on and the block's page size differs from the host
  page size). Default False.
* ``has_guest_addr``: ``bool``. MEM_SIZE entries carry ``guest_addr`` (x-ignore-shared on).
  Default False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import construct as c
from construct import this

from protocol.errors import ProtocolError
from protocol.events import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    TARGET_PAGE_SIZE,
    ColoMessage,
    Command,
    Event,
    RamFlag,
    RecordType,
    RpMessage,
)

# ---------------------------------------------------------------- constants

RAM_FLAGS_MASK = TARGET_PAGE_SIZE - 1  # flags live below the target page size (§3)
XBZRLE_MAX_LEN = TARGET_PAGE_SIZE  # §3.5
# zlib's compressBound(4096): 4096 + (4096 >> 12) + (4096 >> 14) + (4096 >> 25) + 13 (§3.4)
COMPRESS_BOUND = 4110
POSTCOPY_RAM_DISCARD_VERSION = 0  # §4.6
RP_MAX_MESSAGE_LEN = 512  # the source's RP read buffer (§5.1)
RECV_BITMAP_END_MARK = 0x0123456789ABCDEF  # §5.3
MULTIFD_MAGIC = 0x11223344  # §9
MULTIFD_VERSION = 1
MULTIFD_PAGES_ALLOC = 512 * 1024 // TARGET_PAGE_SIZE  # 128 on x86 (§9.2)
MULTIFD_INIT_SIZE = 64
MULTIFD_HEADER_FIXED_SIZE = 64 + 256  # header without the offset array
MULTIFD_RAMBLOCK_LEN = 256
MULTIFD_FLAG_SYNC = 0x1
MULTIFD_FLAG_COMPRESSION_MASK = 0xE  # bits 1-3: 0 none, 1 zlib, 2 zstd


def multifd_header_size(pages_alloc: int) -> int:
    """Byte size of a multifd packet header with ``pages_alloc`` offset slots (1344 for 128)."""
    return MULTIFD_HEADER_FIXED_SIZE + 8 * pages_alloc


def recv_bitmap_size(used_length: int) -> int:
    """Byte size of a RECV_BITMAP reply's bitmap for a block: one bit per target page, whole be64s."""
    pages = used_length // TARGET_PAGE_SIZE
    return (pages + 63) // 64 * 8


# ---------------------------------------------------------------- helper constructs


class _Validate(c.Construct):
    """Zero-byte check that raises CheckError with a readable message (construct's Check does not)."""

    def __init__(self, predicate: Callable[[Any], bool], message: Callable[[Any], str]) -> None:
        super().__init__()
        self.flagbuildnone = True  # nothing to build from
        self.predicate = predicate
        self.message = message

    def _check(self, context: Any, path: str) -> None:
        if not self.predicate(context):
            raise c.CheckError(self.message(context), path=path)

    def _parse(self, stream: Any, context: Any, path: str) -> None:
        self._check(context, path)

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> None:
        self._check(context, path)

    def _sizeof(self, context: Any, path: str) -> int:
        return 0


class _StrictUtf8(c.Adapter):
    """bytes <-> str as UTF-8, raising StringError (a ConstructError) on undecodable names."""

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError as e:
            raise c.StringError(f"name {obj[:64]!r} is not valid UTF-8", path=path) from e

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        if not isinstance(obj, str):
            raise c.StringError(f"expected a str, got {type(obj).__name__}", path=path)
        return obj.encode("utf-8")


class _CName(c.Adapter):
    """Fixed-size NUL-padded C string (multifd ``ramblock``).

    Decoded like QEMU does: the last byte is forced to NUL and the name ends at the first NUL.
    Built as the name followed by NULs up to the field size.
    """

    def __init__(self, size: int) -> None:
        super().__init__(c.Bytes(size))
        self.size = size

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        raw = obj[: self.size - 1]
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise c.StringError(f"block name {raw[:64]!r} is not valid UTF-8", path=path) from e

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        raw = obj.encode("utf-8")
        if len(raw) >= self.size or b"\0" in raw:
            raise c.StringError(f"block name {obj!r} does not fit a {self.size}-byte C string", path=path)
        return raw.ljust(self.size, b"\0")


class _WhileNextByte(c.Subconstruct):
    """Repeat ``subcon`` while the next byte (peeked, not consumed) equals ``marker``."""

    def __init__(self, marker: int, subcon: c.Construct) -> None:
        super().__init__(subcon)
        self.marker = bytes([marker])

    def _parse(self, stream: Any, context: Any, path: str) -> c.ListContainer:
        items = c.ListContainer()
        while True:
            pos = c.stream_tell(stream, path)
            nxt = stream.read(1)
            c.stream_seek(stream, pos, 0, path)
            if nxt != self.marker:
                return items
            items.append(self.subcon._parsereport(stream, context, path))

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        for item in obj or ():
            self.subcon._build(item, stream, context, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise c.SizeofError("variable number of items", path=path)


# cstr8: u8 length + that many bytes, no NUL (all block names, idstrs, capability names)
CStr8 = _StrictUtf8(c.Prefixed(c.Int8ub, c.GreedyBytes))

# Payload that must be empty (zero-length commands).
Empty = c.Struct(c.Terminated)

# ---------------------------------------------------------------- §2 stream framing

# §2.1 file header: magic "QEVM" + version 3 (2 is the obsolete format; everything else rejected)
StreamHeader = c.Struct(
    "magic" / c.Const(QEMU_VM_FILE_MAGIC, c.Int32ub),
    "version" / c.Const(QEMU_VM_FILE_VERSION, c.Int32ub),
)

# §2.3 full section header (SECTION_START / SECTION_FULL)
FullSectionHeader = c.Struct(
    "type" / c.OneOf(c.Int8ub, [RecordType.SECTION_START, RecordType.SECTION_FULL]),
    "section_id" / c.Int32ub,
    "idstr" / CStr8,
    "instance_id" / c.Int32ub,
    "version_id" / c.Int32ub,
)

# §2.3 short section header (SECTION_PART / SECTION_END)
ShortSectionHeader = c.Struct(
    "type" / c.OneOf(c.Int8ub, [RecordType.SECTION_PART, RecordType.SECTION_END]),
    "section_id" / c.Int32ub,
)

# §2.3 section footer: 0x7E + the section id of the header it closes
SectionFooter = c.Struct(
    "type" / c.Const(RecordType.SECTION_FOOTER, c.Int8ub),
    "section_id" / c.Int32ub,
)

# §2.2 EOF record: a single 0x00
EofRecord = c.Struct("type" / c.Const(RecordType.EOF, c.Int8ub))

# §2.7 VMDESCRIPTION trailer: 0x06, be32 length, JSON bytes (kept raw)
VmDescriptionRecord = c.Struct(
    "type" / c.Const(RecordType.VMDESCRIPTION, c.Int8ub),
    "json" / c.Prefixed(c.Int32ub, c.GreedyBytes),
)

# §4 COMMAND framing with the payload left raw: 0x08, be16 cmd, be16 len, payload
CommandFrame = c.Struct(
    "type" / c.Const(RecordType.COMMAND, c.Int8ub),
    "cmd" / c.Int16ub,
    "payload" / c.Prefixed(c.Int16ub, c.GreedyBytes),
)

# ---------------------------------------------------------------- §2.4 configuration section

# "configuration/target-page-bits" v1 body
ConfigTargetPageBits = c.Struct("target_page_bits" / c.Int32ub)
# "configuration/capabilities" v1 body: be32 count + count x cstr8
ConfigCapabilities = c.Struct("capabilities" / c.PrefixedArray(c.Int32ub, CStr8))
# "configuration/uuid" v1 body: 16 raw bytes
ConfigUuid = c.Struct("uuid" / c.Bytes(16))

CONFIG_SUBSECTION_BODIES: MappingProxyType[str, c.Construct] = MappingProxyType(
    {
        "configuration/target-page-bits": ConfigTargetPageBits,
        "configuration/capabilities": ConfigCapabilities,
        "configuration/uuid": ConfigUuid,
    }
)

# §2.5 one subsection of the configuration: 0x05, cstr8 name, be32 version_id, body
ConfigSubsection = c.Struct(
    "type" / c.Const(RecordType.SUBSECTION, c.Int8ub),
    "name" / CStr8,
    "version_id" / c.Int32ub,
    "body"
    / c.Switch(
        this.name,
        dict(CONFIG_SUBSECTION_BODIES),
        default=c.Error,  # an unknown configuration subsection is fatal for QEMU too
    ),
)

# §2.4 whole configuration section: 0x07, be32 name_len, machine type, subsections while 0x05
ConfigurationSection = c.Struct(
    "type" / c.Const(RecordType.CONFIGURATION, c.Int8ub),
    "machine_type" / _StrictUtf8(c.Prefixed(c.Int32ub, c.GreedyBytes)),
    "subsections" / _WhileNextByte(RecordType.SUBSECTION, ConfigSubsection),
)

# ---------------------------------------------------------------- §3 RAM records


class _RamHeaderAdapter(c.Adapter):
    """be64 <-> Container(offset=value & ~0xFFF, flags=value & 0xFFF)."""

    def _decode(self, obj: int, context: Any, path: str) -> c.Container:
        return c.Container(offset=obj & ~RAM_FLAGS_MASK, flags=obj & RAM_FLAGS_MASK)

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        offset, flags = obj["offset"], obj["flags"]
        if offset & RAM_FLAGS_MASK or not 0 <= flags <= RAM_FLAGS_MASK:
            raise c.ValidationError(
                f"RAM record offset {offset:#x} must be page aligned and flags {flags:#x} < 0x1000",
                path=path,
            )
        return offset | flags


# §3 record header: be64, flags in the low 12 bits, page-aligned offset (or total) above
RamRecordHeader = _RamHeaderAdapter(c.Int64ub)

_PAGE_KINDS = frozenset(int(f) for f in (RamFlag.ZERO, RamFlag.PAGE, RamFlag.XBZRLE, RamFlag.COMPRESS_PAGE))
_BARE_KINDS = frozenset(int(f) for f in (RamFlag.MEM_SIZE, RamFlag.EOS, RamFlag.HOOK))


def ram_flags_valid(flags: int) -> bool:
    """Exactly one record kind; CONTINUE only with the page kinds (§3.1). FULL is never valid."""
    kind = flags & ~RamFlag.CONTINUE
    if kind in _PAGE_KINDS:
        return True
    return kind in _BARE_KINDS and not flags & RamFlag.CONTINUE


def ram_record_has_block_name(flags: int) -> bool:
    """A page record carries a cstr8 block name iff CONTINUE is clear (§3.2)."""
    return (flags & ~RamFlag.CONTINUE) in _PAGE_KINDS and not flags & RamFlag.CONTINUE


# Payloads after the header and the optional block name (see RamRecord for the block name)
# ZERO: u8 fill byte of the whole page (QEMU only sends 0)
RamZeroPayload = c.Struct("fill" / c.Int8ub)
# PAGE: one raw target page
RamPagePayload = c.Struct("data" / c.Bytes(TARGET_PAGE_SIZE))
# XBZRLE (§3.5): u8 encoding flag 0x01, be16 len <= 4096, encoded delta
RamXbzrlePayload = c.Struct(
    "encoding" / c.Const(1, c.Int8ub),
    "length" / c.Rebuild(c.Int16ub, c.len_(this.data)),
    _Validate(
        lambda ctx: ctx.length <= XBZRLE_MAX_LEN,
        lambda ctx: f"XBZRLE length {ctx.length} exceeds the page size {XBZRLE_MAX_LEN}",
    ),
    "data" / c.Bytes(this.length),
)
# COMPRESS_PAGE: be32 len <= compressBound(4096), zlib stream of one page
RamCompressPayload = c.Struct(
    "length" / c.Rebuild(c.Int32ub, c.len_(this.data)),
    _Validate(
        lambda ctx: ctx.length <= COMPRESS_BOUND,
        lambda ctx: f"compressed page length {ctx.length} exceeds compressBound {COMPRESS_BOUND}",
    ),
    "data" / c.Bytes(this.length),
)


def _has_page_size(ctx: Any) -> bool:
    p = ctx._params.get("has_page_size", False)
    if isinstance(p, bool):
        return p
    return ctx.name in p  # a collection of hugepage-backed block names


def _has_guest_addr(ctx: Any) -> bool:
    return bool(ctx._params.get("has_guest_addr", False))


# §3.3 one MEM_SIZE block-list entry; optional fields driven by context parameters
MemSizeEntry = c.Struct(
    "name" / CStr8,
    "used_length" / c.Int64ub,
    "page_size" / c.If(_has_page_size, c.Int64ub),
    "guest_addr" / c.If(_has_guest_addr, c.Int64ub),
)


class _MemSizeList(c.Construct):
    """§3.3 block list: entries until their used_lengths add up to ``total`` exactly."""

    def __init__(self, total: Any, entry: c.Construct) -> None:
        super().__init__()
        self.total = total
        self.entry = entry

    def _parse(self, stream: Any, context: Any, path: str) -> c.ListContainer:
        remaining = c.evaluate(self.total, context)
        items = c.ListContainer()
        while remaining:
            item = self.entry._parsereport(stream, context, path)
            if item.used_length > remaining:
                raise c.ValidationError(
                    f"MEM_SIZE block {item.name!r} length {item.used_length:#x} overruns the "
                    f"announced total (only {remaining:#x} left)",
                    path=path,
                )
            remaining -= item.used_length
            items.append(item)
        return items

    def _build(self, obj: Any, stream: Any, context: Any, path: str) -> Any:
        total = c.evaluate(self.total, context)
        if sum(e["used_length"] for e in obj) != total:
            raise c.ValidationError(f"MEM_SIZE lengths do not add up to total {total:#x}", path=path)
        for e in obj:
            self.entry._build(e, stream, context, path)
        return obj

    def _sizeof(self, context: Any, path: str) -> int:
        raise c.SizeofError("variable length", path=path)


# §3 one whole RAM record: header, block name iff a page kind without CONTINUE, payload per kind.
# Build with header=dict(offset=, flags=), block=str|None, payload=... (None for EOS/HOOK; the
# list of MemSizeEntry dicts for MEM_SIZE, where header.offset must be their total).
RamRecord = c.Struct(
    "header" / RamRecordHeader,
    "kind" / c.Computed(lambda ctx: ctx.header["flags"] & ~RamFlag.CONTINUE),
    _Validate(
        lambda ctx: ram_flags_valid(ctx.header["flags"]),
        lambda ctx: f"invalid RAM record flags {ctx.header['flags']:#05x}",
    ),
    "block" / c.If(lambda ctx: ram_record_has_block_name(ctx.header["flags"]), CStr8),
    "payload"
    / c.Switch(
        this.kind,
        {
            int(RamFlag.ZERO): RamZeroPayload,
            int(RamFlag.PAGE): RamPagePayload,
            int(RamFlag.XBZRLE): RamXbzrlePayload,
            int(RamFlag.COMPRESS_PAGE): RamCompressPayload,
            int(RamFlag.MEM_SIZE): _MemSizeList(lambda ctx: ctx.header["offset"], MemSizeEntry),
            int(RamFlag.EOS): c.Pass,  # end of this section's records
            int(RamFlag.HOOK): c.Pass,  # RDMA hook: nothing follows over TCP
        },
    ),
)

# ---------------------------------------------------------------- §4 command payloads

# PING (§4.2): be32 value echoed by PONG
PingPayload = c.Struct("value" / c.Int32ub, c.Terminated)
# POSTCOPY_ADVISE (§4.3): empty, or be64 host page size summary + be64 target page size
PostcopyAdvisePayload = c.Struct(
    "host_page_summary" / c.Optional(c.Int64ub),
    "target_page_size" / c.If(lambda ctx: ctx.host_page_summary is not None, c.Int64ub),
    c.Terminated,
)
# one (start, length) byte range of POSTCOPY_RAM_DISCARD
DiscardRange = c.Struct("start" / c.Int64ub, "length" / c.Int64ub)
# POSTCOPY_RAM_DISCARD as 7.2 sends it (§4.6): u8 0, cstr8 block, u8 0, ranges (at least one)
PostcopyRamDiscardPayload = c.Struct(
    "version" / c.Const(POSTCOPY_RAM_DISCARD_VERSION, c.Int8ub),
    "block" / CStr8,
    "terminator" / c.Const(0, c.Int8ub),
    "ranges" / c.GreedyRange(DiscardRange),
    c.Terminated,  # a partial trailing range is a length error
    _Validate(lambda ctx: len(ctx.ranges) >= 1, lambda ctx: "POSTCOPY_RAM_DISCARD carries no range"),
)
# PACKAGED (§4.8): be32 length of the blob that follows the command
PackagedPayload = c.Struct("length" / c.Int32ub, c.Terminated)
# RECV_BITMAP (§4.10): cstr8 block name, nothing else
RecvBitmapCmdPayload = c.Struct("block" / CStr8, c.Terminated)

# Payload construct per command (INVALID and unknown numbers are absent)
COMMAND_PAYLOADS: MappingProxyType[int, c.Construct] = MappingProxyType(
    {
        Command.OPEN_RETURN_PATH: Empty,
        Command.PING: PingPayload,
        Command.POSTCOPY_ADVISE: PostcopyAdvisePayload,
        Command.POSTCOPY_LISTEN: Empty,
        Command.POSTCOPY_RUN: Empty,
        Command.POSTCOPY_RAM_DISCARD: PostcopyRamDiscardPayload,
        Command.PACKAGED: PackagedPayload,
        Command.ENABLE_COLO: Empty,
        Command.POSTCOPY_RESUME: Empty,
        Command.RECV_BITMAP: RecvBitmapCmdPayload,
    }
)

# QEMU 7.2's mig_cmd_args lengths: fixed length, or None when variable (checked per command).
# ENABLE_COLO has no entry in QEMU's table, so its length is checked as 0.
COMMAND_LENGTHS: MappingProxyType[int, int | None] = MappingProxyType(
    {
        Command.OPEN_RETURN_PATH: 0,
        Command.PING: 4,
        Command.POSTCOPY_ADVISE: None,  # 0 or 16
        Command.POSTCOPY_LISTEN: 0,
        Command.POSTCOPY_RUN: 0,
        Command.POSTCOPY_RAM_DISCARD: None,  # >= 20, 3 + namelen + 16k
        Command.PACKAGED: 4,
        Command.ENABLE_COLO: 0,
        Command.POSTCOPY_RESUME: 0,
        Command.RECV_BITMAP: None,  # 1 + namelen
    }
)

# §4 a whole COMMAND record with its payload decoded per command
CommandRecord = c.Struct(
    "type" / c.Const(RecordType.COMMAND, c.Int8ub),
    "cmd" / c.Int16ub,
    _Validate(lambda ctx: ctx.cmd in COMMAND_PAYLOADS, lambda ctx: f"unknown command {ctx.cmd}"),
    "payload" / c.Prefixed(c.Int16ub, c.Switch(this.cmd, dict(COMMAND_PAYLOADS))),
)

# ---------------------------------------------------------------- §5 return path

# RP message header: be16 type, be16 len
RpHeader = c.Struct("type" / c.Int16ub, "length" / c.Int16ub)
# RP message with the payload left raw
RpFrame = c.Struct("type" / c.Int16ub, "payload" / c.Prefixed(c.Int16ub, c.GreedyBytes))

# SHUT: be32 status (0 ok)
RpShutPayload = c.Struct("status" / c.Int32ub, c.Terminated)
# PONG: be32 value from the PING
RpPongPayload = c.Struct("value" / c.Int32ub, c.Terminated)
# REQ_PAGES_ID: be64 start, be32 len, cstr8 block (len = 13 + namelen)
RpReqPagesIdPayload = c.Struct("start" / c.Int64ub, "length" / c.Int32ub, "block" / CStr8, c.Terminated)
# REQ_PAGES: be64 start, be32 len (block of the last REQ_PAGES_ID)
RpReqPagesPayload = c.Struct("start" / c.Int64ub, "length" / c.Int32ub, c.Terminated)
# RECV_BITMAP: cstr8 block (the bitmap follows outside the message, RecvBitmapData)
RpRecvBitmapPayload = c.Struct("block" / CStr8, c.Terminated)
# RESUME_ACK: be32 value (QEMU's source requires 1)
RpResumeAckPayload = c.Struct("value" / c.Int32ub, c.Terminated)

RP_PAYLOADS: MappingProxyType[int, c.Construct] = MappingProxyType(
    {
        RpMessage.SHUT: RpShutPayload,
        RpMessage.PONG: RpPongPayload,
        RpMessage.REQ_PAGES_ID: RpReqPagesIdPayload,
        RpMessage.REQ_PAGES: RpReqPagesPayload,
        RpMessage.RECV_BITMAP: RpRecvBitmapPayload,
        RpMessage.RESUME_ACK: RpResumeAckPayload,
    }
)

# QEMU 7.2's rp_cmd_args: fixed length, or None when variable
RP_LENGTHS: MappingProxyType[int, int | None] = MappingProxyType(
    {
        RpMessage.SHUT: 4,
        RpMessage.PONG: 4,
        RpMessage.REQ_PAGES_ID: None,  # 13 + namelen
        RpMessage.REQ_PAGES: 12,
        RpMessage.RECV_BITMAP: None,  # 1 + namelen
        RpMessage.RESUME_ACK: 4,
    }
)

# §5.3 data after a RECV_BITMAP message: be64 size, LE bitmap, be64 end mark
RecvBitmapData = c.Struct(
    "size" / c.Rebuild(c.Int64ub, c.len_(this.bitmap)),
    "bitmap" / c.Bytes(this.size),
    "end_mark" / c.Const(RECV_BITMAP_END_MARK, c.Int64ub),
)

# §5 one whole RP message, with the bitmap data of a RECV_BITMAP reply
RpRecord = c.Struct(
    "type" / c.Int16ub,
    _Validate(
        lambda ctx: ctx.type in RP_PAYLOADS,
        lambda ctx: f"invalid return-path message type {ctx.type}",
    ),
    "length" / c.Peek(c.Int16ub),
    _Validate(
        lambda ctx: ctx.length is None or ctx.length <= RP_MAX_MESSAGE_LEN,
        lambda ctx: f"return-path message length {ctx.length} exceeds {RP_MAX_MESSAGE_LEN}",
    ),
    "payload" / c.Prefixed(c.Int16ub, c.Switch(this.type, dict(RP_PAYLOADS))),
    "bitmap_data" / c.If(this.type == RpMessage.RECV_BITMAP, RecvBitmapData),
)

# ---------------------------------------------------------------- §7 COLO

# COLO message: be32 message (< 7), be64 value only for VMSTATE_SIZE
ColoRecord = c.Struct(
    "message" / c.Int32ub,
    _Validate(lambda ctx: ctx.message < len(ColoMessage), lambda ctx: f"invalid COLO message {ctx.message}"),
    "value" / c.If(this.message == ColoMessage.VMSTATE_SIZE, c.Int64ub),
)

# ---------------------------------------------------------------- §9 multifd

# §9.1 initial packet, 64 bytes (unused bytes ignored on parse, zero on build)
MultifdInitPacket = c.Struct(
    "magic" / c.Const(MULTIFD_MAGIC, c.Int32ub),
    "version" / c.Const(MULTIFD_VERSION, c.Int32ub),
    "uuid" / c.Bytes(16),
    "id" / c.Int8ub,
    c.Padding(7),
    c.Padding(32),
)

_MULTIFD_FIXED_FIELDS: tuple[c.Construct, ...] = (
    "magic" / c.Const(MULTIFD_MAGIC, c.Int32ub),
    "version" / c.Const(MULTIFD_VERSION, c.Int32ub),
    "flags" / c.Int32ub,
    "pages_alloc" / c.Int32ub,
    "normal_pages" / c.Int32ub,
    _Validate(
        lambda ctx: ctx.normal_pages <= ctx.pages_alloc,
        lambda ctx: f"normal_pages {ctx.normal_pages} exceeds pages_alloc {ctx.pages_alloc}",
    ),
    "next_packet_size" / c.Int32ub,
    "packet_num" / c.Int64ub,
    c.Padding(32),
    "ramblock" / _CName(MULTIFD_RAMBLOCK_LEN),
)

# §9.2 the 320 bytes of a packet header before the offset array
MultifdPacketFixedHeader = c.Struct(*_MULTIFD_FIXED_FIELDS)

# §9.2 whole packet header: the offset array has pages_alloc slots (all of them, stale ones too)
MultifdPacketHeader = c.Struct(*_MULTIFD_FIXED_FIELDS, "offsets" / c.Array(this.pages_alloc, c.Int64ub))

# ---------------------------------------------------------------- decoder machinery


class BufferedDecoder:
    """Shared machinery of the sans-I/O channel decoders.

    Holds the not yet decoded bytes and the absolute offset of their first byte; errors are
    sticky (once a channel is broken every later call raises the same ProtocolError).
    Subclasses implement :meth:`_next` (return an event, or None when more bytes are needed)
    and :meth:`_partial_what` (what an incomplete tail is, for end_of_input's message).
    """

    channel = "?"

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # absolute channel offset of self._buf[0]
        self._error: ProtocolError | None = None
        self._ended = False

    @property
    def offset(self) -> int:
        """Absolute offset of the first byte not yet consumed by a decoded event."""
        return self._base

    @property
    def pending(self) -> int:
        """Bytes fed but not yet consumed."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self._ended:
            raise RuntimeError("feed() after end_of_input()")
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as e:
            self._error = e
            raise
        except (c.ConstructError, UnicodeDecodeError, ValueError) as e:  # safety net
            self._error = ProtocolError(f"malformed data: {e}", offset=self._base, channel=self.channel)
            raise self._error from e

    def events(self) -> Iterator[Event]:
        """Yield every event decodable from the bytes fed so far."""
        while (ev := self.next_event()) is not None:
            yield ev

    def end_of_input(self) -> list[Event]:
        """The peer closed the channel: return the events still pending, raise unless the
        input ended on a message boundary."""
        self._ended = True
        out = list(self.events())
        if self._buf:
            self._error = ProtocolError(
                f"channel closed inside {self._partial_what()} ({len(self._buf)} bytes of it received)",
                offset=self._base,
                channel=self.channel,
            )
            raise self._error
        return out

    # -- for subclasses

    def _next(self) -> Event | None:
        raise NotImplementedError

    def _partial_what(self) -> str:
        return "a message"

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._base += n

    def _fail(self, reason: str, offset: int | None = None) -> ProtocolError:
        return ProtocolError(reason, offset=self._base if offset is None else offset, channel=self.channel)
