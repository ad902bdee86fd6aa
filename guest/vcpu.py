"""The vCPU: a separate process running the workload, and the daemon's handle on it.

Why a process: a workload in a thread would hold the daemon's GIL while writing pages; in its own
process it leaves the migration a whole core, and shares guest RAM through memfds.

Started with ``python -m guest.vcpu --ctl FD`` (not multiprocessing: the daemon runs trio and
must not fork). It is spawned early, before the RAM it will write is known, so that its ~0.15 s
of interpreter and numpy start-up never lands in a migration's downtime; ``configure`` later
hands it the block's memfd, the shared-state memfd and its end of the fault socket over the
control socket (SCM_RIGHTS).

Control protocol: an AF_UNIX SOCK_SEQPACKET socketpair, one JSON object per message, strictly
request/reply. The child answers only between two batches of page writes (see
:mod:`guest.dirty`), so a ``pause`` reply means no write is in flight, and a ``fence`` reply
means every batch started before the request has completed. Every parent call has a timeout;
a child that dies or stops answering is killed and reported as :class:`VcpuCrashed`.

Postcopy faults (like userfaultfd): while the shared header's POSTCOPY word is 1, the vCPU writes
in program order and never a page that is not ``present``: it writes the present prefix of a
batch, then faults on the first missing page. It sends that page's index on a second
SOCK_SEQPACKET socket (one message: a little-endian uint32 array, unique and sorted; today one
page) and waits for a wake byte ("pages were placed, look again"), resending after FAULT_RESEND
seconds of silence. While it waits it still serves the control socket: no write is in flight, so
every reply keeps the "between two batches" guarantee; a pause or quit abandons the access (the
next batch is recomputed from RNG_POS when the vCPU runs again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .check import block_salt
from .ram import RamBlock
from .shared import H_POSTCOPY, H_WRITES, SharedState
from .workload import WorkloadPlan, missing_pages, next_pages, write_batch

THROTTLE_SLICE = 0.010  # QEMU's CPU_THROTTLE_TIMESLICE_NS: run 10 ms, then sleep pct/(100-pct) of it
MAX_BATCH = 1024  # bounds how long a fence or pause waits for the batch in flight (~1 ms)
FULL_SPEED_BATCH = 256
_MSG_MAX = 1 << 16
FAULT_RESEND = 1.0  # s without a wake before the fault message is sent again (duplicates are harmless)
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR


class VcpuError(RuntimeError):
    """The vCPU refused a request (bad arguments, wrong state)."""


class VcpuCrashed(VcpuError):
    """The vCPU process died, or stopped answering and was killed."""


# ====================================================================== daemon side


class VcpuProcess:
    """Handle on one vCPU process. Thread-safe: one request at a time, each with a timeout."""

    def __init__(self, *, timeout: float = 5.0, start_timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._seq = 0
        self._ready = False
        self._dead: str | None = None
        self._closed = False
        self._sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # stderr goes to an unlinked file: never blocks the child, and a crash report can quote it.
        self._stderr = tempfile.TemporaryFile(prefix="vcpu-stderr-")  # noqa: SIM115 (closed in close())
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "guest.vcpu", "--ctl", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=self._stderr,
                env=env,
            )
        except BaseException:
            self._sock.close()
            self._stderr.close()
            raise
        finally:
            child.close()
        self._spawned = time.monotonic()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None (never blocks)."""
        return self._proc.poll()

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    @property
    def crashed(self) -> bool:
        """True once the process died or was killed for not answering (not after close())."""
        return not self._closed and (self._dead is not None or self._proc.poll() is not None)

    @property
    def error(self) -> str | None:
        """Why the process is considered crashed (None while healthy)."""
        if not self.crashed:
            return None
        return self._dead or f"vcpu process {self._proc.pid} exited with status {self._proc.poll()}"

    def request(
        self, op: str, *, fds: list[int] | None = None, timeout: float | None = None, **args: Any
    ) -> dict:
        """Send one request and return its reply; raises VcpuCrashed or VcpuError."""
        with self._lock:
            if self._dead is not None:
                raise VcpuCrashed(self._dead)
            if not self._ready:
                self._recv(self._spawned + self.start_timeout, "start-up")
                self._ready = True
            self._seq += 1
            msg = json.dumps({"op": op, "seq": self._seq, **args}).encode()
            try:
                if fds:
                    socket.send_fds(self._sock, [msg], fds)
                else:
                    self._sock.send(msg)
            except OSError as e:
                self._crashed(f"control socket: {e}")
            reply = self._recv(time.monotonic() + (self.timeout if timeout is None else timeout), op)
            if reply.get("seq") != self._seq:
                self._crashed(f"reply out of sequence: {reply!r}")
            if not reply.get("ok"):
                raise VcpuError(f"vcpu {op}: {reply.get('error', 'failed')}")
            return reply

    def fence(self) -> None:
        """Return once every batch of writes started before this call has completed."""
        self.request("fence")

    def _recv(self, deadline: float, what: str) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._crashed(f"no reply to {what}")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(_MSG_MAX)
        except TimeoutError:
            self._crashed(f"no reply to {what} within {remaining:.1f} s")
        except OSError as e:
            self._crashed(f"control socket: {e}")
        if not data:
            self._crashed(f"control socket closed during {what}")
        try:
            return json.loads(data)
        except ValueError:
            self._crashed(f"garbled reply {data[:80]!r}")

    def _crashed(self, why: str) -> Any:
        """Kill the process (it can no longer be trusted not to write) and raise."""
        if self._proc.poll() is None:
            self._proc.kill()
        try:
            status = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = None
        detail = f"vcpu process {self._proc.pid} crashed: {why}"
        if status is not None:
            detail += f" (exit status {status})"
        tail = self._stderr_tail()
        if tail:
            detail += f"; stderr: {tail}"
        self._dead = detail
        raise VcpuCrashed(detail)

    def _stderr_tail(self, n: int = 1500) -> str:
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - n))
            return self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def close(self, timeout: float = 2.0) -> None:
        """Ask the process to quit; kill it if it does not. Idempotent."""
        if self._closed:
            return
        if self._dead is None and self._proc.poll() is None:
            if self._ready:
                with contextlib.suppress(VcpuError):
                    self.request("quit", timeout=timeout)
            else:
                self._proc.terminate()  # still starting up: nothing to shut down cleanly
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._closed = True
        if self._dead is None:
            self._dead = "vcpu process closed"
        self._sock.close()
        self._stderr.close()


