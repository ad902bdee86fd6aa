"""Human-readable rendering of sizes, rates, durations and QEMU's query-migrate replies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

_BINARY_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

#: MigrationStatus values after which nothing more will happen.
TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})


def human_bytes(n: float | None) -> str:
    """1536 -> '1.50 KiB'; bytes below 1 KiB are shown exactly."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in _BINARY_UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _BINARY_UNITS[-1]:
            return f"{sign}{value:.2f} {unit}"
    raise AssertionError("unreachable")


def human_rate_mbps(mbps: float | None) -> str:
    """QEMU's ram.mbps is megabits per second (10^6); switch to Gbps above 1000."""
    if mbps is None:
        return "-"
    if mbps >= 1000:
        return f"{mbps / 1000:.2f} Gbps"
    return f"{mbps:.1f} Mbps"


def human_ms(ms: float | None) -> str:
    """Milliseconds -> '350 ms', '12.3 s', '4m05s'."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def human_count(n: float | None) -> str:
    """Thousands separators: 1234567 -> '1,234,567'."""
    if n is None:
        return "-"
    return f"{int(n):,}"


def progress_fraction(info: Mapping[str, Any]) -> float | None:
    """Share of guest RAM not dirty any more: (total - remaining) / total.

    ``transferred`` is not usable here: it counts resent pages and exceeds ``total``."""
    ram = info.get("ram") or {}
    total = ram.get("total")
    remaining = ram.get("remaining")
    if not total or remaining is None:
        return 1.0 if info.get("status") == "completed" else None
    return min(1.0, max(0.0, (total - remaining) / total))


def progress_bar(fraction: float | None, width: int = 24) -> str:
    if fraction is None:
        return "[" + "?" * width + "]"
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_line(info: Mapping[str, Any], *, bar_width: int = 24) -> str:
    """One line of live progress from a query-migrate reply (absent fields are left out)."""
    status = str(info.get("status", "none"))
    ram = info.get("ram") or {}
    fraction = progress_fraction(info)
    pct = "  ?  %" if fraction is None else f"{fraction * 100:5.1f}%"
    parts = [f"{status:<15}", progress_bar(fraction, bar_width), pct]
    if "transferred" in ram:
        parts.append(f"sent {human_bytes(ram['transferred'])}")
    if "remaining" in ram:
        parts.append(f"left {human_bytes(ram['remaining'])}")
    if "mbps" in ram:
        parts.append(human_rate_mbps(ram["mbps"]))
    if "dirty-sync-count" in ram:
        parts.append(f"pass {ram['dirty-sync-count']}")
    if "expected-downtime" in info:
        parts.append(f"exp.downtime {human_ms(info['expected-downtime'])}")
    if ram.get("dirty-pages-rate"):
        parts.append(f"dirty {human_count(ram['dirty-pages-rate'])} pg/s")
    return "  ".join(parts)


def _row(label: str, value: str) -> str:
    return f"{label + ':':<22}{value}"


# rows that only describe a migration in flight, left out of the final summary
_LIVE_ONLY: Final = frozenset({"expected-downtime", "remaining", "dirty-pages-rate", "pages-per-second"})


def status_lines(info: Mapping[str, Any], *, final: bool = False) -> list[str]:
    """A query-migrate reply as 'label: value' lines (what HMP 'info migrate' shows)."""
    skip = _LIVE_ONLY if final else frozenset()
    lines = [_row("status", str(info.get("status", "none")))]
    if "error-desc" in info:
        lines.append(_row("error", str(info["error-desc"])))
    for key, label in (
        ("total-time", "total time"),
        ("expected-downtime", "expected downtime"),
        ("downtime", "downtime"),
        ("setup-time", "setup time"),
    ):
        if key in info and key not in skip:
            lines.append(_row(label, human_ms(info[key])))
    ram = info.get("ram")
    if ram:
        fraction = progress_fraction(info)
        if fraction is not None and info.get("status") not in TERMINAL_STATUSES:
            lines.append(_row("progress", f"{progress_bar(fraction)} {fraction * 100:.1f}%"))
        for key, label, fmt in (
            ("transferred", "transferred", human_bytes),
            ("remaining", "remaining", human_bytes),
            ("total", "total", human_bytes),
            ("mbps", "throughput", human_rate_mbps),
            ("dirty-sync-count", "passes", human_count),
            ("normal", "normal pages", human_count),
            ("normal-bytes", "normal bytes", human_bytes),
            ("duplicate", "zero pages", human_count),
            ("dirty-pages-rate", "dirty pages rate", lambda v: f"{human_count(v)} pages/s"),
            ("pages-per-second", "pages/s", human_count),
            ("postcopy-requests", "postcopy requests", human_count),
            ("precopy-bytes", "precopy bytes", human_bytes),
            ("downtime-bytes", "downtime bytes", human_bytes),
            ("postcopy-bytes", "postcopy bytes", human_bytes),
            ("multifd-bytes", "multifd bytes", human_bytes),
        ):
            if key in ram and key not in skip:
                lines.append(_row(label, fmt(ram[key])))
    for section in ("xbzrle-cache", "compression", "disk"):
        if info.get(section):
            lines.append(f"{section}:")
            lines.extend(f"  {k}: {v}" for k, v in info[section].items())
    return lines


def final_stats_lines(info: Mapping[str, Any]) -> list[str]:
    """Summary after a migration ended (same rows as status, headed by the outcome)."""
    status = info.get("status", "none")
    if status == "completed":
        head = "migration completed"
    elif status == "failed":
        head = f"migration failed: {info.get('error-desc', 'unknown error')}"
    elif status == "cancelled":
        head = "migration cancelled"
    else:
        head = f"migration {status}"
    return [head, *("  " + line for line in status_lines(info, final=True))]


def mapping_lines(value: Any) -> list[str]:
    """Generic rendering of a command result: 'key: value' for objects, JSON otherwise."""
    if isinstance(value, Mapping):
        if not value:
            return []
        width = max(len(str(k)) for k in value) + 2
        return [f"{str(k) + ':':<{width}}{_scalar(v)}" for k, v in value.items()]
    if isinstance(value, list):
        return [_scalar(v) for v in value]
    return [json.dumps(value)]


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(v)
