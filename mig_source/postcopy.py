"""The source side of postcopy (WIRE.md §6.2, §6.4, §6.6): after the switch, and across recovery.

At the switch the migration stops the guest and hands :class:`PostcopySource` the pages the
destination does not hold from us (``remaining``: a bool per page and block). From then on:

* ``switch()`` sends POSTCOPY_RAM_DISCARD for every run of those pages (they may hold stale
  precopy copies there), PING 2, one PACKAGED command (LISTEN, the devices, PING 3, RUN), PING 4;
* ``stream_pages()`` sends RAM PART sections: pages the destination asked for (REQ_PAGES) first,
  as they come, then the background scan in small batches, so that a request waits behind at
  most one batch; then RAM END and EOF;
* after a broken connection, ``resume()`` runs the recovery handshake on the new connection:
  RECV_BITMAP for every block, ``remaining`` rebuilt from the destination's received bitmaps,
  POSTCOPY_RESUME, RESUME_ACK, and streaming continues.

The guest never runs here again once RUN was sent: its state is split between both hosts.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import trio

from protocol.encoder import MainEncoder, discard_commands
from protocol.events import (
    DeviceSection,
    EndOfStream,
    Packaged,
    Ping,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamEos,
    RecvBitmapRequest,
    RpRecvBitmap,
    RpReqPages,
    RpResumeAck,
    SectionEnd,
    SectionFooter,
    SectionPart,
)

from .pages import zero_pages_mask

PAGE = 4096
# pages per background send: a requested page waits behind at most this much of the scan
BACKGROUND_BATCH = 32
# with a postcopy-preempt channel requested pages never wait behind the background scan, which
# can then go in big batches through full-size socket buffers
PREEMPT_BACKGROUND_BATCH = 256
PART_PAGES = 4096  # close a PART section after this many pages (16 MiB), as QEMU bounds its passes


class PostcopyError(Exception):
    """Postcopy cannot go on (becomes error-desc)."""


class HandshakeTimeout(PostcopyError):
    """The peer of a recovery connection did not answer: pause again, as for a broken link
    (it may be the wrong address); never fail, which would lose the guest's split state."""


def true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of True in a bool array."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def discard_events(remaining: Mapping[str, np.ndarray]) -> list[PostcopyRamDiscard]:
    """POSTCOPY_RAM_DISCARD commands (12 ranges each) covering every page still to send."""
    out: list[PostcopyRamDiscard] = []
    for name, mask in remaining.items():
        starts, lengths = true_runs(mask)
        ranges = list(zip((starts * PAGE).tolist(), (lengths * PAGE).tolist(), strict=True))
        out += discard_commands(name, ranges)
    return out


def not_received(bitmap: bytes, n_pages: int) -> np.ndarray:
    """Pages a RECV_BITMAP reply (little-endian bits, 1 = received) says are missing."""
    bits = np.unpackbits(np.frombuffer(bitmap, np.uint8), bitorder="little")
    if len(bits) < n_pages:
        raise PostcopyError(f"received bitmap has {len(bits)} bits for {n_pages} pages")
    return bits[:n_pages] == 0


def encode_pages(
    enc: MainEncoder, name: str, pages: np.ndarray, idx: np.ndarray, holes: np.ndarray, stats: Any
) -> np.ndarray:
    """The records of pages ``idx`` (sorted, unique; a few dozen at most) of one block: ZERO
    records for zero pages (never-allocated ones without reading them), PAGE records gathered
    straight from guest RAM for the rest. Lean on purpose: a faulting vCPU waits for this."""
    known_zero = holes[idx]
    data_idx = idx[~known_zero] if known_zero.any() else idx
    zero = zero_pages_mask(pages, data_idx)
    normal = data_idx[~zero]
    zidx = idx[known_zero]
    if zero.any():
        zidx = np.sort(np.concatenate((zidx, data_idx[zero])))
    out = []
    if len(zidx):
        out.append(enc.zero_pages(name, zidx.astype(np.uint64) * PAGE))
        stats.duplicate += len(zidx)
    if len(normal):
        out.append(enc.pages_from(name, normal.astype(np.uint64) * PAGE, pages, normal))
        stats.normal += len(normal)
        stats.normal_bytes += len(normal) * PAGE
    return out[0] if len(out) == 1 else np.concatenate(out)


