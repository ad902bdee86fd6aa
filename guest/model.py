"""The Guest: RAM blocks, devices, run state and the vCPU process, behind a synchronous API.

Every method is synchronous and fast (start/stop/sync: one round trip to the vCPU process,
about a millisecond) except :meth:`Guest.digest`, :meth:`Guest.check` and random fills, which
touch all of RAM; they spend their time in numpy and xxhash with the GIL released, so the daemons
run them through ``trio.to_thread.run_sync``. Methods may be called from several threads: state
changes are serialised by one lock.

Source side::

    g = Guest.create([("pc.ram", 1 << 30)], fill="random", seed=1,
                     workload=parse_workload("hotset:rate=50000,size=64M"))
    g.start(); g.start_dirty_log(); dirty = g.sync_dirty()  # ... precopy passes
    g.store_global_state(); g.stop("finish-migrate"); states = g.save_devices()

Destination side::

    g = Guest.from_block_list(announced)     # vCPU process pre-spawned, idle
    ... write pages into g.blocks[name].pages ...
    for s in sections: g.load_device(s.idstr, s.instance_id, s.version_id, s.body)
    if g.received_global_state == "running": g.start()   # continues the workload where it was

Postcopy destination (pages keep arriving after the guest runs; see :meth:`Guest.arm_postcopy`)::

    ... precopy pages, then the device sections (the "cpu" one creates the workload state) ...
    block = g.postcopy_block()
    received[block] = g.arm_postcopy(received[block])   # the shared present map, from now on
    g.start()
    # a trio task: await wait_readable(g.fault_fileno()); pages = g.read_faults(); request them
    # placing a page: write its bytes, THEN received[block][i] = True, then g.wake_vcpu()
    g.disarm_postcopy()                                  # every page arrived
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import xxhash

from .check import check as check_guest
from .devices import (
    QEMU_RUN_STATES,
    CpuDevice,
    CpuState,
    DeviceLoadError,
    DeviceSet,
    DeviceState,
    GlobalStateDevice,
    TimerDevice,
)
from .dirty import DirtyLog
from .ram import Fill, FillKind, RamBlock, RamPool
from .shared import H_POSTCOPY, H_RNG_POS, H_RNG_SEED, H_WRITES, SharedState
from .vcpu import VcpuCrashed, VcpuProcess
from .workload import WorkloadPlan, WorkloadSpec, parse_workload

RUN_STATES = QEMU_RUN_STATES | {"crashed"}
STOPPED_STATES = QEMU_RUN_STATES - {"running"}

BlockSpec = tuple[str, int] | tuple[str, int, int]


class GuestStateError(RuntimeError):
    """The operation does not fit the guest's current state (e.g. check() while running)."""


