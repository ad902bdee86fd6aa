"""The source's gathered send (sendmsg of an iovec array from guest RAM) writes exactly the
bytes described, across partial sends on a small non-blocking socket buffer, and stops on abort."""

from __future__ import annotations

import socket
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mig_source.gather import buffer_iov, sendmsg_all
from protocol.encoder import MainEncoder

PAGE = 4096


def _recv_all(sock: socket.socket, out: list[bytes]) -> None:
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        out.append(data)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2047), min_size=1, max_size=1500), st.integers(0, 2**32 - 1))
def test_sendmsg_all_writes_the_described_bytes(rows: list[int], seed: int) -> None:
    ram = np.random.default_rng(seed).integers(0, 256, (2048, PAGE), dtype=np.uint8)
    piov = MainEncoder().pages_iov("pc.ram", ram, np.array(rows, dtype=np.intp))
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # many partial sends
    a.setblocking(False)
    got: list[bytes] = []
    reader = threading.Thread(target=_recv_all, args=(b, got))
    reader.start()
    try:
        sent = sendmsg_all(a.fileno(), piov.iov)
    finally:
        a.close()
        reader.join()
        b.close()
    assert sent == piov.nbytes
    assert b"".join(got) == piov.tobytes()


def test_buffer_iov_and_abort() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        data = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)
        iov, keep = buffer_iov(data)
        abort = threading.Event()
        timer = threading.Timer(0.2, abort.set)
        timer.start()
        sent = sendmsg_all(a.fileno(), iov, abort)  # nobody reads: blocks until aborted
        timer.join()
        assert 0 < sent < data.nbytes
        assert keep is not None
    finally:
        a.close()
        b.close()
