"""Sans-I/O decoder and encoder of the return path (destination -> source, WIRE.md §5) and of
raw COLO messages (§7.1).

Both decoders accept bytes in any chunking: ``feed()`` what arrived, then drain ``events()``
(or call ``next_event()`` until it returns None), and call ``end_of_input()`` when the peer
closed. Every malformed input raises :class:`ProtocolError` (channel "return-path" or "colo")
whose offset is the absolute channel offset where the offending message started.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import construct as c

from protocol.events import (
    ColoEvent,
    ColoMessage,
    Event,
    RpMessage,
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpResumeAck,
    RpShut,
)
from protocol.wire import (
    RECV_BITMAP_END_MARK,
    RP_LENGTHS,
    RP_MAX_MESSAGE_LEN,
    RP_PAYLOADS,
    BufferedDecoder,
    ColoRecord,
    RecvBitmapData,
    RpFrame,
    recv_bitmap_size,
)

DEFAULT_MAX_BITMAP_BYTES = 64 * 1024 * 1024

_RP_HEADER_LEN = 4
_BITMAP_SIZE_LEN = 8
_END_MARK_LEN = 8


def _rp_name(msg_type: int) -> str:
    try:
        return RpMessage(msg_type).name
    except ValueError:
        return str(msg_type)


class ReturnPathDecoder(BufferedDecoder):
    """Incremental decoder of the §5 return path.

    ``max_bitmap_bytes`` caps the size announced by a RECV_BITMAP reply (checked before any of
    the bitmap is waited for). With ``block_sizes`` (block name -> used_length in bytes) the
    decoder also requires known block names, the exact bitmap size QEMU's source expects
    (§5.3), and page requests that lie inside their block.

    Buffering: a message is consumed only once complete, so the decoder itself never needs
    more than one message plus its bitmap beyond what the caller fed at once.
    """

    channel = "return-path"

    def __init__(
        self,
        *,
        max_bitmap_bytes: int = DEFAULT_MAX_BITMAP_BYTES,
        block_sizes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self._max_bitmap_bytes = max_bitmap_bytes
        self._block_sizes = dict(block_sizes) if block_sizes is not None else None
        # REQ_PAGES means "block of the last REQ_PAGES_ID": QEMU's source fails without one
        self._last_req_block: str | None = None

    def _partial_what(self) -> str:
        if len(self._buf) >= _RP_HEADER_LEN:
            return f"a {_rp_name(int.from_bytes(self._buf[:2], 'big'))} return-path message"
        return "a return-path message header"

    def _next(self) -> Event | None:
        buf = self._buf
        if len(buf) < _RP_HEADER_LEN:
            return None
        msg_type = int.from_bytes(buf[0:2], "big")
        length = int.from_bytes(buf[2:4], "big")
        # checks in the order QEMU's source_return_path_thread makes them
        if msg_type not in RP_PAYLOADS:
            raise self._fail(f"invalid return-path message type {msg_type} (length {length})")
        name = RpMessage(msg_type).name
        fixed = RP_LENGTHS[msg_type]
        if fixed is not None and length != fixed:
            raise self._fail(f"return-path {name} has length {length}, expected {fixed}")
        if length > RP_MAX_MESSAGE_LEN:
            raise self._fail(
                f"return-path {name} has length {length}, more than the maximum {RP_MAX_MESSAGE_LEN}"
            )
        end = _RP_HEADER_LEN + length
        if len(buf) < end:
            return None
        payload = bytes(buf[_RP_HEADER_LEN:end])

        if msg_type == RpMessage.RECV_BITMAP:  # the bitmap data follows outside the message
            return self._recv_bitmap(payload, length)
        if msg_type == RpMessage.REQ_PAGES_ID:
            if length < 13:
                raise self._fail(f"return-path REQ_PAGES_ID has length {length}, shorter than 13")
            if length != 13 + payload[12]:
                raise self._fail(
                    f"return-path REQ_PAGES_ID has length {length} but its block name of "
                    f"{payload[12]} bytes needs length {13 + payload[12]}"
                )
        if msg_type == RpMessage.REQ_PAGES:  # the postcopy hot path: struct, not construct
            start, plen = _REQ_PAGES.unpack(payload)
            ev = self._req_pages(start, plen, None)
            self._consume(end)
            return ev
        fields = self._parse_payload(msg_type, payload)
        if msg_type == RpMessage.SHUT:
            ev: Event = RpShut(fields.status)
        elif msg_type == RpMessage.PONG:
            ev = RpPong(fields.value)
        elif msg_type == RpMessage.RESUME_ACK:
            ev = RpResumeAck(fields.value)  # QEMU's source requires 1: the consumer decides
        else:  # REQ_PAGES, REQ_PAGES_ID
            ev = self._req_pages(fields.start, fields.length, fields.get("block"))
        self._consume(end)
        return ev

    def _parse_payload(self, msg_type: int, payload: bytes) -> c.Container:
        name = RpMessage(msg_type).name
        try:
            fields = RP_PAYLOADS[msg_type].parse(payload)
        except c.StringError:
            raise self._fail(f"return-path {name} block name is not valid UTF-8") from None
        except c.ConstructError as e:  # lengths were checked above; kept as a safety net
            raise self._fail(f"malformed return-path {name} payload: {e}") from None
        block = fields.get("block")
        if block is not None and self._block_sizes is not None and block not in self._block_sizes:
            raise self._fail(f"return-path {name} names unknown RAM block {block!r}")
        return fields

    def _req_pages(self, start: int, length: int, block: str | None) -> RpReqPages:
        what = "REQ_PAGES" if block is None else "REQ_PAGES_ID"
        target = block if block is not None else self._last_req_block
        if target is None:
            raise self._fail("return-path REQ_PAGES before any REQ_PAGES_ID named a block")
        if self._block_sizes is not None:
            used = self._block_sizes[target]
            if start + length > used:
                raise self._fail(
                    f"return-path {what} asks for {length:#x} bytes at {start:#x}, beyond the end "
                    f"of block {target!r} ({used:#x} bytes)"
                )
        self._last_req_block = target
        return RpReqPages(start, length, block)

    def _recv_bitmap(self, payload: bytes, length: int) -> Event | None:
        buf = self._buf
        if length < 1:
            raise self._fail("return-path RECV_BITMAP has length 0: the block name is missing")
        if length != 1 + payload[0]:
            raise self._fail(
                f"return-path RECV_BITMAP has length {length} but its block name of "
                f"{payload[0]} bytes needs length {1 + payload[0]}"
            )
        block: str = self._parse_payload(RpMessage.RECV_BITMAP, payload).block
        size_at = _RP_HEADER_LEN + length
        if len(buf) < size_at + _BITMAP_SIZE_LEN:
            return None
        size = int.from_bytes(buf[size_at : size_at + _BITMAP_SIZE_LEN], "big")
        # refuse absurd sizes before waiting for (and buffering) the bitmap itself
        if size > self._max_bitmap_bytes:
            raise self._fail(
                f"RECV_BITMAP reply for block {block!r} announces a {size}-byte bitmap, more than "
                f"the limit of {self._max_bitmap_bytes} bytes"
            )
        if self._block_sizes is not None:
            expected = recv_bitmap_size(self._block_sizes[block])
            if size != expected:
                raise self._fail(
                    f"RECV_BITMAP reply for block {block!r} has a {size}-byte bitmap, expected "
                    f"{expected} bytes for its {self._block_sizes[block]:#x}-byte length"
                )
        bitmap_at = size_at + _BITMAP_SIZE_LEN
        end = bitmap_at + size + _END_MARK_LEN
        if len(buf) < end:
            return None
        mark = int.from_bytes(buf[end - _END_MARK_LEN : end], "big")
        if mark != RECV_BITMAP_END_MARK:
            raise self._fail(
                f"RECV_BITMAP reply for block {block!r} ends with {mark:#018x} instead of the end "
                f"mark {RECV_BITMAP_END_MARK:#018x}"
            )
        ev = RpRecvBitmap(block, bytes(buf[bitmap_at : bitmap_at + size]))
        self._consume(end)
        return ev


_REQ_PAGES = struct.Struct(">QI")
_REQ_PAGES_MSG = struct.Struct(">HHQI")


def encode_req_pages(start: int, length: int, block: str | None) -> bytes:
    """REQ_PAGES (block None) or REQ_PAGES_ID, with struct: what a faulting vCPU waits for.
    Byte-identical to ``encode_rp(RpReqPages(...))``'s construct path (property-tested)."""
    if block is None:
        return _REQ_PAGES_MSG.pack(RpMessage.REQ_PAGES, 12, start, length)
    name = block.encode("utf-8", errors="surrogateescape")
    if len(name) > 255:
        raise ValueError(f"block name {block!r} is longer than 255 bytes")
    return (
        _REQ_PAGES_MSG.pack(RpMessage.REQ_PAGES_ID, 13 + len(name), start, length) + bytes([len(name)]) + name
    )


