"""Guest model shared by mig_source and mig_dest: RAM blocks, a vCPU process, devices.

Modules:

* :mod:`guest.model`: :class:`Guest`, the synchronous API the daemons use.
* :mod:`guest.ram`: :class:`RamBlock`, memfd-backed shared memory with numpy views.
* :mod:`guest.vcpu`: the vCPU process (``python -m guest.vcpu``) and its control handle.
* :mod:`guest.workload`: workload specs (``uniform:rate=20000``...) and the page-writing batch.
* :mod:`guest.dirty` / :mod:`guest.shared`: the race-free double-buffered dirty log.
* :mod:`guest.check`: the self-checking page format and the checker.
* :mod:`guest.devices`: vmstate-like device sections (cpu, timer, globalstate, opaque).
"""

from .check import page_image
from .devices import (
    CpuState,
    DeviceLoadError,
    DeviceSet,
    DeviceState,
    OpaqueDevice,
)
from .model import RUN_STATES, Guest, GuestStateError
from .ram import PAGE_SIZE, Fill, RamBlock
from .vcpu import VcpuCrashed, VcpuError
from .workload import WorkloadSpec, parse_workload

__all__ = [
    "PAGE_SIZE",
    "RUN_STATES",
    "CpuState",
    "DeviceLoadError",
    "DeviceSet",
    "DeviceState",
    "Fill",
    "Guest",
    "GuestStateError",
    "OpaqueDevice",
    "RamBlock",
    "VcpuCrashed",
    "VcpuError",
    "WorkloadSpec",
    "page_image",
    "parse_workload",
]
