"""The destination's postcopy fast path, on a thread of its own (WIRE.md §6.3, §6.7).

A vCPU blocked on a missing page waits for three things: its fault message to be read and a
REQ_PAGES written, the page to come back, and a wake-up once the page is placed. In the trio
loop each of those waited behind whatever the loop was doing with the background stream
(reading and applying up to a megabyte at a time), which put the fault latency's p99 at 7-23 ms.
Here one thread blocks in poll() on just the fault socket and the postcopy-preempt channel and
does those three steps itself; the trio loop keeps the main channel.

Shared with the trio side: guest RAM and the received map (pages are placed under
``place_lock``: contents first, then the received/present byte), the return-path writer (whole
messages under its lock), and the set of pages faulted vCPUs wait for (``awaited_lock``).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from protocol.decoder import MainDecoder
from protocol.errors import ProtocolError
from protocol.events import Pages, RamEos, ZeroPages

from .drain import drain

RP_SEND_TIMEOUT = 10.0  # s: a return-path write that cannot finish by then gives up
PREEMPT_RECV_SIZE = 256 << 10


class RpWriter:
    """Whole return-path messages to one connection, from any thread, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._fd = os.dup(sock.fileno())  # ours: valid whatever trio does with its socket
        self._lock = threading.Lock()
        self._closed = False

    def send(self, data: bytes, timeout: float = RP_SEND_TIMEOUT) -> None:
        """Write all of ``data`` (blocking at most ``timeout``); OSError if it cannot."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise OSError("the return path is closed")
            while view:
                try:
                    n = os.write(self._fd, view)
                except (BlockingIOError, InterruptedError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"return-path write blocked for {timeout} s") from None
                    select.select([], [self._fd], [], min(left, 0.1))
                    continue
                view = view[n:]

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


class FaultService:
    """The fault and preempt thread of one incoming postcopy migration.

    ``request(block, pages)`` sends REQ_PAGES for pages (blocking; errors are the caller's to
    ignore: pages stay marked requested and are asked for again after recovery);
    ``place(event)`` places a Pages/ZeroPages event (thread-safe); ``on_preempt_closed(stream,
    error, bytes read)`` runs in trio (through ``call_in_trio``) when a preempt channel ends."""

    def __init__(
        self,
        *,
        request: Callable[[str, np.ndarray], None],
        place: Callable[[Any], None],
        call_in_trio: Callable[..., None],
        on_preempt_closed: Callable[[Any, str | None, int], None],
        log: Any,
    ) -> None:
        self._request = request
        self._place = place
        self._call_in_trio = call_in_trio
        self._on_preempt_closed = on_preempt_closed
        self.log = log
        self._wake_r, self._wake_w = os.pipe()  # stop, or look at the configuration again
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._config_lock = threading.Lock()
        self._stop = False
        self._closed = False
        # faults (set by arm): the guest, its postcopy block, and its received (= present) map
        self._guest: Any = None
        self._block: str | None = None
        self._received: np.ndarray | None = None
        self._requested: np.ndarray | None = None
        # preempt channel (set by attach_preempt): (trio stream, our fd, its decoder)
        self._preempt: tuple[Any, socket.socket, MainDecoder] | None = None
        self.awaited_lock = threading.Lock()
        self._awaited = np.zeros(0, np.intp)  # faulted pages not placed yet
        self._fault_seen: dict[int, int] = {}  # faulted page -> monotonic_ns its fault was read
        self.service_ns: list[int] = []  # per faulted page: fault read here -> page placed
        self.preempt_bytes = 0

    # ---- configuration, from trio

    def arm(self, guest: Any, block: str, received: np.ndarray, requested: np.ndarray) -> None:
        with self._config_lock:
            self._guest, self._block, self._received, self._requested = guest, block, received, requested
        self._poke()

    def disarm(self) -> None:
        with self._config_lock:
            self._guest = None
        self._poke()

    def attach_preempt(self, stream: Any, decoder: MainDecoder) -> None:
        sock = socket.socket(fileno=os.dup(stream.socket.fileno()))  # ours, non-blocking like trio's
        with self._config_lock:
            self._preempt = (stream, sock, decoder)
        self._poke()

    def stop(self) -> None:
        self._stop = True
        self._poke()

    def _poke(self) -> None:
        with self._config_lock:
            if self._closed:
                return
            with contextlib.suppress(BlockingIOError):  # pokes pending already: one is enough
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Once ``run`` has returned (the trio owner's last step)."""
        with self._config_lock:
            if not self._closed:
                self._closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    # ---- the thread

    def run(self) -> None:
        """Serve until ``stop()``; run it with trio.to_thread."""
        try:
            while not self._stop:
                with self._config_lock:
                    guest = self._guest
                    preempt = self._preempt
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                fault_fd = guest.fault_fileno() if guest is not None else None
                if fault_fd is not None:
                    poller.register(fault_fd, select.POLLIN)
                if preempt is not None:
                    poller.register(preempt[1].fileno(), select.POLLIN)
                while not self._stop:
                    ready = dict(poller.poll())
                    if self._wake_r in ready:
                        self._drain_pokes()
                        break  # the configuration changed: build the poll set again
                    if fault_fd is not None and fault_fd in ready:
                        self._serve_faults(guest)
                        if ready[fault_fd] & (select.POLLHUP | select.POLLERR):
                            poller.unregister(fault_fd)  # the vCPU is gone: no more faults
                            fault_fd = None
                    if (
                        preempt is not None
                        and preempt[1].fileno() in ready
                        and not self._receive_preempt(preempt)
                    ):
                        break
        finally:
            with self._config_lock:
                preempt, self._preempt = self._preempt, None
            if preempt is not None:
                self._close_preempt(preempt, None)

    def _drain_pokes(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _serve_faults(self, guest: Any) -> None:
        pages = guest.read_faults()
        if not len(pages):
            return
        block, received, requested = self._block, self._received, self._requested
        assert block is not None and received is not None and requested is not None
        pages = pages[~received[pages]]
        if not len(pages):
            guest.wake_vcpu()  # placed meanwhile
            return
        now = time.monotonic_ns()
        with self.awaited_lock:
            self._awaited = np.union1d(self._awaited, pages)
            for p in pages.tolist():
                self._fault_seen.setdefault(p, now)
        new = pages[~requested[pages]]
        if len(new):
            # a link that is down: the pages stay requested and are asked for again at resume
            with contextlib.suppress(OSError):
                self._request(block, new)
        self.wake_if_placed()  # a page placed between our check and the awaited update

    def wake_if_placed(self) -> None:
        """Wake the vCPU if a page it waits for is now placed (from any thread)."""
        with self.awaited_lock:
            awaited = self._awaited
            guest, received = self._guest, self._received
            if guest is None or received is None or not len(awaited):
                return
            placed = received[awaited]
            if not placed.any():
                return
            self._awaited = awaited[~placed]
            now = time.monotonic_ns()
            for p in awaited[placed].tolist():
                seen = self._fault_seen.pop(p, None)
                if seen is not None:
                    self.service_ns.append(now - seen)
        guest.wake_vcpu()

    def _receive_preempt(self, preempt: tuple[Any, socket.socket, MainDecoder]) -> bool:
        """Read and place what the preempt channel has; False once it ended (closed here)."""
        _stream, sock, dec = preempt
        error: str | None = None
        try:
            got, ended = drain(sock, dec, PREEMPT_RECV_SIZE)
            self.preempt_bytes += got
            for ev in dec.events():
                if isinstance(ev, (Pages, ZeroPages)):
                    self._place(ev)
                elif not isinstance(ev, RamEos):
                    raise ProtocolError(f"{type(ev).__name__} on the postcopy-preempt channel")
            self.wake_if_placed()
            if ended:
                dec.end_of_input()
            ended = ended or dec.finished
        except (ProtocolError, OSError) as err:
            # the main channel decides: a broken link pauses postcopy, and after recovery the
            # source opens a new preempt channel (pages still missing are requested again)
            error = str(err)
            ended = True
        if not ended:
            return True
        with self._config_lock:
            if self._preempt is preempt:
                self._preempt = None
        self._close_preempt(preempt, error)
        return False

    def _close_preempt(self, preempt: tuple[Any, socket.socket, MainDecoder], error: str | None) -> None:
        preempt[1].close()
        self._call_in_trio(self._on_preempt_closed, preempt[0], error, self.preempt_bytes)
        self.preempt_bytes = 0

    # ---- statistics

    def service_stats(self) -> dict[str, float]:
        """The daemon's share of the fault latency: from reading a fault to placing its page
        (the rest is the vCPU's wake-up and the fault message's delivery)."""
        with self.awaited_lock:
            if not self.service_ns:
                return {}
            a = np.array(self.service_ns) / 1000
        return {
            "service-p50-us": round(float(np.percentile(a, 50)), 1),
            "service-p99-us": round(float(np.percentile(a, 99)), 1),
        }
