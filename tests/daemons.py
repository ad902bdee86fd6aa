"""Real mig-source / mig-dest processes for end-to-end tests.

Each daemon is a subprocess (``python -m mig_source`` / ``python -m mig_dest``, what the
console scripts run) in its own session, logging to a file; the test talks to it through a
connected :class:`control.client.QmpClient`::

    async def test_x(daemons: Daemons) -> None:
        async with daemons.dest(paused=True) as dst, daemons.source(ram="64M") as src:
            await src.migrate_to(dst)
            info = await src.wait_migration()

Leaving the ``async with`` stops the daemon (SIGTERM, then SIGKILL of its whole process group,
vCPU included); the ``daemons`` fixture kills whatever is still alive at teardown even if the
test died half-way (timeout, error while starting), so no process outlives its test. When a test
fails inside the block, the tail of the daemon's log is printed (pytest shows it with the
failure).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from control.client import QmpClient, QmpConnectionError

REPO = Path(__file__).resolve().parent.parent
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
START_TIMEOUT = 30.0  # a random fill of a few hundred MiB plus interpreter start-up on a busy box
STOP_TIMEOUT = 10.0
POLL = 0.02


class DaemonError(AssertionError):
    """A daemon did not start, or died, or a wait timed out; carries the log tail."""


class Daemon:
    """One running daemon process and a QMP connection to it."""

    def __init__(self, role: str, proc: subprocess.Popen[bytes], qmp_path: Path, log_path: Path) -> None:
        self.role = role
        self.proc = proc
        self.qmp_path = qmp_path
        self.log_path = log_path
        self.qmp: QmpClient = None  # type: ignore[assignment]  # set once connected
        self.port: int | None = None  # mig-dest: the TCP port it listens on
        self.listens = False  # mig-dest started with --listen

    # ---- process ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the daemon process itself (not its vCPU child)."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- QMP ---------------------------------------------------------------------------------

    async def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(name, arguments)

    async def query_migrate(self) -> dict[str, Any]:
        return await self.qmp.execute("query-migrate")

    async def listen_addresses(self) -> list[dict[str, Any]]:
        return (await self.query_migrate()).get("socket-address") or []

    async def run_state(self) -> str:
        return (await self.qmp.execute("query-status"))["status"]

    async def digest(self) -> dict[str, Any]:
        """query-guest-digest: ``digest`` (RAM and devices), ``blocks``, ``devices``, ``status``."""
        return await self.qmp.execute("query-guest-digest")

    async def ram_digest(self) -> dict[str, str]:
        """Per-block RAM digests only: comparable while the guest runs (devices hold its clock)."""
        return (await self.digest())["blocks"]

    async def check(self) -> dict[str, Any]:
        return await self.qmp.execute("query-guest-check")

    async def set_capabilities(self, **caps: bool) -> None:
        """``return_path=True`` -> migrate-set-capabilities [{capability: return-path, state: true}]."""
        await self.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]},
        )

    async def set_parameters(self, **params: int | bool) -> None:
        """``max_bandwidth=1 << 30`` -> migrate-set-parameters {"max-bandwidth": 1073741824}."""
        await self.qmp.execute("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    async def migrate_incoming(self, uri: str = "tcp:127.0.0.1:0") -> int:
        """mig-dest without --listen: start listening (port 0: a free one); return the port."""
        await self.qmp.execute("migrate-incoming", {"uri": uri})
        addrs = await self.wait_until("the listening socket", self.listen_addresses)
        self.port = int(addrs[0]["port"])
        return self.port

    def uri(self) -> str:
        assert self.port is not None, f"{self.role} is not listening"
        return f"tcp:127.0.0.1:{self.port}"

    async def migrate_to(self, dest: Daemon) -> None:
        await self.qmp.execute("migrate", {"uri": dest.uri()})

    async def wait_migration(
        self,
        statuses: Iterable[str] = FINAL_STATUSES,
        timeout: float = 30.0,
        *,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll query-migrate until its status is one of ``statuses``; return that reply.

        ``on_poll`` sees every reply (to record values that only exist during the run)."""
        wanted = frozenset(statuses)
        info: dict[str, Any] = {}
        with trio.move_on_after(timeout):
            while True:
                info = await self.query_migrate()
                if on_poll is not None:
                    on_poll(info)
                if info.get("status") in wanted:
                    return info
                self._check_alive()
                await trio.sleep(POLL)
        raise DaemonError(
            f"{self.role}: migration status not in {sorted(wanted)} after {timeout} s; last query-migrate: "
            f"{info}\n--- {self.role} log ---\n{self.log_tail()}"
        )

    async def wait_until(
        self, what: str, probe: Callable[[], Any], timeout: float = 20.0, interval: float = POLL
    ) -> Any:
        """Await ``probe()`` until it returns something truthy; return it."""
        last: Any = None
        with trio.move_on_after(timeout):
            while True:
                last = await probe()
                if last:
                    return last
                self._check_alive()
                await trio.sleep(interval)
        raise DaemonError(f"{self.role}: timed out after {timeout} s waiting for {what} (last: {last!r})")

    def _check_alive(self) -> None:
        if not self.alive():
            raise DaemonError(
                f"{self.role} exited with status {self.proc.returncode}\n"
                f"--- {self.role} log ---\n{self.log_tail()}"
            )


