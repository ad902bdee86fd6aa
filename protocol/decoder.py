"""Incremental, sans-I/O decoder of the main migration channel (QEMU 7.2).

Feed it bytes in any chunking and pull typed events (h11's model)::

    dec = MainDecoder()
    dec.feed(chunk)                 # or: n = sock.recv_into(dec.writable()); dec.commit(n)
    while (ev := dec.next_event()) is not None:
        ...
    dec.end_of_input()              # the peer closed: returns the last events or raises

Design points:
* One growable numpy buffer; ``writable()``/``commit()`` let a socket ``recv_into`` it directly.
* Runs of fixed-size CONTINUE page records (ZERO 9 bytes, PAGE 4104 bytes) are recognised with
  strided numpy views over the buffer, never one Python object per page (the fast path;
  ``tests/test_fastpath.py`` proves it equal to the construct definitions in ``protocol.wire``).
  With ``zero_copy=True`` a ``Pages`` event's data is a view into the buffer, valid only until
  the next ``feed``/``writable``; the default copies.
* Every item is parsed atomically: if its bytes are not all there yet the decoder rewinds to the
  item's start and waits. Every length is checked against a cap before anything is buffered for
  it, so no input makes the decoder hold more than ``max_device_area`` (device state) or
  ``max_packaged`` (one PACKAGED blob) beyond one page run.
* Device (FULL) sections carry no length: they are buffered until the VMDESCRIPTION trailer
  arrives and then delimited from it, as QEMU's analyze-migration.py does; a stream that ends
  without one (or a PACKAGED blob) is delimited by its section footers.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from . import vmdesc as vmdesc_mod
from .errors import ProtocolError
from .events import (
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    TARGET_PAGE_SIZE,
    Command,
    CompressedPage,
    Configuration,
    EnableColo,
    EndOfStream,
    Event,
    OpenReturnPath,
    Packaged,
    Pages,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RamFlag,
    RamHook,
    RecvBitmapRequest,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
)
from .wire import COMMAND_LENGTHS

PAGE = TARGET_PAGE_SIZE
FLAG_MASK = PAGE - 1
KNOWN_FLAGS = 0x1FF
PAGE_TYPES = int(RamFlag.ZERO | RamFlag.PAGE | RamFlag.XBZRLE | RamFlag.COMPRESS_PAGE)
ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)
PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)
ZERO_REC = 9  # be64 + fill byte
PAGE_REC = 8 + PAGE

# QEMU 7.2 caps (migration/savevm.c, ram.c) and our own sane bounds
MAX_PACKAGED = 1 << 24  # MAX_VM_CMD_PACKAGED_SIZE
COMPRESS_BOUND = PAGE + (PAGE >> 12) + (PAGE >> 14) + (PAGE >> 25) + 13  # zlib compressBound
MAX_MACHINE_NAME = 1024
MAX_BLOCKS = 4096
MAX_RAM_TOTAL = 1 << 50
MAX_DISCARD_RANGES = 12

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")


class PagePrediction(NamedTuple):
    """The PAGE record a stream in the middle of a page run most likely holds next."""

    block: str
    offset: int  # of the page: the record's header is ``offset | PAGE | CONTINUE``
    held: int  # bytes of that record the decoder already holds (fewer than a whole record)


class _NeedMore(Exception):
    """Not enough bytes buffered for the item being parsed: rewind and wait."""


class _State(enum.Enum):
    HEADER = "header"
    TOP = "top"
    RAM_BODY = "ram-body"
    FOOTER = "footer"
    PACKAGED_BLOB = "packaged-blob"
    DEVICE_AREA = "device-area"
    AFTER_EOF = "after-eof"
    DONE = "done"


class _Reader:
    """Bounds-checked reads from the buffer; raises _NeedMore past the committed data."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: np.ndarray, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise _NeedMore

    def u8(self) -> int:
        self.need(1)
        v = int(self.buf[self.pos])
        self.pos += 1
        return v

    def be16(self) -> int:
        self.need(2)
        (v,) = _be16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def be32(self) -> int:
        self.need(4)
        (v,) = _be32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def be64(self) -> int:
        self.need(8)
        (v,) = _be64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        self.need(n)
        v = self.buf[self.pos : self.pos + n].tobytes()
        self.pos += n
        return v

    def cstr8(self) -> str:
        n = self.u8()
        return self.raw(n).decode("utf-8", errors="surrogateescape")