class Guest:
    """A guest: ordered RAM blocks, devices, a run state and (with a workload) a vCPU process."""

    def __init__(
        self,
        *,
        fill: Fill | None = None,
        seed: int = 0,
        workload: WorkloadSpec | None = None,
        run_state: str = "prelaunch",
        control_timeout: float = 5.0,
        native_devices: bool = True,
    ) -> None:
        """``native_devices=False``: a guest of a foreign machine (a real QEMU's), whose device
        sections are all kept verbatim as opaque devices; it has RAM but cannot execute."""
        if run_state not in STOPPED_STATES:
            raise ValueError(f"a new guest starts stopped, not in {run_state!r}")
        self.blocks: dict[str, RamBlock] = {}
        self.fill = fill or Fill()
        self.seed = seed
        self.control_timeout = control_timeout
        self._workload = workload or WorkloadSpec()
        self._run_state = run_state
        self._lock = threading.RLock()
        self._shared: SharedState | None = None
        self._shared_block: str | None = None
        self._dirty: DirtyLog | None = None
        self._logging = False
        self._vcpu: VcpuProcess | None = None
        self._vcpu_config: tuple[str, WorkloadPlan] | None = None
        # postcopy fault channel, made at the first configure: (daemon end, vCPU end)
        self._fault_pair: tuple[socket.socket, socket.socket] | None = None
        self._fault_lock = threading.Lock()  # fault socket I/O and close, apart from the main lock
        self._throttle = 0
        self._clock_ns = 0  # the guest clock while stopped
        self._clock_base: int | None = None  # monotonic_ns() - clock, while running
        self._closed = False
        self.devices = DeviceSet()
        self._globalstate = GlobalStateDevice(lambda: self.run_state)
        if native_devices:
            self.devices.register(TimerDevice(self.vm_clock_ns, self._set_clock))
            self.devices.register(CpuDevice(self._get_cpu_state, self._set_cpu_state))
            self.devices.register(self._globalstate)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        blocks: Iterable[BlockSpec],
        fill: FillKind = "zero",
        seed: int = 0,
        workload: WorkloadSpec | str | None = None,
        *,
        control_timeout: float = 5.0,
        prespawn_vcpu: bool = True,
    ) -> Guest:
        """A source guest in state ``prelaunch``: blocks filled, workload bound (not running).

        ``blocks`` are ``(name, size)`` or ``(name, size, max_size)`` for a resizable block.
        """
        if isinstance(workload, str):
            workload = parse_workload(workload)
        g = cls(fill=Fill(fill, seed), seed=seed, workload=workload, control_timeout=control_timeout)
        try:
            for spec in blocks:
                g.add_block(*spec)
            if not g.blocks:
                raise ValueError("a guest needs at least one RAM block")
            if fill == "random":
                for b in g.blocks.values():
                    b.fill_random(seed)
            if g._workload.active:
                g._bind_workload(g._workload)
                if prespawn_vcpu:
                    g.prepare_vcpu()
        except BaseException:
            g.close()
            raise
        return g

    @classmethod
    def empty(
        cls, *, prespawn_vcpu: bool = True, control_timeout: float = 5.0, native_devices: bool = True
    ) -> Guest:
        """A destination guest in state ``inmigrate`` without blocks (add them as announced).

        The vCPU process is spawned now, idle, so its start-up is not in the downtime.
        """
        g = cls(run_state="inmigrate", control_timeout=control_timeout, native_devices=native_devices)
        if prespawn_vcpu and native_devices:
            g.prepare_vcpu()
        return g

    @classmethod
    def from_block_list(
        cls,
        blocks: Iterable[BlockSpec],
        *,
        prespawn_vcpu: bool = True,
        control_timeout: float = 5.0,
        pool: RamPool | None = None,
        native_devices: bool = True,
    ) -> Guest:
        """A destination guest with zeroed blocks as announced by the source's RAM block list.

        With a preallocated ``pool`` big enough, the largest block is made of it."""
        g = cls.empty(
            prespawn_vcpu=prespawn_vcpu, control_timeout=control_timeout, native_devices=native_devices
        )
        specs = list(blocks)
        use_pool = None
        if pool is not None and specs:
            largest = max(range(len(specs)), key=lambda i: specs[i][1])
            if len(specs[largest]) == 2 and specs[largest][1] <= pool.size:
                use_pool = largest
        try:
            for i, spec in enumerate(specs):
                g.add_block(*spec, pool=pool if i == use_pool else None)
        except BaseException:
            g.close()
            raise
        return g

    def add_block(
        self, name: str, size: int, max_size: int | None = None, *, pool: RamPool | None = None
    ) -> RamBlock:
        with self._lock:
            self._check_open()
            if name in self.blocks:
                raise ValueError(f"RAM block {name!r} already exists")
            if pool is not None and max_size is None:
                block = RamBlock.from_pool(name, size, pool)
            else:
                block = RamBlock(name, size, max_size=max_size)
            self.blocks[name] = block
            return block

    def resize_block(self, name: str, size: int) -> None:
        with self._lock:
            if name == self._shared_block:
                raise GuestStateError(f"block {name!r} is the workload's: it cannot be resized")
            self._block(name).resize(size)

    def block_list(self) -> list[tuple[str, int]]:
        return [(name, b.size) for name, b in self.blocks.items()]

    # ------------------------------------------------------------------ workload binding

    @property
    def workload(self) -> WorkloadSpec:
        return self._workload

    @property
    def workload_block(self) -> str | None:
        """The block the workload writes (and whose generation table exists), if any."""
        return self._shared_block

    def set_workload(self, workload: WorkloadSpec | str | None) -> None:
        """Change the workload while stopped (its block can change only if it never wrote)."""
        if isinstance(workload, str):
            workload = parse_workload(workload)
        workload = workload or WorkloadSpec()
        with self._lock:
            self._check_open()
            if self._run_state == "running":
                raise GuestStateError("set_workload needs a stopped guest")
            if workload.active:
                self._bind_workload(workload)
            self._workload = workload

    def _bind_workload(self, spec: WorkloadSpec) -> None:
        sizes = {n: b.size for n, b in self.blocks.items()}
        block = spec.target_block(sizes)
        spec.resolve(sizes, self.seed)  # validate the range now, not at start()
        if self._shared_block == block:
            return
        if self._shared is not None:
            if self._shared.get(H_WRITES):
                raise GuestStateError(
                    f"the workload already wrote block {self._shared_block!r}; cannot move it"
                )
            self._drop_shared()
        self._attach_shared(block)
        assert self._shared is not None
        self._shared.set(H_RNG_SEED, self.seed if spec.seed is None else spec.seed)

    def _attach_shared(self, block: str) -> None:
        shared = SharedState(self.blocks[block].n_pages)
        self._shared, self._shared_block = shared, block
        self._dirty = DirtyLog(shared)
        self._vcpu_config = None

    def _drop_shared(self) -> None:
        if self._shared is not None:
            self._shared.close()
        self._shared = self._dirty = self._shared_block = None
        self._vcpu_config = None

    def _plan(self) -> WorkloadPlan:
        assert self._shared is not None and self._shared_block is not None
        spec = dataclasses.replace(self._workload, block=self._shared_block)
        return spec.resolve({n: b.size for n, b in self.blocks.items()}, self._shared.get(H_RNG_SEED))

    # ------------------------------------------------------------------ the vCPU process

    def prepare_vcpu(self) -> None:
        """Spawn the vCPU process now (non-blocking) so start() does not wait for it."""
        with self._lock:
            self._check_open()
            if self._vcpu is None:
                self._vcpu = VcpuProcess(timeout=self.control_timeout)

    def adopt_vcpu(self, vcpu: VcpuProcess) -> None:
        """Use an idle vCPU process spawned earlier (a daemon's spare) instead of spawning one:
        its interpreter start-up then happened before the migration, not during it."""
        with self._lock:
            self._check_open()
            if self._vcpu is not None:
                raise RuntimeError("this guest already has a vCPU process")
            self._vcpu = vcpu

    @property
    def vcpu_pid(self) -> int | None:
        return None if self._vcpu is None else self._vcpu.pid

    def _running_vcpu(self) -> VcpuProcess | None:
        """The vCPU process if it is executing the workload (i.e. a fence is needed)."""
        if self._run_state == "running" and self._vcpu_config is not None:
            return self._vcpu
        return None

    def _configured_vcpu(self) -> VcpuProcess:
        assert self._shared is not None and self._shared_block is not None
        plan = self._plan()
        if self._vcpu is None:
            self.prepare_vcpu()
        vcpu = self._vcpu
        assert vcpu is not None
        config = (self._shared_block, plan)
        if self._vcpu_config != config:
            ram = self.blocks[self._shared_block]
            _daemon_end, vcpu_end = self._fault_channel()
            vcpu.request(
                "configure",
                fds=[ram.fd, self._shared.fd, vcpu_end.fileno()],
                plan=plan.to_json(),
                block={"name": ram.name, "size": ram.size, "max_size": ram.max_size},
            )
            vcpu.request("throttle", pct=self._throttle)
            self._vcpu_config = config
        return vcpu

    def _fault_channel(self) -> tuple[socket.socket, socket.socket]:
        """The fault socketpair, made once per guest; every configure hands the vCPU its end."""
        with self._fault_lock:
            if self._fault_pair is None:
                self._check_open()
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                ours.setblocking(False)  # read_faults and wake_vcpu never block the daemon
                self._fault_pair = (ours, theirs)
                self._vcpu_config = None  # a vCPU configured before has no fault socket
            return self._fault_pair

    def _crashed(self, e: VcpuCrashed) -> VcpuCrashed:
        self._run_state = "crashed"
        self._clock_freeze()
        return e

    def _check_not_crashed(self) -> None:
        self._check_open()
        if self.run_state == "crashed":
            raise VcpuCrashed(self.vcpu_error or "the guest crashed")

    @property
    def vcpu_error(self) -> str | None:
        """Why the vCPU is considered crashed, if it is."""
        return None if self._vcpu is None else self._vcpu.error

    # ------------------------------------------------------------------ run state

    @property
    def run_state(self) -> str:
        """QEMU-style run state; "crashed" as soon as the vCPU process is found dead."""
        if self._run_state != "crashed" and self._vcpu is not None and self._vcpu.crashed:
            self._run_state = "crashed"
            self._clock_freeze()
        return self._run_state

    def start(self) -> None:
        """Run: resume (or start) the workload from the current RAM and cpu state."""
        with self._lock:
            self._check_not_crashed()
            if self._run_state == "running":
                return
            if self._workload.active and self._shared is not None:
                try:
                    self._configured_vcpu().request("run")
                except VcpuCrashed as e:
                    raise self._crashed(e) from None
            self._clock_base = time.monotonic_ns() - self._clock_ns
            self._run_state = "running"

    def stop(self, state: str = "paused") -> None:
        """Stop; on return the vCPU is really stopped (no page write in flight)."""
        if state not in STOPPED_STATES:
            raise ValueError(f"cannot stop into run state {state!r}")
        with self._lock:
            self._check_not_crashed()
            if self._run_state == "running":
                vcpu = self._running_vcpu()
                if vcpu is not None:
                    try:
                        vcpu.request("pause")
                    except VcpuCrashed as e:
                        raise self._crashed(e) from None
                self._clock_freeze()
            self._run_state = state

    def set_run_state(self, state: str) -> None:
        """Name the stopped state (e.g. "postmigrate", "inmigrate"); stops a running guest.
        Use start() to run."""
        self.stop(state)

    def set_throttle(self, pct: int) -> None:
        """CPU throttling like QEMU's auto-converge: the vCPU sleeps ``pct``% of the time."""
        if not isinstance(pct, int) or not 0 <= pct <= 99:
            raise ValueError(f"throttle must be an int in 0..99, got {pct!r}")
        with self._lock:
            self._check_not_crashed()
            self._throttle = pct
            if self._vcpu is not None and self._vcpu_config is not None:
                try:
                    self._vcpu.request("throttle", pct=pct)
                except VcpuCrashed as e:
                    raise self._crashed(e) from None

    @property
    def throttle(self) -> int:
        return self._throttle

    def store_global_state(self) -> None:
        """Record the current run state for ``globalstate`` (QEMU: global_state_store(),
        called by migration before it stops the guest)."""
        with self._lock:
            self._globalstate.stored = self.run_state

    @property
    def received_global_state(self) -> str | None:
        """The run state received in a ``globalstate`` section (the destination's cue to run)."""
        return self._globalstate.received

    # ------------------------------------------------------------------ clock

    def vm_clock_ns(self) -> int:
        """The guest's virtual clock: advances only while running."""
        base = self._clock_base
        return self._clock_ns if base is None else time.monotonic_ns() - base

    def _clock_freeze(self) -> None:
        if self._clock_base is not None:
            self._clock_ns = time.monotonic_ns() - self._clock_base
            self._clock_base = None

    def _set_clock(self, ns: int) -> None:
        self._clock_ns = ns

    # ------------------------------------------------------------------ dirty log

    def start_dirty_log(self) -> None:
        """Clear the log and start logging; every write after this returns is logged."""
        with self._lock:
            self._check_not_crashed()
            self._logging = True
            if self._dirty is not None:
                try:
                    self._dirty.start(self._fence())
                except VcpuCrashed as e:
                    raise self._crashed(e) from None

    def stop_dirty_log(self) -> None:
        with self._lock:
            self._logging = False
            if self._dirty is not None:
                self._dirty.stop()

    @property
    def dirty_logging(self) -> bool:
        return self._logging

    def _fence(self) -> Any:
        vcpu = self._running_vcpu()
        return None if vcpu is None else vcpu.fence

    def sync_dirty(self) -> dict[str, np.ndarray]:
        """Get-and-clear the dirty log: block name -> bool per page, written since the last sync.

        Race-free (see :mod:`guest.dirty`); raises VcpuCrashed if the vCPU died.
        """
        with self._lock:
            self._check_not_crashed()
            out: dict[str, np.ndarray] = {}
            for name, block in self.blocks.items():
                if name == self._shared_block and self._dirty is not None:
                    try:
                        out[name] = self._dirty.sync(self._fence())
                    except VcpuCrashed as e:
                        raise self._crashed(e) from None
                else:
                    out[name] = np.zeros(block.n_pages, dtype=bool)
            return out

    # ------------------------------------------------------------------ devices

    def _get_cpu_state(self) -> CpuState:
        s = self._shared
        if s is None:
            return CpuState(rng_seed=self.seed, fill=self.fill, workload=str(self._workload))
        return CpuState(
            writes=s.get(H_WRITES),
            rng_seed=s.get(H_RNG_SEED),
            rng_pos=s.get(H_RNG_POS),
            fill=self.fill,
            block=self._shared_block or "",
            workload=str(self._workload),
            generations=s.generations,
        )

    def _set_cpu_state(self, st: CpuState) -> None:
        def fail(reason: str) -> DeviceLoadError:
            return DeviceLoadError("cpu", 0, reason)

        try:
            spec = parse_workload(st.workload)
        except ValueError as e:
            raise fail(f"bad workload spec: {e}") from None
        if st.block:
            block = self.blocks.get(st.block)
            if block is None:
                raise fail(f"workload block {st.block!r} is not a RAM block here")
            if block.n_pages != len(st.generations):
                raise fail(
                    f"generation table has {len(st.generations)} pages, "
                    f"block {st.block!r} has {block.n_pages}"
                )
            if spec.active:
                try:
                    dataclasses.replace(spec, block=st.block).resolve(
                        {n: b.size for n, b in self.blocks.items()}, st.rng_seed
                    )
                except ValueError as e:
                    raise fail(f"workload does not fit this guest: {e}") from None
        # validated: apply
        if st.block:
            if self._shared_block != st.block:
                self._drop_shared()
                self._attach_shared(st.block)
            assert self._shared is not None
            self._shared.generations[:] = st.generations
            self._shared.set(H_WRITES, st.writes)
            self._shared.set(H_RNG_POS, st.rng_pos)
            self._shared.set(H_RNG_SEED, st.rng_seed)
        else:
            self._drop_shared()
        self.seed = st.rng_seed
        self.fill = st.fill
        self._workload = spec
        self._vcpu_config = None  # the plan may differ: reconfigure at start()

    def save_devices(self) -> list[DeviceState]:
        """Every device's state, in section order (consistent when the guest is stopped)."""
        with self._lock:
            self._check_open()
            return self.devices.save()

    def load_device(
        self,
        idstr: str,
        instance_id: int,
        version_id: int,
        body: bytes,
        *,
        vmdesc_entry: dict[str, Any] | None = None,
        unknown: Literal["error", "opaque"] = "error",
    ) -> None:
        """Load one device section (guest stopped). Unknown devices raise DeviceLoadError, or are
        kept verbatim with ``unknown="opaque"``."""
        with self._lock:
            self._check_open()
            if self._run_state == "running":
                raise DeviceLoadError(idstr, instance_id, "cannot load device state while the guest runs")
            self.devices.load(
                idstr, instance_id, version_id, body, vmdesc_entry=vmdesc_entry, unknown=unknown
            )

    def store_opaque_device(self, state: DeviceState) -> None:
        """Keep a raw device section (e.g. from a real QEMU) to re-send it verbatim."""
        with self._lock:
            self.devices.add_opaque(state)

    # ------------------------------------------------------------------ postcopy faults

    def postcopy_block(self) -> str | None:
        """The block postcopy faults can occur in: the workload's (the only one the vCPU
        touches), or None when there is no workload state."""
        return self._shared_block

    def arm_postcopy(self, received: np.ndarray) -> np.ndarray:
        """Run the vCPU with postcopy faults, like userfaultfd: its access to a page not present
        blocks that vCPU until the daemon places the page and calls :meth:`wake_vcpu`.

        ``received`` (a bool per page of :meth:`postcopy_block`) is copied into the shared present
        map; fault statistics are reset and stale fault messages dropped. Returns a bool view of
        that shared map, which the daemon must use as its received map of the block from then on.

        Ordering: a page becomes visible to the vCPU when its present byte is set, and the vCPU
        may write it at once; so write the page's contents first, then set the byte (never clear
        one while armed, and never write a page again once it is present).

        Needs the workload state (after the "cpu" device was loaded on a destination) and a
        stopped guest; raises GuestStateError otherwise or if ``received`` has the wrong size.
        """
        with self._lock:
            self._check_not_crashed()
            s = self._shared
            if s is None or self._shared_block is None:
                raise GuestStateError("no workload block: load the cpu device before arming postcopy")
            if self._run_state == "running":
                raise GuestStateError("arm_postcopy needs a stopped guest")
            rec = np.asarray(received)
            if rec.shape != (s.n_pages,):
                raise GuestStateError(
                    f"received map has shape {rec.shape}, block {self._shared_block!r} has {s.n_pages} pages"
                )
            self._fault_channel()
            s.present[:] = rec != 0
            s.reset_faults()
            self.read_faults()  # requests from an earlier arming are stale
            s.set(H_POSTCOPY, 1)
            return s.present.view(np.bool_)

    def disarm_postcopy(self) -> None:
        """End postcopy (every page is present): the vCPU ignores the present map and any vCPU
        blocked on a fault resumes. Idempotent."""
        with self._lock:
            if self._shared is not None:
                self._shared.set(H_POSTCOPY, 0)
        self.wake_vcpu()

    @property
    def postcopy_armed(self) -> bool:
        s = self._shared
        return s is not None and bool(s.get(H_POSTCOPY))

    def fault_fileno(self) -> int | None:
        """The daemon's end of the fault socket (non-blocking), readable when the vCPU faulted:
        for ``trio.lowlevel.wait_readable``. None before the channel exists (it is made by
        arm_postcopy or the vCPU's configuration). Call ``trio.lowlevel.notify_closing`` on it
        (or cancel the waiter) before :meth:`close`."""
        pair = self._fault_pair
        return None if pair is None else pair[0].fileno()

    def read_faults(self) -> np.ndarray:
        """Page indexes (intp, unique, sorted) of every pending fault message; never blocks.

        Empty when there is none. A page may be asked again (the vCPU resends after a second
        without a wake): requesting it twice is harmless.
        """
        parts: list[np.ndarray] = []
        with self._fault_lock:
            pair = self._fault_pair
            while pair is not None:
                try:
                    data = pair[0].recv(1 << 16)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                parts.append(np.frombuffer(data[: len(data) // 4 * 4], dtype="<u4"))
        if not parts:
            return np.empty(0, dtype=np.intp)
        pages = np.unique(np.concatenate(parts)).astype(np.intp)
        s = self._shared
        n = 0 if s is None else s.n_pages
        return pages[pages < n]  # never trust an index beyond the block

    def wake_vcpu(self) -> None:
        """Tell a vCPU blocked on a fault to look at the present map again (after placing pages).
        Cheap and never blocks: a full socket means a wake is already pending."""
        with self._fault_lock:
            if self._fault_pair is None:
                return
            with contextlib.suppress(BlockingIOError):
                self._fault_pair[0].send(b"\x01")

    def fault_stats(self) -> dict[str, Any]:
        """``{"faults", "blocked-ns", "p50-us", "p99-us", "max-us"}`` since the last arming:
        resolved faults, total blocked time and per-fault percentiles over the last FAULT_RING
        faults (zeros when there was none)."""
        with self._lock:
            if self._shared is None:
                return {"faults": 0, "blocked-ns": 0, "p50-us": 0.0, "p99-us": 0.0, "max-us": 0.0}
            return self._shared.fault_stats()

    # ------------------------------------------------------------------ whole-guest reads

    def generations(self, block: str) -> np.ndarray | None:
        """The live generation table of ``block`` (None: no workload ever bound there)."""
        return self._shared.generations if self._shared is not None and block == self._shared_block else None

    def stats(self) -> dict[str, Any]:
        """Cheap counters read from shared memory (no round trip to the vCPU)."""
        return {
            "run-state": self.run_state,
            "pages-written": 0 if self._shared is None else self._shared.get(H_WRITES),
            "throttle-pct": self._throttle,
            "workload": str(self._workload),
            "workload-block": self._shared_block,
            "dirty-logging": self._logging,
        }

    def vcpu_stats(self) -> dict[str, Any]:
        """The vCPU process's own counters (a round trip): batches, run and throttle seconds."""
        with self._lock:
            self._check_not_crashed()
            if self._vcpu is None or self._vcpu_config is None:
                return {"pages-written": self.stats()["pages-written"], "batches": 0, "running": False}
            try:
                reply = self._vcpu.request("stats")
            except VcpuCrashed as e:
                raise self._crashed(e) from None
            return {k: v for k, v in reply.items() if k not in ("ok", "seq")}

    def digest(self) -> str:
        """xxh3_128 (hex) of every block (name, size, bytes) in order, then every device
        (idstr, instance, version, length, body). Holes are hashed as zeros without being read.

        Meaningful when the guest is stopped; safe to run in a worker thread.
        """
        with self._lock:
            self._check_open()
            blocks = list(self.blocks.values())
            states = self.devices.save()
        h = xxhash.xxh3_128()
        for b in blocks:
            h.update(b.name.encode() + b"\0" + b.size.to_bytes(8, "little"))
            b.hash_into(h)
        for st in states:
            head = st.idstr.encode() + b"\0"
            head += st.instance_id.to_bytes(4, "little") + st.version_id.to_bytes(4, "little")
            h.update(head + len(st.body).to_bytes(8, "little"))
            h.update(st.body)
        return h.hexdigest()

    def check(self) -> dict[str, Any]:
        """Prove every page holds its latest write (or the initial fill); see :mod:`guest.check`.

        Needs a stopped guest: while the vCPU writes, pages and table race.
        """
        with self._lock:
            self._check_open()
            if self.run_state == "running":
                raise GuestStateError("check() needs a stopped guest")
        return check_guest(self)

    # ------------------------------------------------------------------ teardown

    def _block(self, name: str) -> RamBlock:
        try:
            return self.blocks[name]
        except KeyError:
            raise KeyError(f"no RAM block {name!r}") from None

    def _check_open(self) -> None:
        if self._closed:
            raise GuestStateError("the guest is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the vCPU process, unmap everything. Idempotent; never raises for a dead vCPU."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._vcpu is not None:
                self._vcpu.close()
            with self._fault_lock:
                if self._fault_pair is not None:
                    for sock in self._fault_pair:
                        sock.close()
                    self._fault_pair = None
            self._drop_shared()
            for b in self.blocks.values():
                b.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        blocks = ", ".join(f"{n}:{b.size:#x}" for n, b in self.blocks.items())
        return f"Guest({self._run_state}, [{blocks}], workload={self._workload})"
