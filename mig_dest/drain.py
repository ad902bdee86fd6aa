"""Reading a non-blocking connection into a decoder: shared by the receive loop and the fault thread."""

from __future__ import annotations

from typing import Protocol

from protocol.decoder import MainDecoder


class Recv(Protocol):
    """A non-blocking connection: ``recv_into`` raises BlockingIOError when nothing is queued."""

    def recv_into(self, buffer: memoryview) -> int: ...


def drain(sock: Recv, dec: MainDecoder, limit: int) -> tuple[int, bool]:
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
