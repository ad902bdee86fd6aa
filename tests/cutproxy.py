"""A TCP proxy for fault injection: forwards connections to a target it can change, and cuts
every open connection on demand (both sides see the connection end, as when a link breaks)."""

from __future__ import annotations

import trio

CHUNK = 1 << 16


class CutProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port: int | None = None
        self.connections = 0  # accepted so far
        self.cuts = 0
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            for lst in listeners:
                nursery.start_soon(self._accept, lst, nursery)

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    async def _accept(self, lst: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with lst:
            while True:
                client = await lst.accept()
                self.connections += 1
                nursery.start_soon(self._forward, client)

    async def _forward(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._scopes.append(scope)
        try:
            with scope:
                server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with client, server, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server)
                    nursery.start_soon(self._pump, server, client)
        finally:
            self._scopes.remove(scope)
            await client.aclose()

    @staticmethod
    async def _pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
        try:
            while data := await a.receive_some(CHUNK):
                await b.send_all(data)
            await b.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def cut(self) -> int:
        """Break every open connection; returns how many there were."""
        n = len(self._scopes)
        for scope in list(self._scopes):
            scope.cancel()
        self.cuts += 1
        return n
