"""migctl against a fake daemon (our QmpServer with a scripted migration)."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from control import migctl
from control.qmp_server import Arg, CommandRegistry, QmpError, QmpServer

pytestmark = pytest.mark.timeout(30)

GIB = 1 << 30


def progress(status: str, remaining: int, passes: int, transferred: int) -> dict[str, Any]:
    return {
        "status": status,
        "total-time": 100 * passes,
        "expected-downtime": 40 * passes,
        "setup-time": 3,
        "ram": {
            "transferred": transferred,
            "remaining": remaining,
            "total": GIB,
            "duplicate": 1000,
            "normal": transferred // 4096,
            "normal-bytes": transferred,
            "dirty-pages-rate": 5000,
            "mbps": 950.5,
            "dirty-sync-count": passes,
            "pages-per-second": 29000,
        },
    }


def completed() -> dict[str, Any]:
    info = {**progress("completed", 0, 4, GIB + (200 << 20)), "total-time": 1834, "downtime": 37}
    del info["expected-downtime"]  # QEMU drops it once the migration is over
    return info


COMPLETED = completed()
SUCCESS = (
    {"status": "setup"},
    progress("active", GIB, 1, 0),
    progress("active", GIB // 2, 1, GIB // 2),
    progress("active", 100 << 20, 2, GIB),
    progress("active", 10 << 20, 3, GIB + (100 << 20)),
    progress("device", 0, 4, GIB + (190 << 20)),
    COMPLETED,
)
FAILURE = (
    {"status": "setup"},
    progress("active", GIB // 2, 1, GIB // 2),
    {**progress("failed", GIB // 2, 1, GIB // 2), "error-desc": "Connection reset by peer (destination)"},
)


class FakeDaemon:
    """Each query-migrate after `migrate` returns the next state of ``script``."""

    def __init__(self, script: Sequence[dict[str, Any]]) -> None:
        self.script = script
        self.index = -1  # -1: no migration yet
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.server: QmpServer | None = None
        self.caps = {"xbzrle": False, "events": True, "postcopy-ram": False}
        self.reg = reg = CommandRegistry()

        @reg.command("migrate", Arg("uri", str), Arg("resume", bool, default=False))
        async def migrate(args: dict[str, Any]) -> None:
            self.calls.append(("migrate", args))
            if not args["uri"].startswith("tcp:"):
                raise QmpError(f"Invalid migration URI '{args['uri']}'")
            self.index = 0
            assert self.server is not None
            self.server.emit("MIGRATION", {"status": "setup"})

        @reg.command("query-migrate")
        async def query_migrate(args: dict[str, Any]) -> dict[str, Any]:
            if self.index < 0:
                return {}  # QEMU returns {} before any migration
            info = self.script[min(self.index, len(self.script) - 1)]
            self.index += 1
            return info

        @reg.command("migrate_cancel")
        async def cancel(args: dict[str, Any]) -> None:
            self.calls.append(("migrate_cancel", args))

        @reg.command("migrate-set-capabilities", Arg("capabilities", list))
        async def set_caps(args: dict[str, Any]) -> None:
            self.calls.append(("migrate-set-capabilities", args))
            for c in args["capabilities"]:
                if c["capability"] not in self.caps:
                    raise QmpError(f"Invalid parameter '{c['capability']}'")
                self.caps[c["capability"]] = c["state"]

        @reg.command("query-migrate-capabilities")
        async def query_caps(args: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"capability": k, "state": v} for k, v in self.caps.items()]

        @reg.command("migrate-set-parameters", raw=True)
        async def set_params(args: dict[str, Any]) -> None:
            self.calls.append(("migrate-set-parameters", args))

        @reg.command("query-migrate-parameters")
        async def query_params(args: dict[str, Any]) -> dict[str, Any]:
            return {"max-bandwidth": 134217728, "downtime-limit": 300}

        @reg.command("migrate-incoming", Arg("uri", str))
        async def incoming(args: dict[str, Any]) -> None:
            self.calls.append(("migrate-incoming", args))

        for name in ("stop", "cont", "migrate-start-postcopy"):
            reg.register(name, self._recorder(name))

        @reg.command("migrate-recover", Arg("uri", str))
        async def recover(args: dict[str, Any]) -> None:
            self.calls.append(("migrate-recover", args))

        @reg.command("query-status")
        async def query_status(args: dict[str, Any]) -> dict[str, Any]:
            return {"status": "running", "singlestep": False, "running": True}

        @reg.command("query-guest-digest")
        async def digest(args: dict[str, Any]) -> dict[str, Any]:
            return {"algorithm": "xxh3-128", "digest": "ab" * 16, "pages": 262144}

        @reg.command("query-guest-check")
        async def check(args: dict[str, Any]) -> dict[str, Any]:
            return {"ok": self.check_ok, "mismatches": 0 if self.check_ok else 3}

        self.check_ok = True

    def _recorder(self, name: str) -> Any:
        async def handler(args: dict[str, Any]) -> None:
            self.calls.append((name, args))

        return handler


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="migctl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def start(nursery: trio.Nursery, path: Path, script: Sequence[dict[str, Any]]) -> FakeDaemon:
    daemon = FakeDaemon(script)
    # keep the server's log lines out of captured stdout (structlog's default is print)
    daemon.server = QmpServer(path, daemon.reg, structlog.wrap_logger(structlog.PrintLogger(io.StringIO())))
    await nursery.start(daemon.server.serve)
    return daemon


@pytest.fixture
async def daemon(nursery: trio.Nursery, sock_dir: Path) -> AsyncIterator[FakeDaemon]:
    yield await start(nursery, sock_dir / "src.qmp", SUCCESS)


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


async def run(daemon: FakeDaemon, *argv: str, tty: bool = False) -> tuple[int, str, str]:
    out = TtyIO() if tty else io.StringIO()
    err = io.StringIO()
    assert daemon.server is not None
    code = await migctl.run(["--qmp", daemon.server.socket_path, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ---- migrate / watch -----------------------------------------------------------------------------


async def test_migrate_watch_plain(daemon: FakeDaemon) -> None:
    code, out, err = await run(daemon, "migrate", "tcp:10.0.0.2:4444", "--watch", "--interval", "0.01")
    assert code == 0, err
    assert daemon.calls == [("migrate", {"uri": "tcp:10.0.0.2:4444", "resume": False})]
    assert "\r" not in out  # not a TTY: plain lines only
    lines = out.splitlines()
    progress_lines = [x for x in lines if x.startswith(("active", "device", "setup"))]
    assert progress_lines, out
    # one line per pass change at least: passes 1, 2, 3 and the device phase are all shown
    assert any("pass 2" in x for x in progress_lines) and any("pass 3" in x for x in progress_lines)
    assert any(x.startswith("device") for x in progress_lines)
    assert "Mbps" in progress_lines[-1] and "exp.downtime" in progress_lines[-1]
    assert "migration completed" in lines
    summary = out[out.index("migration completed") :]
    for needle in (
        "total time:",
        "1.8 s",
        "downtime:",
        "37 ms",
        "setup time:",
        "3 ms",
        "transferred:",
        "1.20 GiB",
    ):
        assert needle in summary, (needle, summary)
    assert "950.5 Mbps" in summary and "passes:" in summary


async def test_migrate_watch_tty_redraws_one_line(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "migrate", "tcp:h:1", "-w", "--interval", "0.01", tty=True)
    assert code == 0
    bar, _, summary = out.partition("\n")
    assert bar.count("\r") >= 5 and "\x1b[K" in bar  # redrawn in place
    assert "100.0%" in bar.split("\r")[-1]  # the last redraw shows the end state
    assert summary.startswith("migration completed")


async def test_migrate_watch_json(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "migrate", "tcp:h:1", "--watch", "--json", "--interval", "0.01")
    assert code == 0
    assert json.loads(out) == COMPLETED  # exactly one JSON object, nothing else


async def test_migrate_failed(nursery: trio.Nursery, sock_dir: Path) -> None:
    daemon = await start(nursery, sock_dir / "f.qmp", FAILURE)
    code, out, err = await run(daemon, "migrate", "tcp:h:1", "--watch", "--interval", "0.01")
    assert code == 1
    assert "migration failed: Connection reset by peer (destination)" in err
    code, out, err = await run(daemon, "--json", "watch", "--interval", "0.01")
    assert code == 1 and json.loads(out)["error-desc"].startswith("Connection reset")
    code, out, _ = await run(daemon, "status")
    assert code == 1 and "Connection reset by peer" in out


async def test_migrate_without_watch_and_resume(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "migrate", "tcp:h:1")
    assert (code, out) == (0, "migration to tcp:h:1 started\n")
    code, out, _ = await run(daemon, "migrate", "tcp:h:1", "--resume", "--json")
    assert (code, json.loads(out)) == (0, {})
    assert daemon.calls[-1] == ("migrate", {"uri": "tcp:h:1", "resume": True})


async def test_migrate_rejected(daemon: FakeDaemon) -> None:
    code, out, err = await run(daemon, "migrate", "exec:cat", "--watch")
    assert code == 1 and out == "" and "Invalid migration URI 'exec:cat'" in err
    code, out, err = await run(daemon, "migrate", "exec:cat", "--json")
    assert code == 1 and err == ""
    assert json.loads(out) == {"error": {"class": "GenericError", "desc": "Invalid migration URI 'exec:cat'"}}


async def test_watch_without_migration(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "watch")
    assert (code, out) == (0, "no migration\n")


async def test_watch_follows_events_not_just_polls(daemon: FakeDaemon) -> None:
    """With a long polling period the watch still finishes: MIGRATION events wake it up."""
    assert daemon.server is not None
    await run(daemon, "migrate", "tcp:h:1")

    async def pump() -> None:
        while True:
            await trio.sleep(0.02)
            daemon.server.emit("MIGRATION_PASS", {"pass": 1})  # type: ignore[union-attr]

    async with trio.open_nursery() as n:
        n.start_soon(pump)
        with trio.fail_after(10):
            code, _, _ = await run(daemon, "watch", "--interval", "60")
        n.cancel_scope.cancel()
    assert code == 0


# ---- one-shot commands ---------------------------------------------------------------------------


async def test_status(daemon: FakeDaemon) -> None:
    daemon.index = 3
    code, out, _ = await run(daemon, "status")
    assert code == 0
    assert out.splitlines()[0].split() == ["status:", "active"]
    assert "remaining:" in out and "100.00 MiB" in out and "passes:" in out
    daemon.index = 3
    code, out, _ = await run(daemon, "status", "--json")
    assert json.loads(out) == SUCCESS[3]


async def test_capabilities_and_set_capability(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "set-capability", "xbzrle", "on")
    assert (code, out) == (0, "capability xbzrle: on\n")
    assert daemon.calls[-1] == (
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "xbzrle", "state": True}]},
    )
    code, out, _ = await run(daemon, "capabilities")
    assert out.splitlines() == ["xbzrle: on", "events: on", "postcopy-ram: off"]
    code, out, _ = await run(daemon, "--json", "capabilities")
    assert json.loads(out) == {"xbzrle": True, "events": True, "postcopy-ram": False}
    code, _, err = await run(daemon, "set-capability", "bogus", "off")
    assert code == 1 and "Invalid parameter 'bogus'" in err
    code, _, err = await run(daemon, "set-capability", "xbzrle", "maybe")
    assert code == 2 and "on or off" in err


async def test_parameters(daemon: FakeDaemon) -> None:
    assert (await run(daemon, "set-parameter", "downtime-limit", "500"))[0] == 0
    assert (await run(daemon, "set-parameter", "max-bandwidth", "1G"))[0] == 0
    assert (await run(daemon, "set-parameter", "tls-creds", "tls0"))[0] == 0
    assert [args for name, args in daemon.calls if name == "migrate-set-parameters"] == [
        {"downtime-limit": 500},
        {"max-bandwidth": 1 << 30},
        {"tls-creds": "tls0"},
    ]
    code, out, _ = await run(daemon, "parameters")
    assert code == 0
    assert out.splitlines() == ["max-bandwidth:  134217728", "downtime-limit: 300"]
    _, out, _ = await run(daemon, "parameters", "--json")
    assert json.loads(out) == {"max-bandwidth": 134217728, "downtime-limit": 300}


async def test_vm_and_misc_commands(daemon: FakeDaemon) -> None:
    assert await run(daemon, "cancel") == (0, "migration cancel requested\n", "")
    assert await run(daemon, "incoming", "tcp:0:4444") == (
        0,
        "waiting for an incoming migration on tcp:0:4444\n",
        "",
    )
    assert await run(daemon, "stop") == (0, "VM stopped\n", "")
    assert await run(daemon, "cont") == (0, "VM resumed\n", "")
    assert [c[0] for c in daemon.calls] == ["migrate_cancel", "migrate-incoming", "stop", "cont"]
    assert daemon.calls[1][1] == {"uri": "tcp:0:4444"}
    code, out, _ = await run(daemon, "query-status")
    assert code == 0 and "status:" in out and "running" in out
    _, out, _ = await run(daemon, "--json", "stop")
    assert json.loads(out) == {}


async def test_digest_and_check(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "digest", "--json")
    assert code == 0 and json.loads(out)["algorithm"] == "xxh3-128"
    code, out, _ = await run(daemon, "digest")
    assert "digest:" in out
    assert (await run(daemon, "check"))[0] == 0
    daemon.check_ok = False
    code, out, _ = await run(daemon, "check")
    assert code == 1 and "mismatches: 3" in out


async def test_raw(daemon: FakeDaemon) -> None:
    code, out, _ = await run(daemon, "raw", "query-migrate-parameters")
    assert code == 0 and json.loads(out) == {"max-bandwidth": 134217728, "downtime-limit": 300}
    code, out, _ = await run(daemon, "raw", "migrate-incoming", '{"uri": "tcp:0:1"}')
    assert code == 0 and json.loads(out) == {}
    code, out, _ = await run(daemon, "--json", "raw", "query-migrate-capabilities")
    assert json.loads(out)["return"][0] == {"capability": "xbzrle", "state": False}
    code, _, err = await run(daemon, "raw", "no-such")
    assert code == 1 and "The command no-such has not been found" in err
    code, _, err = await run(daemon, "raw", "stop", "[1]")
    assert code == 2 and "JSON object" in err
    code, _, err = await run(daemon, "raw", "stop", "{nope")
    assert code == 2


# ---- usage and connection errors -----------------------------------------------------------------


async def test_usage_errors(monkeypatch: pytest.MonkeyPatch, sock_dir: Path) -> None:
    monkeypatch.delenv(migctl.ENV_QMP, raising=False)
    err = io.StringIO()
    assert await migctl.run(["status"], stdout=io.StringIO(), stderr=err) == 2
    assert "--qmp" in err.getvalue()
    err = io.StringIO()
    assert await migctl.run(["--qmp", "x", "frobnicate"], stdout=io.StringIO(), stderr=err) == 2
    assert "invalid choice" in err.getvalue()
    out = io.StringIO()
    assert await migctl.run(["--help"], stdout=out, stderr=io.StringIO()) == 0
    assert "migrate" in out.getvalue()
    err = io.StringIO()
    code = await migctl.run(
        ["--qmp", str(sock_dir / "none.sock"), "status"], stdout=io.StringIO(), stderr=err
    )
    assert code == 1 and "cannot connect" in err.getvalue()


async def test_env_var_and_main_entry_point(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert daemon.server is not None
    monkeypatch.setenv(migctl.ENV_QMP, daemon.server.socket_path)
    # the console script runs its own trio.run: call it from a worker thread
    code = await trio.to_thread.run_sync(migctl.main, ["--json", "query-status"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["status"] == "running"


async def test_postcopy_commands(daemon: FakeDaemon) -> None:
    assert await run(daemon, "start-postcopy") == (0, "switch to postcopy requested\n", "")
    code, out, _ = await run(daemon, "recover", "tcp:0:4445")
    assert code == 0 and "tcp:0:4445" in out
    assert daemon.calls[-2:] == [("migrate-start-postcopy", {}), ("migrate-recover", {"uri": "tcp:0:4445"})]
