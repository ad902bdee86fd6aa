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
import threading
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

from .gather import buffer_iov, sendmsg_all
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
    enc: MainEncoder, name: str, pages: np.ndarray, idx: np.ndarray, holes: np.ndarray
) -> tuple[np.ndarray, int, int]:
    """The records of pages ``idx`` (sorted, unique; a few dozen at most) of one block: ZERO
    records for zero pages (never-allocated ones without reading them), PAGE records gathered
    straight from guest RAM for the rest; and how many of each (zero, normal). Lean on purpose:
    a faulting vCPU waits for this."""
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
    if len(normal):
        out.append(enc.pages_from(name, normal.astype(np.uint64) * PAGE, pages, normal))
    data = out[0] if len(out) == 1 else np.concatenate(out)
    return data, len(zidx), len(normal)


def count_pages(stats: Any, n_zero: int, n_normal: int) -> None:
    stats.duplicate += n_zero
    stats.normal += n_normal
    stats.normal_bytes += n_normal * PAGE


class PageRequests:
    """Pages the destination asked for, in arrival order, to be served before the background.

    Requests are checked and resolved (``resolve``) by the return-path reader's thread; those
    not sent at once by a :class:`DirectSender` wait here for the stream's trio task."""

    def __init__(self, block_sizes: Mapping[str, int]) -> None:
        self._sizes = dict(block_sizes)
        self._queue: collections.deque[tuple[str, int, int]] = collections.deque()
        self._last_block: str | None = None
        self.arrived = trio.Event()
        self.count = 0  # requests received (query-migrate's postcopy-requests)

    def resolve(self, ev: RpReqPages) -> tuple[str, int, int]:
        """(block, first page, pages) of a request, checked against the block list."""
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
        self.count += 1
        return block, ev.start // PAGE, ev.length // PAGE

    def queue(self, request: tuple[str, int, int]) -> None:
        self._queue.append(request)

    def take(self) -> list[tuple[str, int, int]]:
        out = []
        while self._queue:  # popleft, not a copy and clear: the reader's thread may append
            out.append(self._queue.popleft())
        self.arrived = trio.Event()
        return out

    def reset(self) -> None:
        """A new connection: the destination re-sends what it still waits for (first with an id)."""
        self._queue.clear()
        self._last_block = None


