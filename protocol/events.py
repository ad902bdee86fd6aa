"""Typed events of the migration channels.

The decoders in :mod:`protocol.decoder` turn bytes into these; the encoders in
:mod:`protocol.encoder` turn them back into bytes. Page events carry runs of pages as numpy
arrays so that a GiB of RAM never becomes a quarter of a million Python objects.

Equality: page-run events compare their arrays by value. A run may be split at any record
boundary by the decoder (chunking decides where); :func:`coalesce` joins adjacent runs of the
same kind and block so that streams can be compared independent of chunking.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TARGET_PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12
QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3

# ---------------------------------------------------------------- top-level record types


class RecordType(enum.IntEnum):
    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class RamFlag(enum.IntFlag):
    FULL = 0x001
    ZERO = 0x002
    MEM_SIZE = 0x004
    PAGE = 0x008
    EOS = 0x010
    CONTINUE = 0x020
    XBZRLE = 0x040
    HOOK = 0x080
    COMPRESS_PAGE = 0x100


class Command(enum.IntEnum):
    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


class RpMessage(enum.IntEnum):
    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6


class ColoMessage(enum.IntEnum):
    CHECKPOINT_READY = 0
    CHECKPOINT_REQUEST = 1
    CHECKPOINT_REPLY = 2
    VMSTATE_SEND = 3
    VMSTATE_SIZE = 4
    VMSTATE_RECEIVED = 5
    VMSTATE_LOADED = 6


class Event:
    """Base class of every decoded item."""


# ---------------------------------------------------------------- framing


@dataclass(frozen=True)
class StreamHeader(Event):
    version: int = QEMU_VM_FILE_VERSION


@dataclass(frozen=True)
class Configuration(Event):
    machine_type: str
    # optional subsections, None when absent (in the order QEMU writes them)
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class SectionStart(Event):
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class SectionPart(Event):
    section_id: int


@dataclass(frozen=True)
class SectionEnd(Event):
    section_id: int


@dataclass(frozen=True)
class SectionFooter(Event):
    section_id: int


@dataclass(frozen=True)
class DeviceSection(Event):
    """A non-iterable (FULL) section: header fields and the body's raw bytes, kept verbatim.

    ``body`` is everything between the full section header and the footer.
    """

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    body: bytes


@dataclass(frozen=True)
class EndOfStream(Event):
    """QEMU_VM_EOF at top level (or at the end of a PACKAGED blob)."""


@dataclass(frozen=True)
class VmDescription(Event):
    """The JSON trailer, kept as the exact bytes sent; ``parsed`` decodes it."""

    json_bytes: bytes

    def parsed(self) -> dict[str, Any]:
        import json

        return json.loads(self.json_bytes)


# ---------------------------------------------------------------- RAM section records


@dataclass(frozen=True)
class RamBlockInfo:
    name: str
    used_length: int
    page_size: int | None = None  # only with postcopy-ram and a non-host page size
    guest_addr: int | None = None  # only with x-ignore-shared


@dataclass(frozen=True)
class RamBlockList(Event):
    """RAM_SAVE_FLAG_MEM_SIZE: total of all used lengths and the list itself."""

    blocks: tuple[RamBlockInfo, ...]

    @property
    def total(self) -> int:
        return sum(b.used_length for b in self.blocks)


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


@dataclass(eq=False)
class ZeroPages(Event):
    """A run of RAM_SAVE_FLAG_ZERO records in one block, all with the same fill byte."""

    block: str
    offsets: np.ndarray  # uint64 byte offsets within the block
    fill: int = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ZeroPages)
            and self.block == other.block
            and self.fill == other.fill
            and _arrays_equal(self.offsets, other.offsets)
        )

    def __repr__(self) -> str:
        return f"ZeroPages(block={self.block!r}, n={len(self.offsets)}, fill={self.fill})"


@dataclass(eq=False)
class Pages(Event):
    """A run of RAM_SAVE_FLAG_PAGE records in one block.

    ``data`` has shape (n, 4096) dtype uint8. From a zero-copy decoder it is a view into the
    decoder's buffer, valid only until the decoder is fed again.
    """

    block: str
    offsets: np.ndarray
    data: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Pages)
            and self.block == other.block
            and _arrays_equal(self.offsets, other.offsets)
            and _arrays_equal(self.data, other.data)
        )

    def __repr__(self) -> str:
        return f"Pages(block={self.block!r}, n={len(self.offsets)})"


@dataclass(frozen=True)
class XbzrlePage(Event):
    """RAM_SAVE_FLAG_XBZRLE: a delta to apply on top of the receiver's copy of the page."""

    block: str
    offset: int
    delta: bytes


