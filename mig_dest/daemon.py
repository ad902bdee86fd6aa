"""mig-dest: receives a migrating guest over TCP and runs it from then on."""

from __future__ import annotations

import argparse
import datetime
import time
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
from control.params import Capabilities, MigrationStatus, Parameters
from control.qmp_server import Arg, CommandRegistry, QmpError, QmpServer

from .incoming import IncomingInfo, IncomingMigration, ReceivedGuest, peer_name


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, or tcp:HOST:PORT as in QEMU's -incoming / migrate-incoming."""
    text = text.removeprefix("tcp:")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT (or tcp:HOST:PORT)")
    return host.strip("[]") or "0.0.0.0", int(port)


class DestDaemon(DaemonShell):
    idle_run_state = "inmigrate"

    def __init__(
        self,
        *,
        caps: Capabilities,
        params: Parameters,
        paused: bool,
        log: Any,
        prealloc: int = 0,
        store: Path | None = None,
    ) -> None:
        self.store = store
        self.prealloc = prealloc
        self.pool: Any = None  # guest.ram.RamPool being (or already) populated
        # an idle vCPU process spawned while no migration runs: a received guest of our model
        # takes it, so ~0.2 core-s of interpreter start-up does not compete with the stream
        self.spare_vcpu: Any = None
        self._spawning = False
        self.paused = paused
        self.info = IncomingInfo()
        self.listening: list[str] = []
        self.recover_listening: list[str] = []
        self.refused = 0
        self._busy = False
        self._current: IncomingMigration | None = None
        self._idle = trio.Event()  # set while no incoming migration runs
        self._idle.set()
        super().__init__(guest=None, caps=caps, params=params, log=log)

    def register(self, reg: CommandRegistry) -> None:

        @reg.command("migrate-incoming", Arg("uri", str))
        async def migrate_incoming(args: dict[str, Any]) -> None:
            if self.listening:
                raise QmpError("The incoming migration has already been started")
            try:
                host, port = parse_listen(args["uri"])
            except ValueError as err:
                raise QmpError(str(err)) from None
            await self.listen(host, port)

        @reg.command("query-migrate")
        async def query_migrate(args: dict[str, Any]) -> dict[str, Any]:
            st = self.status.status
            out: dict[str, Any] = {}
            if st is not MigrationStatus.NONE:
                out = {
                    "status": st.value,
                    "total-time": self.info.total_time_ms(),
                    "ram": self.info.stats.to_qmp(),
                }
                if st in (MigrationStatus.FAILED, MigrationStatus.POSTCOPY_PAUSED) and self.info.error_desc:
                    out["error-desc"] = self.info.error_desc
                out.update(self._blocktime())
                if self.info.stored_image:
                    out["x-stored-image"] = self.info.stored_image
                if self.info.postcopy_state is not None:
                    out["x-postcopy-state"] = self.info.postcopy_state
                    out["x-postcopy-requests"] = self.info.postcopy_requests
                    if self.info.preempt_channels:
                        out["x-postcopy-preempt"] = {
                            "channels": self.info.preempt_channels,
                            "pages": self.info.preempt_pages,
                        }
            if self.recover_listening:
                out["x-recover-address"] = [
                    {"type": "inet", "host": h, "port": p}
                    for h, _, p in (a.rpartition(":") for a in self.recover_listening)
                ]
            if self.listening:
                out["socket-address"] = [
                    {"type": "inet", "host": h, "port": p}
                    for h, _, p in (a.rpartition(":") for a in self.listening)
                ]
            out["x-refused-connections"] = self.refused
            if self.prealloc:
                pool = self.pool
                out["x-prealloc"] = {
                    "size": self.prealloc,
                    "ready": bool(pool and pool.ready),
                    "huge-bytes": pool.huge_bytes if pool else 0,
                }
            return out

        @reg.command("migrate-recover", Arg("uri", str))
        async def migrate_recover(args: dict[str, Any]) -> None:
            mig = self._current
            if mig is None or not mig.paused:
                raise QmpError("Migrate recover can only be run when postcopy is paused.")
            try:
                host, port = parse_listen(args["uri"])
            except ValueError as err:
                raise QmpError(str(err)) from None
            try:
                listeners = await trio.open_tcp_listeners(port, host=host)
            except OSError as err:
                raise QmpError(f"cannot listen on {host}:{port}: {err.strerror}") from None
            self.recover_listening = ["{}:{}".format(*lst.socket.getsockname()[:2]) for lst in listeners]
            assert self._nursery is not None
            self._nursery.start_soon(self._accept_recovery, listeners, mig)
            self.log.info("postcopy recovery: listening", addresses=self.recover_listening)

        @reg.command("migrate_cancel")
        async def migrate_cancel(args: dict[str, Any]) -> None:
            raise QmpError("an incoming migration is cancelled from its source (migrate_cancel there)")

    def _blocktime(self) -> dict[str, Any]:
        """QEMU's postcopy-blocktime (total ms) and postcopy-vcpu-blocktime (ms per vCPU), from
        the running guest's faults, plus the per-fault latency percentiles."""
        mig = self._current
        faults = self.info.postcopy_faults
        if faults is None and mig is not None and mig._fault_task and mig.guest is not None:
            faults = {**mig.guest.fault_stats(), **mig.service_stats()}
        if faults is None:
            return {}
        total_ms = faults["blocked-ns"] // 1_000_000
        return {
            "postcopy-blocktime": total_ms,
            "postcopy-vcpu-blocktime": [total_ms],
            "x-postcopy-faults": faults,
        }

    async def _accept_recovery(self, listeners: list[trio.SocketListener], mig: IncomingMigration) -> None:
        """Connections to the migrate-recover address, until the migration ends: the first one
        resumes the paused migration, a later one may be its postcopy-preempt channel."""

        async def accept(lst: trio.SocketListener) -> None:
            while True:
                stream = await lst.accept()
                if not mig.recover(stream) and not mig.attach_preempt(stream):
                    self.log.error("connection to the recovery address not wanted", peer=peer_name(stream))
                    await stream.aclose()

        try:
            async with trio.open_nursery() as nursery:
                for lst in listeners:
                    nursery.start_soon(accept, lst)
                await mig.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            for lst in listeners:
                await lst.aclose()
            self.recover_listening = []

    async def listen(self, host: str, port: int) -> None:
        assert self._nursery is not None
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as err:
            raise QmpError(f"cannot listen on {host}:{port}: {err.strerror}") from None
        for lst in listeners:
            h, p = lst.socket.getsockname()[:2]
            self.listening.append(f"{h}:{p}")
            self._nursery.start_soon(self._accept_loop, lst)
        self.log.info("listening for incoming migrations", addresses=self.listening)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                peer = peer_name(stream)
                if self._current is not None and self._current.attach_preempt(stream):
                    continue  # the running migration's postcopy-preempt channel
                if self._busy and self.status.status is MigrationStatus.FAILED:
                    # the last attempt failed and is only releasing its guest (closing its vCPU
                    # process takes tens of ms): a source that retries at once waits, not refused
                    with trio.move_on_after(5):
                        await self._idle.wait()
                if self._busy or self.holder.guest is not None:
                    why = (
                        "a migration is already in progress"
                        if self._busy
                        else "a guest was already received and runs here"
                    )
                    self.refused += 1
                    self.log.error("refusing incoming migration", peer=peer, reason=why)
                    await stream.aclose()
                    continue
                self._busy = True
                self._idle = trio.Event()
                assert self._nursery is not None
                self._nursery.start_soon(self._incoming, stream, peer)

    def _guest_factory(self, blocks: list[tuple[str, int]], machine_type: str | None) -> Any:
        from guest.model import Guest

        # the pool is only used once it is fully populated; a half-populated one would race
        pool = self.pool if self.pool is not None and self.pool.ready else None
        if pool is not None:
            self.pool = None
        native = machine_type == MODEL_MACHINE_TYPE
        vcpu = None
        if native and self.spare_vcpu is not None:
            vcpu, self.spare_vcpu = self.spare_vcpu, None
            if vcpu.poll() is not None:  # died while idle: the guest spawns its own
                vcpu.close()
                vcpu = None
        guest = Guest.from_block_list(blocks, pool=pool, native_devices=native, prespawn_vcpu=vcpu is None)
        if vcpu is not None:
            try:
                guest.adopt_vcpu(vcpu)
            except BaseException:
                vcpu.close()
                guest.close()
                raise
        return guest

    async def _spawn_spare_vcpu(self) -> None:
        """Spawn the spare vCPU process and wait until it answers (its start-up message is then
        consumed, so it can stay idle for any time). A failure only costs start-up time later."""
        from guest.vcpu import VcpuError, VcpuProcess

        if self.spare_vcpu is not None or self.holder.guest is not None or self._spawning:
            return
        self._spawning = True
        try:
            vcpu = await trio.to_thread.run_sync(VcpuProcess)
            try:
                await trio.to_thread.run_sync(vcpu.fence)
            except BaseException:
                vcpu.close()  # not awaited: a cancelled task must still not leak the process
                raise
            if self.holder.guest is None and self.spare_vcpu is None:
                self.spare_vcpu = vcpu
            else:
                await trio.to_thread.run_sync(vcpu.close)
        except (OSError, VcpuError) as err:
            self.log.warning("could not spawn a spare vCPU process", error=str(err))
        finally:
            self._spawning = False

    async def _refill_pool(self) -> None:
        """Preallocate guest memory in the background (QEMU's -mem-prealloc)."""
        from guest.ram import RamPool

        if not self.prealloc or self.pool is not None or self.holder.guest is not None:
            return
        pool = RamPool(self.prealloc)
        self.pool = pool
        t = time.monotonic()
        await trio.to_thread.run_sync(pool.populate)
        self.log.info(
            "guest memory preallocated",
            size=self.prealloc,
            huge_bytes=pool.huge_bytes,
            seconds=round(time.monotonic() - t, 2),
        )

    async def _incoming(self, stream: trio.SocketStream, peer: str) -> None:
        self._migration_id += 1
        log = self.log.bind(migration_id=f"in-{self._migration_id}", peer=peer)
        log.info("incoming migration")
        self.info = IncomingInfo(peer=peer)
        migration = IncomingMigration(
            guest_factory=self._guest_factory,
            caps=self.caps,
            params=self.params,
            status=self.status,
            info=self.info,
            emit=self.emit,
            log=log,
            model_machine_type=MODEL_MACHINE_TYPE,
            on_received=lambda received: self._adopt(received, log),
            paused_start=self.paused,
            on_run=self._postcopy_guest,
        )
        self._current = migration
        try:
            async with stream:
                await migration.run(stream)
        finally:
            self._busy = False
            self._current = None
            self._idle.set()
        if self.holder.guest is None and self._nursery is not None:
            self._nursery.start_soon(self._refill_pool)  # the failed attempt used the pool
            self._nursery.start_soon(self._spawn_spare_vcpu)

    def _postcopy_guest(self, guest: Any) -> None:
        self.holder.guest = guest

    async def _adopt(self, received: ReceivedGuest, log: Any) -> None:
        guest = received.guest
        if self.store is not None:
            # before "completed": a completed migration has its image on disk, a failed one none
            path = await trio.to_thread.run_sync(store_image, self.store, received, self.info.peer)
            self.info.stored_image = str(path)
            log.info("guest image stored", path=str(path))
        self.holder.guest = guest
        if received.machine_type != MODEL_MACHINE_TYPE:
            # a real QEMU's guest: its RAM and device state are here, but our model cannot
            # execute x86 code; it stays paused (to be stored, checked, or migrated on)
            guest.set_run_state("paused")
            log.info("QEMU guest received; kept paused", machine_type=received.machine_type)
            return
        if guest.run_state == "running":
            log.info("guest running on the destination since POSTCOPY_RUN")
            return
        # QEMU: run if the source ran and no -S; else paused, or the source's stopped state
        if received.run_state == "running" and not self.paused:
            t = time.monotonic()
            await trio.to_thread.run_sync(guest.start)
            self.emit("RESUME", {})
            log.info("guest running on the destination", start_ms=round((time.monotonic() - t) * 1000, 2))
        else:
            state = "paused" if received.run_state == "running" else received.run_state
            guest.set_run_state(state if state in ("paused", "prelaunch", "postmigrate") else "paused")
            log.info("guest received, not started", run_state=guest.run_state)

    async def body(
        self, nursery: trio.Nursery, server: QmpServer | None, listen: tuple[str, int] | None
    ) -> None:
        self._nursery = nursery
        self.server = server
        nursery.start_soon(self._refill_pool)
        nursery.start_soon(self._spawn_spare_vcpu)
        if listen is not None:
            await self.listen(*listen)
        await trio.sleep_forever()