class Daemons:
    """Starts daemons for one test; :meth:`cleanup` (the fixture's teardown) kills leftovers."""

    def __init__(self, sock_dir: Path, log_dir: Path) -> None:
        self.sock_dir = sock_dir
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def _spawn(self, role: str, module: str, args: list[str]) -> Daemon:
        self._count += 1
        name = f"{role}{self._count}"
        qmp_path = self.sock_dir / f"{name}.sock"  # short: UNIX socket paths are limited to 107 bytes
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, "--qmp", str(qmp_path), "--log-json", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                start_new_session=True,  # its own process group: the vCPU child can be reaped with it
            )
        self._procs.append(proc)
        return Daemon(name, proc, qmp_path, log_path)

    @contextlib.asynccontextmanager
    async def _running(self, daemon: Daemon) -> AsyncIterator[Daemon]:
        try:
            async with contextlib.AsyncExitStack() as stack:
                daemon.qmp = await _connect(daemon, stack)
                if daemon.listens:
                    addrs = await daemon.wait_until("the listening socket", daemon.listen_addresses)
                    daemon.port = int(addrs[0]["port"])
                try:
                    yield daemon
                except BaseException:
                    print(f"--- {daemon.role} (pid {daemon.pid}) log tail ---\n{daemon.log_tail()}")
                    raise
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(daemon.proc)

    def source(
        self,
        *,
        ram: str = "128M",
        fill: str = "random",
        workload: str = "none",
        seed: int | None = None,
        paused: bool = False,
        extra: Iterable[str] = (),
    ) -> contextlib.AbstractAsyncContextManager[Daemon]:
        args = ["--ram", ram, "--fill", fill, "--workload", workload]
        if seed is not None:
            args += ["--seed", str(seed)]
        if paused:
            args.append("--paused")
        return self._running(self._spawn("source", "mig_source", [*args, *extra]))

    def dest(
        self, *, paused: bool = True, listen: str | None = "127.0.0.1:0", extra: Iterable[str] = ()
    ) -> contextlib.AbstractAsyncContextManager[Daemon]:
        """A destination listening on a free loopback port (``Daemon.port``); with ``listen=None``
        it waits for :meth:`Daemon.migrate_incoming`."""
        args = ["--listen", listen] if listen else []
        if paused:
            args.append("--paused")
        daemon = self._spawn("dest", "mig_dest", [*args, *extra])
        daemon.listens = bool(listen)
        return self._running(daemon)

    def cleanup(self) -> None:
        """Synchronous last resort: kill every process group we started that is still there."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
            _kill_group(proc.pid)


async def _connect(daemon: Daemon, stack: contextlib.AsyncExitStack) -> QmpClient:
    """Connect to the daemon's QMP socket as soon as it accepts (or fail if the daemon dies).

    The connection is closed when ``stack`` is."""
    # no cancel scope around the loop: the client's nursery must outlive this function
    deadline = trio.current_time() + START_TIMEOUT
    while trio.current_time() < deadline:
        daemon._check_alive()
        if daemon.qmp_path.exists():
            try:
                return await stack.enter_async_context(QmpClient.connect(daemon.qmp_path, timeout=10))
            except QmpConnectionError:
                pass  # bound but not listening yet
        await trio.sleep(POLL)
    raise DaemonError(
        f"{daemon.role}: QMP socket {daemon.qmp_path} not ready after {START_TIMEOUT} s\n{daemon.log_tail()}"
    )


async def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the daemon shuts down and closes its guest), then SIGKILL the whole group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            while proc.poll() is None:
                await trio.sleep(POLL)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(proc.wait)
    _kill_group(proc.pid)


def _kill_group(pgid: int) -> None:
    """Kill what is left of the daemon's process group (a vCPU whose daemon was SIGKILLed)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    sock_dir = Path(tempfile.mkdtemp(prefix="e2e", dir="/tmp"))
    launcher = Daemons(sock_dir, tmp_path)
    try:
        yield launcher
    finally:
        launcher.cleanup()
        for p in sock_dir.iterdir():
            p.unlink(missing_ok=True)
        sock_dir.rmdir()


async def migrate_and_wait(
    src: Daemon, dst: Daemon, timeout: float = 30.0, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Migrate ``src`` to ``dst``; return both sides' final query-migrate (source first)."""
    await src.migrate_to(dst)
    src_info = await src.wait_migration(timeout=timeout, **kwargs)
    dst_info = await dst.wait_migration(timeout=10)
    return src_info, dst_info


def assert_completed(info: dict[str, Any], who: str = "source") -> None:
    assert info.get("status") == "completed", f"{who} migration did not complete: {info}"
