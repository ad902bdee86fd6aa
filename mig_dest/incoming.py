"""The destination side of one incoming migration: decode the stream, build and fill the guest.

In a page run the receive loop reads the records it predicts straight into guest RAM
(``protocol.pagewindow``, ``mig_dest.scatter``): one ``recvmsg`` puts each page where it belongs,
the kernel's copy being the only one. Everything else, and whatever the prediction got wrong,
goes through the decoder's buffer (``recv_into``); page runs decoded there are applied from
zero-copy views into guest RAM before the next read.

A stream is applied to a *new* guest. It becomes the daemon's guest only when the migration
completed; a failed stream leaves nothing behind but an error, and the daemon takes the next one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import trio

from control.daemon_common import tune_socket
from control.params import Capabilities, MigrationStatus, Parameters, RamStats, StatusMachine
from control.priority import lower_thread_priority
from control.threads import run_owned_thread
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
    RamHook,
    RecvBitmapRequest,
    RpPong,
    RpRecvBitmap,
    RpResumeAck,
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
from protocol.pagewindow import MAX_RECORDS, PAGE_REC, PageWindow
from protocol.return_path import encode_rp, recv_bitmap_size
from protocol.xbzrle import decode_xbzrle

from . import scatter
from .drain import drain
from .faults import RP_SEND_TIMEOUT, FaultService, RpWriter
from .postcopy import PostcopyState, PostcopyStateError, PostcopyStateMachine, ReceivedMap

PAGE = 4096
RECV_SIZE = 1 << 20  # per recv_into: a page run's worth, applied while still in cache
# in a page run, once a read emptied the socket: wait until a whole page window is queued (or
# this long) instead of spinning on whatever arrived meanwhile, which costs a Python round per
# ~100 KiB and takes the CPU from the sender on a 2-core machine
PACE_TIMEOUT = 0.002
# postcopy: page requests outstanding at most (sent in batches as the pages arrive)
MAX_OUTSTANDING_REQUESTS = 256
REQUEST_POLL = 0.05  # s: the requester looks again at least this often
# postcopy with a running guest: read less per wake-up and keep less queued in the kernel, so a
# faulting vCPU's page is never behind megabytes of background pages
POSTCOPY_RECV_SIZE = 128 << 10
POSTCOPY_RCVBUF = 64 << 10


class IncomingError(Exception):
    """The incoming migration cannot go on (becomes error-desc)."""


class LinkLost(IncomingError):
    """The connection to the source broke (in postcopy: pause, do not fail)."""


LINK_ERRORS = (LinkLost, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass
class IncomingInfo:
    stats: RamStats = field(default_factory=RamStats)
    start_time: float = 0.0
    end_time: float | None = None
    error_desc: str | None = None
    peer: str | None = None
    machine_type: str | None = None
    stored_image: str | None = None
    postcopy_state: str | None = None  # set once POSTCOPY_ADVISE arrived
    postcopy_requests: int = 0  # pages requested over the return path
    postcopy_faults: dict[str, Any] | None = None  # the running guest's fault statistics
    preempt_channels: int = 0  # postcopy-preempt connections accepted
    preempt_pages: int = 0  # pages placed from them

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
        paused_start: bool = False,
        on_run: Callable[[Any], None] | None = None,
    ) -> None:
        """``paused_start``: the guest is not to run here until ``cont`` (like QEMU's -S); in
        postcopy it then receives every page before it runs."""
        self.paused_start = paused_start
        # postcopy: the guest runs here before the migration completes; the daemon shows it
        # (query-status, stop, cont) from RUN on, and forgets it (None) if it is dropped
        self.on_run = on_run
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
        self._dec: MainDecoder | None = None
        self._nursery: trio.Nursery | None = None
        self.pc = PostcopyStateMachine()
        self.received_map: ReceivedMap | None = None  # only with postcopy-ram on here
        self._rp: RpWriter | None = None  # the current connection's return path (any thread)
        self._req_lock = threading.Lock()  # page requests: the received map's block state, in order
        self._place_lock = threading.Lock()  # pages are placed by trio and the fault thread
        self._service: FaultService | None = None  # postcopy's fault and preempt thread
        self._restore_priority: Callable[[], None] = _nothing  # the trio thread's, after postcopy
        self._arrived = trio.Event()  # pages arrived while postcopy runs: wakes the requester
        self._stream: trio.SocketStream | None = None  # the current connection
        self.rp_connected = True  # False while postcopy is paused: requests wait for recovery
        self._recovery: Any = None  # (send, receive) channel of the recovery connection
        self._recovered_any = False
        self._recv_size = RECV_SIZE
        self.window_records = MAX_RECORDS  # records per speculative page window (tests vary it)
        self._fault_task = False  # a running guest's faults are served (native guest, postcopy)
        self._preempt_open = False  # a postcopy-preempt channel is being read
        self._preempt_done = trio.Event()
        self.finished = trio.Event()  # run() returned: no more connections for this migration

    async def run(self, stream: trio.SocketStream) -> ReceivedGuest | None:
        """Receive the whole stream; returns the guest on success, None on failure."""
        self.status.to(MigrationStatus.SETUP)
        self.info.start_time = time.monotonic()
        self._stream = stream
        self._rp = RpWriter(stream.socket)
        try:
            try:
                await self._receive(stream)
            except BaseExceptionGroup as group:  # from the postcopy tasks' nursery
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                    raise group.exceptions[0] from None
                raise
            if self.rp_open:
                await self._send_rp(encode_rp(RpShut(0)))
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
                postcopy_requests=self.info.postcopy_requests,
            )
            return received
        except (ProtocolError, IncomingError, PostcopyStateError) as err:
            await self._fail(self._stream, str(err))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            await self._fail(self._stream, f"connection from the source failed: {err}")
        except Exception as err:  # a bug of ours must fail this migration, not the daemon
            self.log.exception("internal error during incoming migration")
            await self._fail(self._stream, f"internal error: {type(err).__name__}: {err}")
        finally:
            self.finished.set()
            self._restore_priority()
            self._rp.close()
            if self._stream is not stream:  # a recovery connection: ours to close
                with _ignore_io():
                    await self._stream.aclose()
            if self.guest is not None:  # never completed: drop the half-built guest
                if self.on_run is not None and self._fault_task:
                    self.on_run(None)
                await trio.to_thread.run_sync(self.guest.close)
                self.guest = None
        return None

    async def _fail(self, stream: trio.SocketStream, desc: str) -> None:
        self.info.end_time = time.monotonic()
        self.info.error_desc = desc
        self.log.error("incoming migration failed", error=desc)
        self.status.to(MigrationStatus.FAILED)
        if self.rp_open:
            with _ignore_io():
                await self._send_rp(encode_rp(RpShut(1)), timeout=1)

    async def _send_rp(self, data: bytes, timeout: float = RP_SEND_TIMEOUT) -> None:
        """One whole return-path message (the fault thread writes there too)."""
        assert self._rp is not None
        await trio.to_thread.run_sync(self._rp.send, data, timeout)

    async def _receive(self, stream: trio.SocketStream) -> None:
        """The stream, across as many connections as postcopy recovery needs."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery  # postcopy tasks: they outlive a broken connection
            try:
                while True:
                    try:
                        await self._receive_loop(stream)
                        break
                    except (*LINK_ERRORS, ProtocolError) as err:
                        if self.pc.state is not PostcopyState.RUNNING:
                            raise
                        stream = await self._pause_until_recovered(err)
            finally:
                nursery.cancel_scope.cancel()
                self._nursery = None

    # ---- postcopy recovery (WIRE.md §6.6)

    async def _pause_until_recovered(self, err: BaseException) -> trio.SocketStream:
        """The link broke while the guest runs here: keep everything and wait for migrate-recover."""
        why = str(err) or type(err).__name__
        self.rp_connected = False
        missing = self._missing_count()
        self.info.error_desc = (
            f"postcopy paused: {why}; {missing} pages exist only on the source, so the guest cannot "
            "complete until the source reconnects (migrate-recover here, migrate with resume there)"
        )
        self.log.error("postcopy paused", error=why, missing_pages=missing)
        self.status.to(MigrationStatus.POSTCOPY_PAUSED)
        with self._req_lock:  # no request half-written on the old connection
            if self._rp is not None:
                self._rp.close()
        if self._stream is not None and self._recovered_any:
            with _ignore_io():
                await self._stream.aclose()
        self._recovery = trio.open_memory_channel[trio.SocketStream](1)
        stream = await self._recovery[1].receive()
        self._recovered_any = True
        self.status.to(MigrationStatus.POSTCOPY_RECOVER)
        self.info.error_desc = None
        self.log.info("postcopy recovery: source reconnected", peer=peer_name(stream))
        tune_socket(stream.socket)
        self._stream = stream
        with self._req_lock:
            self._rp = RpWriter(stream.socket)
        self.rp_connected = True
        return stream

    @property
    def paused(self) -> bool:
        return self.status.status is MigrationStatus.POSTCOPY_PAUSED

    def recover(self, stream: trio.SocketStream) -> bool:
        """Hand over a connection accepted by migrate-recover; False if none is awaited."""
        if self._recovery is None or not self.paused:
            return False
        try:
            self._recovery[0].send_nowait(stream)
        except trio.WouldBlock:
            return False
        return True

    async def _receive_loop(self, stream: trio.SocketStream) -> None:
        if self._dec is None:
            dec = MainDecoder(zero_copy=True, initial_capacity=4 * RECV_SIZE)
        else:  # a resumed postcopy connection: no header, blocks and sections already known
            dec = MainDecoder(
                zero_copy=True,
                initial_capacity=4 * RECV_SIZE,
                expect_header=False,
                known_blocks=self._dec.blocks,
                sections=self._dec.sections,
            )
        self._dec = dec
        # no SO_RCVBUF here: setting it turns off the kernel's receive autotuning, which grows
        # the window to tcp_rmem's maximum (32 MiB here) where rmem_max caps a set one at 4 MiB
        if self._fault_task and not self.caps["postcopy-preempt"]:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, POSTCOPY_RCVBUF)
        # our own descriptor of the connection, non-blocking like trio's: drained in a tight
        # loop so that the decoder sees ~1 MiB at a time, not whatever one recv happened to get
        raw = socket.socket(fileno=os.dup(stream.socket.fileno()))
        reader = _SocketReader(raw)
        try:
            await self._pump(reader, dec, stream)
        finally:
            reader.close()
        if dec.buffered:
            raise IncomingError(f"{dec.buffered} bytes of unexpected data after the end of the stream")

    async def _pump(self, reader: Reader, dec: MainDecoder, stream: trio.SocketStream) -> None:
        """Read the connection into guest RAM and the decoder, and apply it, until the stream is
        done."""
        stats = self.info.stats
        window = PageWindow(self.window_records)
        pace = 0  # bytes to let queue up before the next read
        while not self._done:
            if pace:
                await reader.wait_for(pace, PACE_TIMEOUT)
                pace = 0
            try:
                step = self._speculate(reader, dec, window)
                if step is not None:
                    got, eof, drained = step
                else:
                    got, eof = drain(reader, dec, self._recv_size)
                    drained = False
            except OSError as err:
                raise LinkLost(f"connection from the source failed: {err.strerror or err}") from None
            if not got and not eof:
                await reader.wait_readable()
                continue
            stats.transferred += got
            if drained and not eof and dec.page_prediction() is not None:
                pace = window.max_records * PAGE_REC
            # page views point into the decoder's buffer: apply them all before reading again
            for ev in dec.events():
                await self._handle(ev, stream)
            if self._service is not None:
                self._service.wake_if_placed()
            if eof:
                for ev in dec.end_of_input():
                    await self._handle(ev, stream)
                if not self._eof:
                    raise LinkLost(
                        f"the source closed the connection before the end of the stream "
                        f"(after {stats.transferred} bytes)"
                    )
                break
            await trio.lowlevel.checkpoint()  # let QMP and the return path run

    def _speculate(
        self, reader: Reader, dec: MainDecoder, window: PageWindow
    ) -> tuple[int, bool, bool] | None:
        """In a page run: receive the records the decoder predicts straight into guest RAM, keep
        those whose header proves the prediction, and hand the rest back to the decoder. Returns
        (bytes received, peer closed, whether that emptied the socket), or None when there is
        nothing to predict."""
        if self.pc.listening or self._fault_task:
            return None  # postcopy places a page once, and a running guest may read RAM
        pred = dec.page_prediction()
        if pred is None:
            return None
        written = self._written.get(pred.block)
        if written is None:
            return None
        first = pred.offset // PAGE
        # only pages not written yet in this stream: they are zero, so a wrong guess is undone
        # by zeroing what it touched
        fresh = written[first : first + window.max_records]
        k = int(fresh.argmax())
        if not fresh[k]:
            k = len(fresh)
        if not k:
            return None
        iov = window.open(self._pages[pred.block], first, k, dec.held())
        room = k * PAGE_REC - pred.held
        try:
            got, eof = reader.recv_iov(iov)
            if got:
                window.fill_held()
                total = pred.held + got
                good = window.verified(total)
                if good:
                    with self._place_lock:
                        self._placed(pred.block, slice(first, first + good), good)
                    dec.take_pages(good)
                start = max(good * PAGE_REC, pred.held)  # held bytes not taken stay in dec
                if total > start:
                    out = dec.writable(total - start)
                    window.copy_out(start, total, np.frombuffer(out, np.uint8, count=total - start))
                    dec.commit(total - start)
                window.scrub(good, total)
        finally:
            window.close()
        return got, eof, got < room

    def _placed(self, block: str, where: slice | np.ndarray, n: int) -> None:
        """The contents of PAGE records are in place at ``where`` (of ``n`` records: in postcopy
        some may have been dropped as already here): the bookkeeping of both receive paths.
        Under ``_place_lock``."""
        self._written[block][where] = True
        if self.received_map is not None:  # after the contents: a running vCPU may use it now
            self.received_map.received[block][where] = True
        self.info.stats.normal += n
        self.info.stats.normal_bytes += n * PAGE

    async def _handle(self, ev: Event, stream: trio.SocketStream) -> None:
        if isinstance(ev, (Pages, ZeroPages)):
            self._place(ev)
            if self.pc.state is PostcopyState.RUNNING:
                self._arrived.set()
        elif isinstance(ev, XbzrlePage):
            if self.pc.listening:
                raise IncomingError(
                    f"XBZRLE page in postcopy state {self.pc.state.name} (not accepted in postcopy)"
                )
            if self.received_map is not None:
                self.received_map.received[ev.block][ev.offset // PAGE] = True
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
            await self._send_rp(encode_rp(RpPong(ev.value)))
        elif isinstance(ev, PostcopyAdvise) and self.caps["postcopy-ram"]:
            self._postcopy_advise(ev)
        elif isinstance(ev, PostcopyRamDiscard) and self.caps["postcopy-ram"]:
            self._postcopy_to(PostcopyState.DISCARD, "POSTCOPY_RAM_DISCARD")
            self._discard(ev)
        elif isinstance(ev, PostcopyListen) and self.caps["postcopy-ram"]:
            if self.received_map is None:
                raise IncomingError("POSTCOPY_LISTEN before the RAM block list")
            self._postcopy_to(PostcopyState.LISTENING, "POSTCOPY_LISTEN")
        elif isinstance(ev, PostcopyRun) and self.caps["postcopy-ram"]:
            self._postcopy_to(PostcopyState.RUNNING, "POSTCOPY_RUN")
            self.status.to(MigrationStatus.POSTCOPY_ACTIVE)
            await self._postcopy_run()
        elif isinstance(ev, RecvBitmapRequest) and self.caps["postcopy-ram"]:
            await self._send_recv_bitmap(ev.block, stream)
        elif isinstance(ev, PostcopyResume) and self.caps["postcopy-ram"]:
            await self._postcopy_resume(stream)
        elif isinstance(ev, Packaged) and self.caps["postcopy-ram"]:
            await self._packaged(ev, stream)
        elif isinstance(ev, DeviceSection):
            self._load_device(ev)
        elif isinstance(ev, EndOfStream):
            self._eof = True
            if self.pc.state is PostcopyState.RUNNING:
                # postcopy ends with EOF and no VMDESCRIPTION: every page must be here by now,
                # those sent on the preempt channel included (its EOS comes before our EOF)
                if self._preempt_open:
                    with trio.move_on_after(self.params.x_completion_timeout):
                        await self._preempt_done.wait()
                missing = self._missing_count()
                if missing:
                    rm = self.received_map
                    assert rm is not None
                    some = [
                        f"{name}:{int(i)}{'(requested)' if rm.requested[name][i] else ''}"
                        for name, idx in rm.missing().items()
                        for i in idx[:5]
                    ][:5]
                    raise IncomingError(
                        f"postcopy stream ended with {missing} pages never received (e.g. {', '.join(some)})"
                    )
                self._postcopy_to(PostcopyState.END, "EOF")
                self._postcopy_end()
                self._done = True
            elif self.pc.state is PostcopyState.LISTENING:
                raise IncomingError("the stream ended in postcopy state LISTENING (no POSTCOPY_RUN)")
        elif isinstance(ev, VmDescription):
            self.vmdesc = ev.json_bytes
            self._done = True
        elif isinstance(ev, CompressedPage):
            if not self.caps["compress"]:
                raise IncomingError("COMPRESS_PAGE record but capability compress is off here")
            page = zlib.decompress(ev.data)
            if len(page) != PAGE:
                raise IncomingError(f"compressed page at 0x{ev.offset:x} inflates to {len(page)} bytes")
            if self.pc.listening and self._received(ev.block)[ev.offset // PAGE]:
                return  # postcopy: placed once
            self._pages[ev.block][ev.offset // PAGE] = np.frombuffer(page, np.uint8)
            self._written[ev.block][ev.offset // PAGE] = True
            if self.received_map is not None:
                self.received_map.received[ev.block][ev.offset // PAGE] = True
        elif isinstance(ev, RamHook):
            raise IncomingError("RAM_SAVE_FLAG_HOOK (an RDMA control hook) on a TCP stream")
        else:
            name = type(ev).__name__
            raise IncomingError(
                f"{name} is not valid in a precopy migration (postcopy-ram/x-colo are off here)"
            )

    def _place(self, ev: Pages | ZeroPages) -> None:
        """Apply a run of pages or zero pages (from the trio loop or the fault thread). In
        postcopy a page is placed once, never overwritten, and marked received only after its
        contents are in place: a running vCPU may use it from then on."""
        idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
        n = len(idx)
        block = ev.block
        rm = self.received_map
        data = ev.data if isinstance(ev, Pages) else None
        with self._place_lock:
            if self.pc.listening:
                new = ~rm.received[block][idx]
                if not new.all():
                    idx = idx[new]
                    if data is not None:
                        data = data[new]
            if data is not None:
                if len(idx):
                    first, k = int(idx[0]), len(idx)
                    if is_page_run(idx):  # one slice copy
                        self._pages[block][first : first + k] = data
                        self._placed(block, slice(first, first + k), n)
                    else:
                        self._pages[block][idx] = data
                        self._placed(block, idx, n)
                else:
                    self._placed(block, idx, n)
                return
            if ev.fill:
                self._pages[block][idx] = ev.fill
                self._written[block][idx] = True
            else:
                # fresh RAM is zero: only pages written earlier in this stream need clearing
                written = self._written[block]
                hit = idx[written[idx]]
                if len(hit):
                    self._pages[block][hit] = 0
                    written[hit] = False
            if rm is not None:  # after the contents: a running vCPU may use it now
                rm.received[block][idx] = True
            self.info.stats.duplicate += n

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
        if self.caps["postcopy-ram"]:
            self.received_map = ReceivedMap({name: size for name, size in blocks})
        self.info.stats.total = sum(size for _, size in blocks)
        self.log.info("guest RAM created", blocks=len(blocks), total=self.info.stats.total)

    # ---- postcopy (WIRE.md §6)

    def _postcopy_to(self, new: PostcopyState, command: str) -> None:
        self.pc.to(new, command)
        self.info.postcopy_state = new.name.lower()

    def _received(self, block: str) -> np.ndarray:
        assert self.received_map is not None
        return self.received_map.received[block]

    def _missing_count(self) -> int:
        return self.received_map.missing_count() if self.received_map is not None else 0

    def _postcopy_advise(self, ev: PostcopyAdvise) -> None:
        self._postcopy_to(PostcopyState.ADVISE, "POSTCOPY_ADVISE")
        if self._service is None:
            self._start_service()
        if ev.host_page_summary is None:
            raise IncomingError(
                "POSTCOPY_ADVISE without page sizes (dirty-bitmaps postcopy only) but postcopy-ram is on here"
            )
        if ev.host_page_summary != PAGE or ev.target_page_size != PAGE:
            raise IncomingError(
                f"POSTCOPY_ADVISE page sizes: host summary 0x{ev.host_page_summary:x}, target "
                f"{ev.target_page_size}; this destination supports only {PAGE} for both (no hugepages)"
            )

    def _discard(self, ev: PostcopyRamDiscard) -> None:
        if self.received_map is None:
            raise IncomingError("POSTCOPY_RAM_DISCARD before the RAM block list")
        if ev.block not in self.received_map.received:
            raise IncomingError(f"POSTCOPY_RAM_DISCARD for unknown RAM block {ev.block!r}")
        try:
            slices = self.received_map.discard(ev.block, ev.ranges)
        except ValueError as err:
            raise IncomingError(str(err)) from None
        pages, written = self._pages[ev.block], self._written[ev.block]
        for first, last in slices:  # a discarded page must never be served stale
            pages[first:last] = 0
            written[first:last] = False

    async def _packaged(self, ev: Packaged, stream: trio.SocketStream) -> None:
        assert self._dec is not None
        sub = MainDecoder(expect_header=False, known_blocks=self._dec.blocks, sections=self._dec.sections)
        sub.feed(ev.data)
        events = [*sub.events(), *sub.end_of_input()]
        for i, sev in enumerate(events):
            if isinstance(sev, Packaged):
                raise IncomingError("PACKAGED inside a PACKAGED blob")
            if isinstance(sev, EndOfStream):
                raise IncomingError("EOF inside the PACKAGED blob")
            await self._handle(sev, stream)
            if isinstance(sev, PostcopyRun) and i != len(events) - 1:
                raise IncomingError("records follow POSTCOPY_RUN inside the PACKAGED blob")

    async def _postcopy_run(self) -> None:
        """RUN: the guest runs here from now on. Our model's guest runs with its faults served
        (it requests what it touches); a QEMU guest cannot execute here, so we request every
        missing page as its faults would."""
        assert self._nursery is not None and self.received_map is not None
        guest = self.guest
        native = self.machine_type == self.model_machine_type
        block = guest.postcopy_block() if native else None
        if native and self.run_state == "running" and not self.paused_start and block is not None:
            with self._place_lock:
                present = guest.arm_postcopy(self.received_map.received[block])
                self.received_map.received[block] = present  # what we place, the vCPU sees
            self._fault_task = True
            self._recv_size = POSTCOPY_RECV_SIZE
            assert self._stream is not None
            if not self.caps["postcopy-preempt"]:  # else requested pages bypass this queue
                self._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, POSTCOPY_RCVBUF)
            await trio.to_thread.run_sync(guest.start)
            if self.on_run is not None:
                self.on_run(guest)
            self.emit("RESUME", {})
            assert self._service is not None
            self._service.arm(guest, block, present, self.received_map.requested[block])
            # the receive loop streams in bulk from here on: the fault thread and the vCPU go
            # first (control/priority.py)
            self._restore_priority = lower_thread_priority(self.log)
            self.log.info("postcopy running: the guest runs here", missing=self._missing_count())
        elif native:
            self.log.info("postcopy running: guest kept stopped", missing=self._missing_count())
        else:
            self._nursery.start_soon(self._request_pages)
            self.log.info("postcopy running: requesting every missing page", missing=self._missing_count())

    def _postcopy_end(self) -> None:
        if self._fault_task:
            assert self._service is not None
            self._service.disarm()
            self._restore_priority()
            self._restore_priority = _nothing
            self.guest.disarm_postcopy()
            self.info.postcopy_faults = {**self.guest.fault_stats(), **self._service.service_stats()}

    def service_stats(self) -> dict[str, float]:
        return self._service.service_stats() if self._service is not None else {}

    def _request(self, block: str, pages: np.ndarray) -> None:
        """REQ_PAGES(_ID) for ``pages``, one per page as QEMU's destination sends them (from
        any thread; blocking); while paused they are only marked requested, and re-sent at
        resume. OSError if the return path cannot take them."""
        rm = self.received_map
        assert rm is not None
        with self._req_lock:
            rm.requested[block][pages] = True
            if not self.rp_connected or not len(pages) or self._rp is None:
                return
            reqs = rm.requests_for(block, pages)
            self._rp.send(b"".join(encode_rp(r) for r in reqs))
            self.info.postcopy_requests += len(reqs)

    async def _send_requests(self, block: str, pages: np.ndarray) -> None:
        with _ignore_io():  # a broken link pauses postcopy: the requests are re-sent at resume
            await trio.to_thread.run_sync(self._request, block, pages)

    # ---- the fault thread (mig_dest/faults.py)

    def _start_service(self) -> None:
        """At POSTCOPY_ADVISE: the thread that will serve faults and preempt channels."""
        assert self._nursery is not None
        token = trio.lowlevel.current_trio_token()

        def call_in_trio(fn: Callable[..., None], *args: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(fn, *args)

        self._service = FaultService(
            request=self._request,
            place=self._place_preempt,
            call_in_trio=call_in_trio,
            on_preempt_closed=self._preempt_closed,
            log=self.log,
        )
        self._nursery.start_soon(self._run_service, self._service)

    async def _run_service(self, service: FaultService) -> None:
        try:
            await run_owned_thread(service.run, service.stop)
        finally:
            service.close()

    def _place_preempt(self, ev: Pages | ZeroPages) -> None:
        """In the fault thread: a page from the preempt channel."""
        self._place(ev)
        self.info.preempt_pages += len(ev.offsets)

    def _preempt_closed(self, stream: trio.SocketStream, error: str | None, got: int) -> None:
        """In trio: the fault thread is done with a preempt channel."""
        if error is not None:
            # the main channel decides: a broken link pauses postcopy, and after recovery the
            # source opens a new preempt channel (pages still missing are requested again)
            self.log.error("postcopy-preempt channel failed", error=error)
        self.info.stats.transferred += got
        stream.socket.close()
        self._preempt_open = False
        self._preempt_done.set()

    def attach_preempt(self, stream: trio.SocketStream) -> bool:
        """A second connection during postcopy with postcopy-preempt on: the source's channel for
        requested pages (WIRE.md §6.7), read by the fault thread. False if this migration does
        not want one now."""
        if (
            not self.caps["postcopy-preempt"]
            or self._service is None
            or self._dec is None
            or self._preempt_open
            or self.pc.state is PostcopyState.NONE
        ):
            return False
        ram_id = next((i for i, name in self._dec.sections.items() if name == "ram"), 0)
        dec = MainDecoder(
            zero_copy=True,
            expect_header=False,
            known_blocks=self._dec.blocks,
            ram_channel=ram_id,
            initial_capacity=4 * POSTCOPY_RECV_SIZE,
            channel="postcopy-preempt",
        )
        tune_socket(stream.socket)
        self._preempt_open = True
        self._preempt_done = trio.Event()
        self.info.preempt_channels += 1
        self.log.info("postcopy-preempt channel open", peer=peer_name(stream))
        self._service.attach_preempt(stream, dec)
        return True

    async def _send_recv_bitmap(self, block: str, stream: trio.SocketStream) -> None:
        if self.status.status is not MigrationStatus.POSTCOPY_RECOVER:
            raise IncomingError(
                f"RECV_BITMAP in migration status {self.status.status.value}, only valid in postcopy-recover"
            )
        rm = self.received_map
        assert rm is not None
        rec = rm.received.get(block)
        if rec is None:
            raise IncomingError(f"RECV_BITMAP for unknown RAM block {block!r}")
        bits = np.packbits(rec.view(np.bool_), bitorder="little").tobytes()
        size = recv_bitmap_size(len(rec) * PAGE)
        await self._send_rp(encode_rp(RpRecvBitmap(block, bits.ljust(size, b"\0"))))

    async def _postcopy_resume(self, stream: trio.SocketStream) -> None:
        if self.status.status is not MigrationStatus.POSTCOPY_RECOVER:
            raise IncomingError(
                f"POSTCOPY_RESUME in migration status {self.status.status.value}, "
                "only valid in postcopy-recover"
            )
        self.status.to(MigrationStatus.POSTCOPY_ACTIVE)
        await self._send_rp(encode_rp(RpResumeAck(1)))
        rm = self.received_map
        assert rm is not None
        with self._req_lock:
            rm.forget_last_block()  # the first request on a new connection names its block
        outstanding = 0
        for block in rm.received:
            pages = np.flatnonzero(rm.requested[block] & ~rm.received[block])
            if len(pages):
                outstanding += len(pages)
                await self._send_requests(block, pages)
        self.log.info("postcopy resumed", missing=self._missing_count(), re_requested=outstanding)

    async def _request_pages(self) -> None:
        """After RUN: request the missing pages, as a running guest's faults would, keeping at
        most MAX_OUTSTANDING_REQUESTS outstanding while background pages keep arriving."""
        rm = self.received_map
        assert rm is not None
        while rm.missing_count():
            budget = MAX_OUTSTANDING_REQUESTS - rm.outstanding()
            if budget > 0 and self.rp_connected:
                for block, pages in rm.next_missing(budget).items():
                    await self._send_requests(block, pages)
            self._arrived = trio.Event()
            with trio.move_on_after(REQUEST_POLL):
                await self._arrived.wait()
        self.log.info("postcopy: all pages received", requested=self.info.postcopy_requests)

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


def _nothing() -> None:
    pass


def is_page_run(idx: np.ndarray) -> bool:
    """True if ``idx`` (non-empty) is consecutive ascending page numbers. The ends alone do not
    prove it: a postcopy source interleaves requested pages with its background scan, so one
    decoded run can hold e.g. [10, 20, 12]."""
    k = len(idx)
    return int(idx[-1]) - int(idx[0]) == k - 1 and (k < 3 or bool((np.diff(idx) == 1).all()))


def peer_name(stream: trio.SocketStream) -> str:
    """HOST:PORT of the other end, or "?" once it is gone."""
    try:
        h, p = stream.socket.getpeername()[:2]
        return f"{h}:{p}"
    except OSError:
        return "?"


class Reader(Protocol):
    """What the receive loop reads from: a non-blocking connection."""

    def recv_into(self, buffer: memoryview) -> int: ...  # BlockingIOError: nothing queued

    def recv_iov(self, iov: np.ndarray) -> tuple[int, bool]: ...  # like scatter.recv_iov

    async def wait_readable(self) -> None: ...

    async def wait_for(self, n: int, timeout: float) -> None: ...  # n bytes queued, or timeout


class _SocketReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.recv_into = sock.recv_into
        self._lowat = 1

    def recv_iov(self, iov: np.ndarray) -> tuple[int, bool]:
        return scatter.recv_iov(self.fd, iov)

    async def wait_readable(self) -> None:
        self._set_lowat(1)
        await trio.lowlevel.wait_readable(self.sock)

    async def wait_for(self, n: int, timeout: float) -> None:
        # SO_RCVLOWAT: the socket polls readable (and the kernel wakes us) only once n bytes are
        # queued; it does not change what a non-blocking read returns
        self._set_lowat(n)
        with trio.move_on_after(timeout):
            await trio.lowlevel.wait_readable(self.sock)

    def _set_lowat(self, n: int) -> None:
        if n != self._lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n

    def close(self) -> None:
        """Close our descriptor; the connection itself stays as trio has it (SO_RCVLOWAT is
        the socket's, shared with trio's descriptor)."""
        with contextlib.suppress(OSError):
            self._set_lowat(1)
        self.sock.close()


class _ignore_io:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(
            et, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
        )
