"""mig-bench qemu: a paused 1 GiB QEMU guest holding 768 MiB of random data (``-device loader``)
migrated QEMU -> QEMU and QEMU -> mig-dest in the same run, max-bandwidth unlimited; prints both
times (QEMU's own total-time on the source) and their ratio. Each pair runs ``rounds`` times after
a warm-up (the first memory-heavy run pays the host's first touch); the best of each is compared.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from control.client import QmpClient

from .procs import free_port

MIB = 1 << 20


def _qemu_argv(qmp: Path, blob: Path | None, incoming: bool, prealloc: bool = False) -> list[str]:
    argv = [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-S",
        "-qmp",
        f"unix:{qmp},server=on,wait=off",
    ]
    if blob is not None:
        argv += ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]
    if incoming:
        argv += ["-incoming", "defer"]
    if prealloc:  # like mig-dest --prealloc: guest memory populated before the migration starts
        argv += ["-mem-prealloc"]
    return argv


def _listening(path: Path) -> bool:
    """A connection to the UNIX socket succeeds: QEMU binds it some time before it listens."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.asynccontextmanager
async def _process(argv: list[str], sock: Path, log: Path):  # type: ignore[no-untyped-def]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(30):
                while not _listening(sock):
                    if proc.poll() is not None:
                        raise RuntimeError(f"{argv[0]} exited: {log.read_text()[-1500:]}")
                    await trio.sleep(0.02)
            async with QmpClient.connect(str(sock)) as client:
                yield client
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _migrate(src: QmpClient, uri: str) -> float:
    """Seconds from the migrate command until the source reports completed (wall clock: QEMU's
    own total-time is sometimes reported as 0 for a migration this short)."""
    await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 300})
    start = time.perf_counter()
    await src.execute("migrate", {"uri": uri})
    with trio.fail_after(300):
        while True:
            info = await src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            await trio.sleep(0.005)
    elapsed = time.perf_counter() - start
    if info["status"] != "completed":
        raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
    if info["ram"]["normal"] < 196_000:  # 768 MiB of random pages must all have gone
        raise RuntimeError(f"only {info['ram']['normal']} normal pages were sent")
    return elapsed


async def qemu_to_qemu(work: Path, blob: Path, n: int, prealloc: bool = True) -> float:
    d_sock, s_sock = work / f"qd{n}.sock", work / f"qs{n}.sock"
    async with (
        _process(_qemu_argv(d_sock, None, True, prealloc), d_sock, work / f"qd{n}.log") as dst,
        _process(_qemu_argv(s_sock, blob, False), s_sock, work / f"qs{n}.log") as src,
    ):
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
        return await _migrate(src, f"tcp:127.0.0.1:{port}")


async def qemu_to_migdest(work: Path, blob: Path, n: int) -> float:
    port = free_port()
    d_sock, s_sock = work / f"md{n}.sock", work / f"qs{n}.sock"
    dest_argv = [
        sys.executable,
        "-m",
        "mig_dest",
        "--qmp",
        str(d_sock),
        "--log-json",
        "--listen",
        f"127.0.0.1:{port}",
        "--paused",
        "--prealloc",
        "1G",
    ]
    async with (
        _process(dest_argv, d_sock, work / f"md{n}.log") as dst,
        _process(_qemu_argv(s_sock, blob, False), s_sock, work / f"qs{n}.log") as src,
    ):
        with trio.fail_after(120):
            while not (await dst.execute("query-migrate")).get("x-prealloc", {}).get("ready"):
                await trio.sleep(0.05)
        elapsed = await _migrate(src, f"tcp:127.0.0.1:{port}")
        with trio.fail_after(60):
            while (await dst.execute("query-migrate")).get("status") != "completed":
                await trio.sleep(0.02)
        return elapsed


def run(rounds: int = 3) -> dict[str, Any]:
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("mig-bench qemu needs qemu-system-x86_64 (apt-get install qemu-system-x86)")
    work = Path(tempfile.mkdtemp(prefix="mig-bench-qemu-"))
    try:
        blob = work / "random.bin"
        np.random.default_rng(11).integers(0, 256, 768 * MIB, dtype=np.uint8).tofile(blob)
        trio.run(qemu_to_qemu, work, blob, 0)  # warm-up
        q2q, q2m, q2q_plain = [], [], []
        for n in range(1, rounds + 1):
            q2q.append(trio.run(qemu_to_qemu, work, blob, n))
            q2m.append(trio.run(qemu_to_migdest, work, blob, n))
            q2q_plain.append(trio.run(qemu_to_qemu, work, blob, n + 100, False))
        best_q, best_m = min(q2q), min(q2m)
        return {
            "qemu_to_qemu_plain_s": q2q_plain,
            "qemu_to_qemu_s": q2q,
            "qemu_to_migdest_s": q2m,
            "best_qemu_to_qemu_s": best_q,
            "best_qemu_to_migdest_s": best_m,
            "ratio": best_m / best_q,
            "median_ratio": float(np.median(q2m)) / float(np.median(q2q)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    def times(key: str) -> str:
        return ", ".join(f"{t:.3f}" for t in r[key])

    verdict = "PASS" if r["ratio"] <= 1.1 else "FAIL"
    return "\n".join(
        [
            "qemu benchmark: paused 1 GiB pc guest, 768 MiB random data, max-bandwidth unlimited",
            "  (seconds from migrate to completed on the source; both destinations preallocate memory)",
            f"  QEMU -> QEMU -mem-prealloc:      {times('qemu_to_qemu_s')} s "
            f"(best {r['best_qemu_to_qemu_s']:.3f})",
            f"  QEMU -> mig-dest --prealloc:     {times('qemu_to_migdest_s')} s "
            f"(best {r['best_qemu_to_migdest_s']:.3f})",
            f"  ratio mig-dest / QEMU: {r['ratio']:.2f} best to best (target <= 1.1: {verdict}); "
            f"median to median {r['median_ratio']:.2f}",
            f"  for reference, QEMU -> QEMU without -mem-prealloc: {times('qemu_to_qemu_plain_s')} s",
        ]
    )
