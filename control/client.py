"""A small trio QMP client, for migctl, tests and demos (works against real QEMU too)::

    async with QmpClient.connect("/run/mig-source.qmp") as qmp:
        await qmp.execute("migrate", {"uri": "tcp:10.0.0.2:4444"})
        with qmp.events() as events:          # a subscription: a trio receive channel
            async for ev in events:
                print(ev["event"], ev.get("data"))

Requests may be issued concurrently from several tasks; replies are routed by ``id``.
Events are delivered to every subscription made with :meth:`QmpClient.events` (each has a
bounded buffer; a subscriber that falls behind loses events rather than stalling replies).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import structlog
import trio

MAX_LINE: Final = 64 << 20
DEFAULT_EVENT_BUFFER: Final = 256


class QmpClientError(Exception):
    """Base of the client's errors."""


class QmpConnectionError(QmpClientError):
    """The connection failed, or closed while a reply was awaited."""


class QmpProtocolError(QmpClientError):
    """The server sent something that is not QMP."""


class QmpCommandError(QmpClientError):
    """The server answered a command with an error reply."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(f"{cls}: {desc}")
        self.error_class = cls
        self.desc = desc


class _Pending:
    """One outstanding execute: an Event plus the reply slot."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None


class QmpClient:
    """A negotiated QMP connection. Create with :meth:`connect`."""

    def __init__(self, stream: trio.abc.Stream, log: Any = None) -> None:
        self._stream = stream
        self._log = log if log is not None else structlog.get_logger("control.qmp_client")
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._subscribers: list[trio.MemorySendChannel[dict[str, Any]]] = []
        self._send_lock = trio.Lock()
        self._buf = bytearray()
        self._closed = False
        self.greeting: dict[str, Any] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        negotiate: bool = True,
        timeout: float | None = None,
        log: Any = None,
    ) -> AsyncIterator[QmpClient]:
        """Connect to a UNIX socket, read the greeting, negotiate, and run the reader task.

        ``timeout`` bounds connecting, the greeting and the negotiation."""
        deadline = trio.current_time() + (timeout if timeout is not None else math.inf)
        try:
            with trio.fail_at(deadline):
                stream = await trio.open_unix_socket(os.fspath(path))
        except OSError as e:
            raise QmpConnectionError(f"cannot connect to {os.fspath(path)}: {e.strerror or e}") from e
        except trio.TooSlowError:
            raise QmpConnectionError(f"timed out connecting to {os.fspath(path)}") from None
        async with stream:
            client = cls(stream, log)
            try:
                with trio.fail_at(deadline):
                    greeting = await client._read_message()
            except trio.TooSlowError:
                raise QmpConnectionError("timed out waiting for the QMP greeting") from None
            if greeting is None or not isinstance(greeting.get("QMP"), dict):
                raise QmpProtocolError(f"expected a QMP greeting, got {greeting!r}")
            client.greeting = greeting
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client._reader)
                    try:
                        if negotiate:
                            try:
                                with trio.fail_at(deadline):
                                    await client.execute("qmp_capabilities")
                            except trio.TooSlowError:
                                raise QmpConnectionError("timed out negotiating capabilities") from None
                        yield client
                    finally:
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # the nursery wraps the caller's exception; hand back the original one
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise

    @property
    def server_version(self) -> dict[str, Any]:
        return self.greeting.get("QMP", {}).get("version", {})

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; return its ``return`` value or raise :class:`QmpCommandError`."""
        if self._closed:
            raise QmpConnectionError("connection closed")
        msg_id = f"migctl-{next(self._ids)}"
        msg: dict[str, Any] = {"execute": name, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        pending = self._pending[msg_id] = _Pending()
        try:
            async with self._send_lock:  # one message must not interleave with another
                try:
                    await self._stream.send_all(json.dumps(msg).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise QmpConnectionError(f"send failed: {e}") from e
            await pending.done.wait()
        finally:
            del self._pending[msg_id]
        reply = pending.reply
        if reply is None:
            raise QmpConnectionError(f"connection closed while waiting for the reply to {name!r}")
        if "error" in reply:
            err = reply["error"]
            raise QmpCommandError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
        return reply.get("return")

    @contextlib.contextmanager
    def events(
        self, buffer: int = DEFAULT_EVENT_BUFFER
    ) -> Iterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Subscribe to events received from now on; iteration ends when the connection does."""
        send, recv = trio.open_memory_channel[dict[str, Any]](buffer)
        if self._closed:
            send.close()
        else:
            self._subscribers.append(send)
        try:
            with recv:
                yield recv
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    async def wait_event(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the next event called ``name`` (raises trio.TooSlowError on timeout)."""
        with self.events() as events, trio.fail_after(timeout if timeout is not None else float("inf")):
            async for ev in events:
                if ev.get("event") == name:
                    return ev
        raise QmpConnectionError(f"connection closed while waiting for event {name!r}")

    # ---- internals ----------------------------------------------------------------------------

    async def _read_message(self) -> dict[str, Any] | None:
        """Next message, or None at EOF. The server sends one JSON object per line."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    raise QmpProtocolError(f"bad JSON from server: {e}") from e
                if not isinstance(msg, dict):
                    raise QmpProtocolError(f"server message is not an object: {msg!r}")
                return msg
            if len(self._buf) > MAX_LINE:
                raise QmpProtocolError("server message too long")
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not data:
                return None
            self._buf += data

    async def _reader(self) -> None:
        try:
            while (msg := await self._read_message()) is not None:
                if "event" in msg:
                    self._deliver_event(msg)
                    continue
                pending = self._pending.get(str(msg.get("id")))
                if pending is None:
                    self._log.warning("qmp_client.unroutable_reply", reply=msg)
                    continue
                pending.reply = msg
                pending.done.set()
        except QmpProtocolError as e:
            self._log.error("qmp_client.protocol_error", error=str(e))
        finally:
            # wake everyone up: executes raise, event iterations end
            self._closed = True
            for pending in self._pending.values():
                pending.done.set()
            for send in self._subscribers:
                send.close()
            self._subscribers.clear()

    def _deliver_event(self, msg: dict[str, Any]) -> None:
        for send in list(self._subscribers):
            try:
                send.send_nowait(msg)
            except trio.WouldBlock:
                self._log.warning("qmp_client.event_dropped", qmp_event=msg.get("event"))
            except trio.BrokenResourceError:  # subscriber closed its end
                self._subscribers.remove(send)
