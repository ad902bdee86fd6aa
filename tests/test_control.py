"""control/: QMP server (protocol, errors, events, slow clients), framing, schema, our trio
client, formatting helpers and logging setup."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from control import format as fmt
from control.client import QmpClient, QmpCommandError, QmpConnectionError
from control.jsonstream import MAX_NESTING, JsonSplitter, SplitError
from control.logsetup import configure_logging
from control.qmp_schema import Arg, Enum, ListOf, Struct, validate_members
from control.qmp_server import CommandRegistry, QmpError, QmpServer

pytestmark = pytest.mark.timeout(30)

# ---- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="qmp", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Raw:
    """A bare JSON-lines client, to see exactly what goes over the wire."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, path: Path, negotiate: bool = False) -> Raw:
        raw = cls(await trio.open_unix_socket(str(path)))
        raw.greeting = await raw.recv()
        if negotiate:
            await raw.send({"execute": "qmp_capabilities"})
            assert await raw.recv() == {"return": {}}
        return raw

    async def send(self, msg: Any) -> None:
        data = msg if isinstance(msg, bytes) else json.dumps(msg).encode() + b"\n"
        await self.stream.send_all(data)

    async def recv_line(self) -> bytes | None:
        while (nl := self.buf.find(b"\n")) < 0:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                return None
            self.buf += data
        line = bytes(self.buf[: nl + 1])
        del self.buf[: nl + 1]
        return line

    async def recv(self) -> Any:
        with trio.fail_after(5):
            line = await self.recv_line()
        assert line is not None, "connection closed"
        assert line.endswith(b"\r\n")  # QEMU's line ending
        return json.loads(line)

    async def call(self, msg: Any) -> Any:
        await self.send(msg)
        return await self.recv()

    async def aclose(self) -> None:
        await self.stream.aclose()


class Fake:
    """A command registry with test commands and hooks to control them."""

    def __init__(self) -> None:
        self.reg = CommandRegistry()
        self.release = trio.Event()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.server: QmpServer | None = None
        reg = self.reg

        @reg.command(
            "echo", Arg("value", object), Arg("count", int, default=1), Arg("tag", str, required=False)
        )
        async def echo(args: dict[str, Any]) -> Any:
            self.calls.append(("echo", args))
            return args

        @reg.command(
            "set-caps",
            Arg(
                "capabilities",
                ListOf(Struct(Arg("capability", Enum("xbzrle", "events")), Arg("state", bool))),
            ),
        )
        async def set_caps(args: dict[str, Any]) -> None:
            self.calls.append(("set-caps", args))

        @reg.command("fail", Arg("cls", str, default="GenericError"))
        async def fail(args: dict[str, Any]) -> None:
            raise QmpError("it failed on purpose", args["cls"])

        @reg.command("crash")
        async def crash(args: dict[str, Any]) -> None:
            raise RuntimeError("boom")

        @reg.command("bad-return")
        async def bad_return(args: dict[str, Any]) -> Any:
            return {"x": object()}

        @reg.command("wait")
        async def wait(args: dict[str, Any]) -> str:
            await self.release.wait()
            return "released"

        @reg.command("sleep", Arg("seconds", float))
        async def sleep(args: dict[str, Any]) -> float:
            await trio.sleep(args["seconds"])
            return args["seconds"]

        @reg.command("oob-ping", allow_oob=True)
        async def oob_ping(args: dict[str, Any]) -> str:
            return "pong"

        @reg.command("emit", Arg("name", str), Arg("data", dict, required=False))
        async def emit(args: dict[str, Any]) -> None:
            assert self.server is not None
            self.server.emit(args["name"], args.get("data"))

        @reg.command("free-form", raw=True)
        async def free_form(args: dict[str, Any]) -> Any:
            return args


async def start_server(nursery: trio.Nursery, path: Path, fake: Fake, **kw: Any) -> QmpServer:
    server = QmpServer(path, fake.reg, **kw)
    fake.server = server
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def fake() -> Fake:
    return Fake()


