"""mig-bench postcopy: a 1 GiB guest whose vCPU dirties a hot working set faster than precopy can
converge, migrated between the two daemons (separate processes, loopback). After one precopy
pass the source switches to postcopy; the destination runs the guest at once, its vCPU faults on
the pages it lacks and requests them, while the background scan streams the rest at full speed
(max-postcopy-bandwidth unlimited). Reported: total time, downtime (stop to RUN), the fault
latency percentiles measured by the destination's vCPU (time blocked per fault), and the
background rate over the postcopy phase."""

from __future__ import annotations

import time
from typing import Any

import trio

from .procs import daemon_pair, wait_migration, wait_prealloc

GiB = 1 << 30
P99_TARGET_US = 2000


async def migrate_once(
    size: int, workload: str, postcopy_bandwidth: int = 0, preempt: bool = True
) -> dict[str, Any]:
    src_args = ["--ram", str(size), "--fill", "random", "--workload", workload]
    dst_args = ["--prealloc", str(size)]  # a running destination: its vCPU faults
    async with daemon_pair(src_args, dst_args) as pair:
        src, dst = pair.source, pair.dest
        for d in (src, dst):
            caps = [{"capability": "postcopy-ram", "state": True}]
            caps.append({"capability": "postcopy-preempt", "state": preempt})
            await d.execute("migrate-set-capabilities", {"capabilities": caps})
        await src.execute(
            "migrate-set-parameters",
            {
                "max-bandwidth": 1 << 40,
                "max-postcopy-bandwidth": postcopy_bandwidth,
                "x-postcopy-after-passes": 1,
                "downtime-limit": 20,
            },
        )
        await wait_prealloc(dst)
        seen: dict[str, float] = {}

        def note(info: dict[str, Any]) -> None:
            seen.setdefault(info.get("status", ""), time.perf_counter())
            if info.get("status") == "postcopy-active" and "postcopy_bytes_at_start" not in seen:
                seen["postcopy_bytes_at_start"] = info["ram"]["transferred"]

        t = time.perf_counter()
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        info = await wait_migration(src, timeout=300, on_poll=note, interval=0.01)
        end = time.perf_counter()
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
        dinfo = await dst.execute("query-migrate")
        if "postcopy-active" not in seen:
            raise RuntimeError("the migration never switched to postcopy")
        pc_start = seen["postcopy-active"]
        pc_bytes = info["ram"]["transferred"] - seen.get("postcopy_bytes_at_start", 0)
        await dst.execute("stop")
        check = await dst.execute("query-guest-check")
        return {
            "total_time_s": info["total-time"] / 1000,
            "wall_s": end - t,
            "downtime_ms": info.get("downtime"),
            "precopy_s": pc_start - t,
            "postcopy_s": end - pc_start,
            "postcopy_bytes": pc_bytes,
            "postcopy_GBps": pc_bytes / 1e9 / max(end - pc_start, 1e-6),
            "postcopy_requests": info["ram"]["postcopy-requests"],
            "faults": dinfo.get("x-postcopy-faults", {}),
            "blocktime_ms": dinfo.get("postcopy-blocktime"),
            "self_check_bad": check["bad-count"],
            "pages_checked": check["pages-checked"],
        }


def run(
    size: int = GiB,
    rounds: int = 3,
    workload: str = "hotset:rate=max,size=256M",
    postcopy_bandwidth: int = 0,
    preempt: bool = True,
) -> dict[str, Any]:
    results = [trio.run(migrate_once, size, workload, postcopy_bandwidth, preempt) for _ in range(rounds)]
    return {
        "guest_bytes": size,
        "workload": workload,
        "postcopy_bw": postcopy_bandwidth,
        "preempt": preempt,
        "rounds": results,
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"postcopy benchmark: {r['guest_bytes'] / GiB:.2f} GiB guest, workload {r['workload']}, "
        f"daemons as processes over loopback, switch after 1 precopy pass, postcopy-preempt "
        f"{'on' if r['preempt'] else 'off'}"
    ]
    for i, x in enumerate(r["rounds"], 1):
        f = x["faults"]
        ok = f.get("p99-us", 1e9) < P99_TARGET_US
        lines.append(
            f"  round {i}: total {x['total_time_s']:.2f} s (precopy {x['precopy_s']:.2f} s, postcopy "
            f"{x['postcopy_s']:.2f} s at {x['postcopy_GBps']:.2f} GB/s), downtime {x['downtime_ms']} ms; "
            f"{f.get('faults', 0)} faults, {x['postcopy_requests']} page requests; fault latency p50 "
            f"{f.get('p50-us', 0):.0f} us, p99 {f.get('p99-us', 0):.0f} us, max {f.get('max-us', 0):.0f} us "
            f"(of which mig-dest's fault-to-placed p50 {f.get('service-p50-us', 0):.0f} us, "
            f"p99 {f.get('service-p99-us', 0):.0f} us) "
            f"(p99 target < {P99_TARGET_US} us: {'PASS' if ok else 'FAIL'}); self-check: "
            f"{x['self_check_bad']} bad of {x['pages_checked']} pages"
        )
    return "\n".join(lines)
