"""mig-source: runs a guest and migrates it on request (QMP ``migrate``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from control.daemon_common import (
    MODEL_MACHINE_TYPE,
    DaemonShell,
    add_common_args,
    daemon_setup,
    parse_size,
    serve_daemon,
)
from control.params import SUPPORTED_CAPABILITIES, Capabilities, MigrationStatus, Parameters
from control.qmp_server import Arg, CommandRegistry, QmpError, QmpServer

from .precopy import MigrationError, MigrationInfo, PrecopyMigration

POSTCOPY_STATES = frozenset(
    {MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED, MigrationStatus.POSTCOPY_RECOVER}
)


class SourceDaemon(DaemonShell):
    idle_run_state = "prelaunch"

    def __init__(
        self,
        guest: Any,
        *,
        machine_type: str,
        caps: Capabilities,
        params: Parameters,
        log: Any,
        vmdesc: bytes | None = None,
    ) -> None:
        self.vmdesc = vmdesc  # a stored QEMU guest's trailer, re-sent verbatim
        self.machine_type = machine_type
        self.info = MigrationInfo()
        self._scope: trio.CancelScope | None = None
        self._migration: PrecopyMigration | None = None
        super().__init__(guest=guest, caps=caps, params=params, log=log)

    def register(self, reg: CommandRegistry) -> None:

        @reg.command(
            "migrate",
            Arg("uri", str),
            Arg("resume", bool, default=False),
            Arg("detach", bool, required=False),
            Arg("blk", bool, required=False),
            Arg("inc", bool, required=False),
        )
        async def migrate(args: dict[str, Any]) -> None:
            if self.status.active and not args["resume"]:
                raise QmpError("There's a migration process in progress")
            if args["resume"]:
                if self._migration is None:
                    raise QmpError("Cannot resume if there is no paused migration")
                try:
                    self._migration.request_resume(args["uri"])
                except MigrationError as err:
                    raise QmpError(str(err)) from None
                return
            guest = self.holder.require()
            if guest.run_state in ("postmigrate", "crashed"):
                raise QmpError(f"the guest cannot migrate from run state {guest.run_state!r}")
            self._start(args["uri"])

        @reg.command("migrate-start-postcopy")
        async def migrate_start_postcopy(args: dict[str, Any]) -> None:
            if not self.caps["postcopy-ram"]:
                raise QmpError("Enable postcopy with migrate_set_capability before the start of migration")
            if self._migration is None or self.status.status not in (
                MigrationStatus.SETUP,
                MigrationStatus.ACTIVE,
            ):
                raise QmpError(f"postcopy cannot start in migration status {self.status.status.value}")
            self._migration.start_postcopy()

        @reg.command("migrate_cancel")
        async def migrate_cancel(args: dict[str, Any]) -> None:
            if self.status.status in POSTCOPY_STATES:
                raise QmpError(
                    "cannot cancel a migration in postcopy: the guest already runs on the destination "
                    "(after a broken link use migrate with resume)"
                )
            if self.status.active and self._scope is not None:
                self.status.to(MigrationStatus.CANCELLING)
                self._scope.cancel()

        @reg.command("query-migrate")
        async def query_migrate(args: dict[str, Any]) -> dict[str, Any]:
            return self.query_migrate()

    def query_migrate(self) -> dict[str, Any]:
        st = self.status.status
        if st is MigrationStatus.NONE:
            return {}
        info = self.info
        out: dict[str, Any] = {"status": st.value, "total-time": info.total_time_ms()}
        if st is not MigrationStatus.SETUP:
            out["setup-time"] = info.setup_time_ms
            out["ram"] = info.ram.to_qmp()
        if st is MigrationStatus.COMPLETED:
            out["downtime"] = info.downtime_ms or 0
        elif st in POSTCOPY_STATES and info.downtime_ms is not None:
            out["downtime"] = info.downtime_ms
        elif info.expected_downtime_ms is not None:
            out["expected-downtime"] = info.expected_downtime_ms
        if info.cpu_throttle:
            out["cpu-throttle-percentage"] = info.cpu_throttle
        if info.xbzrle is not None:
            out["xbzrle-cache"] = info.xbzrle
        if info.pongs:
            out["x-pongs"] = list(info.pongs)
        if info.error_desc and st in (MigrationStatus.FAILED, MigrationStatus.POSTCOPY_PAUSED):
            out["error-desc"] = info.error_desc
        return out

    def _start(self, uri: str) -> None:
        assert self._nursery is not None
        self._migration_id += 1
        mig_id = f"mig-{self._migration_id}"
        log = self.log.bind(migration_id=mig_id, uri=uri)
        self.info = MigrationInfo()
        migration = PrecopyMigration(
            guest=self.holder.guest,
            uri=uri,
            caps=self.caps,
            params=self.params,
            status=self.status,
            info=self.info,
            emit=self.emit,
            machine_type=self.machine_type,
            log=log,
            vmdesc=self.vmdesc,
        )
        scope = trio.CancelScope()
        self._scope = scope
        self._migration = migration
        log.info("migration starting")

        async def run() -> None:
            with scope:
                await migration.run()
            if scope.cancelled_caught:
                self.status.to(MigrationStatus.CANCELLED)
                log.info("migration cancelled; the guest keeps running here")
            self._scope = None

        self._nursery.start_soon(run)

    async def body(self, nursery: trio.Nursery, server: QmpServer | None) -> None:
        self._nursery = nursery
        self.server = server
        guest = self.holder.guest
        if guest.run_state == "running":
            self.log.info("guest running", blocks=len(guest.blocks))
        await trio.sleep_forever()


def load_image_guest(path: Path) -> tuple[Any, str, bytes | None]:
    """A guest from a stored VM image (guest/image.py): our model's (its devices loaded, so its
    workload can run on) or a real QEMU's (devices kept verbatim; it cannot execute here, but
    migrates to a QEMU started with the same machine options, which runs it on)."""
    from guest.devices import DeviceState
    from guest.image import ImageError, read_image
    from guest.model import Guest

    try:
        image = read_image(path)
    except ImageError as err:
        raise ValueError(f"image {path}: {err}") from None
    native = image.machine_type == MODEL_MACHINE_TYPE
    guest = Guest.from_block_list([(n, len(a)) for n, a in image.blocks.items()], native_devices=native)
    try:
        chunk = 1 << 20
        for name, content in image.blocks.items():
            dst = guest.blocks[name].array
            for off in range(0, len(content), chunk):
                part = content[off : off + chunk]
                if part.any():  # holes stay holes: no memory for zero chunks
                    dst[off : off + len(part)] = part
        for d in image.devices:
            if native:
                guest.load_device(d.idstr, d.instance_id, d.version_id, d.body)
            else:
                guest.store_opaque_device(DeviceState(d.idstr, d.instance_id, d.version_id, d.body))
        guest.set_run_state("paused")
    except BaseException:
        guest.close()
        raise
    return guest, image.machine_type, None if native else image.vmdesc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mig-source", description="Run a guest and live-migrate it on request.")
    add_common_args(ap)
    ap.add_argument("--ram", type=parse_size, help="size of the main RAM block (default 1G)")
    ap.add_argument("--fill", choices=("zero", "random"), help="initial RAM content (default zero)")
    ap.add_argument(
        "--workload", help="vCPU workload: none, uniform:rate=N, hotset:rate=N,size=S, sweep:rate=N"
    )
    ap.add_argument("--seed", type=int, help="seed of the random fill and workload")
    ap.add_argument(
        "--block",
        action="append",
        default=None,
        metavar="NAME:SIZE",
        help="an extra RAM block (repeatable), e.g. /rom@etc/acpi/tables:128K",
    )
    ap.add_argument("--paused", action="store_true", default=None, help="do not start the guest (like -S)")
    ap.add_argument("--image", type=Path, help="load the guest from a stored VM image")
    return ap


def main(argv: list[str] | None = None) -> int:
    args, cfg, log, caps, params = daemon_setup(build_parser(), argv, "mig-source", SUPPORTED_CAPABILITIES)
    gcfg = cfg.get("guest", {})

    from guest.model import Guest

    ram = args.ram if args.ram is not None else parse_size(gcfg.get("ram", "1G"))
    fill = args.fill or gcfg.get("fill", "zero")
    workload = args.workload or gcfg.get("workload", "none")
    seed = args.seed if args.seed is not None else int(gcfg.get("seed", 0))
    blocks: list[tuple[str, int]] = [(gcfg.get("main_block", "pc.ram"), ram)]
    for spec in args.block if args.block is not None else gcfg.get("blocks", []):
        name, sep, size = spec.rpartition(":")
        if not sep or not name:
            raise SystemExit(f"--block {spec!r}: expected NAME:SIZE")
        blocks.append((name, parse_size(size)))
    paused = args.paused if args.paused is not None else bool(gcfg.get("paused", False))
    machine_type, vmdesc = MODEL_MACHINE_TYPE, None
    image_path = args.image or (Path(gcfg["image"]) if "image" in gcfg else None)
    try:
        if image_path is not None:
            guest, machine_type, vmdesc = load_image_guest(image_path)
            log.info("guest loaded from image", image=str(image_path), machine_type=machine_type)
        else:
            guest = Guest.create(blocks, fill=fill, seed=seed, workload=workload)
            log.info("guest created", ram=ram, fill=fill, workload=workload, blocks=[b for b, _ in blocks])
    except (ValueError, OSError) as err:
        raise SystemExit(f"mig-source: {err}") from None
    if not paused and machine_type == MODEL_MACHINE_TYPE:
        guest.start()
    daemon = SourceDaemon(guest, machine_type=machine_type, caps=caps, params=params, log=log, vmdesc=vmdesc)
    try:
        trio.run(lambda: serve_daemon(qmp_path=args.qmp, reg=daemon.registry, log=log, body=daemon.body))
    finally:
        guest.close()
    return 0
