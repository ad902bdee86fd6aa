"""A QMP server on trio, wire-compatible with QEMU 7.2's QMP monitor.

Clients written for QEMU (the ``qemu.qmp`` library, libvirt-style JSON clients, socat) drive
our daemons unchanged. What we reproduce from QEMU (monitor/qmp.c, qapi/qmp-dispatch.c):

* the greeting ``{"QMP": {"version": ..., "capabilities": ["oob"]}}`` and capabilities
  negotiation mode, in which every command but ``qmp_capabilities`` fails with CommandNotFound;
* framing by brace counting (several messages per line, one message over several lines);
* error texts: "JSON parse error, ...", "QMP input must be a JSON object", "The command X has
  not been found", "Parameter 'x' is missing", ...; ``id`` echoed verbatim;
* in-band requests run strictly in order per connection; ``exec-oob`` (when the client
  enabled oob) runs at once for commands registered with ``allow_oob``;
* events as ``{"timestamp": {"seconds", "microseconds"}, "event", "data"}`` to negotiated
  clients only; output lines end in CRLF like QEMU's.

Each connection has its own reader, dispatcher and writer task, so a slow handler or a
client that stops reading only affects that client. Everything sent to a client goes
through a bounded queue; an event that finds it full drops the client, since the
daemon must never wait for a monitor.

Usage::

    commands = CommandRegistry()

    @commands.command("migrate", Arg("uri", str), Arg("resume", bool, default=False))
    async def migrate(args: dict[str, Any]) -> None: ...

    server = QmpServer("/run/mig-source.qmp", commands, log)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        server.emit("MIGRATION", {"status": "active"})
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import socket as pysocket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
import trio

from .jsonstream import DEFAULT_MAX_MESSAGE, JsonSplitter, SplitError
from .qmp_schema import (
    ANY,
    Arg,
    ArgType,
    Enum,
    ListOf,
    QmpError,
    Struct,
    TypeSpec,
    validate_members,
)

__all__ = [
    "ANY",
    "Arg",
    "ArgType",
    "Command",
    "CommandRegistry",
    "Enum",
    "Handler",
    "ListOf",
    "QmpError",
    "QmpServer",
    "Struct",
    "TypeSpec",
]

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

QEMU_VERSION: Final = (7, 2, 0)
DEFAULT_PACKAGE: Final = "qemu-live-migration"
# QEMU's in-band request queue depth (QMP_REQ_QUEUE_LEN_MAX); beyond it we stop reading
REQUEST_QUEUE_LEN: Final = 8
DEFAULT_OUT_QUEUE: Final = 1024
DEFAULT_WRITE_TIMEOUT: Final = 10.0
RECV_CHUNK: Final = 65536

BUILTIN_COMMANDS: Final = ("qmp_capabilities", "query-commands", "query-version")


@dataclass(frozen=True)
class Command:
    """A registered command. ``args=None`` passes arguments through unvalidated."""

    name: str
    handler: Handler
    args: tuple[Arg, ...] | None = ()
    allow_oob: bool = False

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.args is None:
            return arguments
        return validate_members(self.args, arguments)


class CommandRegistry:
    """Name -> :class:`Command`. Build one per daemon and hand it to :class:`QmpServer`."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def register(
        self,
        name: str,
        handler: Handler,
        args: Sequence[Arg] | None = (),
        *,
        allow_oob: bool = False,
    ) -> None:
        if name in self._commands or name in BUILTIN_COMMANDS:
            raise ValueError(f"QMP command {name!r} is already registered")
        if args is not None:
            names = [a.name for a in args]
            if len(set(names)) != len(names):
                raise ValueError(f"QMP command {name!r}: duplicate argument names")
        self._commands[name] = Command(name, handler, None if args is None else tuple(args), allow_oob)

    def command(
        self, name: str, *args: Arg, allow_oob: bool = False, raw: bool = False
    ) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`register`; ``raw=True`` skips argument validation."""

        def deco(handler: Handler) -> Handler:
            self.register(name, handler, None if raw else args, allow_oob=allow_oob)
            return handler

        return deco

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        return list(self._commands)

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __len__(self) -> int:
        return len(self._commands)


def _encode(msg: dict[str, Any]) -> bytes:
    # QEMU escapes non-ASCII and terminates every message with CRLF (monitor_puts)
    return json.dumps(msg, allow_nan=False).encode("ascii") + b"\r\n"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid literal '{name}'")


def _parse(item: bytes | SplitError) -> Any:
    """A framed message -> JSON value, or a QmpError describing why it is not JSON."""
    if isinstance(item, SplitError):
        return QmpError(item.desc)
    try:
        # NaN/Infinity are not JSON and QEMU's parser rejects them too
        return json.loads(item.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return QmpError("JSON parse error, invalid UTF-8 sequence")
    except json.JSONDecodeError as e:
        return QmpError(f"JSON parse error, {e.msg} (line {e.lineno} column {e.colno})")
    except (ValueError, RecursionError) as e:
        return QmpError(f"JSON parse error, {e}")


class _Client:
    """Per-connection state."""

    def __init__(self, cid: int, stream: trio.SocketStream, out_queue: int) -> None:
        self.id = cid
        self.stream = stream
        self.out_send, self.out_recv = trio.open_memory_channel[bytes](out_queue)
        self.negotiated = False
        self.oob = False
        self.closing = False  # no more events; set on EOF (graceful) and on drop
        self.dropped = False  # hard close: pending requests and replies are discarded
        self.reader_scope = trio.CancelScope()
        self.writer_scope = trio.CancelScope()

    def drop(self) -> None:
        """Hard close: stop I/O now and wake a dispatcher blocked on a full queue."""
        if self.dropped:
            return
        self.dropped = self.closing = True
        self.reader_scope.cancel()
        self.writer_scope.cancel()
        self.out_recv.close()  # blocked senders get BrokenResourceError

    def queue_nowait(self, line: bytes) -> bool:
        """Queue without waiting; False (and the client dropped) when the queue is full."""
        try:
            self.out_send.send_nowait(line)
        except trio.WouldBlock:
            self.drop()
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def queue(self, line: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.out_send.send(line)


class QmpServer:
    """QMP server on a UNIX socket. See the module docstring."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        commands: CommandRegistry,
        log: Any = None,
        *,
        version: tuple[int, int, int] = QEMU_VERSION,
        package: str = DEFAULT_PACKAGE,
        out_queue: int = DEFAULT_OUT_QUEUE,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
        backlog: int = 16,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.commands = commands
        self.log = log if log is not None else structlog.get_logger("control.qmp")
        self.version = version
        self.package = package
        self._out_queue = out_queue
        self._write_timeout = write_timeout
        self._max_message = max_message
        self._backlog = backlog
        self._clients: set[_Client] = set()
        self._ids = itertools.count(1)
        self._builtins: dict[str, Command] = {
            "qmp_capabilities": Command(
                "qmp_capabilities", self._noop, (Arg("enable", ListOf(Enum("oob")), required=False),)
            ),
            "query-commands": Command("query-commands", self._query_commands),
            "query-version": Command("query-version", self._query_version),
        }

    # ---- public API -------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Broadcast an event to every negotiated client. Never blocks; ``data=None`` omits
        the member, as QEMU does for events without data (STOP, RESUME...)."""
        now = time.time()
        seconds = math.floor(now)
        msg: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
            "event": event,
        }
        if data is not None:
            msg["data"] = data
        line = _encode(msg)
        for c in list(self._clients):
            if not c.negotiated or c.closing:
                continue
            if not c.queue_nowait(line) and c.dropped:
                self.log.warning("qmp.client_dropped", client=c.id, reason="output queue overflow")

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started(socket_path)``."""
        sock = await self._bind()
        listener = trio.SocketListener(sock)
        ino = os.stat(self.socket_path).st_ino
        self.log.info("qmp.listening", path=self.socket_path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.socket_path)
                await trio.serve_listeners(self._handle_client, [listener], handler_nursery=nursery)
        finally:
            with contextlib.suppress(OSError):
                # only remove the socket if it is still ours (a successor may have rebound it)
                if os.stat(self.socket_path).st_ino == ino:
                    os.unlink(self.socket_path)
            with trio.CancelScope(shield=True):
                await listener.aclose()

    # ---- socket setup -----------------------------------------------------------------------

    async def _bind(self) -> trio.socket.SocketType:
        await self._remove_stale_socket()
        sock = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            await sock.bind(self.socket_path)
            sock.listen(self._backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.socket_path} exists and is not a socket")
        # a socket that accepts connections belongs to a live daemon: do not steal it
        probe = trio.socket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
        try:
            with trio.fail_after(1.0):
                await probe.connect(self.socket_path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listening: stale
        except trio.TooSlowError:
            raise OSError(f"{self.socket_path} is in use by another process") from None
        else:
            raise OSError(f"{self.socket_path} is in use by another process")
        finally:
            probe.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.log.info("qmp.stale_socket_removed", path=self.socket_path)

    # ---- per connection ---------------------------------------------------------------------

    def _greeting(self) -> dict[str, Any]:
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": ["oob"],
            }
        }

    async def _handle_client(self, stream: trio.SocketStream) -> None:
        c = _Client(next(self._ids), stream, self._out_queue)
        log = self.log.bind(client=c.id)
        log.info("qmp.client_connected")
        self._clients.add(c)
        try:
            c.out_send.send_nowait(_encode(self._greeting()))
            req_send, req_recv = trio.open_memory_channel[Any](REQUEST_QUEUE_LEN)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, c, log)
                nursery.start_soon(self._reader, c, req_send, nursery, log)
                nursery.start_soon(self._dispatcher, c, req_recv, log)
        finally:
            self._clients.discard(c)
            c.closing = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            log.info("qmp.client_disconnected", dropped=c.dropped)

    async def _reader(
        self,
        c: _Client,
        req_send: trio.MemorySendChannel[Any],
        nursery: trio.Nursery,
        log: Any,
    ) -> None:
        splitter = JsonSplitter(self._max_message)
        async with req_send:  # closing it tells the dispatcher that input has ended
            with c.reader_scope:
                while True:
                    try:
                        data = await c.stream.receive_some(RECV_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        c.drop()
                        return
                    if not data:
                        break
                    for item in splitter.feed(data):
                        req = _parse(item)
                        if c.oob and isinstance(req, dict) and "exec-oob" in req and "execute" not in req:
                            # out-of-band: overtakes queued in-band requests, like QEMU's I/O thread
                            nursery.start_soon(self._run_one, c, req, log)
                        else:
                            try:
                                await req_send.send(req)
                            except trio.BrokenResourceError:  # dispatcher gone: client dropped
                                return
        # EOF: queued requests still run and their replies are flushed (socat one-shots
        # half-close after sending); events stop now
        c.closing = True

    async def _dispatcher(self, c: _Client, req_recv: trio.MemoryReceiveChannel[Any], log: Any) -> None:
        try:
            async with req_recv:
                async for req in req_recv:
                    if c.dropped:  # like QEMU: a vanished client's pending requests are dropped
                        break
                    await self._run_one(c, req, log)
        finally:
            c.out_send.close()  # lets the writer drain and finish

    async def _writer(self, c: _Client, log: Any) -> None:
        with c.writer_scope:
            try:
                async for line in c.out_recv:
                    with trio.move_on_after(self._write_timeout) as timeout:
                        await c.stream.send_all(line)
                    if timeout.cancelled_caught:
                        log.warning("qmp.client_dropped", reason="write timeout")
                        c.drop()
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                log.info("qmp.client_write_failed", error=str(e))
                c.drop()

    # ---- dispatch ---------------------------------------------------------------------------

    async def _run_one(self, c: _Client, req: Any, log: Any) -> None:
        reply, negotiated = await self._dispatch(c, req, log)
        if reply is not None:
            try:
                line = _encode(reply)
            except (TypeError, ValueError) as e:  # a handler returned something not JSON-able
                log.error("qmp.bad_return_value", error=str(e))
                fallback: dict[str, Any] = {"error": QmpError(f"internal error: {e}").to_json()}
                if isinstance(req, dict) and "id" in req:
                    fallback["id"] = req["id"]
                line = _encode(fallback)
            await c.queue(line)
        if negotiated is not None:
            # switch to command mode only after the reply is queued, so no event precedes it
            c.negotiated = True
            c.oob = negotiated

    async def _dispatch(self, c: _Client, req: Any, log: Any) -> tuple[dict[str, Any] | None, bool | None]:
        """Returns (reply, oob-enabled if this request completed negotiation else None)."""
        if isinstance(req, QmpError):
            return {"error": req.to_json()}, None
        if not isinstance(req, dict):
            return {"error": QmpError("QMP input must be a JSON object").to_json()}, None
        reply: dict[str, Any]
        negotiated: bool | None = None
        name = "?"
        try:
            name, oob = self._check_request(req, allow_oob=c.oob)
            cmd = self._lookup(c, name)
            if oob and not cmd.allow_oob:
                raise QmpError(f"The command {name} does not support OOB")
            args = cmd.validate(req.get("arguments", {}))
            if name == "qmp_capabilities":
                negotiated = "oob" in args.get("enable", [])
                result: Any = {}
            else:
                log.debug("qmp.command", command=name, arguments=args)
                result = await cmd.handler(args)
            reply = {"return": {} if result is None else result}
        except QmpError as e:
            log.info("qmp.command_error", command=name, error_class=e.cls, desc=e.desc)
            reply = {"error": e.to_json()}
        except Exception as e:
            # a handler bug must not kill the monitor: report it like QEMU's GenericError
            log.exception("qmp.command_crashed", command=name)
            reply = {"error": QmpError(f"internal error in '{name}': {e}").to_json()}
        if "id" in req:
            reply["id"] = req["id"]
        return reply, negotiated

    @staticmethod
    def _check_request(req: dict[str, Any], *, allow_oob: bool) -> tuple[str, bool]:
        """QEMU's qmp_dispatch_check_obj: returns (command name, is exec-oob)."""
        exec_key: str | None = None
        for key, value in req.items():
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise QmpError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise QmpError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QmpError("QMP input lacks member 'execute'")
        return req[exec_key], exec_key == "exec-oob"

    def _lookup(self, c: _Client, name: str) -> Command:
        if not c.negotiated:
            if name != "qmp_capabilities":
                raise QmpError(
                    "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
                )
            return self._builtins[name]
        if name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        cmd = self._builtins.get(name) or self.commands.get(name)
        if cmd is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        return cmd

    # ---- built-in commands --------------------------------------------------------------------

    @staticmethod
    async def _noop(args: dict[str, Any]) -> None:
        return None

    async def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        names = [*BUILTIN_COMMANDS, *self.commands.names()]
        return [{"name": n} for n in names]

    async def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._greeting()["QMP"]["version"]
