"""Our QMP server driven by the official ``qemu.qmp`` client library (asyncio).

The trio server runs in the test's event loop; the asyncio client runs in a worker thread
(``trio.to_thread``) with its own loop, so both sides are real and nothing is mocked.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from control.qmp_server import Arg, CommandRegistry, QmpError, QmpServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sock_path() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qmplib", dir="/tmp"))
    yield d / "qmp.sock"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def server(nursery: trio.Nursery, sock_path: Path) -> AsyncIterator[QmpServer]:
    reg = CommandRegistry()
    holder: dict[str, QmpServer] = {}

    @reg.command("query-migrate")
    async def query_migrate(args: dict[str, Any]) -> dict[str, Any]:
        return {"status": "active", "ram": {"transferred": 4096, "remaining": 0, "total": 4096}}

    @reg.command("migrate", Arg("uri", str), Arg("resume", bool, default=False))
    async def migrate(args: dict[str, Any]) -> None:
        if not args["uri"].startswith("tcp:"):
            raise QmpError(f"unsupported URI '{args['uri']}'")
        # the event is emitted while the command runs, like QEMU's MIGRATION setup event
        holder["s"].emit("MIGRATION", {"status": "setup"})

    @reg.command("x-oob-test", allow_oob=True)
    async def oob(args: dict[str, Any]) -> None:
        return None

    server = QmpServer(sock_path, reg)
    holder["s"] = server
    await nursery.start(server.serve)
    yield server


async def in_asyncio_thread(fn: Any) -> Any:
    """Run ``asyncio.run(fn())`` in a worker thread and return its result."""
    return await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(fn(), 20)))


async def test_qemu_qmp_connect_execute_event(server: QmpServer, sock_path: Path) -> None:
    async def client() -> dict[str, Any]:
        qmp = QMPClient("test")
        await qmp.connect(str(sock_path))
        out: dict[str, Any] = {"greeting": qmp.greeting._asdict() if qmp.greeting else None}
        try:
            out["version"] = await qmp.execute("query-version")
            out["status"] = await qmp.execute("query-migrate")
            with qmp.listener("MIGRATION") as listener:
                out["migrate"] = await qmp.execute("migrate", {"uri": "tcp:127.0.0.1:4444"})
                out["event"] = dict(await asyncio.wait_for(listener.get(), 5))
            try:
                await qmp.execute("migrate", {"uri": "exec:cat"})
            except ExecuteError as e:
                out["exec_error"] = (e.error_class, e.error.error.desc)
            try:
                await qmp.execute("migrate", {"uri": 5})
            except ExecuteError as e:
                out["type_error"] = e.error.error.desc
            try:
                await qmp.execute("no-such-command")
            except ExecuteError as e:
                out["not_found"] = e.error_class
            out["oob"] = await qmp.execute("x-oob-test", oob=True)
        finally:
            await qmp.disconnect()
        return out

    out = await in_asyncio_thread(client)
    assert out["greeting"]["QMP"]["version"]["qemu"] == {"micro": 0, "minor": 2, "major": 7}
    assert out["greeting"]["QMP"]["capabilities"] == ["oob"]
    assert out["version"]["qemu"]["minor"] == 2
    assert out["status"]["status"] == "active"
    assert out["migrate"] == {}
    assert out["event"]["event"] == "MIGRATION"
    assert out["event"]["data"] == {"status": "setup"}
    assert set(out["event"]["timestamp"]) == {"seconds", "microseconds"}
    assert out["exec_error"] == ("GenericError", "unsupported URI 'exec:cat'")
    assert out["type_error"] == "Invalid parameter type for 'uri', expected: string"
    assert out["not_found"] == "CommandNotFound"
    assert out["oob"] == {}


async def test_qemu_qmp_events_emitted_by_daemon(server: QmpServer, sock_path: Path) -> None:
    """Events emitted by the daemon on its own (not from a handler) reach the library."""
    ready = trio.Event()
    token = trio.lowlevel.current_trio_token()

    async def client() -> list[str]:
        qmp = QMPClient("events")
        await qmp.connect(str(sock_path))
        try:
            with qmp.listener(("MIGRATION", "MIGRATION_PASS")) as listener:
                trio.from_thread.run_sync(ready.set, trio_token=token)
                got = []
                for _ in range(3):
                    got.append((await asyncio.wait_for(listener.get(), 5))["event"])
                return got
        finally:
            await qmp.disconnect()

    async def emitter() -> None:
        await ready.wait()
        server.emit("MIGRATION", {"status": "active"})
        server.emit("MIGRATION_PASS", {"pass": 1})
        server.emit("MIGRATION", {"status": "completed"})

    async with trio.open_nursery() as n:
        n.start_soon(emitter)
        got = await in_asyncio_thread(client)
    assert got == ["MIGRATION", "MIGRATION_PASS", "MIGRATION"]


async def test_qemu_qmp_legacy_sync_api(server: QmpServer, sock_path: Path) -> None:
    """The synchronous wrapper used by QEMU's iotests and scripts."""

    def client() -> tuple[Any, Any]:
        qmp = QEMUMonitorProtocol(str(sock_path))
        qmp.connect(negotiate=True)
        try:
            return qmp.cmd_raw("query-migrate"), qmp.cmd_raw("migrate")
        finally:
            qmp.close()

    ok, missing = await trio.to_thread.run_sync(client)
    assert ok == {"return": {"status": "active", "ram": {"transferred": 4096, "remaining": 0, "total": 4096}}}
    assert missing["error"] == {"class": "GenericError", "desc": "Parameter 'uri' is missing"}
