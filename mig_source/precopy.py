"""The source side of a precopy migration: passes of dirty pages, switchover, completion.

One ``PrecopyMigration`` is one attempt. It owns its nursery (the return-path reader runs in it)
and is run inside a cancel scope owned by the daemon: ``migrate_cancel`` cancels that scope.
Whatever ends the attempt (success, error, cancel) the ``finally`` path puts the guest back:
if we stopped it for the switchover and did not complete, it runs again.

Non-convergence policy (documented in README.md):
* with capability ``postcopy-ram``: after ``x-postcopy-after-passes`` passes (default 5; 0 turns
  this off) the source switches to postcopy, which always finishes; ``migrate-start-postcopy``
  switches at any time;
* with capability ``auto-converge``: the vCPU is throttled as QEMU does (``cpu-throttle-initial``,
  then ``+cpu-throttle-increment`` each time the guest dirtied more than
  ``throttle-trigger-threshold`` % of what was sent in a pass, twice in a row), up to
  ``max-cpu-throttle``; if it still has not converged after ``x-max-throttled-passes`` passes at
  the maximum, the migration fails;
* without it: the migration fails after ``x-max-passes`` passes that did not converge.
Either way the failure leaves the source guest running, unchanged, with a clear error-desc.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from control.daemon_common import tune_socket
from control.params import Capabilities, MigrationStatus, Parameters, RamStats, StatusMachine
from control.priority import lower_thread_priority
from control.threads import run_owned_thread
from protocol.encoder import MainEncoder, PageIov
from protocol.errors import ProtocolError
from protocol.events import (
    Configuration,
    DeviceSection,
    EndOfStream,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RpPong,
    RpReqPages,
    RpShut,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
)
from protocol.return_path import ReturnPathDecoder

from .gather import buffer_iov, sendmsg_all
from .pages import hole_pages, zero_pages_mask
from .postcopy import DirectSender, HandshakeTimeout, PostcopyError, PostcopySource

PAGE = 4096
BATCH_PAGES = 256  # 1 MiB of pages per encoded buffer (the XBZRLE path)
GATHER_PAGES = 512  # pages per sendmsg (2 segments each: IOV_MAX is 1024)
RAM_SECTION_ID = 2  # QEMU's savevm registers "ram" as the third handler; any value works
PART_BYTES = 64 << 20  # close a PART section after this much so cancel/sync points stay near
POSTCOPY_CHECK_BYTES = 4 << 20  # with postcopy-ram: how often a pass looks for the switch
POSTCOPY_SNDBUF = 64 << 10  # after the switch (see _postcopy_stream)


class MigrationError(Exception):
    """A migration failed for a reason a user should read (becomes error-desc)."""


class LinkLost(MigrationError):
    """The connection to the destination broke (in postcopy: pause, do not fail)."""


@dataclass
class MigrationInfo:
    """What query-migrate reports about the current or last migration."""

    ram: RamStats = field(default_factory=RamStats)
    start_time: float = 0.0
    end_time: float | None = None
    setup_time_ms: int = 0
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    error_desc: str | None = None
    cpu_throttle: int = 0
    passes: int = 0
    xbzrle: dict[str, Any] | None = None
    pongs: list[int] = field(default_factory=list)  # PONG values from the return path, in order

    def total_time_ms(self) -> int:
        end = self.end_time if self.end_time is not None else time.monotonic()
        return int((end - self.start_time) * 1000)


class RateLimiter:
    """Bytes per second, in 100 ms windows like QEMU's rate limiter; 0 means unlimited.
    Used from the trio task or from the sender thread, never both at once."""

    def __init__(self, params: Parameters, parameter: str = "max_bandwidth") -> None:
        self._params = params
        self._parameter = parameter  # max_bandwidth, or max_postcopy_bandwidth after the switch
        self._window_start = time.monotonic()
        self._used = 0

    def reserve(self, n: int) -> float | None:
        """Account ``n`` bytes; the monotonic time until which nothing more may be sent, if
        over the budget (None: go on)."""
        limit = getattr(self._params, self._parameter)
        if limit <= 0:
            return None
        per_window = max(limit / 10, 1)
        now = time.monotonic()
        if now - self._window_start >= 0.1:
            self._window_start = now
            self._used = 0
        self._used += n
        if self._used <= per_window:
            return None
        until = self._window_start + 0.1 * (self._used / per_window)
        self._window_start = until
        self._used = 0
        return until

    async def acquire(self, n: int) -> None:
        until = self.reserve(n)
        if until is not None:
            await trio.sleep(max(until - time.monotonic(), 0))

    def acquire_blocking(self, n: int, abort: threading.Event) -> None:
        until = self.reserve(n)
        while until is not None and not abort.is_set() and time.monotonic() < until:
            abort.wait(min(until - time.monotonic(), 0.05))


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    if not uri.startswith("tcp:"):
        raise MigrationError(f"unsupported migration URI {uri!r}: only tcp:HOST:PORT is implemented")
    host, sep, port = uri[4:].rpartition(":")
    if not sep or not port.isdigit():
        raise MigrationError(f"migration URI {uri!r} is not tcp:HOST:PORT")
    return host.strip("[]"), int(port)


class PageSender:
    """Encodes dirty pages of the guest's blocks into the stream: zero detection, XBZRLE."""

    def __init__(
        self,
        stream: trio.SocketStream,
        enc: MainEncoder,
        stats: RamStats,
        limiter: RateLimiter,
        xbzrle: Any | None,
    ) -> None:
        self.stream = stream
        self.enc = enc
        self.stats = stats
        self.limiter = limiter
        self.xbzrle = xbzrle  # XbzrleCache or None
        self.xbzrle_bases: dict[str, int] = {}
        self.sync_round = 0
        self.last_stage = False

    async def send(self, data: bytes | np.ndarray | memoryview) -> None:
        if isinstance(data, np.ndarray):
            data = memoryview(data).cast("B")  # a flat byte view: partial sends slice bytes
        n = len(data)
        if not n:
            return
        await self.limiter.acquire(n)
        await self.stream.send_all(data)
        self.stats.transferred += n

    async def send_pages(
        self, name: str, pages: np.ndarray, idx: np.ndarray, holes: np.ndarray | None = None
    ) -> int:
        """Send the pages ``idx`` (sorted page numbers) of one block; returns bytes sent.

        ``holes`` marks pages the memory backend has never allocated: they are zero without
        being read (reading would make the kernel allocate them)."""
        before = self.stats.transferred
        if self.xbzrle is None:
            await self._send_in_thread(self._batches(name, pages, idx, holes, gather=True))
        else:
            batches = self._batches(name, pages, idx, holes)
            for item in batches:
                if isinstance(item, np.ndarray):
                    await self.send(item)
                else:
                    await self._send_xbzrle(name, pages, item[1])
        return self.stats.transferred - before

    def _batches(
        self, name: str, pages: np.ndarray, idx: np.ndarray, holes: np.ndarray | None, gather: bool = False
    ) -> Iterator[np.ndarray | PageIov | tuple[str, np.ndarray]]:
        """Encoded record buffers for ``idx``, batch by batch; with XBZRLE active, the normal
        pages of a batch come out as ("xbzrle", page numbers) for the caller to encode.

        With ``gather`` the normal pages come out as a ``PageIov`` (headers plus addresses in
        guest RAM, for sendmsg): no page is copied in user space."""
        if holes is not None:
            known_zero = holes[idx]
            if known_zero.any():
                zidx = idx[known_zero]
                for a in range(0, len(zidx), 1 << 16):
                    part = zidx[a : a + (1 << 16)]
                    yield self.enc.zero_pages(name, part.astype(np.uint64) * PAGE)
                    self._note_zero(name, part)
                idx = idx[~known_zero]
        scratch = None if gather else np.empty((BATCH_PAGES, PAGE), dtype=np.uint8)
        batch = GATHER_PAGES if gather else BATCH_PAGES
        for a in range(0, len(idx), batch):
            chunk = idx[a : a + batch]
            first, last = int(chunk[0]), int(chunk[-1])
            contiguous = last - first == len(chunk) - 1
            # a page being written by the vCPU right now may be torn (here, or in the kernel's
            # copy during sendmsg): its dirty bit is set again after our sync and the next pass
            # sends it again, exactly as in QEMU; at stop-and-copy the guest is stopped
            if gather:
                src = pages
                if contiguous:
                    zero = zero_pages_mask(pages[first : last + 1])
                else:
                    zero = zero_pages_mask(pages, chunk)
            else:
                if contiguous:
                    src = pages[first : last + 1]  # a view: no copy for runs of dirty pages
                else:
                    assert scratch is not None
                    src = np.take(pages, chunk, axis=0, out=scratch[: len(chunk)])
                zero = zero_pages_mask(src)
            nz = int(np.count_nonzero(zero))
            if nz:
                zidx = chunk[zero]
                yield self.enc.zero_pages(name, zidx.astype(np.uint64) * PAGE)
                self._note_zero(name, zidx)
                if nz == len(chunk):
                    continue
            rows = np.flatnonzero(~zero) if nz else None
            normal = chunk[rows] if nz else chunk
            if self.xbzrle is not None and self.sync_round >= 2:
                yield ("xbzrle", normal)
                continue
            if gather:
                yield self.enc.pages_iov(name, pages, normal)
            else:
                yield self.enc.pages_from(name, normal.astype(np.uint64) * PAGE, src, rows)
            self.stats.normal += len(normal)
            self.stats.normal_bytes += len(normal) * PAGE

    def _note_zero(self, name: str, zidx: np.ndarray) -> None:
        self.stats.duplicate += len(zidx)
        if self.xbzrle is not None:
            base = self.xbzrle_bases[name]
            self.xbzrle.cache_zero_pages(base + zidx.astype(np.int64) * PAGE, self.sync_round)

    async def _send_in_thread(self, batches: Iterator[Any]) -> None:
        """Build and send the batches in one worker thread: zero detection and the iovecs are
        numpy, the sends are sendmsg from guest RAM (both release the GIL).

        Cancellation sets an abort flag and then waits, shielded, for the thread to stop, so
        no thread is left writing to a socket that the caller is about to close."""
        abort = threading.Event()
        # our own descriptor of the connection: valid for the thread whatever trio closes
        fd = os.dup(self.stream.socket.fileno())
        try:
            await run_owned_thread(lambda: self._pump(batches, fd, abort), abort.set)
        finally:
            os.close(fd)

    def _pump(self, batches: Iterator[Any], fd: int, abort: threading.Event) -> None:
        for item in batches:
            if abort.is_set():
                return
            if isinstance(item, PageIov):
                iov, n = item.iov, item.nbytes
            else:
                iov, item = buffer_iov(item)
                n = int(iov[0, 1])
            self.limiter.acquire_blocking(n, abort)
            # sendmsg copies: once it returned, the pages and buffers are free to change
            self.stats.transferred += sendmsg_all(fd, iov, abort)

    async def _send_xbzrle(self, name: str, pages: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """QEMU's save_xbzrle_page for each page: deltas go out here; pages that must go as
        PAGE are sent here too, from the cache copy, so cache and destination stay equal."""
        base = self.xbzrle_bases[name]
        for i in idx:
            i = int(i)
            kind, *payload = self.xbzrle.save_page(
                base + i * PAGE, pages[i], self.sync_round, self.last_stage, detect_zero=False
            )
            if kind == "xbzrle":
                await self.send(self.enc.encode(XbzrlePage(name, i * PAGE, payload[0])))
                self.stats.xbzrle_pages += 1
                self.stats.xbzrle_bytes += len(payload[0])
            elif kind == "page":
                data = np.frombuffer(payload[0], np.uint8).reshape(1, PAGE)
                await self.send(self.enc.pages(name, np.array([i * PAGE], np.uint64), data))
                self.stats.normal += 1
                self.stats.normal_bytes += PAGE
        return idx[:0]


class PrecopyMigration:
    """One outgoing precopy migration attempt."""

    def __init__(
        self,
        *,
        guest: Any,
        uri: str,
        caps: Capabilities,
        params: Parameters,
        status: StatusMachine,
        info: MigrationInfo,
        emit: Callable[[str, dict[str, Any]], None],
        machine_type: str,
        log: Any,
        vmdesc: bytes | None = None,
    ) -> None:
        self.vmdesc = vmdesc
        self.guest = guest
        self.uri = uri
        self.caps = caps
        self.params = params
        self.status = status
        self.info = info
        self.emit = emit
        self.machine_type = machine_type
        self.log = log
        self.stopped_guest = False
        self.was_running = False
        self._shut: trio.Event = trio.Event()
        self._shut_status: int | None = None
        self._rp_error: BaseException | None = None
        self._rp_generation = 0  # which return-path reader's messages count (the newest)
        self._high_dirty_count = 0
        self._passes_at_max_throttle = 0
        self.postcopy_requested = False  # migrate-start-postcopy, or the automatic policy
        self.pc: PostcopySource | None = None  # set at the postcopy switch
        self._resume_requested = trio.Event()
        self._resume_uri = uri
        self._conn_uri = uri  # the current connection's (a preempt channel goes there too)
        self._last_devices: list[Any] = []

    # ------------------------------------------------------------------ entry point

    async def run(self) -> None:
        info = self.info
        self.status.to(MigrationStatus.SETUP)
        info.start_time = time.monotonic()
        self.was_running = self.guest.run_state == "running"
        completed = False
        try:
            stream = await self._connect(self.uri)
            while True:
                try:
                    await self._run_connection(stream)
                    completed = True
                    break
                except (
                    LinkLost,
                    HandshakeTimeout,
                    OSError,
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                ) as err:
                    if self.pc is None or not self.pc.run_sent:
                        raise
                    stream = await self._pause_until_resumed(err)
        except trio.Cancelled:
            self.log.warning("migration cancelled")
            raise
        except (MigrationError, PostcopyError) as err:
            self._fail(str(err))
        except ProtocolError as err:
            self._fail(f"return path: {err}")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._fail(f"connection to the destination failed: {_describe_io_error(err)}")
        except Exception as err:  # a bug of ours must fail this migration, not kill the daemon
            self.log.exception("internal error during migration")
            self._fail(f"internal error: {type(err).__name__}: {err}")
        finally:
            info.end_time = time.monotonic()
            with trio.CancelScope(shield=True):
                await self._restore_guest(completed)

    async def _connect(self, uri: str) -> trio.SocketStream:
        host, port = parse_tcp_uri(uri)
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as err:
            raise MigrationError(f"cannot connect to {host}:{port}: {err.strerror or err}") from None
        tune_socket(stream.socket)
        return stream

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        """One connection: the whole migration, or (after a pause) the rest of postcopy."""
        async with stream:
            try:
                async with trio.open_nursery() as nursery:
                    if self.pc is None:
                        await self._migrate(stream, nursery)
                    else:
                        await self._resume_postcopy(stream, nursery)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # the nursery wraps even a lone error in a group (strict exception groups):
                # unwrap it for the handlers in run(), or it escapes and kills the daemon
                if len(group.exceptions) == 1:
                    raise group.exceptions[0]  # noqa: B904 (keep the error's own __cause__)
                raise

    # ------------------------------------------------------------------ postcopy control

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: switch at the next point where a pass can stop."""
        if not self.caps["postcopy-ram"]:
            raise MigrationError("postcopy-ram capability is not set")
        self.postcopy_requested = True

    def request_resume(self, uri: str) -> None:
        """migrate with resume=true: reconnect a paused postcopy migration to ``uri``."""
        if self.status.status is not MigrationStatus.POSTCOPY_PAUSED:
            raise MigrationError(
                f"Cannot resume if there is no paused migration (status {self.status.status.value})"
            )
        self._resume_uri = uri
        self._resume_requested.set()

    async def _pause_until_resumed(self, err: BaseException) -> trio.SocketStream:
        """The link broke after RUN: keep everything, wait for ``migrate`` with resume."""
        why = str(err) if isinstance(err, MigrationError) else _describe_io_error(err)
        self.info.error_desc = f"postcopy paused: {why}"
        self.log.warning(
            "postcopy paused: connection lost; waiting for migrate with resume",
            error=why,
            pages_left=self.pc.left if self.pc else None,
        )
        self.status.to(MigrationStatus.POSTCOPY_PAUSED)
        while True:
            self._resume_requested = trio.Event()
            await self._resume_requested.wait()
            self.status.to(MigrationStatus.POSTCOPY_RECOVER)
            try:
                stream = await self._connect(self._resume_uri)
                self._conn_uri = self._resume_uri
            except MigrationError as cerr:
                self.info.error_desc = f"postcopy paused: {cerr}"
                self.log.warning("postcopy recovery: cannot reconnect", error=str(cerr))
                self.status.to(MigrationStatus.POSTCOPY_PAUSED)
                continue
            self.info.error_desc = None
            self.log.info("postcopy recovery: reconnected", uri=self._resume_uri)
            return stream

    def _wants_postcopy(self) -> bool:
        return self.postcopy_requested and self.caps["postcopy-ram"]

    def _release_throttle(self) -> None:
        """Before a final status is visible: a client that sees it sees no throttle either."""
        self.info.cpu_throttle = 0
        try:
            self.guest.set_throttle(0)
        except Exception as err:  # a crashed vCPU must not hide the migration's own outcome
            self.log.error("could not release the CPU throttle", error=str(err))

    def _fail(self, desc: str) -> None:
        self.info.error_desc = desc
        self.log.error("migration failed", error=desc)
        self._release_throttle()
        if self.status.status is not MigrationStatus.FAILED:
            self.status.to(MigrationStatus.FAILED)

    async def _restore_guest(self, completed: bool) -> None:
        try:
            await trio.to_thread.run_sync(self.guest.stop_dirty_log)
        except Exception as err:  # the guest's own error must not hide the migration's
            self.log.error("could not stop dirty logging", error=str(err))
        self._release_throttle()  # (cancelled: nothing released it yet)
        if not completed and self.pc is not None and self.pc.run_sent:
            # the destination has run the guest: its state is split, it must never run here again
            self.guest.set_run_state("postmigrate")
            self.log.error("postcopy failed after the switch: the guest cannot be resumed on the source")
        elif not completed and self.stopped_guest and self.was_running:
            await trio.to_thread.run_sync(self.guest.start)
            self.log.info("source guest resumed after unsuccessful migration")

    # ------------------------------------------------------------------ the stream

    async def _migrate(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        info, stats = self.info, self.info.ram
        enc = MainEncoder()
        limiter = RateLimiter(self.params)
        xbzrle = None
        if self.caps["xbzrle"]:
            from protocol.xbzrle import XbzrleCache

            xbzrle = XbzrleCache(self.params.xbzrle_cache_size)
        sender = PageSender(stream, enc, stats, limiter, xbzrle)
        blocks = self.guest.blocks
        if xbzrle is not None:
            from protocol.xbzrle import ram_addr_bases

            sender.xbzrle_bases = ram_addr_bases({n: b.size for n, b in blocks.items()})
        stats.total = sum(b.size for b in blocks.values())
        postcopy = self.caps["postcopy-ram"]
        return_path = self.caps["return-path"] or postcopy  # postcopy needs one (WIRE.md §6.1)

        head = [enc.encode(StreamHeader()), enc.encode(Configuration(self.machine_type))]
        if return_path:
            nursery.start_soon(self._read_return_path, stream)
            head += [enc.encode(OpenReturnPath()), enc.encode(Ping(1))]
        if postcopy:  # our page sizes, before any page: the destination checks them
            head.append(enc.encode(PostcopyAdvise(PAGE, PAGE)))
        block_list = RamBlockList(tuple(RamBlockInfo(n, b.size) for n, b in blocks.items()))
        head += [
            enc.encode(SectionStart(RAM_SECTION_ID, "ram", 0, 4)),
            enc.encode(block_list),
            enc.encode(RamEos()),
            enc.encode(SectionFooter(RAM_SECTION_ID)),
        ]
        # dirty logging starts before the first pass: every write from now on is caught
        await trio.to_thread.run_sync(self.guest.start_dirty_log)
        await trio.to_thread.run_sync(self.guest.sync_dirty)
        dirty = {n: np.arange(b.n_pages, dtype=np.intp) for n, b in blocks.items()}
        stats.remaining = stats.total
        stats.dirty_sync_count = 1
        sender.sync_round = 1
        await sender.send(b"".join(head))
        info.setup_time_ms = int((time.monotonic() - info.start_time) * 1000)
        self.status.to(MigrationStatus.ACTIVE)

        while True:
            self._check_return_path()
            pass_start = time.monotonic()
            sent, unsent = await self._send_pass(sender, dirty)
            elapsed = max(time.monotonic() - pass_start, 1e-6)
            bandwidth = sent / elapsed  # bytes/s over this pass
            if unsent:  # the pass stopped early for postcopy: those pages were never sent
                await self._postcopy_switch(sender, stream, unsent)
                return
            dirty = await self._sync(sender, elapsed)
            remaining = sum(len(v) for v in dirty.values()) * PAGE
            stats.remaining = remaining
            stats.mbps = bandwidth * 8 / 1e6
            stats.pages_per_second = int((sent / (PAGE + 8)) / elapsed)
            expected = remaining / max(bandwidth, 1.0)
            info.expected_downtime_ms = int(expected * 1000)
            info.passes += 1
            self.emit("MIGRATION_PASS", {"pass": stats.dirty_sync_count})
            self.log.info(
                "pass done",
                passno=info.passes,
                sent=sent,
                seconds=round(elapsed, 3),
                remaining=remaining,
                expected_downtime_ms=info.expected_downtime_ms,
                throttle=info.cpu_throttle,
            )
            if expected * 1000 <= self.params.downtime_limit:
                break
            self._non_convergence(sent, elapsed)
            if self._wants_postcopy():
                await self._postcopy_switch(sender, stream, dirty)
                return

        await self._switchover(sender, stream, dirty)

    async def _send_pass(
        self, sender: PageSender, dirty: dict[str, np.ndarray]
    ) -> tuple[int, dict[str, np.ndarray]]:
        """One PART section per up to PART_BYTES of pages; returns the bytes sent, and the pages
        not sent when migrate-start-postcopy stopped the pass early (else an empty dict)."""
        total = 0
        in_section = 0
        open_section = False
        pass_start = time.monotonic()
        enc = sender.enc
        unsent: dict[str, np.ndarray] = {}
        # with postcopy possible, look for migrate-start-postcopy every few MiB, not every 64
        step = (POSTCOPY_CHECK_BYTES if self.caps["postcopy-ram"] else PART_BYTES) // PAGE
        for name, idx in dirty.items():
            if unsent:
                unsent[name] = idx
                continue
            block = self.guest.blocks[name]
            pages = block.pages
            holes = hole_pages(block)
            for a in range(0, len(idx), step):
                if self._wants_postcopy():
                    unsent[name] = idx[a:]
                    break
                if not open_section:
                    await sender.send(enc.encode(SectionPart(RAM_SECTION_ID)))
                    open_section = True
                chunk = idx[a : a + step]
                n = await sender.send_pages(name, pages, chunk, holes)
                total += n
                in_section += n
                stats = self.info.ram
                stats.remaining = max(stats.remaining - len(chunk) * PAGE, 0)
                elapsed = time.monotonic() - pass_start
                if elapsed > 0.05:  # live rate for query-migrate while the pass runs
                    stats.mbps = total * 8 / elapsed / 1e6
                if in_section >= PART_BYTES:
                    await sender.send(enc.encode(RamEos()) + enc.encode(SectionFooter(RAM_SECTION_ID)))
                    open_section = False
                    in_section = 0
                    self._check_return_path()
        if open_section:
            await sender.send(enc.encode(RamEos()) + enc.encode(SectionFooter(RAM_SECTION_ID)))
        return total, unsent

    async def _sync(self, sender: PageSender, elapsed: float) -> dict[str, np.ndarray]:
        bitmaps = await trio.to_thread.run_sync(self.guest.sync_dirty)
        out = {name: np.flatnonzero(bm) for name, bm in bitmaps.items()}
        n_dirty = sum(len(v) for v in out.values())
        stats = self.info.ram
        stats.dirty_sync_count += 1
        stats.dirty_pages_rate = int(n_dirty / max(elapsed, 1e-6))
        sender.sync_round = stats.dirty_sync_count
        if sender.xbzrle is not None:
            sender.xbzrle.update_rates(self.info.ram.normal + self.info.ram.xbzrle_pages)
            self.info.xbzrle = sender.xbzrle.stats()
        return out

    def _non_convergence(self, sent: int, elapsed: float) -> None:
        info, params = self.info, self.params
        if self.caps["postcopy-ram"] and 0 < params.x_postcopy_after_passes <= info.passes:
            if not self.postcopy_requested:
                self.log.info("postcopy: switching after passes that did not converge", passes=info.passes)
            self.postcopy_requested = True  # postcopy always finishes: it comes before throttling
            return
        dirtied = info.ram.dirty_pages_rate * elapsed * PAGE
        if self.caps["auto-converge"]:
            # QEMU's mig_throttle_guest_down trigger: dirtied > threshold% of sent, twice in a row
            if dirtied > sent * params.throttle_trigger_threshold / 100:
                self._high_dirty_count += 1
            if self._high_dirty_count >= 2:
                self._high_dirty_count = 0
                if info.cpu_throttle == 0:
                    new = params.cpu_throttle_initial
                else:
                    new = min(info.cpu_throttle + params.cpu_throttle_increment, params.max_cpu_throttle)
                if new != info.cpu_throttle:
                    info.cpu_throttle = new
                    self.guest.set_throttle(new)
                    self.log.info("auto-converge: throttling the guest", cpu_throttle=new)
            if info.cpu_throttle >= params.max_cpu_throttle:
                self._passes_at_max_throttle += 1
                if self._passes_at_max_throttle > params.x_max_throttled_passes:
                    raise MigrationError(
                        f"migration did not converge: after {params.x_max_throttled_passes} passes at "
                        f"{info.cpu_throttle}% CPU throttle the expected downtime is still "
                        f"{info.expected_downtime_ms} ms > downtime-limit {params.downtime_limit} ms"
                    )
        elif info.passes >= params.x_max_passes:
            raise MigrationError(
                f"migration did not converge after {info.passes} passes: expected downtime "
                f"{info.expected_downtime_ms} ms > downtime-limit {params.downtime_limit} ms "
                "(enable auto-converge, raise downtime-limit or max-bandwidth)"
            )

    async def _switchover(
        self, sender: PageSender, stream: trio.SocketStream, pending: dict[str, np.ndarray]
    ) -> None:
        """Stop the guest; send what is still dirty (``pending``, from the last pass's sync,
        plus what the guest wrote since), the devices, EOF and the vmdesc."""
        info, enc = self.info, sender.enc
        self.status.to(MigrationStatus.DEVICE)
        down_start = time.monotonic()
        bitmaps = await self._stop_guest()
        sender.last_stage = True
        await sender.send(enc.encode(SectionEnd(RAM_SECTION_ID)))
        for name, bm in bitmaps.items():
            idx = np.union1d(np.flatnonzero(bm), pending.get(name, bm[:0].nonzero()[0]))
            if len(idx):
                await sender.send_pages(name, self.guest.blocks[name].pages, idx)
        await sender.send(enc.encode(RamEos()) + enc.encode(SectionFooter(RAM_SECTION_ID)))
        devices = self._device_sections()
        out = [enc.encode(sec) + enc.encode(SectionFooter(sec.section_id)) for sec in devices]
        out.append(enc.encode(EndOfStream()))
        if self.vmdesc is not None:
            out.append(enc.encode(VmDescription(self.vmdesc)))
        elif all(d.vmdesc_entry is not None for d in self._last_devices):
            desc = {"page_size": PAGE, "devices": [d.vmdesc_entry for d in self._last_devices]}
            out.append(enc.encode(VmDescription(json.dumps(desc, separators=(", ", ": ")).encode())))
        await sender.send(b"".join(out))
        self.info.ram.remaining = 0
        await self._await_completion(stream)
        info.downtime_ms = int((time.monotonic() - down_start) * 1000)
        self._completed()

    async def _stop_guest(self) -> dict[str, np.ndarray]:
        """Stop the guest for the switch; its last dirty bitmaps."""
        if self.guest.run_state == "running":
            self.stopped_guest = True
        self.guest.store_global_state()  # the destination runs the guest iff it ran here
        await trio.to_thread.run_sync(self.guest.stop)
        self.emit("STOP", {})
        bitmaps = await trio.to_thread.run_sync(self.guest.sync_dirty)
        self.info.ram.dirty_sync_count += 1
        return bitmaps

    def _device_sections(self) -> list[DeviceSection]:
        devices = self.guest.save_devices()
        self._last_devices = devices
        return [
            DeviceSection(RAM_SECTION_ID + 1 + i, d.idstr, d.instance_id, d.version_id, d.body)
            for i, d in enumerate(devices)
        ]

    async def _await_completion(self, stream: trio.SocketStream) -> None:
        """After the last byte: the destination's SHUT (with a return path) or our EOF."""
        if self.caps["return-path"] or self.caps["postcopy-ram"]:
            with trio.move_on_after(self.params.x_completion_timeout) as scope:
                await self._shut.wait()
            if scope.cancelled_caught:
                raise MigrationError(
                    "destination did not confirm completion (no SHUT) within "
                    f"{self.params.x_completion_timeout} s"
                )
            if self._rp_error is not None:
                raise self._rp_error
            if self._shut_status:
                raise MigrationError(f"destination reported failure (SHUT status {self._shut_status})")
        else:
            await stream.send_eof()

    def _completed(self) -> None:
        info = self.info
        self.guest.set_run_state("postmigrate")  # it runs on the destination from now on
        self._release_throttle()
        self.status.to(MigrationStatus.COMPLETED)
        self.log.info(
            "migration completed",
            total_time_ms=info.total_time_ms(),
            downtime_ms=info.downtime_ms,
            transferred=info.ram.transferred,
            postcopy_requests=info.ram.postcopy_requests,
        )

    # ------------------------------------------------------------------ postcopy

    async def _postcopy_switch(
        self, sender: PageSender, stream: trio.SocketStream, pending: dict[str, np.ndarray]
    ) -> None:
        """Stop the guest, discard what the destination must not use, run it there, stream the
        rest (WIRE.md §6.2)."""
        self.status.to(MigrationStatus.POSTCOPY_ACTIVE)
        down_start = time.monotonic()
        bitmaps = await self._stop_guest()
        remaining: dict[str, np.ndarray] = {}
        for name, bm in bitmaps.items():
            mask = bm.astype(bool, copy=True)
            if name in pending:
                mask[pending[name]] = True
            remaining[name] = mask
        holes = {n: hole_pages(b) for n, b in self.guest.blocks.items()}
        self.pc = PostcopySource(
            guest=self.guest, stats=self.info.ram, log=self.log, remaining=remaining, holes=holes
        )
        self.info.ram.remaining = self.pc.left * PAGE
        self.log.info("postcopy: switching", pages_to_send=self.pc.left, passes=self.info.passes)
        await self.pc.switch(sender.send, sender.enc, self._device_sections())
        self.info.downtime_ms = int((time.monotonic() - down_start) * 1000)
        await self._postcopy_stream(stream, sender.enc)

    async def _postcopy_stream(self, stream: trio.SocketStream, enc: MainEncoder) -> None:
        assert self.pc is not None
        preempt = await self._open_preempt() if self.caps["postcopy-preempt"] else None
        if preempt is None:
            # a small send buffer: a requested page never queues behind megabytes of background
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SNDBUF)
        limiter = RateLimiter(self.params, "max_postcopy_bandwidth")
        sender = PageSender(stream, enc, self.info.ram, limiter, None)

        def sending(s: trio.SocketStream) -> Callable[[Any], Any]:
            async def send(buf: Any) -> None:
                data = memoryview(buf).cast("B") if isinstance(buf, np.ndarray) else buf
                await s.send_all(data)
                self.info.ram.transferred += len(data)

            return send

        direct = None
        # this (trio) thread streams in bulk from here on: the return-path reader's thread and
        # the destination's fault path go first (control/priority.py)
        restore_priority = lower_thread_priority(self.log)
        if preempt is not None:  # requested pages on their own connection, with their own CONTINUE state
            direct = DirectSender(MainEncoder(), os.dup(preempt.socket.fileno()))
        try:
            await self.pc.stream_pages(
                sender,
                RAM_SECTION_ID,
                self._check_return_path,
                sending(stream),
                direct=direct,
            )
            if direct is not None:
                # its EOS before the main EOF: the destination then has every requested page
                self.info.ram.transferred += await trio.to_thread.run_sync(self._close_direct, direct)
        finally:
            if direct is not None:
                direct.abort.set()  # a send blocked on a dead channel gives up
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.pc.stop_direct)
                    os.close(direct.fd)
                    await preempt.aclose()
            restore_priority()
        await sender.send(self.pc.end_of_stream(enc, RAM_SECTION_ID))
        await self._await_completion(stream)
        self._completed()

    def _close_direct(self, direct: DirectSender) -> int:
        """No more direct sends; then the channel's EOS (blocking: run it in a thread).
        Returns the EOS's length."""
        assert self.pc is not None
        self.pc.stop_direct()
        eos = direct.enc.encode(RamEos())
        with direct.lock:
            direct.send(eos)
        return len(eos)

    async def _open_preempt(self) -> trio.SocketStream | None:
        """The postcopy-preempt channel (WIRE.md §6.7): a second connection to the destination;
        without it requested pages go on the main channel."""
        try:
            preempt = await self._connect(self._conn_uri)
        except MigrationError as err:
            self.log.warning(
                "postcopy-preempt channel not opened; requested pages use the main channel", error=str(err)
            )
            return None
        self.log.info("postcopy-preempt channel open")
        return preempt

    async def _resume_postcopy(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        """The recovery handshake on a new connection, then the rest of the pages."""
        assert self.pc is not None
        self._shut = trio.Event()
        self._shut_status = None
        self._rp_error = None
        enc = MainEncoder()  # a new stream: the first page names its block again
        nursery.start_soon(self._read_return_path, stream)

        async def send(data: bytes) -> None:
            await stream.send_all(data)
            self.info.ram.transferred += len(data)

        await self.pc.resume(send, enc, self._check_return_path, self.params.x_completion_timeout)
        self.status.to(MigrationStatus.POSTCOPY_ACTIVE)
        self.log.info("postcopy resumed", pages_left=self.pc.left)
        await self._postcopy_stream(stream, enc)

    # ------------------------------------------------------------------ return path

    def _check_return_path(self) -> None:
        if self._rp_error is not None:
            raise self._rp_error
        if self._shut.is_set() and self.status.status is not MigrationStatus.DEVICE:
            raise MigrationError(
                f"destination shut the migration down early (SHUT status {self._shut_status})"
            )

    async def _read_return_path(self, stream: trio.SocketStream) -> None:
        """The return path, read by a thread of its own: a page request is answered from that
        thread when a postcopy-preempt channel is up (the trio loop is busy with the background
        stream, and a faulting vCPU waits); everything else is handed to the trio loop in order."""
        block_sizes = {n: b.size for n, b in self.guest.blocks.items()}
        dec = ReturnPathDecoder(block_sizes=block_sizes)
        self._rp_generation += 1
        generation = self._rp_generation
        token = trio.lowlevel.current_trio_token()

        def deliver(fn: Callable[..., None], *args: Any) -> None:
            def call() -> None:
                if self._rp_generation == generation:  # not from a reader of an older connection
                    fn(*args)

            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(call)

        fd = os.dup(stream.socket.fileno())
        stop_r, stop_w = os.pipe()  # closed here, once the thread is done with them
        try:
            await run_owned_thread(
                lambda: self._rp_loop(fd, stop_r, dec, deliver), lambda: os.write(stop_w, b"x")
            )
        finally:
            for f in (fd, stop_r, stop_w):
                os.close(f)

    def _rp_loop(self, fd: int, stop_fd: int, dec: ReturnPathDecoder, deliver: Callable[..., None]) -> None:
        """The reader thread: until the connection ends, fails, or ``stop_fd`` is readable."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        try:
            while True:
                ready = [f for f, _ in poller.poll()]
                if stop_fd in ready:
                    return
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    deliver(self._rp_eof)
                    return
                dec.feed(data)
                for ev in dec.events():
                    if isinstance(ev, RpReqPages):
                        pc = self.pc
                        if pc is None:
                            raise ProtocolError("unexpected RpReqPages during precopy", channel="return-path")
                        try:
                            queued = pc.take_request(ev)
                        except OSError as err:
                            what = _describe_io_error(err)
                            deliver(self._rp_failed, LinkLost(f"postcopy-preempt channel failed: {what}"))
                            return
                        if queued:
                            deliver(pc.notify_request)
                    else:
                        deliver(self._on_rp_event, ev)
        except (ProtocolError, PostcopyError) as err:
            deliver(self._rp_failed, err)
        except OSError as err:
            deliver(self._rp_failed, LinkLost(f"return path failed: {_describe_io_error(err)}"))

    def _rp_eof(self) -> None:
        if not self._shut.is_set():
            self._rp_failed(LinkLost("destination closed the connection without SHUT"))

    def _on_rp_event(self, ev: Any) -> None:
        """In trio: a return-path message other than a page request."""
        if isinstance(ev, RpPong):
            self.info.pongs.append(ev.value)
            self.log.debug("pong", value=ev.value)
        elif isinstance(ev, RpShut):
            self._shut_status = ev.status
            self._shut.set()
            if self.pc is not None:
                self.pc.changed.set()
        else:
            try:
                if self.pc is None or not self.pc.on_return_path(ev):
                    name = type(ev).__name__
                    raise ProtocolError(f"unexpected {name} during precopy", channel="return-path")
            except (ProtocolError, PostcopyError) as err:
                self._rp_failed(err)

    def _rp_failed(self, err: BaseException) -> None:
        self._rp_error = err
        self._shut.set()
        if self.pc is not None:
            self.pc.changed.set()  # wakes a recovery handshake waiting for the destination


def _describe_io_error(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__
    if isinstance(err, trio.BrokenResourceError) and cause is not None:
        err = cause
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
