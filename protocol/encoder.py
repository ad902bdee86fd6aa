"""Encoder of the main migration channel: events to bytes, as QEMU 7.2 writes them.

The encoder keeps the one piece of state the format has: the CONTINUE rule (a page record omits
its block name when the previous page record on this stream was of the same block). Runs of
pages are encoded with strided numpy writes into one buffer (the fast path), byte-identical to
the construct definitions in ``protocol.wire`` (proven in ``tests/test_fastpath.py``).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

from .events import (
    QEMU_VM_FILE_MAGIC,
    TARGET_PAGE_SIZE,
    Command,
    CompressedPage,
    Configuration,
    DeviceSection,
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

PAGE = TARGET_PAGE_SIZE
PAGE_REC = 8 + PAGE
ZERO_REC = 9
_U64 = np.uint64


def _cstr8(s: str) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape")
    if len(b) > 255:
        raise ValueError(f"name {s!r} is longer than 255 bytes")
    return bytes([len(b)]) + b


def command(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BHH", 0x08, cmd, len(payload)) + payload


def discard_commands(block: str, ranges: list[tuple[int, int]]) -> list[PostcopyRamDiscard]:
    """Split a block's discard ranges into commands of at most 12 ranges, as QEMU sends them."""
    return [PostcopyRamDiscard(block, tuple(ranges[i : i + 12])) for i in range(0, len(ranges), 12)]


@dataclass(frozen=True)
class PageIov:
    """A gathered write: ``iov`` is an (n, 2) uint64 array of (address, length) pairs, laid out
    as Linux's ``struct iovec``; ``keep`` holds the arrays the addresses point into."""

    iov: np.ndarray
    keep: tuple[object, ...]
    nbytes: int

    def tobytes(self) -> bytes:
        """The bytes described (a copy, for tests and checks)."""
        return b"".join(ctypes.string_at(int(a), int(n)) for a, n in self.iov)