@pytest.fixture
async def server(nursery: trio.Nursery, sock_dir: Path, fake: Fake) -> AsyncIterator[QmpServer]:
    yield await start_server(nursery, sock_dir / "qmp.sock", fake)


def path_of(server: QmpServer) -> Path:
    return Path(server.socket_path)


# ---- greeting and negotiation --------------------------------------------------------------------


async def test_greeting(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server))
    assert raw.greeting == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "qemu-live-migration"},
            "capabilities": ["oob"],
        }
    }


async def test_negotiation_required(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server))
    expect = {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
    }
    assert await raw.call({"execute": "echo", "arguments": {"value": 1}, "id": 7}) == {
        "error": expect,
        "id": 7,
    }
    assert await raw.call({"execute": "no-such-command"}) == {"error": expect}
    assert await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}) == {
        "return": {},
        "id": "n",
    }
    assert await raw.call({"execute": "echo", "arguments": {"value": 1}}) == {
        "return": {"value": 1, "count": 1}
    }
    again = await raw.call({"execute": "qmp_capabilities"})
    assert again["error"]["class"] == "CommandNotFound"
    assert "already complete" in again["error"]["desc"]


async def test_negotiation_bad_capability(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server))
    reply = await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}})
    assert reply == {
        "error": {"class": "GenericError", "desc": "Parameter 'enable[0]' does not accept value 'bogus'"}
    }
    # still in negotiation mode, and a correct negotiation works afterwards
    assert (await raw.call({"execute": "query-version"}))["error"]["class"] == "CommandNotFound"
    assert await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}


