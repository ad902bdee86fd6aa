"""Sans-I/O decoder and encoders of one multifd channel (WIRE.md §9, QEMU 7.2, nocomp only).

A channel is the 64-byte initial packet, then packets: a header with ``pages_alloc`` offset
slots (1344 bytes for 128) followed by ``normal_pages`` x 4096 bytes of page data.

7.2 quirks preserved for byte-identical re-encoding: an empty packet (0 pages) carries stale
``next_packet_size`` and ``ramblock`` values from the previous packet, and the offset slots
beyond ``normal_pages`` are not cleared (stale offsets of earlier packets). The decoder keeps
both in the event; the payload length of a nocomp packet is always ``normal_pages * 4096``.

Compressed channels (flags bits 1-3 non-zero: zlib, zstd) are rejected with
"multifd compression not supported".
"""

from __future__ import annotations

from collections.abc import Mapping

import construct as c
import numpy as np

from protocol.events import TARGET_PAGE_SIZE, Event, MultifdInit, MultifdPacket
from protocol.wire import (
    MULTIFD_FLAG_COMPRESSION_MASK,
    MULTIFD_HEADER_FIXED_SIZE,
    MULTIFD_INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_PAGES_ALLOC,
    MULTIFD_VERSION,
    BufferedDecoder,
    MultifdInitPacket,
    MultifdPacketFixedHeader,
    multifd_header_size,
)

_BE64 = np.dtype(">u8")


