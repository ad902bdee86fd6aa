"""Run real QEMU 7.2 processes for tests and benchmarks, driven over QMP with our trio client.

::

    opts = QemuOptions(machine="q35", memory_mib=128, disk=build_disk(tmp / "boot.img"))
    async with QemuVM.start(opts, workdir=tmp) as vm:
        await vm.set_parameters({"max-bandwidth": 1 << 30})
        await vm.migrate("exec:cat > /tmp/stream.bin")
        info = await vm.wait_migration(timeout=20)
        ram = await vm.dump_memory(0, 128 << 20)        # numpy uint8 array (pmemsave)
        print(vm.serial_markers())

Every QEMU runs with ``-accel tcg -display none -nodefaults`` (KVM is nested and very slow here,
and both sides of a migration must use the same accelerator), QMP on a unix socket in a short
private directory (sun_path is limited to 108 bytes; pytest's tmp paths can be longer), stdout
and stderr in ``workdir/<name>.log`` (quoted in every error so a failure explains itself), and
the serial port in ``workdir/<name>.serial``. Leaving the ``async with`` always ends the process:
``quit`` over QMP, then SIGTERM, then SIGKILL, each with a short grace period, shielded from
cancellation so that a failing or timed-out test leaves no QEMU behind.

Every QMP call goes through :meth:`QemuVM.execute`, which raises :class:`QemuError` (with the
command and the log tail) on an error reply; the helpers also check the *content* of the replies
they depend on (e.g. pmemsave's file size).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from control.client import QmpClient, QmpClientError, QmpCommandError
from protocol.decoder import MainDecoder
from protocol.events import (
    CompressedPage,
    Configuration,
    DeviceSection,
    EndOfStream,
    Event,
    OpenReturnPath,
    Pages,
    Ping,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RpPong,
    RpShut,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
)
from protocol.return_path import encode_rp
from protocol.xbzrle import decode_xbzrle

QEMU_BINARY_ENV = "QEMU_SYSTEM_X86_64"
TERMINAL_MIGRATION_STATES = frozenset({"completed", "failed", "cancelled"})
PAGE_SIZE = 4096


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64 (``$QEMU_SYSTEM_X86_64`` overrides), or None if missing."""
    override = os.environ.get(QEMU_BINARY_ENV)
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


class QemuError(Exception):
    """QEMU failed to start, died, or answered a command with an error."""


@dataclass(frozen=True)
class Loader:
    """``-device loader,file=F,addr=A,force-raw=on``: raw file content at a guest address
    (the address must lie inside RAM)."""

    file: Path
    addr: int

    def arg(self) -> str:
        return f"loader,file={self.file},addr={self.addr:#x},force-raw=on"


@dataclass
class QemuOptions:
    machine: str = "pc"  # "pc" / "q35" or a versioned name; the wire carries the resolved one
    memory_mib: int = 128
    disk: Path | None = None  # raw boot disk (-drive file=...,format=raw)
    paused: bool = False  # -S
    incoming: str | None = None  # "defer" or a URI for -incoming
    loaders: Sequence[Loader] = ()
    serial: bool = True  # COM1 to workdir/<name>.serial
    accel: str = "tcg"
    extra_args: Sequence[str] = ()
    name: str = "vm"

    def argv(self, binary: str, qmp_path: Path, serial_path: Path) -> list[str]:
        args = [
            binary,
            "-M",
            self.machine,
            "-accel",
            self.accel,
            "-m",
            str(self.memory_mib),
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-name",
            self.name,
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
        ]
        # without -serial, -nodefaults leaves no COM1 at all; "null" keeps the device present
        args += ["-serial", f"file:{serial_path}" if self.serial else "null"]
        if self.disk is not None:
            args += ["-drive", f"file={self.disk},format=raw,if=ide,index=0,media=disk"]
        if self.paused:
            args.append("-S")
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        for ld in self.loaders:
            args += ["-device", ld.arg()]
        args += list(self.extra_args)
        return args