@dataclass(frozen=True)
class CompressedPage(Event):
    """RAM_SAVE_FLAG_COMPRESS_PAGE: one page as a zlib stream."""

    block: str
    offset: int
    data: bytes


@dataclass(frozen=True)
class RamHook(Event):
    """RAM_SAVE_FLAG_HOOK: an RDMA control hook (meaningless over TCP)."""

    value: int = 0


@dataclass(frozen=True)
class RamEos(Event):
    """RAM_SAVE_FLAG_EOS: the end of one RAM section body."""


# ---------------------------------------------------------------- commands (main channel)


@dataclass(frozen=True)
class OpenReturnPath(Event):
    pass


@dataclass(frozen=True)
class Ping(Event):
    value: int


@dataclass(frozen=True)
class PostcopyAdvise(Event):
    """len 16 form carries both sizes; the len 0 form (dirty-bitmaps only) has both None."""

    host_page_summary: int | None = None
    target_page_size: int | None = None


@dataclass(frozen=True)
class PostcopyListen(Event):
    pass


@dataclass(frozen=True)
class PostcopyRun(Event):
    pass


@dataclass(frozen=True)
class PostcopyRamDiscard(Event):
    """One POSTCOPY_RAM_DISCARD command: byte ranges (start, length) of one block (1..12)."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Packaged(Event):
    """CMD_PACKAGED with the blob that follows it: a header-less sub-stream."""

    data: bytes


@dataclass(frozen=True)
class EnableColo(Event):
    pass


@dataclass(frozen=True)
class PostcopyResume(Event):
    pass


@dataclass(frozen=True)
class RecvBitmapRequest(Event):
    """CMD_RECV_BITMAP: the source asks for the destination's received bitmap of a block."""

    block: str


# ---------------------------------------------------------------- return path


@dataclass(frozen=True)
class RpShut(Event):
    status: int


@dataclass(frozen=True)
class RpPong(Event):
    value: int


@dataclass(frozen=True)
class RpReqPages(Event):
    """REQ_PAGES (block None: same block as the last request) or REQ_PAGES_ID (block given)."""

    start: int
    length: int
    block: str | None = None


@dataclass(frozen=True)
class RpRecvBitmap(Event):
    """RECV_BITMAP reply: the block and its little-endian received bitmap (raw bytes)."""

    block: str
    bitmap: bytes


@dataclass(frozen=True)
class RpResumeAck(Event):
    value: int = 1


# ---------------------------------------------------------------- COLO (raw be32 [+ be64])


@dataclass(frozen=True)
class ColoEvent(Event):
    message: ColoMessage
    value: int | None = None  # only VMSTATE_SIZE carries one


# ---------------------------------------------------------------- multifd channels


@dataclass(frozen=True)
class MultifdInit(Event):
    uuid: bytes
    channel_id: int
    version: int = 1


@dataclass(eq=False)
class MultifdPacket(Event):
    flags: int
    pages_alloc: int
    packet_num: int
    block: str
    offsets: np.ndarray  # the normal_pages valid offsets
    data: np.ndarray  # (normal_pages, 4096) page payload (nocomp)
    next_packet_size: int = field(default=-1)  # -1: derive normal_pages * page size
    # offset slots normal_pages..pages_alloc-1: QEMU 7.2 leaves stale values from earlier
    # packets there; kept so re-encoding is byte-identical (None: all zero)
    stale_offsets: np.ndarray | None = None

    SYNC = 0x1

    @property
    def normal_pages(self) -> int:
        return len(self.offsets)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MultifdPacket)
            and (self.flags, self.pages_alloc, self.packet_num, self.block)
            == (other.flags, other.pages_alloc, other.packet_num, other.block)
            and _arrays_equal(self.offsets, other.offsets)
            and _arrays_equal(self.data, other.data)
        )


# ---------------------------------------------------------------- helpers


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Join adjacent page runs of the same kind, block (and fill) into one event.

    Makes event lists comparable whatever chunking or run splitting produced them.
    """
    out: list[Event] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, ZeroPages)
            and isinstance(prev, ZeroPages)
            and (prev.block, prev.fill) == (ev.block, ev.fill)
        ):
            out[-1] = ZeroPages(prev.block, np.concatenate([prev.offsets, ev.offsets]), prev.fill)
            continue
        if isinstance(ev, Pages) and isinstance(prev, Pages) and prev.block == ev.block:
            out[-1] = Pages(
                prev.block,
                np.concatenate([prev.offsets, ev.offsets]),
                np.concatenate([prev.data, ev.data]),
            )
            continue
        if isinstance(ev, Pages):
            ev = Pages(ev.block, ev.offsets.copy(), ev.data.copy())
        out.append(ev)
    return out
