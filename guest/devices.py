"""Device state, vmstate style: versioned sections whose bodies are fields back to back.

Like QEMU's vmstate, a body carries no tags: integers are big-endian, buffers raw, and only the
vmdesc JSON (one entry per device, in the stream's trailer) says where fields start and end. Each
device here produces both its body and its QEMU-style vmdesc entry, whose field sizes add up to the
body's length, so a decoder can delimit the section the way QEMU's analyze-migration.py does.

Devices:

* ``globalstate`` v1: exactly QEMU's (be32 size = strlen + 1, then the run state name in a
  100-byte NUL-padded buffer); the destination reads it to decide whether to run.
* ``timer`` v2: QEMU 7.2's layout (cpu_ticks_offset, 8 unused bytes, cpu_clock_offset); carries the
  guest's virtual clock, frozen while stopped.
* ``cpu`` v1: the workload's state: write counter, page-stream seed and position, initial fill,
  workload block and spec, and the generation table that :mod:`guest.check` verifies pages against.
* :class:`OpaqueDevice`: any section received verbatim (e.g. from a real QEMU), re-sent verbatim.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from .ram import Fill

# QEMU 7.2's RunState names (qapi/run-state.json), as globalstate may carry them.
QEMU_RUN_STATES = frozenset(
    {
        "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
        "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
        "guest-panicked", "colo",
    }
)  # fmt: skip
GLOBALSTATE_RUNSTATE_BYTES = 100

_INT_FORMATS: Mapping[str, str] = MappingProxyType(
    {
        "bool": ">?",
        "uint8": ">B",
        "uint16": ">H",
        "uint32": ">I",
        "uint64": ">Q",
        "int8": ">b",
        "int16": ">h",
        "int32": ">i",
        "int64": ">q",
    }
)


class DeviceLoadError(ValueError):
    """A device section cannot be loaded: unknown device, unsupported version, bad body."""

    def __init__(self, idstr: str, instance_id: int, reason: str) -> None:
        self.idstr = idstr
        self.instance_id = instance_id
        self.reason = reason
        super().__init__(f"device {idstr!r} instance {instance_id}: {reason}")


@dataclass(frozen=True)
class DeviceState:
    """One saved device section: what goes on the wire, plus its vmdesc entry (if known)."""

    idstr: str
    instance_id: int
    version_id: int
    body: bytes
    vmdesc_entry: dict[str, Any] | None = field(default=None, compare=False)


# ---------------------------------------------------------------------- vmstate fields


@dataclass(frozen=True)
class Field:
    """One vmstate field. ``size`` fixes a buffer's length; ``size_from`` names the earlier
    integer field that holds a variable buffer's length (times ``scale``), like VMSTATE_VBUFFER."""

    name: str
    type: str
    size: int | None = None
    size_from: str | None = None
    scale: int = 1


def _field_len(f: Field, values: dict[str, Any]) -> int:
    if f.type in _INT_FORMATS:
        return struct.calcsize(_INT_FORMATS[f.type])
    if f.size_from is not None:
        return int(values[f.size_from]) * f.scale
    assert f.size is not None, f"field {f.name} needs a size"
    return f.size


def encode_fields(fields: tuple[Field, ...], values: dict[str, Any]) -> tuple[bytes, list[dict[str, Any]]]:
    """Body bytes and the vmdesc ``fields`` list (with actual sizes) for ``values``."""
    parts: list[bytes] = []
    desc: list[dict[str, Any]] = []
    for f in fields:
        n = _field_len(f, values)
        if f.type in _INT_FORMATS:
            b = struct.pack(_INT_FORMATS[f.type], values[f.name])
        elif f.type == "unused_buffer":
            b = bytes(n)
        else:
            b = bytes(values[f.name])
            if len(b) != n:
                raise ValueError(f"field {f.name}: {len(b)} bytes, expected {n}")
        parts.append(b)
        desc.append({"name": f.name, "type": "buffer" if f.type == "vbuffer" else f.type, "size": n})
    return b"".join(parts), desc


def decode_fields(fields: tuple[Field, ...], body: bytes, fail: Callable[[str], Exception]) -> dict[str, Any]:
    """Inverse of :func:`encode_fields`; the body must be consumed exactly."""
    values: dict[str, Any] = {}
    pos = 0
    view = memoryview(body)
    for f in fields:
        n = _field_len(f, values)
        if pos + n > len(body):
            raise fail(f"body is {len(body)} bytes: too short for field {f.name!r} ({n} bytes at {pos})")
        if f.type in _INT_FORMATS:
            (values[f.name],) = struct.unpack_from(_INT_FORMATS[f.type], body, pos)
        elif f.type != "unused_buffer":
            values[f.name] = view[pos : pos + n]
        pos += n
    if pos != len(body):
        raise fail(f"body is {len(body)} bytes, expected {pos}")
    return values


# ---------------------------------------------------------------------- devices