def encode_rp(event: Event) -> bytes:
    """Bytes of one return-path message (a RECV_BITMAP reply includes its bitmap data).

    Raises TypeError for a non-RP event and ValueError for values that do not fit the format.
    """
    if isinstance(event, RpReqPages) and 0 <= event.start < 1 << 64 and 0 <= event.length < 1 << 32:
        return encode_req_pages(event.start, event.length, event.block)
    return encode_rp_construct(event)


def encode_rp_construct(event: Event) -> bytes:
    """encode_rp through the construct definitions (the reference for the struct fast path)."""
    fields: dict[str, object]
    if isinstance(event, RpShut):
        msg_type, fields = RpMessage.SHUT, dict(status=event.status)
    elif isinstance(event, RpPong):
        msg_type, fields = RpMessage.PONG, dict(value=event.value)
    elif isinstance(event, RpResumeAck):
        msg_type, fields = RpMessage.RESUME_ACK, dict(value=event.value)
    elif isinstance(event, RpReqPages):
        fields = dict(start=event.start, length=event.length, block=event.block)
        msg_type = RpMessage.REQ_PAGES if event.block is None else RpMessage.REQ_PAGES_ID
    elif isinstance(event, RpRecvBitmap):
        msg_type, fields = RpMessage.RECV_BITMAP, dict(block=event.block)
    else:
        raise TypeError(f"not a return-path event: {event!r}")
    try:
        out = RpFrame.build(dict(type=msg_type, payload=RP_PAYLOADS[msg_type].build(fields)))
        if isinstance(event, RpRecvBitmap):
            out += RecvBitmapData.build(dict(bitmap=event.bitmap))
    except c.ConstructError as e:
        raise ValueError(f"cannot encode {event!r}: {e}") from e
    return out


