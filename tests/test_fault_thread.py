"""The postcopy fault path's thread-side pieces: the shared return-path writer and priorities."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from control.priority import BULK_NICE, lower_thread_priority
from mig_dest.faults import RpWriter


def test_rp_writer_keeps_messages_whole_across_threads() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial writes are the norm
    writer = RpWriter(a)
    msgs = {t: bytes([t]) * 3000 for t in range(4)}
    got = bytearray()

    def read() -> None:
        while len(got) < 4 * 50 * 3000:
            got.extend(b.recv(65536))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=lambda t=t: [writer.send(msgs[t]) for _ in range(50)]) for t in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.join(10)
    assert len(got) == 4 * 50 * 3000
    for i in range(0, len(got), 3000):  # every 3000-byte message is one thread's, never mixed
        assert len(set(got[i : i + 3000])) == 1
    writer.close()
    with pytest.raises(OSError):
        writer.send(b"x")
    a.close()
    b.close()


def test_rp_writer_gives_up_when_the_peer_stops_reading() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    writer = RpWriter(a)
    with pytest.raises(TimeoutError):
        writer.send(b"x" * (16 << 20), timeout=0.2)
    writer.close()
    a.close()
    b.close()


def test_lower_thread_priority_restores() -> None:
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    result: dict[str, int] = {}

    def work() -> None:
        me = threading.get_native_id()
        restore = lower_thread_priority()
        result["low"] = os.getpriority(os.PRIO_PROCESS, me)
        restore()
        result["after"] = os.getpriority(os.PRIO_PROCESS, me)

    t = threading.Thread(target=work)  # a thread of its own: the test runner's stays as it is
    t.start()
    t.join()
    assert result["low"] == max(before, BULK_NICE)
    if os.geteuid() == 0:  # going back up needs CAP_SYS_NICE
        assert result["after"] == before
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