class MainDecoder:
    """Decoder of one main-channel byte stream (or of a header-less sub-stream)."""

    def __init__(
        self,
        *,
        expect_header: bool = True,
        footers: bool = True,
        zero_copy: bool = False,
        known_blocks: Mapping[str, int] | None = None,
        sections: Mapping[int, str] | None = None,
        lenient_blocks: bool = False,
        assume_ram_section: bool = False,
        ram_channel: int | None = None,
        max_device_area: int = 256 << 20,
        max_packaged: int = MAX_PACKAGED,
        base_offset: int = 0,
        channel: str = "main",
        initial_capacity: int = 4 << 20,
    ) -> None:
        """
        ``known_blocks``: RAM blocks (name -> used length) already known, for header-less streams
        (a resumed postcopy connection, a PACKAGED blob). ``sections``: section ids already
        started (id -> idstr), likewise. ``lenient_blocks`` accepts page records for blocks never
        announced (for analysing a resumed stream without its first half);
        ``assume_ram_section`` treats a PART/END of an unknown id as the RAM section (likewise).
        ``ram_channel``: the stream is a postcopy-preempt channel (WIRE.md §6.7): bare RAM records
        of the RAM section with this id, with their own CONTINUE state, ended by one EOS.
        """
        self._buf = np.empty(initial_capacity, dtype=np.uint8)
        self._r = 0  # first unparsed byte
        self._w = 0  # end of committed data
        self._dropped = base_offset  # absolute offset of _buf[0]
        self._state = _State.HEADER if expect_header else _State.TOP
        self._config_allowed = expect_header
        self._footers = footers
        self._zero_copy = zero_copy
        self._blocks: dict[str, int] = dict(known_blocks or {})
        self._sections: dict[int, str] = dict(sections or {})
        self._open_sections: set[int] = set(self._sections)
        self._ended_sections: set[int] = set()
        self._lenient_blocks = lenient_blocks
        self._assume_ram = assume_ram_section
        self._max_device_area = max_device_area
        self._max_packaged = max_packaged
        self._channel = channel
        self._cur_section: int | None = None  # section whose body/footer is being parsed
        self._cur_block: str | None = None  # CONTINUE state of this stream
        self._cur_block_size = 0
        self._next_page: int | None = None  # right after a PAGE record: the offset that follows it
        self._ram_section_kind: type[Event] | None = None
        self._seen_mem_size = False
        self._postcopy_hugepages = False
        self._ignore_shared = False
        self._packaged_len = 0
        self._packaged_at = 0
        self._device_area_start = 0
        self._vmdesc_checked_upto = 0
        self._pending: list[Event] = []
        self._error: ProtocolError | None = None
        self._ram_channel = ram_channel is not None
        if ram_channel is not None:
            self._state = _State.RAM_BODY
            self._cur_section = ram_channel
            self._sections.setdefault(ram_channel, "ram")
        self._ended = False
        self.bytes_consumed = 0  # bytes fully parsed into events

    # ------------------------------------------------------------------ input side

    @property
    def offset(self) -> int:
        """Absolute offset of the first byte not yet parsed."""
        return self._dropped + self._r

    def _reserve(self, n: int) -> None:
        cap = len(self._buf)
        if self._w + n <= cap:
            return
        live = self._w - self._r
        if self._r and live + n <= cap:
            # compact: move the unparsed tail to the front (overwrites views of older events)
            self._buf[:live] = self._buf[self._r : self._w]
        else:
            new = np.empty(max(cap * 2, live + n), dtype=np.uint8)
            new[:live] = self._buf[self._r : self._w]
            self._buf = new
        self._dropped += self._r
        self._device_area_start -= self._r
        self._vmdesc_checked_upto = max(0, self._vmdesc_checked_upto - self._r)
        self._w = live
        self._r = 0

    def writable(self, min_size: int = 1 << 20) -> memoryview:
        """A writable view of at least ``min_size`` free bytes: recv_into it, then commit()."""
        if self._ended:
            raise RuntimeError("writable() after end_of_input()")
        self._reserve(min_size)
        return memoryview(self._buf)[self._w :]

    def commit(self, n: int) -> None:
        if n < 0 or self._w + n > len(self._buf):
            raise ValueError("commit() of more bytes than writable() offered")
        self._w += n

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended:
            raise RuntimeError("feed() after end_of_input()")
        n = len(data)
        if not n:
            return
        self._reserve(n)
        self._buf[self._w : self._w + n] = np.frombuffer(data, dtype=np.uint8)
        self._w += n

    @property
    def buffered(self) -> int:
        return self._w - self._r

    # ------------------------------------------------------------------ page records taken outside

    def page_prediction(self) -> PagePrediction | None:
        """When the decoder sits in a RAM section right after a PAGE record, with every event
        delivered and at most part of one more record buffered (whose header, if complete, is the
        CONTINUE PAGE record of the next page): that next record. A receiver may then read the
        records that follow straight into guest RAM, check their headers itself and report the
        ones that matched with :meth:`take_pages`; anything else it must :meth:`feed` back, in
        stream order. None otherwise."""
        nxt = self._next_page
        if (
            nxt is None
            or self._state is not _State.RAM_BODY
            or self._pending
            or self._error is not None
            or self._ended
            or self._cur_block is None
            or nxt + PAGE > self._cur_block_size
        ):
            return None
        held = self._w - self._r
        if held >= PAGE_REC:
            return None  # a whole record is here: decode it
        if held >= 8 and _be64.unpack_from(self._buf, self._r)[0] != nxt | PAGE_CONT:
            return None
        return PagePrediction(self._cur_block, nxt, held)

    def held(self) -> memoryview:
        """The buffered start of the predicted record (``page_prediction().held`` bytes); valid
        until the decoder is fed again."""
        return memoryview(self._buf)[self._r : self._w]

    def take_pages(self, k: int) -> None:
        """``k`` records, the predicted one and the ``k - 1`` CONTINUE PAGE records of the pages
        after it, were consumed outside the decoder (the held bytes were the first record's
        start). The stream goes on after them, in the same block."""
        pred = self.page_prediction()
        if pred is None or k < 1 or pred.offset + k * PAGE > self._cur_block_size:
            raise RuntimeError(f"take_pages({k}) without a prediction that covers it")
        # the held bytes leave the buffer; offsets of what follows move on by k whole records
        self._dropped += k * PAGE_REC - pred.held
        self._r = self._w
        self.bytes_consumed += k * PAGE_REC
        self._next_page = pred.offset + k * PAGE

    # ------------------------------------------------------------------ output side

    def next_event(self) -> Event | None:
        """The next complete event, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        if self._pending:
            return self._pending.pop(0)
        try:
            ev = self._step()
        except ProtocolError as err:
            self._error = err
            raise
        if ev is None and self._pending:
            return self._pending.pop(0)
        return ev

    def events(self) -> Iterator[Event]:
        while (ev := self.next_event()) is not None:
            yield ev

    def end_of_input(self) -> list[Event]:
        """The peer closed the stream: return the events that this completes, or raise."""
        self._ended = True  # lets a trailing configuration section end at the last byte
        out = list(self.events())
        while self._state is _State.DEVICE_AREA:
            out.extend(self._finish_device_area_by_footers())
            out.extend(self.events())
        if self._r < self._w:
            what = self._describe_state()
            raise self._fail(
                f"stream ends in the middle of {what} ({self._w - self._r} bytes left unparsed)",
                self.offset,
            )
        if self._state is _State.HEADER:
            raise self._fail("stream ends before the QEVM header", self.offset)
        if self._state in (_State.RAM_BODY, _State.FOOTER, _State.PACKAGED_BLOB):
            raise self._fail(f"stream ends in the middle of {self._describe_state()}", self.offset)
        return out

    def remaining_bytes(self) -> bytes:
        """Bytes buffered but not parsed (e.g. what follows the stream in COLO mode)."""
        return self._buf[self._r : self._w].tobytes()

    @property
    def finished(self) -> bool:
        """True once EOF (and the vmdesc trailer, if any) has been decoded."""
        return self._state in (_State.AFTER_EOF, _State.DONE)

    @property
    def blocks(self) -> dict[str, int]:
        return dict(self._blocks)

    @property
    def sections(self) -> dict[int, str]:
        return dict(self._sections)

    # ------------------------------------------------------------------ internals

    def _describe_state(self) -> str:
        return {
            _State.HEADER: "the stream header",
            _State.TOP: "a top-level record",
            _State.RAM_BODY: "a RAM section body",
            _State.FOOTER: "a section footer",
            _State.PACKAGED_BLOB: "a PACKAGED blob",
            _State.DEVICE_AREA: "the device state",
            _State.AFTER_EOF: "the VMDESCRIPTION trailer",
            _State.DONE: "trailing data",
        }[self._state]

    def _section_name(self) -> str | None:
        if self._cur_section is None:
            return None
        return self._sections.get(self._cur_section, f"id {self._cur_section}")

    def _fail(self, reason: str, offset: int, section: str | None = None) -> ProtocolError:
        return ProtocolError(
            reason,
            offset=offset,
            section=section if section is not None else self._section_name(),
            channel=self._channel,
        )

    def _step(self) -> Event | None:
        # items advance self._r only once complete, so waiting for more needs no rewind
        rd = _Reader(self._buf, self._r, self._w)
        try:
            ev = self._parse(rd)
        except _NeedMore:
            return None
        if ev is not None and type(ev) is not Pages:
            self._next_page = None  # the prediction holds only right after a PAGE record
        return ev

    def _advance(self, rd: _Reader) -> None:
        self.bytes_consumed += rd.pos - self._r
        self._r = rd.pos

    def _parse(self, rd: _Reader) -> Event | None:
        st = self._state
        if st is _State.RAM_BODY:
            return self._parse_ram_record(rd)
        if st is _State.TOP:
            return self._parse_top(rd)
        if st is _State.FOOTER:
            return self._parse_footer(rd)
        if st is _State.HEADER:
            return self._parse_header(rd)
        if st is _State.PACKAGED_BLOB:
            return self._parse_packaged_blob(rd)
        if st is _State.DEVICE_AREA:
            return self._scan_device_area()
        if st is _State.AFTER_EOF:
            return self._parse_after_eof(rd)
        if rd.pos < rd.end:
            raise self._fail("unexpected data after the end of the stream", self.offset)
        return None

    def _parse_header(self, rd: _Reader) -> Event:
        at = self.offset
        magic = rd.be32()
        version = rd.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._fail(f"bad magic 0x{magic:08x}, expected 0x5145564d ('QEVM')", at)
        if version == 2:
            raise self._fail("stream version 2 (the obsolete format) is not supported", at + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise self._fail(f"unsupported stream version {version}, expected 3", at + 4)
        self._advance(rd)
        self._state = _State.TOP
        return StreamHeader(version)

    # ---- top level

    def _parse_top(self, rd: _Reader) -> Event | None:
        at = self.offset
        kind = rd.u8()
        config_allowed = self._config_allowed
        if kind != 0x07:
            self._config_allowed = False
        if kind == 0x07:
            if not config_allowed:
                raise self._fail("CONFIGURATION section is only allowed right after the header", at)
            ev = self._parse_configuration(rd, at)
            self._config_allowed = False
            self._advance(rd)
            return ev
        if kind in (0x01, 0x04):
            section_id = rd.be32()
            idstr = rd.cstr8()
            instance_id = rd.be32()
            version_id = rd.be32()
            if kind == 0x04:
                if idstr == "ram":
                    raise self._fail("RAM sent as a FULL section (QEMU never does)", at, "ram")
                # device state: delimited later (vmdesc) - rewind to the header and buffer
                self._state = _State.DEVICE_AREA
                self._device_area_start = at - self._dropped
                self._vmdesc_checked_upto = self._device_area_start
                return self._scan_device_area()
            if section_id in self._sections:
                raise self._fail(
                    f"SECTION_START reuses section id {section_id} (already {self._sections[section_id]!r})",
                    at,
                    idstr,
                )
            if idstr != "ram":
                raise self._fail(
                    f"unsupported iterable section {idstr!r} (only 'ram' is implemented)", at, idstr
                )
            if instance_id != 0 or version_id != 4:
                raise self._fail(
                    f"RAM section must be instance 0 version 4, got instance {instance_id} "
                    f"version {version_id}",
                    at,
                    idstr,
                )
            self._sections[section_id] = idstr
            self._open_sections.add(section_id)
            self._enter_ram_body(section_id, SectionStart)
            self._advance(rd)
            return SectionStart(section_id, idstr, instance_id, version_id)
        if kind in (0x02, 0x03):
            section_id = rd.be32()
            name = "PART" if kind == 0x02 else "END"
            if section_id not in self._sections:
                if self._assume_ram and section_id not in self._ended_sections:
                    self._sections[section_id] = "ram"
                    self._open_sections.add(section_id)
                else:
                    raise self._fail(
                        f"SECTION_{name} for section id {section_id}, which was never started", at
                    )
            if section_id not in self._open_sections:
                raise self._fail(f"SECTION_{name} for section id {section_id} after its SECTION_END", at)
            if kind == 0x03:
                self._open_sections.discard(section_id)
                self._ended_sections.add(section_id)
            cls = SectionPart if kind == 0x02 else SectionEnd
            self._enter_ram_body(section_id, cls)
            self._advance(rd)
            return cls(section_id)
        if kind == 0x08:
            return self._parse_command(rd, at)
        if kind == 0x00:
            self._advance(rd)
            self._state = _State.AFTER_EOF
            return EndOfStream()
        if kind == 0x06:
            raise self._fail("VMDESCRIPTION before the end of the stream (EOF)", at)
        if kind == 0x05:
            raise self._fail("SUBSECTION marker at top level (only valid inside device state)", at)
        if kind == 0x7E:
            raise self._fail("SECTION_FOOTER with no section before it", at)
        raise self._fail(f"unknown top-level record type 0x{kind:02x}", at)

    def _enter_ram_body(self, section_id: int, kind: type[Event]) -> None:
        self._state = _State.RAM_BODY
        self._cur_section = section_id
        self._ram_section_kind = kind

    def _parse_configuration(self, rd: _Reader, at: int) -> Configuration:
        name_len = rd.be32()
        if name_len > MAX_MACHINE_NAME:
            raise self._fail(f"machine type name length {name_len} is not sane", at, "configuration")
        machine = rd.raw(name_len).decode("utf-8", errors="surrogateescape")
        page_bits: int | None = None
        caps: tuple[str, ...] | None = None
        uuid: bytes | None = None
        # subsections follow while the next byte is QEMU_VM_SUBSECTION; we must see that byte
        while True:
            sub_at = self._dropped + rd.pos
            if rd.pos >= rd.end:
                if self._ended:
                    break
                raise _NeedMore
            if int(self._buf[rd.pos]) != 0x05:
                break
            rd.pos += 1
            sub = rd.cstr8()
            version = rd.be32()
            if version != 1:
                raise self._fail(f"subsection {sub!r} version {version}, expected 1", sub_at, "configuration")
            if sub == "configuration/target-page-bits" and page_bits is None and caps is None:
                page_bits = rd.be32()
            elif sub == "configuration/capabilities" and caps is None and uuid is None:
                count = rd.be32()
                if count > 64:
                    raise self._fail(f"{count} capabilities listed: not sane", sub_at, "configuration")
                caps = tuple(rd.cstr8() for _ in range(count))
            elif sub == "configuration/uuid" and uuid is None:
                uuid = rd.raw(16)
            else:
                raise self._fail(
                    f"unknown or repeated configuration subsection {sub!r}", sub_at, "configuration"
                )
        if page_bits is not None and page_bits != 12:
            raise self._fail(f"target page bits {page_bits}, expected 12", at, "configuration")
        self._ignore_shared = bool(caps and "x-ignore-shared" in caps)
        return Configuration(machine, page_bits, caps, uuid)

    def _parse_footer(self, rd: _Reader) -> Event:
        at = self.offset
        kind = rd.u8()
        section_id = rd.be32()
        expected = self._cur_section
        if kind != 0x7E:
            raise self._fail(
                f"expected SECTION_FOOTER (0x7e) for section id {expected}, found byte 0x{kind:02x}",
                at,
            )
        if section_id != expected:
            raise self._fail(
                f"section footer names section id {section_id}, but section {expected} was being read",
                at,
            )
        self._advance(rd)
        self._state = _State.TOP
        self._cur_section = None
        return SectionFooter(section_id)

    # ---- RAM records

    def _block_for(self, rd: _Reader, flags: int, at: int) -> tuple[str, int]:
        if flags & RamFlag.CONTINUE:
            if self._cur_block is None:
                raise self._fail("RAM record with CONTINUE flag but no block named before it", at)
            return self._cur_block, self._cur_block_size
        name = rd.cstr8()
        size = self._blocks.get(name)
        if size is None:
            if not self._lenient_blocks:
                raise self._fail(f"RAM block {name!r} was never announced in the block list", at)
            size = MAX_RAM_TOTAL
        self._cur_block = name
        self._cur_block_size = size
        return name, size

    def _check_offset(self, block: str, size: int, offset: int, at: int) -> None:
        if offset + PAGE > size:
            raise self._fail(
                f"page offset 0x{offset:x} lies beyond the end of RAM block {block!r} (size 0x{size:x})",
                at,
            )

    def _parse_ram_record(self, rd: _Reader) -> Event | None:
        at = self.offset
        # fast path: runs of CONTINUE records of fixed size
        if rd.end - rd.pos >= 2 * ZERO_REC and self._cur_block is not None:
            (hdr,) = _be64.unpack_from(self._buf, rd.pos)
            flags = hdr & FLAG_MASK
            if flags == ZERO_CONT and rd.end - rd.pos >= 2 * ZERO_REC:
                return self._zero_run(rd.pos, rd.end)
            if flags == PAGE_CONT and rd.end - rd.pos >= 2 * PAGE_REC:
                return self._page_run(rd.pos, rd.end)
        value = rd.be64()
        flags = value & FLAG_MASK
        offset = value & ~FLAG_MASK
        if flags & ~KNOWN_FLAGS:
            raise self._fail(f"unknown RAM flags 0x{flags:03x} (QEMU 7.2 knows 0x1ff)", at)
        kind = flags & ~RamFlag.CONTINUE
        if kind & PAGE_TYPES and kind not in (
            RamFlag.ZERO,
            RamFlag.PAGE,
            RamFlag.XBZRLE,
            RamFlag.COMPRESS_PAGE,
        ):
            raise self._fail(f"RAM flags 0x{flags:03x} combine several page types", at)
        if kind == RamFlag.ZERO:
            block, size = self._block_for(rd, flags, at)
            fill = rd.u8()
            self._check_offset(block, size, offset, at)
            self._advance(rd)
            return ZeroPages(block, np.array([offset], dtype=np.uint64), fill)
        if kind == RamFlag.PAGE:
            block, size = self._block_for(rd, flags, at)
            rd.need(PAGE)
            self._check_offset(block, size, offset, at)
            data = self._buf[rd.pos : rd.pos + PAGE].reshape(1, PAGE)
            rd.pos += PAGE
            self._advance(rd)
            self._next_page = offset + PAGE
            return Pages(block, np.array([offset], dtype=np.uint64), data if self._zero_copy else data.copy())
        if kind == RamFlag.XBZRLE:
            block, size = self._block_for(rd, flags, at)
            enc = rd.u8()
            if enc != 0x01:
                raise self._fail(f"XBZRLE encoding flag 0x{enc:02x}, expected 0x01", at)
            n = rd.be16()
            if n > PAGE:
                raise self._fail(f"XBZRLE delta length {n} exceeds the page size", at)
            delta = rd.raw(n)
            self._check_offset(block, size, offset, at)
            self._advance(rd)
            return XbzrlePage(block, offset, delta)
        if kind == RamFlag.COMPRESS_PAGE:
            block, size = self._block_for(rd, flags, at)
            n = rd.be32()
            if n > COMPRESS_BOUND:
                raise self._fail(
                    f"compressed page length {n} exceeds compressBound(4096)={COMPRESS_BOUND}", at
                )
            data_b = rd.raw(n)
            self._check_offset(block, size, offset, at)
            self._advance(rd)
            return CompressedPage(block, offset, data_b)
        if flags & RamFlag.CONTINUE:
            raise self._fail(f"CONTINUE flag on a non-page RAM record (flags 0x{flags:03x})", at)
        if kind == RamFlag.EOS:
            if offset:
                raise self._fail(f"EOS record with non-zero offset bits 0x{offset:x}", at)
            self._advance(rd)
            if self._ram_channel:  # the preempt channel ends here
                self._state = _State.DONE
                return RamEos()
            self._state = _State.FOOTER if self._footers else _State.TOP
            if not self._footers:
                self._cur_section = None
            return RamEos()
        if kind == RamFlag.MEM_SIZE:
            return self._parse_mem_size(rd, offset, at)
        if kind == RamFlag.HOOK:
            self._advance(rd)
            return RamHook(offset)
        if kind == RamFlag.FULL:
            raise self._fail("RAM_SAVE_FLAG_FULL is obsolete and never sent by QEMU", at)
        raise self._fail(f"RAM record without a type (flags 0x{flags:03x})", at)

    def _parse_mem_size(self, rd: _Reader, total: int, at: int) -> Event:
        if self._ram_section_kind is not SectionStart:
            raise self._fail("RAM block list (MEM_SIZE) outside the RAM START section", at)
        if self._seen_mem_size:
            raise self._fail("second RAM block list (MEM_SIZE) in the stream", at)
        if total > MAX_RAM_TOTAL:
            raise self._fail(f"announced RAM total 0x{total:x} is not sane", at)
        if self._postcopy_hugepages:
            raise self._fail(
                "postcopy with hugepage-backed RAM: the block list's page-size fields cannot be "
                "located from the stream alone",
                at,
            )
        remaining = total
        blocks: list[RamBlockInfo] = []
        names: set[str] = set()
        while remaining:
            entry_at = self._dropped + rd.pos
            if len(blocks) >= MAX_BLOCKS:
                raise self._fail(f"more than {MAX_BLOCKS} RAM blocks announced", entry_at)
            name = rd.cstr8()
            used = rd.be64()
            addr = rd.be64() if self._ignore_shared else None
            if name in names:
                raise self._fail(f"RAM block {name!r} announced twice", entry_at)
            if used > remaining:
                raise self._fail(
                    f"RAM block {name!r} length 0x{used:x} exceeds the 0x{remaining:x} bytes left of "
                    f"the announced total 0x{total:x}",
                    entry_at,
                )
            if used == 0:
                raise self._fail(f"RAM block {name!r} announced with length 0", entry_at)
            names.add(name)
            remaining -= used
            blocks.append(RamBlockInfo(name, used, None, addr))
        self._advance(rd)
        self._seen_mem_size = True
        for b in blocks:
            self._blocks[b.name] = b.used_length
        return RamBlockList(tuple(blocks))

    def _run_length(self, hdr: np.ndarray, want: int, fills: np.ndarray | None, fill0: int) -> int:
        """Length of the prefix of records whose flags (and fill) match, scanning in growing
        windows so that a short run costs little."""
        n = len(hdr)
        done = 0
        window = 512  # one pass for the runs a 1-4 MiB read holds; larger buffers grow by 4x
        while done < n:
            stop = min(n, done + window)
            ok = (hdr[done:stop] & FLAG_MASK) == want
            if fills is not None:
                ok &= fills[done:stop] == fill0
            if not ok.all():
                return done + int(np.argmin(ok))
            done = stop
            window *= 4
        return n

    def _zero_run(self, pos: int, end: int) -> Event:
        avail = (end - pos) // ZERO_REC
        buf = self._buf
        hdr = np.ndarray((avail,), dtype=">u8", buffer=buf, offset=pos, strides=(ZERO_REC,))
        fills = np.ndarray((avail,), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(ZERO_REC,))
        fill0 = int(fills[0])
        k = self._run_length(hdr, ZERO_CONT, fills, fill0)
        offsets = (hdr[:k] & np.uint64(~FLAG_MASK & 0xFFFFFFFFFFFFFFFF)).astype(np.uint64)
        self._check_run(offsets, pos, ZERO_REC)
        self._r = pos + k * ZERO_REC
        self.bytes_consumed += k * ZERO_REC
        return ZeroPages(self._cur_block or "", offsets, fill0)

    def _page_run(self, pos: int, end: int) -> Event:
        avail = (end - pos) // PAGE_REC
        buf = self._buf
        hdr = np.ndarray((avail,), dtype=">u8", buffer=buf, offset=pos, strides=(PAGE_REC,))
        k = self._run_length(hdr, PAGE_CONT, None, 0)
        offsets = (hdr[:k] & np.uint64(~FLAG_MASK & 0xFFFFFFFFFFFFFFFF)).astype(np.uint64)
        self._check_run(offsets, pos, PAGE_REC)
        data = np.ndarray((k, PAGE), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(PAGE_REC, 1))
        self._r = pos + k * PAGE_REC
        self.bytes_consumed += k * PAGE_REC
        self._next_page = int(offsets[-1]) + PAGE
        return Pages(self._cur_block or "", offsets, data if self._zero_copy else data.copy())

    def _check_run(self, offsets: np.ndarray, pos: int, rec_size: int) -> None:
        limit = self._cur_block_size - PAGE
        if len(offsets) and int(offsets.max()) > limit:
            bad = int(np.argmax(offsets > limit))
            raise self._fail(
                f"page offset 0x{int(offsets[bad]):x} lies beyond the end of RAM block "
                f"{self._cur_block!r} (size 0x{self._cur_block_size:x})",
                self._dropped + pos + bad * rec_size,
            )

    # ---- commands

    def _parse_command(self, rd: _Reader, at: int) -> Event:
        cmd = rd.be16()
        length = rd.be16()
        if cmd not in COMMAND_LENGTHS:
            raise self._fail(f"unknown command {cmd} (QEMU 7.2 knows 1..10)", at, "command")
        name = Command(cmd).name
        section = f"command {name}"
        fixed = COMMAND_LENGTHS[cmd]
        if fixed is not None and length != fixed:
            raise self._fail(f"{name} with length {length}, expected {fixed}", at, section)
        payload_at = rd.pos
        ev: Event
        if cmd == 1:
            ev = OpenReturnPath()
        elif cmd == 2:
            ev = Ping(rd.be32())
        elif cmd == 3:
            if length == 0:
                ev = PostcopyAdvise()
            elif length == 16:
                summary = rd.be64()
                tps = rd.be64()
                if tps != PAGE:
                    raise self._fail(f"POSTCOPY_ADVISE target page size {tps}, expected 4096", at, section)
                self._postcopy_hugepages = summary != PAGE
                ev = PostcopyAdvise(summary, tps)
            else:
                raise self._fail(f"POSTCOPY_ADVISE with length {length}, expected 0 or 16", at, section)
        elif cmd == 4:
            ev = PostcopyListen()
        elif cmd == 5:
            ev = PostcopyRun()
        elif cmd == 6:
            ev = self._parse_discard(rd, length, at, section)
        elif cmd == 7:
            n = rd.be32()
            if n > self._max_packaged:
                raise self._fail(
                    f"PACKAGED blob of {n} bytes exceeds the limit of {self._max_packaged}", at, section
                )
            self._advance(rd)
            self._packaged_len = n
            self._packaged_at = at
            self._state = _State.PACKAGED_BLOB
            return self._parse_packaged_blob(_Reader(self._buf, self._r, self._w))
        elif cmd == 8:
            ev = EnableColo()
        elif cmd == 9:
            ev = PostcopyResume()
        else:  # RECV_BITMAP
            rd.need(length)
            if length < 1:
                raise self._fail("RECV_BITMAP with an empty payload", at, section)
            name_len = rd.u8()
            if length != 1 + name_len:
                raise self._fail(
                    f"RECV_BITMAP length {length} disagrees with its block name length {name_len}",
                    at,
                    section,
                )
            ev = RecvBitmapRequest(rd.raw(name_len).decode("utf-8", errors="surrogateescape"))
        if rd.pos - payload_at != length:
            raise self._fail(
                f"{name} payload is {rd.pos - payload_at} bytes but its length says {length}", at, section
            )
        self._advance(rd)
        return ev

    def _parse_discard(self, rd: _Reader, length: int, at: int, section: str) -> Event:
        rd.need(length)
        if length < 3 + 1 + 16:
            raise self._fail(f"POSTCOPY_RAM_DISCARD length {length} is below the minimum 20", at, section)
        version = rd.u8()
        if version != 0:
            raise self._fail(f"POSTCOPY_RAM_DISCARD version {version}, expected 0", at, section)
        name_len = rd.u8()
        if 3 + name_len > length:
            raise self._fail("POSTCOPY_RAM_DISCARD block name runs past its length", at, section)
        block = rd.raw(name_len).decode("utf-8", errors="surrogateescape")
        term = rd.u8()
        if term != 0:
            raise self._fail(f"POSTCOPY_RAM_DISCARD name terminator 0x{term:02x}, expected 0", at, section)
        body = length - 3 - name_len
        if body <= 0 or body % 16:
            raise self._fail(
                f"POSTCOPY_RAM_DISCARD range list of {body} bytes is not a multiple of 16", at, section
            )
        count = body // 16
        if count > MAX_DISCARD_RANGES:
            raise self._fail(f"POSTCOPY_RAM_DISCARD with {count} ranges (at most 12)", at, section)
        ranges = tuple((rd.be64(), rd.be64()) for _ in range(count))
        size = self._blocks.get(block)
        if size is None and not self._lenient_blocks:
            raise self._fail(f"POSTCOPY_RAM_DISCARD names unknown RAM block {block!r}", at, section)
        if size is not None:
            for start, n in ranges:
                if start + n > size or start % PAGE or n % PAGE:
                    raise self._fail(
                        f"discard range 0x{start:x}+0x{n:x} is not page aligned inside block "
                        f"{block!r} (size 0x{size:x})",
                        at,
                        section,
                    )
        return PostcopyRamDiscard(block, ranges)

    def _parse_packaged_blob(self, rd: _Reader) -> Event:
        rd.need(self._packaged_len)
        data = rd.raw(self._packaged_len)
        self._advance(rd)
        self._state = _State.TOP
        return Packaged(data)

    # ---- device state

    def _scan_device_area(self) -> Event | None:
        """Device sections: wait for the vmdesc trailer that delimits them."""
        start = self._device_area_start
        size = self._w - start
        if size > self._max_device_area:
            raise self._fail(
                f"device state exceeds {self._max_device_area} bytes without a VMDESCRIPTION trailer",
                self._dropped + start,
            )
        if self._w == self._vmdesc_checked_upto or self._buf[self._w - 1] != ord("}"):
            raise _NeedMore
        self._vmdesc_checked_upto = self._w
        area = memoryview(self._buf)[start : self._w]
        found = vmdesc_mod.find_vmdesc_trailer(area)
        if found is None:
            raise _NeedMore
        desc_at, json_bytes = found
        try:
            desc = json.loads(json_bytes)
        except ValueError as err:
            raise self._fail(
                f"VMDESCRIPTION is not valid JSON: {err}", self._dropped + start + desc_at
            ) from None
        if desc_at < 1 or self._buf[start + desc_at - 1] != 0:
            raise self._fail(
                "VMDESCRIPTION is not preceded by the end-of-stream byte",
                self._dropped + start + desc_at,
            )
        sections = vmdesc_mod.split_device_area(
            bytes(area[:desc_at]), desc, base_offset=self._dropped + start, footers=self._footers
        )
        out: list[Event] = []
        for sec in sections:
            out.append(sec)
            if self._footers:
                out.append(SectionFooter(sec.section_id))
        out.append(EndOfStream())
        out.append(VmDescription(bytes(json_bytes)))
        consumed = self._w - start
        self._r = self._w
        self.bytes_consumed += consumed
        self._state = _State.DONE
        self._pending.extend(out[1:])
        return out[0]

    def _finish_device_area_by_footers(self) -> list[Event]:
        start = self._device_area_start
        area = self._buf[start : self._w].tobytes()
        sections, rest = vmdesc_mod.split_by_footers(area, base_offset=self._dropped + start)
        out: list[Event] = []
        for sec in sections:
            out.append(sec)
            out.append(SectionFooter(sec.section_id))
        self._r = start + rest
        self.bytes_consumed += rest
        self._state = _State.TOP
        return out

    def _parse_after_eof(self, rd: _Reader) -> Event | None:
        at = self.offset
        kind = rd.u8()
        if kind != 0x06:
            raise self._fail(f"byte 0x{kind:02x} after the end of the stream (expected VMDESCRIPTION)", at)
        n = rd.be32()
        if n > self._max_device_area:
            raise self._fail(f"VMDESCRIPTION of {n} bytes exceeds the limit", at)
        data = rd.raw(n)
        self._advance(rd)
        self._state = _State.DONE
        return VmDescription(data)
