"""Migration capabilities, parameters and status: QEMU 7.2's names, our explicit state machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any


class MigrationStatus(enum.Enum):
    """QEMU's MigrationStatus values."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus
FINAL = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

# Allowed transitions. A finished migration may start again from SETUP (a new migration).
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP, S.FAILED}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
    S.ACTIVE: frozenset({S.DEVICE, S.POSTCOPY_ACTIVE, S.COMPLETED, S.FAILED, S.CANCELLING, S.COLO}),
    S.DEVICE: frozenset({S.COMPLETED, S.FAILED, S.CANCELLING, S.POSTCOPY_ACTIVE}),
    S.POSTCOPY_ACTIVE: frozenset({S.COMPLETED, S.FAILED, S.POSTCOPY_PAUSED}),
    S.POSTCOPY_PAUSED: frozenset({S.POSTCOPY_RECOVER, S.FAILED}),
    S.POSTCOPY_RECOVER: frozenset({S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
    S.COLO: frozenset({S.COMPLETED, S.FAILED}),
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
    S.PRE_SWITCHOVER: frozenset({S.DEVICE, S.FAILED, S.CANCELLING}),
    S.WAIT_UNPLUG: frozenset({S.ACTIVE, S.FAILED, S.CANCELLING}),
}


class InvalidTransition(RuntimeError):
    pass


class StatusMachine:
    """The migration status with checked transitions; listeners hear every change."""

    def __init__(self) -> None:
        self.status = S.NONE
        self._listeners: list[Any] = []

    def on_change(self, fn: Any) -> None:
        self._listeners.append(fn)

    def to(self, new: MigrationStatus) -> None:
        if new not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"migration status cannot go from {self.status.value} to {new.value}")
        self.status = new
        for fn in self._listeners:
            fn(new)

    @property
    def active(self) -> bool:
        return self.status not in FINAL and self.status is not S.NONE


CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
)
# what this implementation can actually do; setting any other capability is refused clearly
SUPPORTED_CAPABILITIES = frozenset(
    {
        "events",
        "return-path",
        "auto-converge",
        "xbzrle",
        "postcopy-ram",
        "postcopy-blocktime",
        "postcopy-preempt",
    }
)


@dataclass
class Parameters:
    """migrate-set-parameters values (QEMU 7.2 names and defaults), plus our x- extensions."""

    max_bandwidth: int = 128 << 20  # bytes/s, QEMU's MAX_THROTTLE
    downtime_limit: int = 300  # ms
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    max_cpu_throttle: int = 99
    xbzrle_cache_size: int = 64 << 20
    announce_initial: int = 50
    multifd_channels: int = 2
    max_postcopy_bandwidth: int = 0
    throttle_trigger_threshold: int = 50
    # passes without convergence before the non-convergence policy acts (see README)
    x_max_passes: int = 30
    # passes at the highest throttle before giving up (only with auto-converge)
    x_max_throttled_passes: int = 10
    # seconds to wait for the destination's SHUT after the last byte
    x_completion_timeout: int = 30
    # with postcopy-ram: switch to postcopy by itself after this many passes that did not
    # converge (0: only on migrate-start-postcopy)
    x_postcopy_after_passes: int = 5

    @classmethod
    def names(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    def to_qmp(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def update(self, args: dict[str, Any]) -> None:
        """Validate everything first, then apply: a bad value changes nothing."""
        known = {f.name.replace("_", "-"): f for f in fields(self)}
        staged: dict[str, Any] = {}
        for key, value in args.items():
            f = known.get(key)
            if f is None:
                raise ValueError(f"Invalid parameter '{key}'")
            want = type(getattr(self, f.name))
            if want is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"Parameter '{key}' expects a boolean")
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"Parameter '{key}' expects an integer")
            elif value < 0:
                raise ValueError(f"Parameter '{key}' must not be negative")
            staged[f.name] = value
        if staged.get("max_cpu_throttle", self.max_cpu_throttle) > 99:
            raise ValueError("Parameter 'max-cpu-throttle' expects a value between 1 and 99")
        if staged.get("cpu_throttle_initial", self.cpu_throttle_initial) > 99:
            raise ValueError("Parameter 'cpu-throttle-initial' expects a value between 1 and 99")
        if staged.get("downtime_limit", self.downtime_limit) > 2_000_000:
            raise ValueError("Parameter 'downtime-limit' expects a value between 0 and 2000000")
        for name, value in staged.items():
            setattr(self, name, value)


@dataclass
class Capabilities:
    state: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CAPABILITIES, False))
    # what this daemon implements; setting anything else on is refused, never ignored
    supported: frozenset[str] = SUPPORTED_CAPABILITIES

    def __getitem__(self, name: str) -> bool:
        return self.state[name]

    def to_qmp(self) -> list[dict[str, Any]]:
        return [{"capability": k, "state": v} for k, v in self.state.items()]

    def update(self, caps: list[Any]) -> None:
        staged: dict[str, bool] = {}
        for item in caps:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise ValueError("each capability must be an object with 'capability' and 'state'")
            name, state = item["capability"], item["state"]
            if name not in self.state:
                raise ValueError(f"Invalid parameter '{name}'")
            if not isinstance(state, bool):
                raise ValueError(f"capability '{name}' state must be a boolean")
            if state and name not in self.supported:
                raise ValueError(f"capability '{name}' is not supported by this implementation")
            staged[name] = state
        self.state.update(staged)


PAGE_SIZE = 4096


@dataclass
class RamStats:
    transferred: int = 0
    duplicate: int = 0
    normal: int = 0
    normal_bytes: int = 0
    xbzrle_pages: int = 0
    xbzrle_bytes: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    pages_per_second: int = 0
    remaining: int = 0
    total: int = 0
    postcopy_requests: int = 0

    def to_qmp(self) -> dict[str, Any]:
        return {
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal_bytes,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "pages-per-second": self.pages_per_second,
            "postcopy-requests": self.postcopy_requests,
            "page-size": PAGE_SIZE,
            "multifd-bytes": 0,
            "precopy-bytes": self.transferred,
            "downtime-bytes": 0,
            "postcopy-bytes": 0,
        }
