"""The destination side of one incoming migration: decode the stream, build and fill the guest.

The receive loop reads straight into the decoder's buffer (``recv_into``), and page runs are
applied from zero-copy views into guest RAM before the next read, so each page byte is copied
once by the kernel and once into RAM.

A stream is applied to a *new* guest. It becomes the daemon's guest only when the migration
completed; a failed stream leaves nothing behind but an error, and the daemon takes the next one.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from control.daemon_common import tune_socket
from control.params import Capabilities, MigrationStatus, Parameters, RamStats, StatusMachine
from guest.devices import DeviceState
from protocol.decoder import MainDecoder
from protocol.errors import ProtocolError
from protocol.events import (
    CompressedPage,
    Configuration,
    DeviceSection,
    EndOfStream,
    Event,
    OpenReturnPath,
    Pages,
    Ping,
    RamBlockList,
    RamEos,
    RamHook,
    RpPong,
    RpShut,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
)
from protocol.return_path import encode_rp
from protocol.xbzrle import decode_xbzrle

PAGE = 4096
RECV_SIZE = 1 << 20  # per recv_into: a page run's worth, applied while still in cache


class IncomingError(Exception):
    """The incoming migration cannot go on (becomes error-desc)."""


@dataclass
class IncomingInfo:
    stats: RamStats = field(default_factory=RamStats)
    start_time: float = 0.0
    end_time: float | None = None
    error_desc: str | None = None
    peer: str | None = None
    machine_type: str | None = None
    stored_image: str | None = None

    def total_time_ms(self) -> int:
        end = self.end_time if self.end_time is not None else time.monotonic()
        return int((end - self.start_time) * 1000)


@dataclass
class ReceivedGuest:
    """What a completed migration produced."""

    guest: Any
    machine_type: str | None
    run_state: str  # from the globalstate section ("running", "paused", "prelaunch"...)
    vmdesc: bytes | None
    configuration: Configuration | None = None
    devices: list[DeviceSection] = field(default_factory=list)  # as received, in stream order


class IncomingMigration:
    """Applies one main-channel stream to a guest built from the announced block list."""

    def __init__(
        self,
        *,
        guest_factory: Callable[[list[tuple[str, int]], str | None], Any],
        caps: Capabilities,
        params: Parameters,
        status: StatusMachine,
        info: IncomingInfo,
        emit: Callable[[str, dict[str, Any]], None],
        log: Any,
        model_machine_type: str,
        on_received: Callable[[ReceivedGuest], Awaitable[None]] | None = None,
    ) -> None:
        self.model_machine_type = model_machine_type
        self.on_received = on_received
        self.guest_factory = guest_factory
        self.caps = caps
        self.params = params
        self.status = status
        self.info = info
        self.emit = emit
        self.log = log
        self.guest: Any = None
        self.rp_open = False
        self.machine_type: str | None = None
        self.vmdesc: bytes | None = None
        self.configuration: Configuration | None = None
        self.devices: list[DeviceSection] = []
        self.run_state = "running"  # QEMU assumes running when no globalstate section comes
        self._written: dict[str, np.ndarray] = {}
        self._pages: dict[str, np.ndarray] = {}
        self._eof = False
        self._done = False

    async def run(self, stream: trio.SocketStream) -> ReceivedGuest | None:
        """Receive the whole stream; returns the guest on success, None on failure."""
        self.status.to(MigrationStatus.SETUP)
        self.info.start_time = time.monotonic()
        try:
            await self._receive(stream)
            if self.rp_open:
                await stream.send_all(encode_rp(RpShut(0)))
            self.info.end_time = time.monotonic()
            guest, self.guest = self.guest, None
            received = ReceivedGuest(
                guest, self.machine_type, self.run_state, self.vmdesc, self.configuration, self.devices
            )
            if self.on_received is not None:
                # as in QEMU, the guest is in place (and running, if it is to run) before the
                # status says completed: a client that sees "completed" can use it at once
                await self.on_received(received)
            self.status.to(MigrationStatus.COMPLETED)
            self.log.info(
                "incoming migration completed",
                total_time_ms=self.info.total_time_ms(),
                transferred=self.info.stats.transferred,
            )
            return received
        except (ProtocolError, IncomingError) as err:
            await self._fail(stream, str(err))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            await self._fail(stream, f"connection from the source failed: {err}")
        except Exception as err:  # a bug of ours must fail this migration, not the daemon
            self.log.exception("internal error during incoming migration")
            await self._fail(stream, f"internal error: {type(err).__name__}: {err}")
        finally:
            if self.guest is not None:  # never completed: drop the half-built guest
                await trio.to_thread.run_sync(self.guest.close)
                self.guest = None
        return None

    async def _fail(self, stream: trio.SocketStream, desc: str) -> None:
        self.info.end_time = time.monotonic()
        self.info.error_desc = desc
        self.log.error("incoming migration failed", error=desc)
        self.status.to(MigrationStatus.FAILED)
        if self.rp_open:
            with trio.move_on_after(1), _ignore_io():
                await stream.send_all(encode_rp(RpShut(1)))

    async def _receive(self, stream: trio.SocketStream) -> None:
        dec = MainDecoder(zero_copy=True, initial_capacity=4 * RECV_SIZE)
        tune_socket(stream.socket)
        stats = self.info.stats
        # our own descriptor of the connection, non-blocking like trio's: drained in a tight
        # loop so that the decoder sees ~1 MiB at a time, not whatever one recv happened to get
        raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        try:
            while not self._done:
                got, eof = _drain(raw, dec, RECV_SIZE)
                if not got and not eof:
                    await trio.lowlevel.wait_readable(raw)
                    continue
                stats.transferred += got
                # page views point into the decoder's buffer: apply them all before reading again
                for ev in dec.events():
                    await self._handle(ev, stream)
                if eof:
                    for ev in dec.end_of_input():
                        await self._handle(ev, stream)
                    if not self._eof:
                        raise IncomingError(
                            f"the source closed the connection before the end of the stream "
                            f"(after {stats.transferred} bytes)"
                        )
                    break
                await trio.lowlevel.checkpoint()  # let QMP and the return path run
        finally:
            raw.close()
        if dec.buffered:
            raise IncomingError(f"{dec.buffered} bytes of unexpected data after the end of the stream")

    async def _handle(self, ev: Event, stream: trio.SocketStream) -> None:
        if isinstance(ev, Pages):
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            first, n = int(idx[0]), len(idx)
            if int(idx[-1]) - first == n - 1:  # a run of consecutive pages: one slice copy
                self._pages[ev.block][first : first + n] = ev.data
                self._written[ev.block][first : first + n] = True
            else:
                self._pages[ev.block][idx] = ev.data
                self._written[ev.block][idx] = True
            self.info.stats.normal += n
            self.info.stats.normal_bytes += n * PAGE
        elif isinstance(ev, ZeroPages):
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            if ev.fill:
                self._pages[ev.block][idx] = ev.fill
                self._written[ev.block][idx] = True
            else:
                # fresh RAM is zero: only pages written earlier in this stream need clearing
                written = self._written[ev.block]
                hit = idx[written[idx]]
                if len(hit):
                    self._pages[ev.block][hit] = 0
                    written[hit] = False
            self.info.stats.duplicate += len(idx)
        elif isinstance(ev, XbzrlePage):
            page = self._pages[ev.block][ev.offset // PAGE]
            decode_xbzrle(ev.delta, page)
            self._written[ev.block][ev.offset // PAGE] = True
            self.info.stats.xbzrle_pages += 1
        elif isinstance(ev, (SectionPart, SectionEnd, RamEos, SectionFooter)):
            pass
        elif isinstance(ev, StreamHeader):
            self.status.to(MigrationStatus.ACTIVE)
        elif isinstance(ev, Configuration):
            self.configuration = ev
            self.machine_type = ev.machine_type
            self.info.machine_type = ev.machine_type
            if ev.capabilities:
                raise IncomingError(f"source capabilities {list(ev.capabilities)} are not supported here")
        elif isinstance(ev, SectionStart):
            pass
        elif isinstance(ev, RamBlockList):
            await self._create_guest(ev)
        elif isinstance(ev, OpenReturnPath):
            self.rp_open = True
        elif isinstance(ev, Ping):
            if not self.rp_open:
                raise IncomingError(f"PING {ev.value} arrived but no return path was opened")
            await stream.send_all(encode_rp(RpPong(ev.value)))
        elif isinstance(ev, DeviceSection):
            self._load_device(ev)
        elif isinstance(ev, EndOfStream):
            self._eof = True
        elif isinstance(ev, VmDescription):
            self.vmdesc = ev.json_bytes
            self._done = True
        elif isinstance(ev, CompressedPage):
            if not self.caps["compress"]:
                raise IncomingError("COMPRESS_PAGE record but capability compress is off here")
            page = zlib.decompress(ev.data)
            if len(page) != PAGE:
                raise IncomingError(f"compressed page at 0x{ev.offset:x} inflates to {len(page)} bytes")
            self._pages[ev.block][ev.offset // PAGE] = np.frombuffer(page, np.uint8)
            self._written[ev.block][ev.offset // PAGE] = True
        elif isinstance(ev, RamHook):
            raise IncomingError("RAM_SAVE_FLAG_HOOK (an RDMA control hook) on a TCP stream")
        else:
            name = type(ev).__name__
            raise IncomingError(
                f"{name} is not valid in a precopy migration (postcopy-ram/x-colo are off here)"
            )

    async def _create_guest(self, ev: RamBlockList) -> None:
        if self.guest is not None:
            raise IncomingError("second RAM block list in one stream")
        blocks = [(b.name, b.used_length) for b in ev.blocks]
        for name, size in blocks:
            if size % PAGE:
                raise IncomingError(
                    f"RAM block {name!r} length 0x{size:x} is not a multiple of the page size"
                )
        self.guest = await trio.to_thread.run_sync(self.guest_factory, blocks, self.machine_type)
        for name, blk in self.guest.blocks.items():
            self._pages[name] = blk.pages
            self._written[name] = np.zeros(blk.n_pages, dtype=bool)
        self.info.stats.total = sum(size for _, size in blocks)
        self.log.info("guest RAM created", blocks=len(blocks), total=self.info.stats.total)

    def _load_device(self, ev: DeviceSection) -> None:
        self.devices.append(ev)
        if ev.idstr == "globalstate" and len(ev.body) >= 4:
            n = int.from_bytes(ev.body[:4], "big")
            self.run_state = ev.body[4 : 4 + max(n - 1, 0)].decode("ascii", errors="replace")
        if self.guest is None:
            raise IncomingError(f"device section {ev.idstr!r} before any RAM block list")
        if self.machine_type != self.model_machine_type:
            # a real QEMU's device: we have no model of it, keep it verbatim to re-send
            try:
                self.guest.store_opaque_device(DeviceState(ev.idstr, ev.instance_id, ev.version_id, ev.body))
            except ValueError as err:
                raise IncomingError(str(err)) from None
            return
        try:
            self.guest.load_device(ev.idstr, ev.instance_id, ev.version_id, ev.body)
        except ValueError as err:
            raise IncomingError(str(err)) from None


def _drain(sock: socket.socket, dec: MainDecoder, limit: int) -> tuple[int, bool]:
    """Read what the socket has queued, up to ``limit`` bytes, into the decoder, never blocking;
    returns (bytes read, whether the peer closed)."""
    # reserve once, while almost nothing is undecoded, so the buffer never compacts mid-drain
    view = dec.writable(limit)[:limit]
    got = 0
    while got < limit:
        try:
            n = sock.recv_into(view[got:])
        except (BlockingIOError, InterruptedError):
            break
        if n == 0:
            dec.commit(got)
            return got, True
        got += n
    dec.commit(got)
    return got, False


class _ignore_io:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(
            et, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
        )
