"""mig-bench: benchmarks that print ratios measured in the same run."""

from __future__ import annotations

import argparse
import json
import sys


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mig-bench", description=__doc__)
    sub = ap.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("protocol", help="decode/encode throughput of synthetic streams vs memcpy")
    p.add_argument("--size", type=_size, default=1 << 30, help="guest bytes per stream (default 1G)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("precopy", help="daemon to daemon over loopback vs a raw loopback copy")
    p.add_argument("--size", type=_size, default=1 << 30)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("qemu", help="QEMU->QEMU vs QEMU->mig-dest, 1 GiB guest with 768 MiB random data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("postcopy", help="1 GiB hot-set guest in postcopy: fault latency while pages stream")
    p.add_argument("--size", type=_size, default=1 << 30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workload", default="hotset:rate=max,size=256M")
    p.add_argument(
        "--max-postcopy-bandwidth", type=_size, default=0, help="background rate limit (default 0: unlimited)"
    )
    p.add_argument(
        "--no-preempt", action="store_true", help="requested pages on the main channel (no postcopy-preempt)"
    )
    p.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    if args.bench == "protocol":
        from .protocol_bench import report, run

        result = run(args.size, args.repeat)
        print(json.dumps(result, indent=2) if args.json else report(result))
        return 0
    if args.bench == "precopy":
        from .precopy_bench import report, run

        result = run(args.size, args.rounds)
        print(json.dumps(result, indent=2) if args.json else report(result))
        return 0
    if args.bench == "postcopy":
        from .postcopy_bench import report, run

        result = run(args.size, args.rounds, args.workload, args.max_postcopy_bandwidth, not args.no_preempt)
        print(json.dumps(result, indent=2) if args.json else report(result))
        return 0
    if args.bench == "qemu":
        from .qemu_bench import report, run

        result = run(args.rounds)
        print(json.dumps(result, indent=2) if args.json else report(result))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