class MainEncoder:
    """Stateful encoder of one main-channel stream (one per TCP connection)."""

    def __init__(self) -> None:
        self._last_block: str | None = None

    def reset_continue(self) -> None:
        """Forget the last block (a new connection, e.g. a resumed postcopy stream)."""
        self._last_block = None

    # ---------------------------------------------------------------- page runs (fast path)

    def _name_prefix(self, block: str) -> bytes | None:
        if block == self._last_block:
            return None
        self._last_block = block
        return _cstr8(block)

    def pages(self, block: str, offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
        """PAGE records for ``data[i]`` at ``offsets[i]``: one contiguous uint8 array."""
        n = len(offsets)
        if data.shape != (n, PAGE):
            raise ValueError(f"page data shape {data.shape}, expected ({n}, {PAGE})")
        return self.pages_from(block, offsets, data, None)

    def pages_from(
        self, block: str, offsets: np.ndarray, source: np.ndarray, rows: np.ndarray | None
    ) -> np.ndarray:
        """PAGE records gathering ``source[rows[i]]`` (all rows when None) straight into the
        record buffer: the page bytes are copied exactly once."""
        n = len(offsets)
        if n == 0:
            return np.empty(0, dtype=np.uint8)
        data = source if rows is None else None
        name = self._name_prefix(block)
        head = 0
        out_len = n * PAGE_REC
        if name is not None:
            head = 8 + len(name) + PAGE
            out_len += len(name)
        out = np.empty(out_len, dtype=np.uint8)
        first = 0
        if name is not None:
            struct.pack_into(">Q", out, 0, int(offsets[0]) | RamFlag.PAGE)
            out[8 : 8 + len(name)] = np.frombuffer(name, dtype=np.uint8)
            out[8 + len(name) : head] = source[0] if rows is None else source[int(rows[0])]
            first = 1
        m = n - first
        if m:
            hdr = np.ndarray((m,), dtype=">u8", buffer=out, offset=head, strides=(PAGE_REC,))
            hdr[:] = np.asarray(offsets[first:], dtype=_U64) | _U64(RamFlag.PAGE | RamFlag.CONTINUE)
            body = np.ndarray((m, PAGE), dtype=np.uint8, buffer=out, offset=head + 8, strides=(PAGE_REC, 1))
            if data is not None:
                body[:] = data[first:]
            else:
                np.take(source, np.asarray(rows[first:], dtype=np.intp), axis=0, out=body)
        return out

    def pages_iov(self, block: str, pages: np.ndarray, rows: np.ndarray) -> PageIov:
        """PAGE records for the pages ``pages[rows[i]]`` at offsets ``rows[i] * PAGE``, as an
        iovec array for a gathered write (sendmsg/writev) straight from ``pages``.

        The bytes it describes equal ``pages_from(block, rows * PAGE, pages, rows)``: one segment
        per record header (8 bytes, from a header array built here), one for the block name when
        the CONTINUE rule needs it, one per page (4096 bytes, an address inside ``pages``).
        ``pages`` must be a C-contiguous (n, PAGE) uint8 array (a RAM block's view); the
        addresses are valid while it and ``PageIov.keep`` are alive. Nothing is copied here.
        """
        rows = np.asarray(rows, dtype=np.intp)
        n = len(rows)
        if pages.ndim != 2 or pages.shape[1] != PAGE or not pages.flags.c_contiguous:
            raise ValueError("pages_iov needs a C-contiguous (n, PAGE) page array")
        if n == 0:
            return PageIov(np.empty((0, 2), dtype=_U64), (), 0)
        if int(rows.min()) < 0 or int(rows.max()) >= len(pages):
            raise IndexError("page rows out of range")
        name = self._name_prefix(block)
        offsets = rows.astype(_U64) * _U64(PAGE)
        hdr = np.empty(n, dtype=">u8")
        hdr[:] = offsets | _U64(RamFlag.PAGE | RamFlag.CONTINUE)
        extra = 0
        name_arr = np.frombuffer(name or b"", dtype=np.uint8)
        keep: tuple[object, ...] = (hdr, pages, name_arr)
        if name is not None:
            hdr[0] = int(offsets[0]) | RamFlag.PAGE  # the first record names its block
            extra = 1
        iov = np.empty((2 * n + extra, 2), dtype=_U64)
        hdr_addr = _U64(hdr.ctypes.data)
        page_addr = _U64(pages.ctypes.data)
        # record i: header segment at 2*i (+extra after the first), page segment right after it
        iov[0, 0], iov[0, 1] = hdr_addr, 8
        if extra:
            iov[1, 0], iov[1, 1] = name_arr.ctypes.data, len(name_arr)
        iov[1 + extra, 0], iov[1 + extra, 1] = page_addr + offsets[0], PAGE
        rest = iov[2 + extra :]
        rest[0::2, 0] = hdr_addr + np.arange(1, n, dtype=_U64) * _U64(8)
        rest[0::2, 1] = 8
        rest[1::2, 0] = page_addr + offsets[1:]
        rest[1::2, 1] = PAGE
        return PageIov(iov, keep, n * PAGE_REC + len(name_arr))

    def zero_pages(self, block: str, offsets: np.ndarray, fill: int = 0) -> np.ndarray:
        """ZERO records for ``offsets``: one contiguous uint8 array."""
        n = len(offsets)
        if n == 0:
            return np.empty(0, dtype=np.uint8)
        name = self._name_prefix(block)
        head = 0
        out_len = n * ZERO_REC
        if name is not None:
            head = ZERO_REC + len(name)
            out_len += len(name)
        out = np.empty(out_len, dtype=np.uint8)
        first = 0
        if name is not None:
            struct.pack_into(">Q", out, 0, int(offsets[0]) | RamFlag.ZERO)
            out[8 : 8 + len(name)] = np.frombuffer(name, dtype=np.uint8)
            out[head - 1] = fill
            first = 1
        m = n - first
        if m:
            hdr = np.ndarray((m,), dtype=">u8", buffer=out, offset=head, strides=(ZERO_REC,))
            hdr[:] = np.asarray(offsets[first:], dtype=_U64) | _U64(RamFlag.ZERO | RamFlag.CONTINUE)
            fills = np.ndarray((m,), dtype=np.uint8, buffer=out, offset=head + 8, strides=(ZERO_REC,))
            fills[:] = fill
        return out

    def _single(self, flag: int, block: str, offset: int, payload: bytes) -> bytes:
        name = self._name_prefix(block)
        if name is None:
            return struct.pack(">Q", offset | flag | RamFlag.CONTINUE) + payload
        return struct.pack(">Q", offset | flag) + name + payload

    # ---------------------------------------------------------------- every event

    def encode(self, ev: Event) -> bytes:
        """Bytes of one main-channel event."""
        if isinstance(ev, Pages):
            return self.pages(ev.block, ev.offsets, ev.data).tobytes()
        if isinstance(ev, ZeroPages):
            return self.zero_pages(ev.block, ev.offsets, ev.fill).tobytes()
        if isinstance(ev, XbzrlePage):
            if len(ev.delta) > PAGE:
                raise ValueError("XBZRLE delta longer than a page")
            return self._single(
                RamFlag.XBZRLE, ev.block, ev.offset, struct.pack(">BH", 1, len(ev.delta)) + ev.delta
            )
        if isinstance(ev, CompressedPage):
            return self._single(
                RamFlag.COMPRESS_PAGE, ev.block, ev.offset, struct.pack(">I", len(ev.data)) + ev.data
            )
        if isinstance(ev, RamEos):
            return struct.pack(">Q", RamFlag.EOS)
        if isinstance(ev, RamHook):
            return struct.pack(">Q", ev.value | RamFlag.HOOK)
        if isinstance(ev, RamBlockList):
            out = [struct.pack(">Q", ev.total | RamFlag.MEM_SIZE)]
            for b in ev.blocks:
                out.append(_cstr8(b.name) + struct.pack(">Q", b.used_length))
                if b.page_size is not None:
                    out.append(struct.pack(">Q", b.page_size))
                if b.guest_addr is not None:
                    out.append(struct.pack(">Q", b.guest_addr))
            return b"".join(out)
        if isinstance(ev, StreamHeader):
            return struct.pack(">II", QEMU_VM_FILE_MAGIC, ev.version)
        if isinstance(ev, Configuration):
            return encode_configuration(ev)
        if isinstance(ev, SectionStart):
            return (
                struct.pack(">BI", 0x01, ev.section_id)
                + _cstr8(ev.idstr)
                + struct.pack(">II", ev.instance_id, ev.version_id)
            )
        if isinstance(ev, SectionPart):
            return struct.pack(">BI", 0x02, ev.section_id)
        if isinstance(ev, SectionEnd):
            return struct.pack(">BI", 0x03, ev.section_id)
        if isinstance(ev, SectionFooter):
            return struct.pack(">BI", 0x7E, ev.section_id)
        if isinstance(ev, DeviceSection):
            return (
                struct.pack(">BI", 0x04, ev.section_id)
                + _cstr8(ev.idstr)
                + struct.pack(">II", ev.instance_id, ev.version_id)
                + ev.body
            )
        if isinstance(ev, EndOfStream):
            return b"\x00"
        if isinstance(ev, VmDescription):
            return struct.pack(">BI", 0x06, len(ev.json_bytes)) + ev.json_bytes
        return encode_command(ev)


def encode_configuration(ev: Configuration) -> bytes:
    name = ev.machine_type.encode("utf-8", errors="surrogateescape")
    out = [struct.pack(">BI", 0x07, len(name)), name]

    def sub(sub_name: str, body: bytes) -> None:
        out.append(b"\x05" + _cstr8(sub_name) + struct.pack(">I", 1) + body)

    if ev.target_page_bits is not None:
        sub("configuration/target-page-bits", struct.pack(">I", ev.target_page_bits))
    if ev.capabilities is not None:
        sub(
            "configuration/capabilities",
            struct.pack(">I", len(ev.capabilities)) + b"".join(_cstr8(c) for c in ev.capabilities),
        )
    if ev.uuid is not None:
        if len(ev.uuid) != 16:
            raise ValueError("configuration uuid must be 16 bytes")
        sub("configuration/uuid", ev.uuid)
    return b"".join(out)


def encode_command(ev: Event) -> bytes:
    """Bytes of one MIG_CMD_* event (PACKAGED includes its blob)."""
    if isinstance(ev, OpenReturnPath):
        return command(Command.OPEN_RETURN_PATH)
    if isinstance(ev, Ping):
        return command(Command.PING, struct.pack(">I", ev.value))
    if isinstance(ev, PostcopyAdvise):
        if ev.host_page_summary is None:
            return command(Command.POSTCOPY_ADVISE)
        return command(Command.POSTCOPY_ADVISE, struct.pack(">QQ", ev.host_page_summary, ev.target_page_size))
    if isinstance(ev, PostcopyListen):
        return command(Command.POSTCOPY_LISTEN)
    if isinstance(ev, PostcopyRun):
        return command(Command.POSTCOPY_RUN)
    if isinstance(ev, PostcopyRamDiscard):
        if not 1 <= len(ev.ranges) <= 12:
            raise ValueError("a POSTCOPY_RAM_DISCARD command carries 1 to 12 ranges")
        name = ev.block.encode("utf-8", errors="surrogateescape")
        payload = bytes([0, len(name)]) + name + b"\x00"
        payload += b"".join(struct.pack(">QQ", s, n) for s, n in ev.ranges)
        return command(Command.POSTCOPY_RAM_DISCARD, payload)
    if isinstance(ev, Packaged):
        return command(Command.PACKAGED, struct.pack(">I", len(ev.data))) + ev.data
    if isinstance(ev, EnableColo):
        return command(Command.ENABLE_COLO)
    if isinstance(ev, PostcopyResume):
        return command(Command.POSTCOPY_RESUME)
    if isinstance(ev, RecvBitmapRequest):
        return command(Command.RECV_BITMAP, _cstr8(ev.block))
    raise TypeError(f"not a main-channel event: {ev!r}")