class MultifdChannelDecoder(BufferedDecoder):
    """Incremental decoder of one multifd channel: MultifdInit, then MultifdPacket events.

    ``max_pages_alloc``: largest accepted ``pages_alloc`` (QEMU's destination rejects more than
    its own 128). Optional checks: ``channels`` (reject a channel id >= channels),
    ``expected_uuid`` (16 bytes the initial packet must carry), ``block_sizes`` (block name ->
    used_length: packets with pages must name a known block and offsets must lie inside it).
    """

    channel = "multifd"

    def __init__(
        self,
        max_pages_alloc: int = MULTIFD_PAGES_ALLOC,
        *,
        channels: int | None = None,
        expected_uuid: bytes | None = None,
        block_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self._max_pages_alloc = max_pages_alloc
        self._channels = channels
        self._expected_uuid = expected_uuid
        self._block_sizes = dict(block_sizes) if block_sizes is not None else None
        self._seen_init = False
        self._hdr: c.Container | None = None  # parsed fixed header of the packet in progress

    def _partial_what(self) -> str:
        if not self._seen_init:
            return "the multifd initial packet"
        if self._hdr is not None and len(self._buf) >= multifd_header_size(self._hdr.pages_alloc):
            return f"the page data of a multifd packet ({self._hdr.normal_pages} pages)"
        return "a multifd packet header"

    def _next(self) -> Event | None:
        if not self._seen_init:
            return self._init_packet()
        return self._packet()

    def _init_packet(self) -> Event | None:
        buf = self._buf
        if len(buf) < MULTIFD_INIT_SIZE:
            return None
        magic = int.from_bytes(buf[0:4], "big")
        if magic != MULTIFD_MAGIC:
            raise self._fail(f"multifd initial packet has magic {magic:#010x}, expected {MULTIFD_MAGIC:#x}")
        version = int.from_bytes(buf[4:8], "big")
        if version != MULTIFD_VERSION:
            raise self._fail(f"multifd initial packet has version {version}, expected {MULTIFD_VERSION}")
        init = MultifdInitPacket.parse(bytes(buf[:MULTIFD_INIT_SIZE]))
        if self._expected_uuid is not None and init.uuid != self._expected_uuid:
            raise self._fail(
                f"multifd initial packet has UUID {init.uuid.hex()}, expected {self._expected_uuid.hex()}"
            )
        if self._channels is not None and init.id >= self._channels:
            raise self._fail(f"multifd channel id {init.id} is out of range for {self._channels} channels")
        self._seen_init = True
        self._consume(MULTIFD_INIT_SIZE)
        return MultifdInit(uuid=init.uuid, channel_id=init.id, version=init.version)

    def _parse_fixed_header(self) -> c.Container | None:
        buf = self._buf
        if len(buf) < MULTIFD_HEADER_FIXED_SIZE:
            return None
        magic = int.from_bytes(buf[0:4], "big")
        if magic != MULTIFD_MAGIC:
            raise self._fail(f"multifd packet has magic {magic:#010x}, expected {MULTIFD_MAGIC:#x}")
        version = int.from_bytes(buf[4:8], "big")
        if version != MULTIFD_VERSION:
            raise self._fail(f"multifd packet has version {version}, expected {MULTIFD_VERSION}")
        flags = int.from_bytes(buf[8:12], "big")
        pages_alloc = int.from_bytes(buf[12:16], "big")
        normal_pages = int.from_bytes(buf[16:20], "big")
        if flags & MULTIFD_FLAG_COMPRESSION_MASK:
            raise self._fail(
                f"multifd compression not supported (packet flags {flags:#x} select method "
                f"{(flags & MULTIFD_FLAG_COMPRESSION_MASK) >> 1})"
            )
        if pages_alloc > self._max_pages_alloc:
            raise self._fail(
                f"multifd packet has pages_alloc {pages_alloc}, more than the maximum {self._max_pages_alloc}"
            )
        if normal_pages > pages_alloc:
            raise self._fail(
                f"multifd packet has {normal_pages} pages, more than its pages_alloc {pages_alloc}"
            )
        try:
            return MultifdPacketFixedHeader.parse(bytes(buf[:MULTIFD_HEADER_FIXED_SIZE]))
        except c.StringError:
            raise self._fail("multifd packet's ramblock name is not valid UTF-8") from None

    def _packet(self) -> Event | None:
        if self._hdr is None:
            self._hdr = self._parse_fixed_header()
            if self._hdr is None:
                return None
        hdr = self._hdr
        buf = self._buf
        n = hdr.normal_pages
        hdr_len = multifd_header_size(hdr.pages_alloc)
        end = hdr_len + n * TARGET_PAGE_SIZE  # nocomp: next_packet_size is not trusted (7.2 quirk)
        if len(buf) < end:
            return None
        slots = np.frombuffer(buf, dtype=_BE64, count=hdr.pages_alloc, offset=MULTIFD_HEADER_FIXED_SIZE)
        slots = slots.astype(np.uint64)
        offsets = slots[:n]
        if n and self._block_sizes is not None:
            self._check_pages(hdr.ramblock, offsets)
        stale = slots[n:]
        data = (
            np.frombuffer(buf, dtype=np.uint8, count=n * TARGET_PAGE_SIZE, offset=hdr_len)
            .reshape(n, TARGET_PAGE_SIZE)
            .copy()
        )
        ev = MultifdPacket(
            flags=hdr.flags,
            pages_alloc=hdr.pages_alloc,
            packet_num=hdr.packet_num,
            block=hdr.ramblock,
            offsets=offsets.copy(),
            data=data,
            next_packet_size=hdr.next_packet_size,
            stale_offsets=stale.copy() if stale.any() else None,
        )
        self._hdr = None
        self._consume(end)
        return ev

    def _check_pages(self, block: str, offsets: np.ndarray) -> None:
        assert self._block_sizes is not None
        used = self._block_sizes.get(block)
        if used is None:
            raise self._fail(f"multifd packet names unknown RAM block {block!r}")
        # as QEMU: each page must start no later than used_length - page size
        bad = offsets[(offsets > used - TARGET_PAGE_SIZE) | (offsets % TARGET_PAGE_SIZE != 0)]
        if bad.size:
            raise self._fail(
                f"multifd packet offset {int(bad[0]):#x} is not a page inside block {block!r} "
                f"({used:#x} bytes)"
            )


def encode_multifd_init(event: MultifdInit) -> bytes:
    """The 64-byte initial packet of a channel."""
    if not isinstance(event, MultifdInit):
        raise TypeError(f"not a MultifdInit: {event!r}")
    if event.version != MULTIFD_VERSION or len(event.uuid) != 16:
        raise ValueError(f"cannot encode {event!r}: version must be 1 and uuid 16 bytes")
    try:
        return MultifdInitPacket.build(dict(uuid=event.uuid, id=event.channel_id))
    except c.ConstructError as e:
        raise ValueError(f"cannot encode {event!r}: {e}") from e


def encode_multifd_packet(event: MultifdPacket) -> bytes:
    """Header (pages_alloc offset slots) plus page data of one nocomp packet.

    ``next_packet_size`` -1 means normal_pages * 4096; ``stale_offsets`` None means zeros.
    """
    if not isinstance(event, MultifdPacket):
        raise TypeError(f"not a MultifdPacket: {event!r}")
    n = len(event.offsets)
    data = np.asarray(event.data, dtype=np.uint8)
    if data.shape != (n, TARGET_PAGE_SIZE):
        raise ValueError(f"multifd packet data has shape {data.shape}, expected ({n}, {TARGET_PAGE_SIZE})")
    if n > event.pages_alloc:
        raise ValueError(f"multifd packet has {n} pages, more than its pages_alloc {event.pages_alloc}")
    if event.flags & MULTIFD_FLAG_COMPRESSION_MASK:
        raise ValueError("multifd compression not supported")
    slots = np.zeros(event.pages_alloc, dtype=_BE64)
    slots[:n] = event.offsets
    if event.stale_offsets is not None:
        if len(event.stale_offsets) != event.pages_alloc - n:
            raise ValueError(
                f"multifd packet has {len(event.stale_offsets)} stale offsets, "
                f"expected {event.pages_alloc - n}"
            )
        slots[n:] = event.stale_offsets
    size = n * TARGET_PAGE_SIZE if event.next_packet_size == -1 else event.next_packet_size
    try:
        fixed = MultifdPacketFixedHeader.build(
            dict(
                flags=event.flags,
                pages_alloc=event.pages_alloc,
                normal_pages=n,
                next_packet_size=size,
                packet_num=event.packet_num,
                ramblock=event.block,
            )
        )
    except c.ConstructError as e:
        raise ValueError(f"cannot encode {event!r}: {e}") from e
    return b"".join((fixed, slots.tobytes(), data.tobytes()))


__all__ = [
    "MultifdChannelDecoder",
    "encode_multifd_init",
    "encode_multifd_packet",
]
