"""The demo: a 1 GiB guest that keeps dirtying memory moves from mig-source to mig-dest over
loopback, with live progress; then both digests are compared, and the guest runs on at the
destination and proves its memory consistent with the self-check.

    ./run demo [--ram 1G] [--workload hotset:rate=30000,size=64M] [--bandwidth 512M]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import trio

from control.daemon_common import parse_size
from control.format import human_bytes, progress_line

from .procs import daemon_pair, wait_migration


async def demo(args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    print(f"starting mig-dest and mig-source: {human_bytes(args.ram)} guest, workload {args.workload}")
    src_args = ["--ram", str(args.ram), "--fill", "random", "--workload", args.workload]
    dst_args = ["--paused", "--prealloc", str(args.ram)]
    async with daemon_pair(src_args, dst_args) as pair:
        src, dst = pair.source, pair.dest
        await src.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "return-path", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )
        await src.execute("migrate-set-parameters", {"max-bandwidth": args.bandwidth, "downtime-limit": 300})
        status = await src.execute("query-status")
        print(
            f"source guest is {status['status']}; migrating to tcp:127.0.0.1:{pair.port} "
            f"(max-bandwidth {human_bytes(args.bandwidth)}/s, downtime-limit 300 ms)"
        )
        last_print = 0.0

        def show(info: dict[str, Any]) -> None:
            nonlocal last_print
            now = time.monotonic()
            if tty:
                print("\r  " + progress_line(info) + "  ", end="", flush=True)
            elif now - last_print >= 1 or info.get("status") in ("completed", "failed"):
                print("  " + progress_line(info), flush=True)
                last_print = now

        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{pair.port}"})
        info = await wait_migration(src, timeout=600, on_poll=show, interval=0.1)
        if tty:
            print()
        if info["status"] != "completed":
            print(f"migration {info['status']}: {info.get('error-desc')}")
            return 1
        ram = info["ram"]
        print(
            f"migration completed: total {info['total-time']} ms, downtime {info['downtime']} ms, "
            f"{ram['dirty-sync-count']} dirty syncs, {human_bytes(ram['transferred'])} sent "
            f"({ram['normal']} normal pages, {ram['duplicate']} zero pages)"
        )
        d_src = await src.execute("query-guest-digest")
        d_dst = await dst.execute("query-guest-digest")
        same = d_src["digest"] == d_dst["digest"]
        print(f"source digest      {d_src['digest']} ({d_src['status']})")
        print(f"destination digest {d_dst['digest']} ({d_dst['status']})")
        print(f"digests match: {'YES' if same else 'NO'}")
        await dst.execute("cont")
        print("destination guest resumed; letting it run for 2 s ...")
        await trio.sleep(2)
        await dst.execute("stop")
        check = await dst.execute("query-guest-check")
        ok = check["bad-count"] == 0
        print(
            f"self-check on the destination after running on: {check['pages-checked']} pages checked, "
            f"{check['bad-count']} bad: {'CLEAN' if ok else 'BAD'}"
        )
        return 0 if same and ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo", description=__doc__.splitlines()[0])
    ap.add_argument("--ram", type=parse_size, default=1 << 30)
    ap.add_argument("--workload", default="hotset:rate=30000,size=64M")
    ap.add_argument("--bandwidth", type=parse_size, default=512 << 20, help="max-bandwidth per second")
    args = ap.parse_args(argv)
    return trio.run(demo, args)


if __name__ == "__main__":
    sys.exit(main())