async def test_builtin_queries(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    names = {c["name"] for c in (await raw.call({"execute": "query-commands"}))["return"]}
    assert {"qmp_capabilities", "query-commands", "query-version", "echo", "wait"} <= names
    version = (await raw.call({"execute": "query-version"}))["return"]
    assert version["qemu"] == {"micro": 0, "minor": 2, "major": 7}


# ---- requests, ids and errors --------------------------------------------------------------------


@pytest.mark.parametrize("msg_id", ["abc", 42, [1, {"a": None}], {"k": "v"}, None, 1.5])
async def test_id_echoed_verbatim(server: QmpServer, msg_id: Any) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    ok = await raw.call({"execute": "echo", "arguments": {"value": "x"}, "id": msg_id})
    assert ok == {"return": {"value": "x", "count": 1}, "id": msg_id}
    err = await raw.call({"execute": "nope", "id": msg_id})
    assert err["id"] == msg_id and err["error"]["class"] == "CommandNotFound"


ERROR_CASES = (
    ({"execute": "nope"}, "CommandNotFound", "The command nope has not been found"),
    ({"execute": "echo"}, "GenericError", "Parameter 'value' is missing"),
    (
        {"execute": "echo", "arguments": {"value": 1, "foo": 2}},
        "GenericError",
        "Parameter 'foo' is unexpected",
    ),
    (
        {"execute": "echo", "arguments": {"value": 1, "count": "3"}},
        "GenericError",
        "Invalid parameter type for 'count', expected: integer",
    ),
    (
        {"execute": "echo", "arguments": {"value": 1, "count": True}},
        "GenericError",
        "Invalid parameter type for 'count', expected: integer",
    ),
    (
        {"execute": "set-caps", "arguments": {"capabilities": [{"capability": "xbzrle", "state": 1}]}},
        "GenericError",
        "Invalid parameter type for 'capabilities[0].state', expected: boolean",
    ),
    (
        {"execute": "set-caps", "arguments": {"capabilities": [{"capability": "nope", "state": True}]}},
        "GenericError",
        "Parameter 'capabilities[0].capability' does not accept value 'nope'",
    ),
    (
        {"execute": "set-caps", "arguments": {"capabilities": [{"capability": "events"}]}},
        "GenericError",
        "Parameter 'capabilities[0].state' is missing",
    ),
    ({"execute": 5}, "GenericError", "QMP input member 'execute' must be a string"),
    ({"execute": "echo", "arguments": [1]}, "GenericError", "QMP input member 'arguments' must be an object"),
    ({"execute": "echo", "extra": 1}, "GenericError", "QMP input member 'extra' is unexpected"),
    ({"arguments": {}}, "GenericError", "QMP input lacks member 'execute'"),
    # exec-oob is only accepted once the client enabled the oob capability
    ({"exec-oob": "oob-ping"}, "GenericError", "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "fail"}, "GenericError", "it failed on purpose"),
    ({"execute": "fail", "arguments": {"cls": "DeviceNotFound"}}, "DeviceNotFound", "it failed on purpose"),
)


@pytest.mark.parametrize(("msg", "cls", "desc"), ERROR_CASES)
async def test_errors(server: QmpServer, msg: dict[str, Any], cls: str, desc: str) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    assert await raw.call({**msg, "id": "e"}) == {"error": {"class": cls, "desc": desc}, "id": "e"}
    # the connection is still usable
    assert (await raw.call({"execute": "echo", "arguments": {"value": 0}}))["return"]["value"] == 0


async def test_malformed_input_keeps_connection(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    for bad, desc_start in [
        (b'{"execute": nope}\n', "JSON parse error, "),
        (b"garbage\n", "JSON parse error, "),
        (b"}\n", "JSON parse error, stray '}'"),
        (b'{"execute": "echo", "arguments": {"value": NaN}}\n', "JSON parse error, "),
        (b'{"execute": "\xff"}\n', "JSON parse error, invalid UTF-8"),
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b'"str"\n', "QMP input must be a JSON object"),
    ]:
        await raw.send(bad)
        reply = await raw.recv()
        assert set(reply) == {"error"}, bad  # no id: the server could not read one
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"].startswith(desc_start), (bad, reply)
    assert (await raw.call({"execute": "echo", "arguments": {"value": "alive"}}))["return"][
        "value"
    ] == "alive"


async def test_handler_crash_is_generic_error(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    reply = await raw.call({"execute": "crash", "id": 1})
    assert reply["error"]["class"] == "GenericError" and "boom" in reply["error"]["desc"]
    reply = await raw.call({"execute": "bad-return", "id": 2})
    assert reply["error"]["class"] == "GenericError" and reply["id"] == 2
    assert (await raw.call({"execute": "echo", "arguments": {"value": 1}}))["return"]["value"] == 1


async def test_framing_like_qemu(server: QmpServer) -> None:
    """Several messages per line, a message over several lines, and byte-by-byte input."""
    raw = await Raw.open(path_of(server))
    await raw.send(
        b'{"execute": "qmp_capabilities"}{"execute": "echo", "arguments": {"value": "}{\\""}, "id": 1}'
    )
    await raw.send(b'\n{\n  "execute": "echo",\n  "arguments": {"value": [1, {"a": "]"}]},\n  "id": 2\n}\n')
    for b in b'{"execute": "echo", "arguments": {"value": "\\u00e9"}, "id": 3}':
        await raw.send(bytes([b]))
    assert await raw.recv() == {"return": {}}
    assert await raw.recv() == {"return": {"value": '}{"', "count": 1}, "id": 1}
    assert await raw.recv() == {"return": {"value": [1, {"a": "]"}], "count": 1}, "id": 2}
    assert await raw.recv() == {"return": {"value": "é", "count": 1}, "id": 3}


async def test_unvalidated_command(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    assert (await raw.call({"execute": "free-form", "arguments": {"a": 1, "b": [2]}}))["return"] == {
        "a": 1,
        "b": [2],
    }


async def test_eof_after_requests_still_answers(server: QmpServer) -> None:
    """`echo '...' | socat - UNIX-CONNECT:sock` half-closes right after sending."""
    raw = await Raw.open(path_of(server))
    await raw.send(
        b'{"execute": "qmp_capabilities"}\n'
        b'{"execute": "sleep", "arguments": {"seconds": 0.05}, "id": 1}\n'
        b'{"execute": "echo", "arguments": {"value": 2}, "id": 2}\n'
    )
    await raw.stream.send_eof()
    assert await raw.recv() == {"return": {}}
    assert await raw.recv() == {"return": 0.05, "id": 1}
    assert (await raw.recv())["id"] == 2
    with trio.fail_after(5):
        assert await raw.recv_line() is None  # then the server closes


# ---- ordering and concurrency --------------------------------------------------------------------


async def test_in_order_per_client_but_clients_independent(server: QmpServer, fake: Fake) -> None:
    a = await Raw.open(path_of(server), negotiate=True)
    b = await Raw.open(path_of(server), negotiate=True)
    await a.send({"execute": "wait", "id": "slow"})
    await a.send({"execute": "echo", "arguments": {"value": "fast"}, "id": "fast"})
    # b is not held up by a's blocked handler
    assert (await b.call({"execute": "echo", "arguments": {"value": "b"}, "id": "b"}))["id"] == "b"
    # a's second request waits behind the first: nothing arrives yet
    with trio.move_on_after(0.1) as cs:
        await a.recv_line()
    assert cs.cancelled_caught
    fake.release.set()
    assert await a.recv() == {"return": "released", "id": "slow"}
    assert (await a.recv())["id"] == "fast"


async def test_oob_overtakes_in_band(server: QmpServer, fake: Fake) -> None:
    raw = await Raw.open(path_of(server))
    assert await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}) == {"return": {}}
    await raw.send({"execute": "wait", "id": "inband"})
    assert await raw.call({"exec-oob": "oob-ping", "id": "oob"}) == {"return": "pong", "id": "oob"}
    reply = await raw.call({"exec-oob": "echo", "arguments": {"value": 1}, "id": "x"})
    assert reply == {
        "error": {"class": "GenericError", "desc": "The command echo does not support OOB"},
        "id": "x",
    }
    fake.release.set()
    assert await raw.recv() == {"return": "released", "id": "inband"}


# ---- events --------------------------------------------------------------------------------------


async def test_events_to_all_negotiated_clients(server: QmpServer) -> None:
    c1 = await Raw.open(path_of(server), negotiate=True)
    c2 = await Raw.open(path_of(server), negotiate=True)
    pending = await Raw.open(path_of(server))  # not negotiated: must not get events
    server.emit("MIGRATION", {"status": "active"})
    server.emit("STOP")
    for c in (c1, c2):
        ev = await c.recv()
        assert ev["event"] == "MIGRATION" and ev["data"] == {"status": "active"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= ev["timestamp"]["microseconds"] < 1_000_000
        assert abs(ev["timestamp"]["seconds"] - time.time()) < 60  # wall clock, not trio's
        stop = await c.recv()
        assert stop["event"] == "STOP" and "data" not in stop  # QEMU omits empty data
    assert await pending.call({"execute": "qmp_capabilities"}) == {"return": {}}
    server.emit("RESUME")
    assert (await pending.recv())["event"] == "RESUME"


async def test_event_from_handler_follows_its_reply_order(server: QmpServer) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    await raw.send({"execute": "emit", "arguments": {"name": "X", "data": {"n": 1}}, "id": 1})
    first, second = await raw.recv(), await raw.recv()
    assert {"event": "X"}.items() <= first.items() or {"event": "X"}.items() <= second.items()
    assert {first.get("id"), second.get("id")} == {1, None}


async def test_hung_client_is_dropped_without_blocking_others(nursery: trio.Nursery, sock_dir: Path) -> None:
    fake = Fake()
    server = await start_server(nursery, sock_dir / "q.sock", fake, out_queue=8, write_timeout=30)
    hung = await Raw.open(sock_dir / "q.sock", negotiate=True)  # never reads again
    good = await Raw.open(sock_dir / "q.sock", negotiate=True)
    assert server.client_count == 2
    blob = "x" * 65536
    for i in range(60):
        server.emit("BIG", {"i": i, "blob": blob})  # synchronous: the daemon never waits
        assert (await good.recv())["data"]["i"] == i
    # socket buffers (a few hundred KiB) plus 8 queued events cannot hold 60 x 64 KiB
    with trio.fail_after(5):
        while server.client_count != 1:
            await trio.sleep(0.01)
    assert (await good.call({"execute": "echo", "arguments": {"value": 1}}))["return"]["value"] == 1
    # the dropped client sees its connection end after what was already buffered
    with trio.fail_after(5):
        while (line := await hung.recv_line()) is not None:
            assert line.endswith(b"\r\n")


async def test_write_timeout_drops_client(nursery: trio.Nursery, sock_dir: Path) -> None:
    fake = Fake()
    server = await start_server(nursery, sock_dir / "q.sock", fake, out_queue=1000, write_timeout=0.2)
    await Raw.open(sock_dir / "q.sock", negotiate=True)
    for i in range(20):
        server.emit("BIG", {"i": i, "blob": "y" * 65536})
    with trio.fail_after(5):
        while server.client_count:
            await trio.sleep(0.02)


async def test_disconnect_during_handler(server: QmpServer, fake: Fake) -> None:
    raw = await Raw.open(path_of(server), negotiate=True)
    await raw.send({"execute": "wait"})
    await raw.send({"execute": "echo", "arguments": {"value": "never"}})
    await trio.sleep(0.05)
    await raw.aclose()
    fake.release.set()
    other = await Raw.open(path_of(server), negotiate=True)
    assert (await other.call({"execute": "echo", "arguments": {"value": 1}}))["return"]["value"] == 1
    with trio.fail_after(5):
        while server.client_count != 1:
            await trio.sleep(0.01)


# ---- socket lifecycle ----------------------------------------------------------------------------


async def test_stale_socket_replaced_and_removed_on_exit(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
    s.close()
    assert path.exists()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, path, Fake())
        raw = await Raw.open(path)
        assert "QMP" in raw.greeting
        # a second server must not steal a live socket
        with pytest.raises(OSError, match="in use"):
            await QmpServer(path, CommandRegistry()).serve()
        await raw.aclose()
        nursery.cancel_scope.cancel()
    assert not path.exists()
    assert server.client_count == 0


async def test_refuses_non_socket_path(sock_dir: Path) -> None:
    path = sock_dir / "file"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await QmpServer(path, CommandRegistry()).serve()
    assert path.read_text() == "not a socket"


def test_registry_rejects_duplicates() -> None:
    reg = CommandRegistry()

    async def h(args: dict[str, Any]) -> None:
        return None

    reg.register("a", h)
    with pytest.raises(ValueError):
        reg.register("a", h)
    with pytest.raises(ValueError):
        reg.register("query-version", h)
    with pytest.raises(ValueError):
        reg.register("b", h, [Arg("x", int), Arg("x", str)])
    assert "a" in reg and len(reg) == 1 and reg.names() == ["a"]


# ---- schema --------------------------------------------------------------------------------------


def test_schema_validation() -> None:
    args = [
        Arg("uri", str),
        Arg("resume", bool, default=False),
        Arg("blk", bool, required=False),
        Arg("rate", float, default=1.0),
        Arg("mode", Enum("a", "b"), default="a"),
    ]
    assert validate_members(args, {"uri": "tcp:x"}) == {
        "uri": "tcp:x",
        "resume": False,
        "rate": 1.0,
        "mode": "a",
    }
    assert validate_members(args, {"uri": "u", "blk": True, "rate": 3})["rate"] == 3
    with pytest.raises(QmpError, match="Parameter 'uri' is missing"):
        validate_members(args, {})
    with pytest.raises(QmpError, match="expected: number"):
        validate_members(args, {"uri": "u", "rate": "1"})
    with pytest.raises(QmpError, match="expected: string"):
        validate_members(args, {"uri": "u", "mode": 1})
    with pytest.raises(ValueError):
        Arg("x", int, default=1, required=True)
    with pytest.raises(TypeError):
        Arg("x", bytes)


# ---- JSON framing --------------------------------------------------------------------------------


STREAM = (
    b' {"a": "}{\\"\\\\", "b": [1, [2, {"c": "]"}]]}\n'
    b'{"x":\n 1}{"y": 2}  42 "top" [3]\r\n'
    b'{"unicode": "\xc3\xa9\\u00e9"}'
)
EXPECTED = (
    b'{"a": "}{\\"\\\\", "b": [1, [2, {"c": "]"}]]}',
    b'{"x":\n 1}',
    b'{"y": 2}',
    b"42",
    b'"top"',
    b"[3]",
    b'{"unicode": "\xc3\xa9\\u00e9"}',
)


def test_splitter_whole_and_bytewise() -> None:
    assert JsonSplitter().feed(STREAM + b"\n") == list(EXPECTED)
    sp = JsonSplitter()
    got: list[bytes | SplitError] = []
    for i in range(len(STREAM)):
        got += sp.feed(STREAM[i : i + 1])
    got += sp.feed(b"\n")
    assert got == list(EXPECTED)


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_splitter_any_split_point(cut: int) -> None:
    sp = JsonSplitter()
    assert sp.feed(STREAM[:cut]) + sp.feed(STREAM[cut:] + b"\n") == list(EXPECTED)


def test_splitter_errors_and_resync() -> None:
    sp = JsonSplitter(max_message=100)
    assert sp.feed(b'] {"a": 1}') == [SplitError("JSON parse error, stray ']'"), b'{"a": 1}']
    out = sp.feed(b'{"big": "' + b"x" * 200)
    assert out == [SplitError("JSON token size limit exceeded")]
    assert sp.feed(b'still the big one"}\n{"ok": 1}') == [b'{"ok": 1}']
    deep = b"[" * (MAX_NESTING + 1)
    assert JsonSplitter(max_message=1 << 20).feed(deep + b'\n{"after": 1}') == [
        SplitError("JSON nesting depth limit exceeded"),
        b'{"after": 1}',
    ]


# ---- our trio client -----------------------------------------------------------------------------


async def test_client_execute_errors_events(server: QmpServer) -> None:
    async with QmpClient.connect(path_of(server), timeout=5) as qmp:
        assert qmp.server_version["qemu"]["major"] == 7
        assert await qmp.execute("echo", {"value": [1]}) == {"value": [1], "count": 1}
        assert await qmp.execute("set-caps", {"capabilities": []}) == {}
        with pytest.raises(QmpCommandError) as ei:
            await qmp.execute("nope")
        assert ei.value.error_class == "CommandNotFound"
        assert ei.value.desc == "The command nope has not been found"
        with qmp.events() as events:
            server.emit("MIGRATION", {"status": "setup"})
            server.emit("MIGRATION_PASS", {"pass": 1})
            with trio.fail_after(5):
                assert (await events.receive())["data"] == {"status": "setup"}
                assert (await events.receive())["event"] == "MIGRATION_PASS"
        async with trio.open_nursery() as n:
            n.start_soon(qmp.execute, "emit", {"name": "DONE"})
            ev = await qmp.wait_event("DONE", timeout=5)
        assert ev["event"] == "DONE"


async def test_client_concurrent_executes(server: QmpServer) -> None:
    results: dict[int, Any] = {}
    async with QmpClient.connect(path_of(server)) as qmp:

        async def one(i: int) -> None:
            results[i] = await qmp.execute("echo", {"value": i})

        async with trio.open_nursery() as n:
            for i in range(50):
                n.start_soon(one, i)
    assert {i: r["value"] for i, r in results.items()} == {i: i for i in range(50)}


async def test_client_connection_lost(nursery: trio.Nursery, sock_dir: Path) -> None:
    fake = Fake()
    async with trio.open_nursery() as server_nursery:
        await start_server(server_nursery, sock_dir / "c.sock", fake)
        async with QmpClient.connect(sock_dir / "c.sock") as qmp:
            with qmp.events() as events:
                async with trio.open_nursery() as n:

                    async def pending() -> None:
                        with pytest.raises(QmpConnectionError):
                            await qmp.execute("wait")

                    n.start_soon(pending)
                    await trio.sleep(0.05)
                    server_nursery.cancel_scope.cancel()  # the daemon goes away
                async for _ in events:  # iteration ends with the connection
                    pytest.fail("no events expected")
            with pytest.raises(QmpConnectionError):
                await qmp.execute("echo", {"value": 1})


async def test_client_exception_not_wrapped(server: QmpServer) -> None:
    with pytest.raises(KeyError):
        async with QmpClient.connect(path_of(server)):
            raise KeyError("mine")


async def test_client_connect_errors(sock_dir: Path) -> None:
    with pytest.raises(QmpConnectionError, match="cannot connect"):
        async with QmpClient.connect(sock_dir / "missing.sock"):
            pass
    # a server that never greets
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_dir / "mute.sock"))
    listener.listen(1)
    try:
        with pytest.raises(QmpConnectionError, match="greeting"):
            async with QmpClient.connect(sock_dir / "mute.sock", timeout=0.2):
                pass
    finally:
        listener.close()


# ---- formatting ----------------------------------------------------------------------------------


def test_format_helpers() -> None:
    assert fmt.human_bytes(0) == "0 B"
    assert fmt.human_bytes(1023) == "1023 B"
    assert fmt.human_bytes(1536) == "1.50 KiB"
    assert fmt.human_bytes(3 << 30) == "3.00 GiB"
    assert fmt.human_bytes(None) == "-"
    assert fmt.human_rate_mbps(940.25) == "940.2 Mbps"
    assert fmt.human_rate_mbps(2500) == "2.50 Gbps"
    assert fmt.human_ms(350) == "350 ms"
    assert fmt.human_ms(12_300) == "12.3 s"
    assert fmt.human_ms(245_000) == "4m05s"
    assert fmt.human_ms(3_725_000) == "1h02m05s"
    assert fmt.human_count(1234567) == "1,234,567"
    assert fmt.progress_bar(0.5, 10) == "[#####.....]"
    info = {
        "status": "active",
        "expected-downtime": 120,
        "ram": {"total": 1000, "remaining": 250, "transferred": 900, "mbps": 100.0, "dirty-sync-count": 3},
    }
    assert fmt.progress_fraction(info) == 0.75
    line = fmt.progress_line(info)
    assert "75.0%" in line and "pass 3" in line and "exp.downtime 120 ms" in line
    done = {"status": "completed", "total-time": 1500, "downtime": 30, "ram": {"transferred": 2048}}
    lines = fmt.final_stats_lines(done)
    assert lines[0] == "migration completed"
    assert any("downtime" in x and "30 ms" in x for x in lines)
    failed = fmt.final_stats_lines({"status": "failed", "error-desc": "boom"})
    assert failed[0] == "migration failed: boom"
    assert fmt.mapping_lines({"a": True, "bb": [1]}) == ["a:  true", "bb: [1]"]


# ---- logging -------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_logging_json_lines() -> None:
    buf = io.StringIO()
    configure_logging("debug", stream=buf)  # not a TTY -> JSON
    configure_logging("info", stream=buf)  # reconfiguring replaces, not stacks, the handler
    structlog.get_logger("mig_source").info("migration.started", uri="tcp:x", passes=0)
    structlog.get_logger("mig_source").debug("hidden")
    logging.getLogger("thirdparty").warning("plain %s", "stdlib")
    try:
        raise ValueError("bad")
    except ValueError:
        structlog.get_logger("mig_dest").exception("failed")
    records = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["migration.started", "plain stdlib", "failed"]
    first = records[0]
    assert first["level"] == "info" and first["logger"] == "mig_source" and first["uri"] == "tcp:x"
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert records[1]["level"] == "warning" and records[1]["logger"] == "thirdparty"
    assert records[2]["exception"][0]["exc_type"] == "ValueError"


@pytest.mark.usefixtures("restore_logging")
def test_logging_console() -> None:
    buf = io.StringIO()
    configure_logging("info", json=False, stream=buf)
    structlog.get_logger("x").info("hello", key="value")
    text = buf.getvalue()
    assert "hello" in text and "key=value" in text and not text.startswith("{")
    with pytest.raises(ValueError):
        configure_logging("loud")