# ---------------------------------------------------------------- COLO


class ColoDecoder(BufferedDecoder):
    """Incremental decoder of raw COLO messages: be32 message (< 7), be64 value for VMSTATE_SIZE."""

    channel = "colo"

    def _partial_what(self) -> str:
        return "a COLO message"

    def _next(self) -> Event | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        msg = int.from_bytes(buf[0:4], "big")
        if msg >= len(ColoMessage):
            raise self._fail(f"invalid COLO message {msg} (valid: 0..{len(ColoMessage) - 1})")
        if msg == ColoMessage.VMSTATE_SIZE:
            if len(buf) < 12:
                return None
            ev = ColoEvent(ColoMessage(msg), int.from_bytes(buf[4:12], "big"))
            self._consume(12)
            return ev
        self._consume(4)
        return ColoEvent(ColoMessage(msg))


def encode_colo(event: ColoEvent) -> bytes:
    """Bytes of one COLO message; ``value`` is required for VMSTATE_SIZE and forbidden otherwise."""
    if not isinstance(event, ColoEvent):
        raise TypeError(f"not a COLO event: {event!r}")
    if (event.message == ColoMessage.VMSTATE_SIZE) != (event.value is not None):
        raise ValueError(f"{event!r}: a value goes with VMSTATE_SIZE and only with it")
    try:
        return ColoRecord.build(dict(message=int(event.message), value=event.value))
    except c.ConstructError as e:
        raise ValueError(f"cannot encode {event!r}: {e}") from e


__all__ = [
    "DEFAULT_MAX_BITMAP_BYTES",
    "ColoDecoder",
    "ReturnPathDecoder",
    "encode_colo",
    "encode_rp",
]