class Device(ABC):
    """A device with a vmstate description; subclasses map their state to field values."""

    idstr: str
    vmsd_name: str
    version_id: int
    minimum_version_id: int
    instance_id: int = 0

    @abstractmethod
    def fields(self, version_id: int) -> tuple[Field, ...]: ...

    @abstractmethod
    def get_values(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_values(self, version_id: int, values: dict[str, Any]) -> None:
        """Apply decoded values; raise DeviceLoadError (via :meth:`error`) to refuse them."""

    def error(self, reason: str) -> DeviceLoadError:
        return DeviceLoadError(self.idstr, self.instance_id, reason)

    def save(self) -> DeviceState:
        body, fields = encode_fields(self.fields(self.version_id), self.get_values())
        entry = {
            "name": self.idstr,
            "instance_id": self.instance_id,
            "vmsd_name": self.vmsd_name,
            "version": self.version_id,
            "fields": fields,
        }
        return DeviceState(self.idstr, self.instance_id, self.version_id, body, entry)

    def load(self, version_id: int, body: bytes) -> None:
        if version_id > self.version_id:
            raise self.error(f"stream has version {version_id}, newer than ours ({self.version_id})")
        if version_id < self.minimum_version_id:
            raise self.error(
                f"stream has version {version_id}, older than we load ({self.minimum_version_id})"
            )
        self.set_values(version_id, decode_fields(self.fields(version_id), bytes(body), self.error))


class OpaqueDevice(Device):
    """A section kept as raw bytes (e.g. a real QEMU device): saved back exactly as loaded."""

    def __init__(self, state: DeviceState) -> None:
        self.state = state
        self.idstr = state.idstr
        self.instance_id = state.instance_id
        self.version_id = state.version_id
        self.minimum_version_id = 0
        self.vmsd_name = (state.vmdesc_entry or {}).get("vmsd_name", state.idstr)

    def fields(self, version_id: int) -> tuple[Field, ...]:
        return (Field("data", "buffer", size=len(self.state.body)),)

    def get_values(self) -> dict[str, Any]:
        return {"data": self.state.body}

    def set_values(self, version_id: int, values: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def save(self) -> DeviceState:
        if self.state.vmdesc_entry is not None:
            return self.state
        # No entry came with it: describe the body as one buffer so analyzers can still skip it.
        return DeviceState(
            self.idstr, self.instance_id, self.version_id, self.state.body, super().save().vmdesc_entry
        )

    def load(self, version_id: int, body: bytes) -> None:
        self.state = DeviceState(self.idstr, self.instance_id, version_id, bytes(body))
        self.version_id = version_id


class GlobalStateDevice(Device):
    """QEMU's ``globalstate``: the run state the source was in when migration stopped it.

    ``stored`` is what gets saved (QEMU: global_state_store() before stopping the VM); while
    nothing is stored, the current run state is saved. Loading stores the received state and sets
    ``received`` (QEMU: global_state_received / global_state_get_runstate).
    """

    idstr = "globalstate"
    vmsd_name = "globalstate"
    version_id = 1
    minimum_version_id = 1

    def __init__(self, current: Callable[[], str]) -> None:
        self._current = current
        self.stored: str | None = None
        self.received: str | None = None

    def fields(self, version_id: int) -> tuple[Field, ...]:
        return (Field("size", "uint32"), Field("runstate", "buffer", size=GLOBALSTATE_RUNSTATE_BYTES))

    def get_values(self) -> dict[str, Any]:
        state = (self.stored if self.stored is not None else self._current()).encode()
        if len(state) >= GLOBALSTATE_RUNSTATE_BYTES:
            raise ValueError(f"run state {state!r} does not fit globalstate's buffer")
        return {"size": len(state) + 1, "runstate": state.ljust(GLOBALSTATE_RUNSTATE_BYTES, b"\0")}

    def set_values(self, version_id: int, values: dict[str, Any]) -> None:
        raw = bytes(values["runstate"])
        # QEMU forces a NUL at the end and parses up to the first NUL; it ignores ``size``.
        name = raw[: GLOBALSTATE_RUNSTATE_BYTES - 1].split(b"\0", 1)[0].decode(errors="replace")
        if name not in QEMU_RUN_STATES:
            raise self.error(f"invalid run state {name!r}")
        self.stored = self.received = name


class TimerDevice(Device):
    """QEMU 7.2's ``timer`` layout; both offsets hold the frozen guest clock in ns."""

    idstr = "timer"
    vmsd_name = "timer"
    version_id = 2
    minimum_version_id = 2

    def __init__(self, get_clock: Callable[[], int], set_clock: Callable[[int], None]) -> None:
        self._get = get_clock
        self._set = set_clock

    def fields(self, version_id: int) -> tuple[Field, ...]:
        return (
            Field("cpu_ticks_offset", "int64"),
            Field("unused", "unused_buffer", size=8),
            Field("cpu_clock_offset", "int64"),
        )

    def get_values(self) -> dict[str, Any]:
        now = self._get()
        return {"cpu_ticks_offset": now, "cpu_clock_offset": now}

    def set_values(self, version_id: int, values: dict[str, Any]) -> None:
        self._set(int(values["cpu_clock_offset"]))


FILL_KINDS: Mapping[str, int] = MappingProxyType({"zero": 0, "random": 1})


@dataclass
class CpuState:
    """What the ``cpu`` device carries. ``block`` is "" (and ``generations`` empty) when no
    workload was ever bound; ``workload`` is the canonical spec string."""

    writes: int = 0
    rng_seed: int = 0
    rng_pos: int = 0
    fill: Fill = field(default_factory=Fill)
    block: str = ""
    workload: str = "none"
    generations: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))