# ====================================================================== vCPU process side


class _Child:
    def __init__(self, ctl: socket.socket) -> None:
        self.ctl = ctl
        self.poller = select.poll()
        self.poller.register(ctl, _POLL_IN)
        self.fault: socket.socket | None = None  # to the daemon: fault messages out, wakes in
        self.fault_poller: select.poll | None = None  # ctl and fault: served while blocked
        self.ram: RamBlock | None = None
        self.shared: SharedState | None = None
        self.plan: WorkloadPlan | None = None
        self.salt = np.uint64(0)
        self.running = False
        self.throttle = 0
        self.credit = 0.0
        self.last = 0.0
        self.slice_run = 0.0
        self.sleep_until = 0.0
        self.batches = 0
        self.run_seconds = 0.0
        self.throttle_seconds = 0.0
        self.quit = False
        self.faults = 0
        self.fault_messages = 0

    # -------------------------------------------------------------- messages

    def send(self, obj: dict) -> None:
        self.ctl.send(json.dumps(obj).encode())

    def receive(self) -> None:
        """Read and handle one message (the caller knows one is ready, or blocks)."""
        data, fds, _flags, _addr = socket.recv_fds(self.ctl, _MSG_MAX, 4)
        if not data:
            self.quit = True  # the daemon is gone: stop writing its memory
            return
        msg = json.loads(data)
        try:
            reply = self.handle(msg, fds)
            reply["ok"] = True
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply["seq"] = msg.get("seq")
        self.send(reply)

    def handle(self, msg: dict, fds: list[int]) -> dict:
        op = msg.get("op")
        if op == "configure":
            return self.configure(msg, fds)  # takes ownership of the fds, even on failure
        for fd in fds:  # nobody else sends fds: do not leak them
            os.close(fd)
        now = time.monotonic()
        if op == "fence":
            return {}
        if op == "run":
            if self.plan is None:
                raise ValueError("not configured")
            if not self.running:
                self.running = True
                self.last = now
                self.credit = 0.0
                self.slice_run = 0.0
                self.sleep_until = 0.0
            return {}
        if op == "pause":
            if self.running and not self.sleep_until:
                self.run_seconds += max(0.0, now - self.last)
            self.running = False
            return {}
        if op == "throttle":
            pct = int(msg["pct"])
            if not 0 <= pct <= 99:
                raise ValueError(f"throttle must be 0..99 percent, got {pct}")
            self.throttle = pct
            if pct == 0 and self.sleep_until:
                self.sleep_until = 0.0
                self.last = now  # the interrupted sleep earns no write credit
            return {}
        if op == "stats":
            return self.stats()
        if op == "quit":
            self.quit = True
            return {}
        raise ValueError(f"unknown op {op!r}")

    def configure(self, msg: dict, fds: list[int]) -> dict:
        """Map the workload's block and the shared state, take the fault socket (fds via
        SCM_RIGHTS: block, shared state, fault socket); only while paused."""
        owned = list(fds)
        ram: RamBlock | None = None
        try:
            if self.running:
                raise ValueError("configure while running")
            if len(fds) != 3:
                raise ValueError(f"configure needs 3 fds, got {len(fds)}")
            plan = WorkloadPlan.from_json(msg["plan"])
            b = msg["block"]
            ram = RamBlock.attach(b["name"], fds[0], b["size"], max_size=b["max_size"])
            owned.remove(fds[0])
            shared = SharedState(ram.n_pages, fd=fds[1])
            owned.remove(fds[1])
            fault = socket.socket(fileno=fds[2])
            owned.remove(fds[2])
            if fault.type != socket.SOCK_SEQPACKET:
                fault.close()
                raise ValueError("the fault fd is not a SOCK_SEQPACKET socket")
        except BaseException:
            if ram is not None:
                ram.close()
            for fd in owned:
                os.close(fd)
            raise
        self.close_maps()
        fault.setblocking(False)  # a daemon that stops reading must not stop us answering it
        self.ram, self.shared, self.plan, self.fault = ram, shared, plan, fault
        self.fault_poller = select.poll()
        self.fault_poller.register(self.ctl, _POLL_IN)
        self.fault_poller.register(fault, _POLL_IN)
        self.salt = block_salt(ram.name)
        return {}

    def stats(self) -> dict:
        return {
            "pages-written": self.shared.get(H_WRITES) if self.shared else 0,
            "batches": self.batches,
            "run-seconds": round(self.run_seconds, 6),
            "throttle-seconds": round(self.throttle_seconds, 6),
            "throttle-pct": self.throttle,
            "running": self.running,
            "faults": self.faults,
            "fault-messages": self.fault_messages,
        }

    # -------------------------------------------------------------- main loop

    def wait(self, seconds: float) -> bool:
        """Wait for a control message up to ``seconds``; handle it if one came."""
        if self.poller.poll(max(0.0, seconds) * 1000.0):
            self.receive()
            return True
        return False

    def serve(self) -> None:
        self.send({"hello": 1, "pid": os.getpid()})
        while not self.quit:
            if not self.running:
                self.receive()  # blocks: a paused vCPU only waits for orders
                continue
            now = time.monotonic()
            if self.sleep_until:
                if now < self.sleep_until:
                    self.wait(self.sleep_until - now)  # throttled, but still serving the daemon
                    continue
                # the throttle sleep is over; it earns no write credit
                self.throttle_seconds += self.sleep_until - self.last
                self.last = self.sleep_until
                self.sleep_until = 0.0
                continue
            self.step(now)

    def step(self, now: float) -> None:
        plan = self.plan
        assert plan is not None and self.ram is not None and self.shared is not None
        dt = max(0.0, now - self.last)
        self.last = now
        self.slice_run += dt
        self.run_seconds += dt
        if plan.rate is None:
            k = FULL_SPEED_BATCH
            min_batch = 1
        else:
            min_batch = min(FULL_SPEED_BATCH, max(1, round(plan.rate * 0.002)))
            self.credit = min(self.credit + plan.rate * dt, max(plan.rate * 0.05, 2.0 * min_batch))
            k = min(int(self.credit), MAX_BATCH)
        if k >= min_batch:
            if self.shared.header[H_POSTCOPY]:
                # writes happen in program order, like a real vCPU's accesses: the present prefix
                # of the batch is written, and the vCPU faults on the first page that is missing
                pages = next_pages(self.shared, plan, k)
                absent = np.flatnonzero(self.shared.present[pages] == 0)
                if len(absent):
                    k = int(absent[0])
                    if not k:
                        self.await_pages(pages[:1])  # False (paused, quitting): nothing written
                        return
            write_batch(self.ram.words, self.shared, plan, self.salt, k)
            self.batches += 1
            if plan.rate is not None:
                self.credit -= k
            if self.poller.poll(0):  # serve the daemon between two batches
                self.receive()
        else:
            wait = (min_batch - self.credit) / plan.rate  # type: ignore[operator]
            if self.throttle:
                wait = min(wait, max(0.0, THROTTLE_SLICE - self.slice_run))
            self.wait(wait)
        if self.throttle and self.running and self.slice_run >= THROTTLE_SLICE:
            start = time.monotonic()
            self.run_seconds += start - self.last
            self.last = start
            self.sleep_until = start + THROTTLE_SLICE * self.throttle / (100 - self.throttle)
            self.slice_run = 0.0

    # -------------------------------------------------------------- postcopy faults

    def await_pages(self, pages: np.ndarray) -> bool:
        """Block until every page of ``pages`` is present (True), serving control messages;
        False if the vCPU was paused or told to quit meanwhile (nothing written)."""
        shared = self.shared
        assert shared is not None
        missing = missing_pages(shared, pages)
        if not len(missing):
            return True
        t0 = time.monotonic_ns()
        self.send_fault(missing)
        deadline = time.monotonic() + FAULT_RESEND
        while True:
            poller = self.fault_poller if self.fault is not None else self.poller
            assert poller is not None
            events = poller.poll(max(0.0, deadline - time.monotonic()) * 1000.0)
            for fd, _ev in events:
                if fd == self.ctl.fileno():
                    self.receive()
                    if self.quit or not self.running:
                        return False
                elif self.fault is not None and fd == self.fault.fileno():
                    self.drain_wakes()
            if not shared.header[H_POSTCOPY]:
                missing = missing[:0]  # disarmed: everything is present
            else:
                missing = missing[shared.present[missing] == 0]
            if not len(missing):
                shared.record_fault(time.monotonic_ns() - t0)
                self.faults += 1
                return True
            if time.monotonic() >= deadline:
                self.send_fault(missing)  # a lost or ignored request: ask again
                deadline = time.monotonic() + FAULT_RESEND

    def send_fault(self, missing: np.ndarray) -> None:
        if self.fault is None:
            return
        try:
            self.fault.send(missing.astype("<u4").tobytes())
            self.fault_messages += 1
        except (BlockingIOError, ConnectionError):
            pass  # the daemon is behind (or gone): the resend timer retries

    def drain_wakes(self) -> None:
        """Consume every pending wake byte: one look at ``present`` answers them all."""
        assert self.fault is not None
        while True:
            try:
                data = self.fault.recv(64)
            except BlockingIOError:
                return
            except ConnectionError:
                data = b""
            if not data:  # the daemon's end is closed: no wake will ever come again
                self.drop_fault()
                return

    def drop_fault(self) -> None:
        if self.fault is not None:
            self.fault.close()
        self.fault = self.fault_poller = None

    def close_maps(self) -> None:
        if self.ram is not None:
            self.ram.close()
        if self.shared is not None:
            self.shared.close()
        self.ram = self.shared = None
        self.drop_fault()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m guest.vcpu", description="vCPU process (started by the daemon)"
    )
    ap.add_argument("--ctl", type=int, required=True, help="fd of the control socket (SOCK_SEQPACKET)")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when the vCPU ends
    ctl = socket.socket(fileno=args.ctl)
    child = _Child(ctl)
    try:
        child.serve()
    finally:
        child.close_maps()
        ctl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
