"""What both daemons share: sizes, TOML config, the QMP commands about the guest and the
migration settings, and the process shell (logging, signals, the QMP server)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
import trio

from .logsetup import configure_logging
from .params import Capabilities, Parameters, StatusMachine
from .qmp_server import Arg, CommandRegistry, ListOf, QmpError, QmpServer

# the machine type our own guest model announces in the configuration section
MODEL_MACHINE_TYPE = "x-migpy-model-1"

_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


SOCKET_BUFFER = 8 << 20


def tune_socket(sock: Any) -> None:
    """Large kernel buffers: a 1 MiB page batch then goes out in one send call."""
    import socket

    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # a smaller buffer only costs speed
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def parse_size(text: str | int) -> int:
    """'1G', '512M', '4096', '64KiB' -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in _UNITS:
            return int(float(t[:-1]) * _UNITS[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 512M, 4096)") from None


def load_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise SystemExit(f"cannot read config {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise SystemExit(f"config {path} is not valid TOML: {err}") from None


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--qmp", type=Path, help="path of the QMP control socket (UNIX)")
    ap.add_argument("--config", type=Path, help="TOML configuration file (flags override it)")
    ap.add_argument("--log-level", default=None, help="debug, info, warning, error")
    ap.add_argument("--log-json", action="store_true", default=None, help="JSON log lines even on a terminal")


def apply_migration_config(cfg: dict[str, Any], caps: Capabilities, params: Parameters) -> None:
    """[migration] capabilities = {name = bool}, parameters = {name = value} from the config."""
    mig = cfg.get("migration", {})
    try:
        caps.update([{"capability": k, "state": v} for k, v in mig.get("capabilities", {}).items()])
        params.update(mig.get("parameters", {}))
    except ValueError as err:
        raise SystemExit(f"config [migration]: {err}") from None


class GuestHolder:
    """The daemon's current guest (None on a destination that has not received one yet)."""

    def __init__(self, guest: Any = None) -> None:
        self.guest = guest

    def require(self) -> Any:
        if self.guest is None:
            raise QmpError("no guest: no incoming migration has completed yet")
        return self.guest


def register_common(
    reg: CommandRegistry,
    *,
    holder: GuestHolder,
    caps: Capabilities,
    params: Parameters,
    status: StatusMachine,
    emit: Callable[[str, dict[str, Any]], None],
    idle_run_state: str,
) -> None:
    """QMP commands both daemons answer alike."""

    @reg.command("query-status")
    async def query_status(args: dict[str, Any]) -> dict[str, Any]:
        state = holder.guest.run_state if holder.guest is not None else idle_run_state
        return {"running": state == "running", "singlestep": False, "status": state}

    @reg.command("stop")
    async def stop(args: dict[str, Any]) -> None:
        guest = holder.require()
        if guest.run_state == "running":
            await trio.to_thread.run_sync(guest.stop)
            emit("STOP", {})

    @reg.command("cont")
    async def cont(args: dict[str, Any]) -> None:
        guest = holder.require()
        if status.active:
            raise QmpError("Migration is not finalized yet")
        if guest.run_state == "postmigrate":
            raise QmpError("this guest migrated away: it runs on the destination now")
        if guest.run_state != "running":
            try:
                await trio.to_thread.run_sync(guest.start)
            except Exception as err:
                raise QmpError(f"cannot start the guest: {err}") from None
            emit("RESUME", {})

    @reg.command("query-guest-digest")
    async def query_digest(args: dict[str, Any]) -> dict[str, Any]:
        guest = holder.require()
        digest = await trio.to_thread.run_sync(guest.digest)
        parts = await trio.to_thread.run_sync(_digest_parts, guest)
        return {"digest": digest, "status": guest.run_state, **parts}

    @reg.command("query-guest-check")
    async def query_check(args: dict[str, Any]) -> dict[str, Any]:
        guest = holder.require()
        result = await trio.to_thread.run_sync(guest.check)
        result.setdefault("ok", not result.get("bad-count", len(result.get("bad-pages", []))))
        return result

    @reg.command(
        "migrate-set-capabilities",
        Arg("capabilities", ListOf(dict)),
    )
    async def set_caps(args: dict[str, Any]) -> None:
        if status.active:
            raise QmpError("There's a migration process in progress")
        try:
            caps.update(args["capabilities"])
        except ValueError as err:
            raise QmpError(str(err)) from None

    @reg.command("query-migrate-capabilities")
    async def query_caps(args: dict[str, Any]) -> list[dict[str, Any]]:
        return caps.to_qmp()

    @reg.command("migrate-set-parameters", raw=True)  # validated by Parameters.update
    async def set_params(args: dict[str, Any]) -> None:
        try:
            params.update(args)
        except ValueError as err:
            raise QmpError(str(err)) from None

    @reg.command("query-migrate-parameters")
    async def query_params(args: dict[str, Any]) -> dict[str, Any]:
        return params.to_qmp()


class DaemonShell:
    """What both daemons are: the guest, migration capabilities/parameters/status, a QMP
    registry holding the common commands, and events to QMP clients. A daemon adds its own
    commands in :meth:`register` and sets ``server`` and ``_nursery`` when it runs."""

    idle_run_state = "prelaunch"  # query-status before there is a guest

    def __init__(self, *, guest: Any, caps: Capabilities, params: Parameters, log: Any) -> None:
        self.holder = GuestHolder(guest)
        self.caps = caps
        self.params = params
        self.log = log
        self.status = StatusMachine()
        self.server: QmpServer | None = None
        self._nursery: trio.Nursery | None = None
        self._migration_id = 0
        self.status.on_change(lambda new: self.emit("MIGRATION", {"status": new.value}))
        self.registry = CommandRegistry()
        register_common(
            self.registry,
            holder=self.holder,
            caps=caps,
            params=params,
            status=self.status,
            emit=self.emit,
            idle_run_state=self.idle_run_state,
        )
        self.register(self.registry)

    def register(self, reg: CommandRegistry) -> None:
        """Add the daemon's own QMP commands."""

    def emit(self, event: str, data: dict[str, Any]) -> None:
        if self.server is not None:
            self.server.emit(event, data)


def _digest_parts(guest: Any) -> dict[str, Any]:
    """Per-block and per-device digests: when two guests differ, where."""
    import xxhash

    blocks = {}
    for name, blk in guest.blocks.items():
        h = xxhash.xxh3_128()
        blk.hash_into(h)
        blocks[name] = h.hexdigest()
    devices = {
        f"{d.idstr}:{d.instance_id}": xxhash.xxh3_128(d.body).hexdigest() for d in guest.save_devices()
    }
    return {"blocks": blocks, "devices": devices}


async def serve_daemon(
    *,
    qmp_path: Path | None,
    reg: CommandRegistry,
    log: Any,
    body: Callable[[trio.Nursery, QmpServer | None], Awaitable[None]],
) -> None:
    """Run the QMP server and the daemon's body until SIGTERM/SIGINT."""
    async with trio.open_nursery() as nursery:
        server = None
        if qmp_path is not None:
            server = QmpServer(str(qmp_path), reg, log)
            await nursery.start(server.serve)
            log.info("QMP socket ready", path=str(qmp_path))

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        await body(nursery, server)


def daemon_setup(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    name: str,
    supported: frozenset[str] | None = None,
) -> tuple[argparse.Namespace, dict[str, Any], Any, Capabilities, Parameters]:
    """What every daemon's main() does first: flags, TOML config, logging, and the migration
    capabilities and parameters from the config's [migration] table."""
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    setup_logging(args, cfg)
    caps, params = Capabilities(), Parameters()
    if supported is not None:
        caps.supported = supported
    apply_migration_config(cfg, caps, params)
    return args, cfg, structlog.get_logger(name), caps, params


def setup_logging(args: argparse.Namespace, cfg: dict[str, Any]) -> None:
    level = args.log_level or cfg.get("log", {}).get("level", "info")
    json_logs = True if args.log_json else cfg.get("log", {}).get("json")
    configure_logging(level, json=json_logs)
