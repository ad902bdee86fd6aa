"""Start the two daemons as processes for the demo and the benchmarks, and drive them."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from control.client import QmpClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen[bytes]
    qmp_path: Path
    log_path: Path
    client: QmpClient | None = None

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        assert self.client is not None
        return await self.client.execute(cmd, args)


@dataclass
class Pair:
    source: Daemon
    dest: Daemon
    port: int
    workdir: Path


async def _start(name: str, argv: list[str], workdir: Path, stack: contextlib.AsyncExitStack) -> Daemon:
    qmp = workdir / f"{name}.sock"
    log = workdir / f"{name}.log"
    logf = open(log, "wb")  # noqa: SIM115 - closed by the exit stack
    stack.callback(logf.close)
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", name.replace("-", "_"), "--qmp", str(qmp), "--log-json", *argv],
        stdout=logf,
        stderr=subprocess.STDOUT,
        env=env,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    stack.callback(stop)
    with trio.fail_after(30):
        while not qmp.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
            await trio.sleep(0.02)
    client = await stack.enter_async_context(QmpClient.connect(str(qmp)))
    return Daemon(name, proc, qmp, log, client)


@contextlib.asynccontextmanager
async def daemon_pair(source_args: list[str], dest_args: list[str]) -> AsyncIterator[Pair]:
    workdir = Path(tempfile.mkdtemp(prefix="mig-"))
    port = free_port()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        dest = await _start("mig-dest", ["--listen", f"127.0.0.1:{port}", *dest_args], workdir, stack)
        source = await _start("mig-source", source_args, workdir, stack)
        yield Pair(source, dest, port, workdir)


async def wait_migration(
    src: Daemon, timeout: float, on_poll: Any = None, interval: float = 0.1
) -> dict[str, Any]:
    """Poll query-migrate until a final status; returns the last reply."""
    with trio.fail_after(timeout):
        while True:
            info = await src.execute("query-migrate")
            if on_poll is not None:
                on_poll(info)
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            await trio.sleep(interval)


async def wait_prealloc(dst: Daemon, timeout: float = 120) -> None:
    """Until mig-dest's --prealloc memory is populated (query-migrate's x-prealloc.ready)."""
    with trio.fail_after(timeout):
        while True:
            info = await dst.execute("query-migrate")
            if info.get("x-prealloc", {}).get("ready", True):
                return
            await trio.sleep(0.05)
