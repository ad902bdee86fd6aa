"""The source side of a precopy migration: passes of dirty pages, switchover, completion.

One ``PrecopyMigration`` is one attempt. It owns its nursery (the return-path reader runs in it)
and is run inside a cancel scope owned by the daemon: ``migrate_cancel`` cancels that scope.
Whatever ends the attempt (success, error, cancel) the ``finally`` path puts the guest back:
if we stopped it for the switchover and did not complete, it runs again.

Non-convergence policy (documented in README.md):
* with capability ``auto-converge``: the vCPU is throttled as QEMU does (``cpu-throttle-initial``,
  then ``+cpu-throttle-increment`` each time the guest dirtied more than
  ``throttle-trigger-threshold`` % of what was sent in a pass, twice in a row), up to
  ``max-cpu-throttle``; if it still has not converged after ``x-max-throttled-passes`` passes at
  the maximum, the migration fails;
* without it: the migration fails after ``x-max-passes`` passes that did not converge.
Either way the failure leaves the source guest running, unchanged, with a clear error-desc.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from control.daemon_common import tune_socket
from control.params import Capabilities, MigrationStatus, Parameters, RamStats, StatusMachine
from protocol.encoder import MainEncoder, PageIov
from protocol.errors import ProtocolError
from protocol.events import (
    Configuration,
    DeviceSection,
    EndOfStream,
    OpenReturnPath,
    Ping,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RpPong,
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

PAGE = 4096
BATCH_PAGES = 256  # 1 MiB of pages per encoded buffer (the XBZRLE path)
GATHER_PAGES = 512  # pages per sendmsg (2 segments each: IOV_MAX is 1024)
RAM_SECTION_ID = 2  # QEMU's savevm registers "ram" as the third handler; any value works
PART_BYTES = 64 << 20  # close a PART section after this much so cancel/sync points stay near


class MigrationError(Exception):
    """A migration failed for a reason a user should read (becomes error-desc)."""


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

    def total_time_ms(self) -> int:
        end = self.end_time if self.end_time is not None else time.monotonic()
        return int((end - self.start_time) * 1000)


class RateLimiter:
    """Bytes per second, in 100 ms windows like QEMU's rate limiter; 0 means unlimited.
    Used from the trio task or from the sender thread, never both at once."""

    def __init__(self, params: Parameters) -> None:
        self._params = params
        self._window_start = time.monotonic()
        self._used = 0

    def _wait_until(self, n: int) -> float | None:
        """Account ``n`` bytes; the monotonic time to wait until, if over the budget."""
        limit = self._params.max_bandwidth
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
        until = self._wait_until(n)
        if until is not None:
            await trio.sleep(max(until - time.monotonic(), 0))

    def acquire_blocking(self, n: int, abort: threading.Event) -> None:
        until = self._wait_until(n)
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
        done = threading.Event()
        # our own descriptor of the connection: valid for the thread whatever trio closes
        fd = os.dup(self.stream.socket.fileno())

        def work() -> None:
            try:
                self._pump(batches, fd, abort)
            finally:
                os.close(fd)
                done.set()

        try:
            await trio.to_thread.run_sync(work, abandon_on_cancel=True)
        except trio.Cancelled:
            abort.set()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(done.wait)
            raise

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
        self._high_dirty_count = 0
        self._passes_at_max_throttle = 0

    # ------------------------------------------------------------------ entry point

    async def run(self) -> None:
        info = self.info
        self.status.to(MigrationStatus.SETUP)
        info.start_time = time.monotonic()
        self.was_running = self.guest.run_state == "running"
        completed = False
        try:
            host, port = parse_tcp_uri(self.uri)
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as err:
                raise MigrationError(f"cannot connect to {host}:{port}: {err.strerror or err}") from None
            tune_socket(stream.socket)
            async with stream:
                try:
                    async with trio.open_nursery() as nursery:
                        await self._migrate(stream, nursery)
                        completed = True
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # the nursery wraps even a lone error in a group (strict exception groups):
                    # unwrap it for the handlers below, or it escapes and kills the daemon
                    if len(group.exceptions) == 1:
                        raise group.exceptions[0]  # noqa: B904 (keep the error's own __cause__)
                    raise
        except trio.Cancelled:
            self.log.warning("migration cancelled")
            raise
        except MigrationError as err:
            self._fail(str(err))
        except ProtocolError as err:
            self._fail(f"return path: {err}")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._fail(f"connection to the destination failed: {_describe_io_error(err)}")
        finally:
            info.end_time = time.monotonic()
            with trio.CancelScope(shield=True):
                await self._restore_guest(completed)

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
        if not completed and self.stopped_guest and self.was_running:
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
        return_path = self.caps["return-path"]

        head = [enc.encode(StreamHeader()), enc.encode(Configuration(self.machine_type))]
        if return_path:
            nursery.start_soon(self._read_return_path, stream)
            head += [enc.encode(OpenReturnPath()), enc.encode(Ping(1))]
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
            sent = await self._send_pass(sender, dirty)
            elapsed = max(time.monotonic() - pass_start, 1e-6)
            bandwidth = sent / elapsed  # bytes/s over this pass
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

        await self._switchover(sender, stream, dirty)

    async def _send_pass(self, sender: PageSender, dirty: dict[str, np.ndarray]) -> int:
        """One PART section per up to PART_BYTES of pages; returns the bytes sent."""
        total = 0
        in_section = 0
        open_section = False
        pass_start = time.monotonic()
        enc = sender.enc
        for name, idx in dirty.items():
            block = self.guest.blocks[name]
            pages = block.pages
            holes = hole_pages(block)
            for a in range(0, len(idx), PART_BYTES // PAGE):
                if not open_section:
                    await sender.send(enc.encode(SectionPart(RAM_SECTION_ID)))
                    open_section = True
                chunk = idx[a : a + PART_BYTES // PAGE]
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
        return total

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
        if self.guest.run_state == "running":
            self.stopped_guest = True
        self.guest.store_global_state()  # the destination runs the guest iff it ran here
        await trio.to_thread.run_sync(self.guest.stop)
        self.emit("STOP", {})
        bitmaps = await trio.to_thread.run_sync(self.guest.sync_dirty)
        self.info.ram.dirty_sync_count += 1
        sender.last_stage = True
        await sender.send(enc.encode(SectionEnd(RAM_SECTION_ID)))
        for name, bm in bitmaps.items():
            idx = np.union1d(np.flatnonzero(bm), pending.get(name, bm[:0].nonzero()[0]))
            if len(idx):
                await sender.send_pages(name, self.guest.blocks[name].pages, idx)
        await sender.send(enc.encode(RamEos()) + enc.encode(SectionFooter(RAM_SECTION_ID)))
        devices = self.guest.save_devices()
        out: list[bytes] = []
        for i, dev in enumerate(devices):
            sec = DeviceSection(RAM_SECTION_ID + 1 + i, dev.idstr, dev.instance_id, dev.version_id, dev.body)
            out += [enc.encode(sec), enc.encode(SectionFooter(sec.section_id))]
        out.append(enc.encode(EndOfStream()))
        if self.vmdesc is not None:
            out.append(enc.encode(VmDescription(self.vmdesc)))
        elif all(d.vmdesc_entry is not None for d in devices):
            desc = {"page_size": PAGE, "devices": [d.vmdesc_entry for d in devices]}
            out.append(enc.encode(VmDescription(json.dumps(desc, separators=(", ", ": ")).encode())))
        await sender.send(b"".join(out))
        self.info.ram.remaining = 0
        if self.caps["return-path"]:
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
        info.downtime_ms = int((time.monotonic() - down_start) * 1000)
        self.guest.set_run_state("postmigrate")  # it runs on the destination from now on
        self._release_throttle()
        self.status.to(MigrationStatus.COMPLETED)
        self.log.info(
            "migration completed",
            total_time_ms=info.total_time_ms(),
            downtime_ms=info.downtime_ms,
            transferred=info.ram.transferred,
        )

    # ------------------------------------------------------------------ return path

    def _check_return_path(self) -> None:
        if self._rp_error is not None:
            raise self._rp_error
        if self._shut.is_set() and self.status.status is not MigrationStatus.DEVICE:
            raise MigrationError(
                f"destination shut the migration down early (SHUT status {self._shut_status})"
            )

    async def _read_return_path(self, stream: trio.SocketStream) -> None:
        block_sizes = {n: b.size for n, b in self.guest.blocks.items()}
        dec = ReturnPathDecoder(block_sizes=block_sizes)
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    if not self._shut.is_set():
                        self._rp_error = MigrationError("destination closed the connection without SHUT")
                        self._shut.set()
                    return
                dec.feed(data)
                for ev in dec.events():
                    if isinstance(ev, RpPong):
                        self.log.debug("pong", value=ev.value)
                    elif isinstance(ev, RpShut):
                        self._shut_status = ev.status
                        self._shut.set()
                    else:
                        raise ProtocolError(
                            f"unexpected {type(ev).__name__} during precopy", channel="return-path"
                        )
        except ProtocolError as err:
            self._rp_error = err
            self._shut.set()
        except (OSError, trio.BrokenResourceError) as err:
            self._rp_error = MigrationError(f"return path failed: {_describe_io_error(err)}")
            self._shut.set()


def zero_pages_mask(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Which of these pages (``pages[rows]``, all when None) are all zero. A page with a
    non-zero first word cannot be, so only the rest are read in full: random data costs one
    word per page, not 4 KiB, and no page is gathered."""
    words = pages.view(np.uint64)
    if rows is None:
        rows = np.arange(len(words))
        zero = words[:, 0] == 0
    else:
        zero = words[rows, 0] == 0
    cand = np.flatnonzero(zero)
    if len(cand):
        zero[cand] = ~words[rows[cand]].any(axis=1)
    return zero


def hole_pages(block: Any) -> np.ndarray:
    """Per page: True where the block's memory was never allocated (so it reads as zero)."""
    holes = np.ones(block.n_pages, dtype=bool)
    for start, stop in block.data_ranges():
        holes[start // PAGE : -(-stop // PAGE)] = False
    return holes


def _describe_io_error(err: BaseException) -> str:
    cause = err.__cause__ or err.__context__
    if isinstance(err, trio.BrokenResourceError) and cause is not None:
        err = cause
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__