def store_image(directory: Path, received: ReceivedGuest, peer: str | None) -> Path:
    """Write the received guest as a VM image (guest/image.py) named by time and machine."""
    from guest.image import DeviceRecord, write_image

    guest = received.guest
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    path = directory / f"{stamp}-{received.machine_type or 'unknown'}"
    cfg = received.configuration
    config = {
        "machine_type": received.machine_type,
        "target_page_bits": cfg.target_page_bits if cfg else None,
        "capabilities": list(cfg.capabilities) if cfg and cfg.capabilities is not None else None,
        "uuid": cfg.uuid.hex() if cfg and cfg.uuid else None,
    }
    return write_image(
        path,
        machine_type=received.machine_type or "",
        config=config,
        blocks=[(name, blk.array) for name, blk in guest.blocks.items()],
        devices=[
            DeviceRecord(d.idstr, d.instance_id, d.version_id, d.body, d.section_id) for d in received.devices
        ],
        vmdesc=received.vmdesc,
        extra={"run_state": received.run_state},
        source=f"mig-dest, incoming migration from {peer}",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mig-dest", description="Receive a live-migrating guest and run it.")
    add_common_args(ap)
    ap.add_argument("--listen", help="HOST:PORT to accept migrations on (else use QMP migrate-incoming)")
    ap.add_argument(
        "--paused", action="store_true", default=None, help="keep the received guest paused (like -S)"
    )
    ap.add_argument(
        "--store",
        type=Path,
        help="store every received guest as a VM image in this directory (written only once the "
        "migration completed)",
    )
    ap.add_argument(
        "--prealloc",
        type=parse_size,
        default=None,
        help="preallocate this much guest memory at start-up (like -mem-prealloc), so incoming pages "
        "pay no first-touch page faults",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args, cfg, log, caps, params = daemon_setup(build_parser(), argv, "mig-dest")
    dcfg = cfg.get("dest", {})
    listen_text = args.listen or dcfg.get("listen")
    try:
        listen = parse_listen(listen_text) if listen_text else None
    except ValueError as err:
        raise SystemExit(f"mig-dest: --listen: {err}") from None
    paused = args.paused if args.paused is not None else bool(dcfg.get("paused", False))
    prealloc = args.prealloc if args.prealloc is not None else parse_size(dcfg.get("prealloc", 0))
    store = args.store if args.store is not None else (Path(dcfg["store"]) if "store" in dcfg else None)
    daemon = DestDaemon(caps=caps, params=params, paused=paused, log=log, prealloc=prealloc, store=store)

    async def body(nursery: trio.Nursery, server: QmpServer | None) -> None:
        try:
            await daemon.body(nursery, server, listen)
        except QmpError as err:
            raise SystemExit(f"mig-dest: {err.desc}") from None

    try:
        trio.run(lambda: serve_daemon(qmp_path=args.qmp, reg=daemon.registry, log=log, body=body))
    finally:
        if daemon.holder.guest is not None:
            daemon.holder.guest.close()
        if daemon.pool is not None:
            daemon.pool.close()
        if daemon.spare_vcpu is not None:
            daemon.spare_vcpu.close()
    return 0