class DirectSender:
    """Requested pages sent from the return-path reader's thread, on the postcopy-preempt
    channel, the moment they are asked for: no hop through the trio loop, which is busy with
    the background stream. One serve at a time; ``close`` waits for the one in flight."""

    def __init__(self, enc: MainEncoder, fd: int) -> None:
        self.enc = enc  # the channel's own encoder (its CONTINUE state)
        self.fd = fd  # our own descriptor of the channel's socket
        self.lock = threading.Lock()
        self.abort = threading.Event()  # set: a blocked send gives up within 0.1 s
        self.closed = False
        self.error: OSError | None = None
        # folded into the migration's statistics by the trio side at close
        self.bytes_sent = 0
        self.zero_pages = 0
        self.normal_pages = 0
        self.pages_sent = 0

    def send(self, data: np.ndarray | bytes) -> None:
        iov, keep = buffer_iov(data)
        n = sendmsg_all(self.fd, iov, self.abort)
        del keep
        if n < int(iov[0, 1]):
            raise OSError("send aborted")
        self.bytes_sent += n


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
        self.requests_allowed = False  # from just before RUN is sent (its answer may come first)
        self.requested_pages_sent = 0
        # remaining, left and _cursor are shared with the return-path reader's thread
        self.lock = threading.Lock()
        self.direct: DirectSender | None = None
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
        if isinstance(ev, RpRecvBitmap):
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

    def take_request(self, ev: RpReqPages) -> bool:
        """A page request, in the return-path reader's thread: sent at once when a direct
        sender is active, else queued; True if the trio side must be woken for it."""
        if not self.requests_allowed:
            raise PostcopyError("page request before POSTCOPY_RUN")
        request = self.requests.resolve(ev)
        self.stats.postcopy_requests = self.requests.count
        with self.lock:
            direct = self.direct
            if direct is None:
                self.requests.queue(request)
                return True
        self._serve_direct(direct, *request)
        return False

    def notify_request(self) -> None:
        """In trio: a request was queued."""
        self.requests.arrived.set()

    def _claim(self, name: str, idx: np.ndarray) -> np.ndarray:
        """The pages of ``idx`` still ours to send, now marked sent (background or request)."""
        with self.lock:
            mask = self.remaining[name]
            idx = idx[mask[idx]]
            if len(idx):
                mask[idx] = False
                self.left -= len(idx)
                self.stats.remaining = self.left * PAGE
            return idx

    def _serve_direct(self, direct: DirectSender, name: str, first: int, n: int) -> None:
        with direct.lock:
            if direct.closed or direct.error is not None:
                return  # the channel is gone: recovery rebuilds what is owed from the bitmaps
            idx = np.arange(first, first + n)
            # also the pages a background batch already took: that copy may sit behind
            # megabytes of the main channel's socket buffers, this one overtakes it (the
            # destination places a page once and drops the later copy)
            self._claim(name, idx)
            block = self.guest.blocks[name]
            data, n_zero, n_normal = encode_pages(direct.enc, name, block.pages, idx, self.holes[name])
            try:
                direct.send(data)
            except OSError as err:
                direct.error = err
                raise
            direct.zero_pages += n_zero
            direct.normal_pages += n_normal
            direct.pages_sent += len(idx)

    def start_direct(self, direct: DirectSender) -> list[tuple[str, int, int]]:
        """Requests go to ``direct`` from now on; returns those queued before."""
        with self.lock:
            self.direct = direct
            return self.requests.take()

    def stop_direct(self) -> DirectSender | None:
        """Blocking (run it in a thread): no more direct sends; waits for the one in flight and
        folds the direct sender's counts into the statistics."""
        with self.lock:
            direct, self.direct = self.direct, None
        if direct is None:
            return None
        with direct.lock:
            direct.closed = True
        self.stats.transferred += direct.bytes_sent
        count_pages(self.stats, direct.zero_pages, direct.normal_pages)
        self.requested_pages_sent += direct.pages_sent
        return direct

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
        self.requests_allowed = True
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
        with self.lock:
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
        *,
        direct: DirectSender | None = None,
    ) -> None:
        """RAM PART sections until nothing is left, requests first; the caller ends the stream
        (:meth:`end_of_stream`).

        ``send`` sends without rate limit; background pages are accounted to ``sender.limiter``
        afterwards, and its waits end early when a request arrives. Without ``direct``,
        requested pages go by ``send`` too, between two background batches on the main channel.
        With ``direct`` (a postcopy-preempt channel) the return-path reader's thread sends each
        the moment it is asked for, while a background batch may still be on its way;
        :meth:`stop_direct` ends that."""
        enc = sender.enc
        await sender.send(enc.encode(SectionPart(section_id)))
        if direct is not None:
            early = self.start_direct(direct)
            if early:  # asked for before the channel was there
                await trio.to_thread.run_sync(self._serve_taken, direct, early)
        await self._background_loop(sender, section_id, check, send, direct is not None)
        check()
        self.stats.remaining = 0
        self.log.info(
            "postcopy: all pages sent",
            requests=self.requests.count,
            requested_pages_sent=self.requested_pages_sent + (direct.pages_sent if direct else 0),
        )

    def _serve_taken(self, direct: DirectSender, reqs: list[tuple[str, int, int]]) -> None:
        for req in reqs:
            self._serve_direct(direct, *req)

    async def _serve_requests(self, enc: MainEncoder, send: Callable[[Any], Any]) -> int:
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
            idx = self._claim(name, np.unique(np.concatenate(parts)))
            if not len(idx):
                continue  # already sent: on its way (or there)
            data, n_zero, n_normal = encode_pages(enc, name, blocks[name].pages, idx, self.holes[name])
            count_pages(self.stats, n_zero, n_normal)
            # a record must never be cut short on its channel: finish the send even if cancelled
            with trio.CancelScope(shield=True):
                await send(data)
            self.requested_pages_sent += len(idx)
            sent += len(idx)
        return sent

    async def _background_loop(
        self,
        sender: Any,
        section_id: int,
        check: Callable[[], None],
        send: Callable[[Any], Any],
        preempt: bool,
    ) -> None:
        enc = sender.enc
        in_section = 0
        not_before = 0.0  # the rate limit's next send time for background pages
        blocks = self.guest.blocks
        while True:
            check()
            if not preempt:
                n = await self._serve_requests(enc, send)
                if n:
                    in_section += n
                    continue
            now = time.monotonic()
            if not_before > now:
                # over max-postcopy-bandwidth: wait, but never with a request waiting behind us
                with trio.move_on_after(not_before - now):
                    await self.requests.arrived.wait()
                continue
            with self.lock:
                nxt = self._next_background(PREEMPT_BACKGROUND_BATCH if preempt else BACKGROUND_BATCH)
            if nxt is None:
                return
            name, idx = nxt
            idx = self._claim(name, idx)
            if not len(idx):
                continue  # sent meanwhile on request
            data, n_zero, n_normal = encode_pages(sender.enc, name, blocks[name].pages, idx, self.holes[name])
            count_pages(self.stats, n_zero, n_normal)
            await send(data)
            not_before = sender.limiter.reserve(len(data)) or 0.0
            in_section += len(idx)
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
