"""Fuzz the decoders with inputs mutated from the real captures.

Every input goes through the main-channel, return-path and multifd decoders in a random
chunking; the only exception allowed out is ProtocolError. Anything else (or a hang past the
per-input deadline) is a bug and stops the run with the input saved.

    python -m tests.fuzz_decoders --count 200000            # seeded random mutations
    python -m tests.fuzz_decoders --atheris -atheris_runs=200000   # coverage-guided (atheris)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from protocol.decoder import MainDecoder
from protocol.errors import ProtocolError
from protocol.multifd import MultifdChannelDecoder
from protocol.return_path import ReturnPathDecoder

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"
WINDOW = 6000  # bytes of capture per seed input: keeps one input to well under a millisecond


def seeds() -> list[tuple[str, bytes]]:
    """(kind, bytes) seeds: stream starts, and windows from inside streams (header-less)."""
    out: list[tuple[str, bytes]] = []
    for path in sorted(CAPTURES.glob("*.bin")):
        raw = path.read_bytes()
        if "return" in path.name:
            out.append(("rp", raw))
        elif "chan" in path.name:
            out.append(("multifd", raw[:WINDOW]))
        elif "resume" in path.name:
            out.append(("resume", raw[:WINDOW]))
        else:
            out.append(("main", raw[:WINDOW]))
            # the device area and trailer: the vmdesc-delimited path and its JSON
            out.append(("main-tail", raw[-WINDOW:]))
    pc = (CAPTURES / "postcopy-main.bin").read_bytes()
    out.append(("resume", pc[353362 : 353362 + 13000]))  # the PACKAGED blob and what follows
    return out


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.choice((1, 1, 2, 3, 8))):
        op = rnd.randrange(7)
        pos = rnd.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # flip bits
            buf[min(pos, len(buf) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[min(pos, len(buf) - 1)] = rnd.choice(
                (0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x07, 0x08, 0x7E, 0xFF)
            )
        elif op == 2:  # insert bytes
            buf[pos:pos] = rnd.randbytes(rnd.randrange(1, 16))
        elif op == 3 and buf:  # delete a span
            del buf[pos : pos + rnd.randrange(1, 64)]
        elif op == 4:  # truncate
            del buf[pos:]
        elif op == 5 and len(buf) >= 8:  # a lying big-endian length
            at = min(pos, len(buf) - 4)
            buf[at : at + 4] = rnd.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x01000001, 0x1000, 0)).to_bytes(4, "big")
        elif op == 6 and buf:  # duplicate a span
            n = rnd.randrange(1, 256)
            buf[pos:pos] = buf[pos : pos + n]
    return bytes(buf)


def run_one(kind: str, data: bytes, chunk: int) -> None:
    if kind == "rp":
        dec: object = ReturnPathDecoder()
    elif kind == "multifd":
        dec = MultifdChannelDecoder()
    elif kind == "resume" or kind == "main-tail":
        dec = MainDecoder(
            expect_header=False, lenient_blocks=True, assume_ram_section=True, max_device_area=1 << 20
        )
    else:
        dec = MainDecoder(max_device_area=1 << 20)
    try:
        for a in range(0, len(data), chunk):
            dec.feed(data[a : a + chunk])  # type: ignore[attr-defined]
            for _ in dec.events():  # type: ignore[attr-defined]
                pass
        dec.end_of_input()  # type: ignore[attr-defined]
    except ProtocolError:
        pass


def random_campaign(count: int, seed: int, crash_dir: Path) -> int:
    rnd = random.Random(seed)
    pool = seeds()
    start = time.monotonic()
    for i in range(count):
        kind, base = rnd.choice(pool)
        data = mutate(base, rnd)
        chunk = rnd.choice((1 << 20, 4096, 333, 17, 1)) if len(data) < 20000 else 1 << 20
        if chunk == 1 and len(data) > 2000:
            chunk = 7
        try:
            run_one(kind, data, chunk)
        except Exception as err:
            crash_dir.mkdir(parents=True, exist_ok=True)
            path = crash_dir / f"crash-{kind}-{i}.bin"
            path.write_bytes(data)
            print(f"input {i} ({kind}, chunk {chunk}) raised {type(err).__name__}: {err}; saved {path}")
            raise
    print(f"{count} mutated inputs, only ProtocolError escaped, {time.monotonic() - start:.1f} s")
    return count


def atheris_campaign(argv: list[str]) -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback over every loaded function, the decoders' too
    pool = seeds()

    def test_one(data: bytes) -> None:
        if len(data) < 2:
            return
        kind, base = pool[data[0] % len(pool)]
        # the fuzzer's bytes replace a window of the seed, so inputs stay stream-like
        at = (data[1] * 97) % max(len(base), 1)
        run_one(kind, base[:at] + data[2:] + base[at + len(data) :], 4096)

    atheris.Setup([sys.argv[0], *argv], test_one)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    ap.add_argument("--atheris", action="store_true")
    args, rest = ap.parse_known_args()
    if args.atheris:
        atheris_campaign(rest)
        return 0
    random_campaign(args.count, args.seed, args.crash_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