@dataclass
class QemuVM:
    """One running QEMU process and its QMP connection. Create with :meth:`start`."""

    options: QemuOptions
    process: trio.Process
    qmp: QmpClient
    workdir: Path
    log_path: Path
    serial_path: Path
    argv: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- life cycle

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, options: QemuOptions, *, workdir: str | os.PathLike[str], start_timeout: float = 15.0
    ) -> AsyncIterator[QemuVM]:
        binary = qemu_binary()
        if binary is None:
            raise QemuError("qemu-system-x86_64 not found (set $QEMU_SYSTEM_X86_64)")
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        log_path = work / f"{options.name}.log"
        serial_path = work / f"{options.name}.serial"
        sockdir = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
        qmp_path = sockdir / "qmp.sock"
        argv = options.argv(binary, qmp_path, serial_path)
        log = log_path.open("wb")
        proc: trio.Process | None = None
        try:
            log.write((" ".join(argv) + "\n").encode())
            log.flush()
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
            with trio.move_on_after(start_timeout) as scope:
                # QEMU creates the socket during start-up; it may also die first (bad option)
                while not qmp_path.exists():
                    if proc.poll() is not None:
                        raise QemuError(
                            f"{options.name}: QEMU exited with status {proc.returncode} during start-up:\n"
                            + _tail(log_path)
                        )
                    await trio.sleep(0.02)
            if scope.cancelled_caught:
                raise QemuError(f"{options.name}: no QMP socket after {start_timeout}s:\n" + _tail(log_path))
            try:
                async with QmpClient.connect(qmp_path, timeout=start_timeout) as qmp:
                    vm = cls(options, proc, qmp, work, log_path, serial_path, argv)
                    try:
                        yield vm
                    finally:
                        with trio.CancelScope(shield=True):
                            await vm._shutdown()
            except QmpClientError as e:
                raise QemuError(f"{options.name}: QMP failed: {e}\n" + _tail(log_path)) from e
        finally:
            with trio.CancelScope(shield=True):
                if proc is not None:
                    await _reap(proc)
                log.close()
                shutil.rmtree(sockdir, ignore_errors=True)

    async def _shutdown(self) -> None:
        """``quit`` over QMP; the process itself is reaped (terminate/kill) by start()."""
        if self.process.poll() is not None:
            return
        with trio.move_on_after(3):
            # the reply may or may not arrive before QEMU closes the socket
            with contextlib.suppress(QmpClientError):
                await self.qmp.execute("quit")
            await self.process.wait()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    # ---------------------------------------------------------------- QMP

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run a QMP command; any error reply or lost connection raises QemuError."""
        try:
            return await self.qmp.execute(command, dict(arguments) if arguments else None)
        except QmpCommandError as e:
            raise QemuError(
                f"{self.options.name}: {command} {dict(arguments or {})} failed: {e}\n" + self.log_tail()
            ) from e
        except QmpClientError as e:
            raise QemuError(f"{self.options.name}: {command}: {e}\n" + self.log_tail()) from e

    async def hmp(self, command_line: str) -> str:
        """An HMP command through ``human-monitor-command``; HMP reports errors as output text."""
        out = await self.execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(out, str):
            raise QemuError(f"{self.options.name}: HMP {command_line!r} returned {out!r}")
        return out

    async def query_status(self) -> dict[str, Any]:
        return await self.execute("query-status")

    async def run_state(self) -> str:
        return str((await self.query_status())["status"])

    async def stop(self) -> None:
        await self._expect_empty("stop")

    async def cont(self) -> None:
        await self._expect_empty("cont")

    async def _expect_empty(self, command: str, arguments: Mapping[str, Any] | None = None) -> None:
        ret = await self.execute(command, arguments)
        if ret != {}:
            raise QemuError(f"{self.options.name}: {command} returned {ret!r}, expected {{}}")

    async def wait_run_state(self, state: str, timeout: float = 10.0) -> None:
        with trio.move_on_after(timeout):
            while (cur := await self.run_state()) != state:
                await trio.sleep(0.05)
            return
        raise QemuError(f"{self.options.name}: run state still {cur!r} after {timeout}s, wanted {state!r}")

    # ---------------------------------------------------------------- migration

    async def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        await self._expect_empty(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": bool(v)} for k, v in caps.items()]},
        )
        got = {c["capability"]: c["state"] for c in await self.execute("query-migrate-capabilities")}
        wrong = {k: got.get(k) for k, v in caps.items() if got.get(k) != bool(v)}
        if wrong:
            raise QemuError(f"{self.options.name}: capabilities not applied: {wrong}")

    async def set_parameters(self, params: Mapping[str, Any]) -> None:
        await self._expect_empty("migrate-set-parameters", params)

    async def query_migrate(self) -> dict[str, Any]:
        return await self.execute("query-migrate")

    async def migrate(self, uri: str, **extra: Any) -> None:
        await self._expect_empty("migrate", {"uri": uri, **extra})

    async def wait_migration(
        self, timeout: float = 30.0, *, poll: float = 0.05, check: bool = True
    ) -> dict[str, Any]:
        """Poll query-migrate until completed/failed/cancelled; return that final reply.

        ``check``: raise QemuError unless the status is ``completed``."""
        info: dict[str, Any] = {}
        with trio.move_on_after(timeout):
            while True:
                info = await self.query_migrate()
                if info.get("status") in TERMINAL_MIGRATION_STATES:
                    break
                await trio.sleep(poll)
        status = info.get("status")
        if status not in TERMINAL_MIGRATION_STATES:
            raise QemuError(f"{self.options.name}: migration not finished after {timeout}s: {info}")
        if check and status != "completed":
            raise QemuError(
                f"{self.options.name}: migration {status}: {info.get('error-desc', info)}\n" + self.log_tail()
            )
        return info

    async def migrate_incoming(self, uri: str) -> None:
        """``migrate-incoming`` (needs ``-incoming defer``)."""
        await self._expect_empty("migrate-incoming", {"uri": uri})

    async def incoming_port(self) -> int:
        """The TCP port a ``migrate-incoming tcp:HOST:0`` ended up listening on."""
        info = await self.query_migrate()
        for addr in info.get("socket-address", []):
            if addr.get("type") == "inet":
                return int(addr["port"])
        raise QemuError(f"{self.options.name}: no inet socket-address in query-migrate: {info}")

    # ---------------------------------------------------------------- memory and serial

    async def pmemsave(self, addr: int, size: int, path: str | os.PathLike[str]) -> Path:
        """Save guest physical memory [addr, addr+size) to ``path`` (absolute; written by QEMU).

        Stop the guest first for a consistent image."""
        p = Path(path).absolute()
        p.unlink(missing_ok=True)
        await self._expect_empty("pmemsave", {"val": addr, "size": size, "filename": str(p)})
        actual = p.stat().st_size if p.exists() else -1
        if actual != size:
            raise QemuError(f"{self.options.name}: pmemsave wrote {actual} bytes to {p}, expected {size}")
        return p

    async def dump_memory(
        self, addr: int, size: int, path: str | os.PathLike[str] | None = None
    ) -> np.ndarray:
        """pmemsave into a file (default: in the workdir) and return it as a uint8 array."""
        p = Path(path) if path is not None else self.workdir / f"{self.options.name}-mem-{addr:x}.bin"
        await self.pmemsave(addr, size, p)
        return np.fromfile(p, dtype=np.uint8)

    def serial_output(self) -> bytes:
        try:
            return self.serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def serial_markers(self) -> int:
        """Number of marker bytes the guest wrote to COM1 so far."""
        return len(self.serial_output())

    async def wait_serial_markers(self, count: int, timeout: float = 20.0) -> None:
        """Wait until the guest has written ``count`` serial markers (for the boot-sector
        guest: completed passes of its dirtying loop)."""
        with trio.move_on_after(timeout):
            while self.serial_markers() < count and self.alive:
                await trio.sleep(0.02)
        if self.serial_markers() < count:
            raise QemuError(
                f"{self.options.name}: guest wrote {self.serial_markers()} serial markers, expected "
                f"{count} within {timeout}s\n" + self.log_tail()
            )


async def wait_file_stable(path: Path, *, quiet: float = 0.2, timeout: float = 10.0) -> int:
    """Wait until ``path`` exists and its size has not changed for ``quiet`` seconds.

    An ``exec:cat > FILE`` migration is reported completed when QEMU has written its last byte
    to the pipe; cat may still be copying it into the file."""
    last = -1
    stable_since = math.inf
    with trio.fail_after(timeout):
        while True:
            size = path.stat().st_size if path.exists() else -1
            now = trio.current_time()
            if size != last:
                last, stable_since = size, now
            elif size >= 0 and now - stable_since >= quiet:
                return size
            await trio.sleep(0.05)


async def _reap(proc: trio.Process) -> None:
    """End ``proc`` (SIGTERM, then SIGKILL) and wait for it; no-op if it already exited."""
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with trio.move_on_after(grace):
            await proc.wait()
            return


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ==================================================================== streams


@dataclass
class StreamImage:
    """What a main-channel stream carried, applied: RAM blocks rebuilt as arrays, device
    sections, and per-record statistics (for comparison with QEMU's query-migrate)."""

    config: Configuration | None = None
    block_list: tuple[RamBlockInfo, ...] = ()
    blocks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> uint8 (used_length,)
    devices: list[DeviceSection] = field(default_factory=list)
    vmdesc: bytes | None = None
    normal_pages: int = 0  # PAGE records
    zero_pages: int = 0  # ZERO records
    xbzrle_pages: int = 0
    compressed_pages: int = 0
    # per RAM section body (START/PART/END in order): (kind, normal, zero, xbzrle)
    ram_sections: list[tuple[str, int, int, int]] = field(default_factory=list)
    commands: list[Event] = field(default_factory=list)  # OPEN_RETURN_PATH, PING, ...
    pages_sent: dict[str, np.ndarray] = field(default_factory=dict)  # name -> count per page
    eof: bool = False
    header: bool = False
    ram_section_id: int | None = None

    def apply(self, ev: Event) -> None:
        if isinstance(ev, StreamHeader):
            self.header = True
        elif isinstance(ev, Configuration):
            self.config = ev
        elif isinstance(ev, RamBlockList):
            self.block_list = ev.blocks
            for b in ev.blocks:
                self.blocks[b.name] = np.zeros(b.used_length, dtype=np.uint8)
                self.pages_sent[b.name] = np.zeros(b.used_length // PAGE_SIZE, dtype=np.uint32)
        elif isinstance(ev, SectionStart | SectionPart | SectionEnd):
            kind = {SectionStart: "START", SectionPart: "PART", SectionEnd: "END"}[type(ev)]
            if isinstance(ev, SectionStart):
                self.ram_section_id = ev.section_id
            self.ram_sections.append((kind, 0, 0, 0))
        elif isinstance(ev, ZeroPages):
            idx = (ev.offsets // PAGE_SIZE).astype(np.intp)
            self._pages(ev.block)[idx] = ev.fill
            np.add.at(self.pages_sent[ev.block], idx, 1)
            self.zero_pages += len(idx)
            self._count(zero=len(idx))
        elif isinstance(ev, Pages):
            idx = (ev.offsets // PAGE_SIZE).astype(np.intp)
            self._pages(ev.block)[idx] = ev.data
            np.add.at(self.pages_sent[ev.block], idx, 1)
            self.normal_pages += len(idx)
            self._count(normal=len(idx))
        elif isinstance(ev, XbzrlePage):
            page = self._pages(ev.block)[ev.offset // PAGE_SIZE]
            decode_xbzrle(ev.delta, page, offset=None)
            self.pages_sent[ev.block][ev.offset // PAGE_SIZE] += 1
            self.xbzrle_pages += 1
            self._count(xbzrle=1)
        elif isinstance(ev, CompressedPage):
            self._pages(ev.block)[ev.offset // PAGE_SIZE] = np.frombuffer(
                zlib.decompress(ev.data), dtype=np.uint8
            )
            self.compressed_pages += 1
        elif isinstance(ev, DeviceSection):
            self.devices.append(ev)
        elif isinstance(ev, EndOfStream):
            self.eof = True
        elif isinstance(ev, VmDescription):
            self.vmdesc = ev.json_bytes
        elif isinstance(ev, RamEos | SectionFooter):
            pass
        else:
            self.commands.append(ev)

    def _pages(self, block: str) -> np.ndarray:
        try:
            return self.blocks[block].reshape(-1, PAGE_SIZE)
        except KeyError:
            raise AssertionError(f"page for block {block!r}, which the block list did not announce") from None

    def _count(self, normal: int = 0, zero: int = 0, xbzrle: int = 0) -> None:
        kind, n, z, x = self.ram_sections[-1]
        self.ram_sections[-1] = (kind, n + normal, z + zero, x + xbzrle)

    def device(self, idstr: str, instance_id: int = 0) -> DeviceSection:
        for d in self.devices:
            if (d.idstr, d.instance_id) == (idstr, instance_id):
                return d
        raise KeyError((idstr, instance_id))

    def globalstate(self) -> str:
        """The run state carried by the ``globalstate`` section (be32 size, 100-byte name)."""
        body = self.device("globalstate").body
        size = int.from_bytes(body[:4], "big")
        return body[4 : 4 + size].rstrip(b"\0").decode()


def decode_stream(chunks: Iterable[bytes], image: StreamImage | None = None) -> StreamImage:
    """Decode a whole main-channel stream with our MainDecoder and apply it (raises
    ProtocolError if our decoder rejects it or it ends early)."""
    img = image if image is not None else StreamImage()
    dec = MainDecoder()
    for chunk in chunks:
        dec.feed(chunk)
        for ev in dec.events():
            img.apply(ev)
    for ev in dec.end_of_input():
        img.apply(ev)
    if not dec.finished:
        raise AssertionError("stream ended without EOF")
    return img


def decode_stream_file(path: str | os.PathLike[str], chunk: int = 4 << 20) -> StreamImage:
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while data := f.read(chunk):
                yield data

    return decode_stream(chunks())


@dataclass
class RecordingListener:
    """A one-connection migration destination on loopback: records the main stream to a file,
    decodes it live with MainDecoder (applied to a :class:`StreamImage`) and, once the source
    opened the return path, answers every PING with a PONG and, after the VMDESCRIPTION trailer,
    sends SHUT 0 - what mig_dest does. ``port`` is known once :meth:`serve` has started::

        listener = RecordingListener(tmp / "main.bin")
        port = await nursery.start(listener.serve)
        await vm.migrate(f"tcp:127.0.0.1:{port}")
    """

    record_path: Path
    image: StreamImage = field(default_factory=StreamImage)
    shut_status: int = 0
    rp_open: bool = False
    rp_sent: list[Event] = field(default_factory=list)
    bytes_received: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    port: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        try:
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)
            stream = await listeners[0].accept()
        finally:
            for lst in listeners:
                await lst.aclose()
        try:
            async with stream:
                await self._handle(stream)
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.done.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        dec = MainDecoder()
        shut_sent = False
        with self.record_path.open("wb") as rec:
            while True:
                data = await stream.receive_some(1 << 20)
                if not data:
                    break
                rec.write(data)
                self.bytes_received += len(data)
                dec.feed(data)
                for ev in dec.events():
                    self.image.apply(ev)
                    if isinstance(ev, OpenReturnPath):
                        self.rp_open = True
                    elif isinstance(ev, Ping):
                        if not self.rp_open:
                            raise AssertionError("PING before OPEN_RETURN_PATH")
                        await self._send_rp(stream, RpPong(ev.value))
                if dec.finished and self.rp_open and not shut_sent and self.image.vmdesc is not None:
                    # the source waits for SHUT before it declares the migration completed
                    shut_sent = True
                    await self._send_rp(stream, RpShut(self.shut_status))
        for ev in dec.end_of_input():
            self.image.apply(ev)
        if not dec.finished:
            raise AssertionError("main stream ended before EOF")

    async def _send_rp(self, stream: trio.SocketStream, ev: Event) -> None:
        self.rp_sent.append(ev)
        await stream.send_all(encode_rp(ev))