class PageRequests:
    """Pages the destination asked for, in arrival order, to be served before the background."""

    def __init__(self, block_sizes: Mapping[str, int]) -> None:
        self._sizes = dict(block_sizes)
        self._queue: collections.deque[tuple[str, int, int]] = collections.deque()
        self._last_block: str | None = None
        self.arrived = trio.Event()
        self.count = 0  # requests received (query-migrate's postcopy-requests)

    def add(self, ev: RpReqPages) -> None:
        block = ev.block if ev.block is not None else self._last_block
        if block is None:
            raise PostcopyError("REQ_PAGES before any REQ_PAGES_ID named a block")
        size = self._sizes.get(block)
        if size is None:
            raise PostcopyError(f"page request for unknown RAM block {block!r}")
        if ev.start % PAGE or ev.length % PAGE or not ev.length or ev.start + ev.length > size:
            raise PostcopyError(
                f"page request {ev.start:#x}+{ev.length:#x} in block {block!r} is not whole pages "
                f"inside its {size:#x} bytes"
            )
        self._last_block = block
        self._queue.append((block, ev.start // PAGE, ev.length // PAGE))
        self.count += 1
        self.arrived.set()

    def take(self) -> list[tuple[str, int, int]]:
        out = list(self._queue)
        self._queue.clear()
        self.arrived = trio.Event()
        return out

    def reset(self) -> None:
        """A new connection: the destination re-sends what it still waits for (first with an id)."""
        self._queue.clear()
        self._last_block = None


class PostcopySource:
    """What the source still owes the destination after the switch, and the request queue."""

    def __init__(
        self,
        *,
        guest: Any,
        stats: Any,
        log: Any,
        remaining: dict[str, np.ndarray],
        holes: dict[str, np.ndarray],
    ) -> None:
        self.guest = guest
        self.stats = stats
        self.log = log
        self.remaining = remaining
        self.holes = holes
        self.requests = PageRequests({n: b.size for n, b in guest.blocks.items()})
        self._cursor = dict.fromkeys(remaining, 0)
        self.left = self.remaining_pages()  # kept in step with ``remaining``
        self.run_sent = False
        self.requested_pages_sent = 0
        # recovery handshake (filled by the return-path reader)
        self.bitmaps: dict[str, np.ndarray] = {}
        self.resume_acked = False
        self.changed = trio.Event()  # any of the above arrived

    # ------------------------------------------------------------------ bookkeeping

    def remaining_pages(self) -> int:
        return int(sum(int(np.count_nonzero(m)) for m in self.remaining.values()))

    def _next_background(self, limit: int) -> tuple[str, np.ndarray] | None:
        """Up to ``limit`` pages still to send from one block, in address order."""
        for name, mask in self.remaining.items():
            start = self._cursor[name]
            window = mask[start:]
            idx = np.flatnonzero(window[: max(limit * 64, 4096)])
            if not len(idx):
                idx = np.flatnonzero(window)
            if not len(idx):
                self._cursor[name] = len(mask)
                continue
            idx = idx[:limit] + start
            self._cursor[name] = int(idx[-1]) + 1
            return name, idx
        return None

    # ------------------------------------------------------------------ return-path events

    def on_return_path(self, ev: Any) -> bool:
        """Handle a postcopy return-path message; False if it is not one."""
        if isinstance(ev, RpReqPages):
            if not self.run_sent:
                raise PostcopyError("page request before POSTCOPY_RUN")
            self.requests.add(ev)
            self.stats.postcopy_requests = self.requests.count
        elif isinstance(ev, RpRecvBitmap):
            block = self.guest.blocks.get(ev.block)
            if block is None:
                raise PostcopyError(f"RECV_BITMAP reply for unknown block {ev.block!r}")
            self.bitmaps[ev.block] = not_received(ev.bitmap, block.n_pages)
        elif isinstance(ev, RpResumeAck):
            if ev.value != 1:
                raise PostcopyError(f"RESUME_ACK with value {ev.value}, expected 1")
            self.resume_acked = True
        else:
            return False
        self.changed.set()
        return True

    async def wait_for(self, done: Callable[[], bool], check: Callable[[], None], timeout: float) -> None:
        """Wait until ``done()``; ``check()`` raises the return path's error, if any."""
        with trio.move_on_after(timeout) as scope:
            while not done():
                check()
                self.changed = trio.Event()
                await self.changed.wait()
        check()
        if scope.cancelled_caught:
            raise HandshakeTimeout(
                f"the destination did not answer the recovery handshake within {timeout} s"
            )

    # ------------------------------------------------------------------ the stream

    async def switch(
        self, send: Callable[[bytes], Any], enc: MainEncoder, devices: list[DeviceSection]
    ) -> None:
        """Discards, PING 2, the package (LISTEN, devices, PING 3, RUN), PING 4."""
        out = [enc.encode(ev) for ev in discard_events(self.remaining)]
        n_discards = len(out)
        out.append(enc.encode(Ping(2)))
        blob = [enc.encode(PostcopyListen())]
        for sec in devices:
            blob += [enc.encode(sec), enc.encode(SectionFooter(sec.section_id))]
        blob += [enc.encode(Ping(3)), enc.encode(PostcopyRun())]
        out.append(enc.encode(Packaged(b"".join(blob))))
        out.append(enc.encode(Ping(4)))
        await send(b"".join(out))
        self.run_sent = True
        self.log.info(
            "postcopy: package sent, the guest runs on the destination",
            discards=n_discards,
            pages_to_send=self.remaining_pages(),
        )

    async def resume(
        self,
        send: Callable[[bytes], Any],
        enc: MainEncoder,
        check: Callable[[], None],
        timeout: float,
    ) -> None:
        """The recovery handshake on a new connection (WIRE.md §6.6)."""
        self.bitmaps.clear()
        self.resume_acked = False
        self.requests.reset()
        names = list(self.guest.blocks)
        await send(b"".join(enc.encode(RecvBitmapRequest(n)) for n in names))
        await self.wait_for(lambda: all(n in self.bitmaps for n in names), check, timeout)
        # what the destination lacks is what we send; anything it holds is never sent again
        before = self.remaining_pages()
        self.remaining = {n: self.bitmaps[n] for n in names}
        self._cursor = dict.fromkeys(names, 0)
        self.left = self.remaining_pages()
        self.stats.remaining = self.left * PAGE
        self.log.info("postcopy recovery: bitmaps received", missing=self.remaining_pages(), before=before)
        await send(enc.encode(PostcopyResume()))
        await self.wait_for(lambda: self.resume_acked, check, timeout)

    async def stream_pages(
        self,
        sender: Any,
        section_id: int,
        check: Callable[[], None],
        send: Callable[[Any], Any],
        urgent: Any,
        send_urgent: Callable[[Any], Any],
        *,
        preempt: bool = False,
    ) -> None:
        """RAM PART sections until nothing is left, requests first; the caller ends the stream
        (:meth:`end_of_stream`).

        ``send`` sends without rate limit; background pages are accounted to ``sender.limiter``
        afterwards, and its waits end early when a request arrives. Requested pages are encoded
        by ``urgent`` (a PageSender) and sent by ``send_urgent``. On the main channel they go
        between two background batches; with ``preempt`` (a postcopy-preempt channel) a task of
        their own sends them the moment they are asked for, while a background batch may still
        be on its way."""
        enc = sender.enc
        await sender.send(enc.encode(SectionPart(section_id)))
        try:
            async with trio.open_nursery() as nursery:
                done = trio.Event()
                if preempt:
                    nursery.start_soon(self._urgent_loop, urgent, send_urgent, done)
                await self._background_loop(sender, section_id, check, send, urgent, send_urgent, preempt)
                done.set()
                self.requests.arrived.set()  # wakes the urgent loop to see that we are done
        except BaseExceptionGroup as group:
            # a broken link must reach the migration as itself (it pauses on it), not in a group
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        self.stats.remaining = 0
        self.log.info(
            "postcopy: all pages sent",
            requests=self.requests.count,
            requested_pages_sent=self.requested_pages_sent,
        )

    async def _urgent_loop(self, urgent: Any, send_urgent: Callable[[Any], Any], done: trio.Event) -> None:
        while True:
            if await self._serve_requests(urgent, send_urgent):
                continue
            if done.is_set():
                return
            await self.requests.arrived.wait()

    async def _serve_requests(self, urgent: Any, send_urgent: Callable[[Any], Any]) -> int:
        """Send every page asked for so far that is still ours to send; returns how many."""
        reqs = self.requests.take()
        if not reqs:
            return 0
        blocks = self.guest.blocks
        # everything asked for so far, per block, in one encode and one send each
        wanted: dict[str, list[np.ndarray]] = {}
        for name, first, n in reqs:
            wanted.setdefault(name, []).append(np.arange(first, first + n))
        sent = 0
        for name, parts in wanted.items():
            mask = self.remaining[name]
            idx = np.unique(np.concatenate(parts))
            idx = idx[mask[idx]]  # already sent: it is on its way (or there)
            if not len(idx):
                continue
            mask[idx] = False
            self.left -= len(idx)
            data = encode_pages(urgent.enc, name, blocks[name].pages, idx, self.holes[name], self.stats)
            # a record must never be cut short on its channel: finish the send even if cancelled
            with trio.CancelScope(shield=True):
                await send_urgent(data)
            self.requested_pages_sent += len(idx)
            sent += len(idx)
        self.stats.remaining = self.left * PAGE
        return sent

    async def _background_loop(
        self,
        sender: Any,
        section_id: int,
        check: Callable[[], None],
        send: Callable[[Any], Any],
        urgent: Any,
        send_urgent: Callable[[Any], Any],
        preempt: bool,
    ) -> None:
        enc = sender.enc
        in_section = 0
        not_before = 0.0  # the rate limit's next send time for background pages
        blocks = self.guest.blocks
        while True:
            check()
            if not preempt:
                n = await self._serve_requests(urgent, send_urgent)
                if n:
                    in_section += n
                    continue
            now = time.monotonic()
            if not_before > now:
                # over max-postcopy-bandwidth: wait, but never with a request waiting behind us
                with trio.move_on_after(not_before - now):
                    await self.requests.arrived.wait()
                continue
            nxt = self._next_background(PREEMPT_BACKGROUND_BATCH if preempt else BACKGROUND_BATCH)
            if nxt is None:
                return
            name, idx = nxt
            self.remaining[name][idx] = False
            self.left -= len(idx)
            data = encode_pages(sender.enc, name, blocks[name].pages, idx, self.holes[name], self.stats)
            await send(data)
            not_before = sender.limiter.reserve(len(data)) or 0.0
            in_section += len(idx)
            self.stats.remaining = self.left * PAGE
            if in_section >= PART_PAGES:
                await sender.send(
                    enc.encode(RamEos())
                    + enc.encode(SectionFooter(section_id))
                    + enc.encode(SectionPart(section_id))
                )
                in_section = 0

    @staticmethod
    def end_of_stream(enc: MainEncoder, section_id: int) -> bytes:
        """Close the open PART section, then RAM END and EOF (no vmdesc in postcopy)."""
        return (
            enc.encode(RamEos())
            + enc.encode(SectionFooter(section_id))
            + enc.encode(SectionEnd(section_id))
            + enc.encode(RamEos())
            + enc.encode(SectionFooter(section_id))
            + enc.encode(EndOfStream())
        )