class CpuDevice(Device):
    """The vCPU's state. Values come from and go to the guest through two callables."""

    idstr = "cpu"
    vmsd_name = "cpu"
    version_id = 1
    minimum_version_id = 1
    _FIELDS = (
        Field("writes", "uint64"),
        Field("rng_seed", "uint64"),
        Field("rng_pos", "uint64"),
        Field("fill_kind", "uint8"),
        Field("fill_seed", "uint64"),
        Field("block_len", "uint8"),
        Field("block", "vbuffer", size_from="block_len"),
        Field("workload_len", "uint16"),
        Field("workload", "vbuffer", size_from="workload_len"),
        Field("gen_pages", "uint64"),
        Field("generations", "vbuffer", size_from="gen_pages", scale=4),
    )

    def __init__(self, get_state: Callable[[], CpuState], set_state: Callable[[CpuState], None]) -> None:
        self._get = get_state
        self._set = set_state

    def fields(self, version_id: int) -> tuple[Field, ...]:
        return self._FIELDS

    def get_values(self) -> dict[str, Any]:
        s = self._get()
        block, workload = s.block.encode(), s.workload.encode()
        return {
            "writes": s.writes,
            "rng_seed": s.rng_seed,
            "rng_pos": s.rng_pos,
            "fill_kind": FILL_KINDS[s.fill.kind],
            "fill_seed": s.fill.seed,
            "block_len": len(block),
            "block": block,
            "workload_len": len(workload),
            "workload": workload,
            "gen_pages": len(s.generations),
            "generations": s.generations.astype(">u4").tobytes(),  # vmstate integers are big-endian
        }

    def set_values(self, version_id: int, values: dict[str, Any]) -> None:
        kinds = {v: k for k, v in FILL_KINDS.items()}
        if values["fill_kind"] not in kinds:
            raise self.error(f"unknown fill kind {values['fill_kind']}")
        try:
            block = bytes(values["block"]).decode()
            workload = bytes(values["workload"]).decode()
        except UnicodeDecodeError as e:
            raise self.error(f"bad text field: {e}") from None
        if not block and values["gen_pages"]:
            raise self.error("generation table without a block")
        gens = np.frombuffer(values["generations"], dtype=">u4").astype(np.uint32)
        self._set(
            CpuState(
                writes=values["writes"],
                rng_seed=values["rng_seed"],
                rng_pos=values["rng_pos"],
                fill=Fill(kinds[values["fill_kind"]], values["fill_seed"]),  # type: ignore[arg-type]
                block=block,
                workload=workload,
                generations=gens,
            )
        )


# ---------------------------------------------------------------------- the set


class DeviceSet:
    """The guest's devices in section order, keyed by (idstr, instance_id)."""

    def __init__(self) -> None:
        self._devices: dict[tuple[str, int], Device] = {}

    def register(self, device: Device) -> Device:
        key = (device.idstr, device.instance_id)
        if key in self._devices:
            raise ValueError(f"device {device.idstr!r} instance {device.instance_id} is already registered")
        self._devices[key] = device
        return device

    def add_opaque(self, state: DeviceState) -> OpaqueDevice:
        """Store a raw section (replacing an opaque one with the same key) for re-sending."""
        key = (state.idstr, state.instance_id)
        old = self._devices.get(key)
        if old is not None and not isinstance(old, OpaqueDevice):
            raise ValueError(f"device {state.idstr!r} instance {state.instance_id} is a native device")
        dev = OpaqueDevice(state)
        self._devices[key] = dev
        return dev

    def get(self, idstr: str, instance_id: int = 0) -> Device | None:
        return self._devices.get((idstr, instance_id))

    def __iter__(self) -> Iterator[Device]:
        return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, key: object) -> bool:
        return key in self._devices

    def save(self) -> list[DeviceState]:
        return [d.save() for d in list(self._devices.values())]

    def load(
        self,
        idstr: str,
        instance_id: int,
        version_id: int,
        body: bytes,
        *,
        vmdesc_entry: dict[str, Any] | None = None,
        unknown: Literal["error", "opaque"] = "error",
    ) -> Device:
        """Load one section into its device; all validation happens before any state changes."""
        dev = self._devices.get((idstr, instance_id))
        if isinstance(dev, OpaqueDevice) or (dev is None and unknown == "opaque"):
            return self.add_opaque(DeviceState(idstr, instance_id, version_id, bytes(body), vmdesc_entry))
        if dev is None:
            raise DeviceLoadError(idstr, instance_id, "unknown device")
        dev.load(version_id, body)
        return dev
