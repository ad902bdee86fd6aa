"""End to end: mig-source and mig-dest as real processes, migrating over loopback TCP.

Every test starts its own daemons (``tests/daemons.py``) on free ports and asserts on what the
daemons report over QMP: the migration status and error-desc, run states, the guests' digests
and their self-check (every page holds its latest write, see ``guest/check.py``).

Digests: the whole-guest ``digest`` includes the devices, and the timer device holds the guest
clock, so it is compared only between stopped guests (a source in ``postmigrate`` and a
destination started with ``--paused``); for a running guest the per-block RAM digests are used.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import trio

from protocol.encoder import MainEncoder
from protocol.events import Configuration, RamBlockInfo, RamBlockList, SectionPart, SectionStart, StreamHeader

from .daemons import Daemon, Daemons, assert_completed, daemons, migrate_and_wait

__all__ = ["daemons"]  # the fixture, imported so that pytest finds it

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MiB = 1 << 20
PAGE = 4096
FAST = 4 << 30  # max-bandwidth "unlimited" for loopback
MODEL_MACHINE = "x-migpy-model-1"


async def prepare(src: Daemon, *, return_path: bool = True, **params: int) -> None:
    await src.set_capabilities(return_path=return_path)
    await src.set_parameters(**{"max_bandwidth": FAST, **params})


async def assert_same_guest(src: Daemon, dst: Daemon) -> dict[str, Any]:
    """Source (postmigrate) and paused destination hold the same guest, bit for bit."""
    s, d = await src.digest(), await dst.digest()
    assert s["status"] == "postmigrate", s
    assert d["status"] == "paused", d
    assert s["blocks"] == d["blocks"], (s, d)
    assert s["devices"] == d["devices"], (s, d)
    assert s["digest"] == d["digest"]
    return d


async def assert_clean(d: Daemon, pages: int | None = None) -> dict[str, Any]:
    """Stop the guest (if it runs) and self-check it."""
    if await d.run_state() == "running":
        await d.execute("stop")
    chk = await d.check()
    assert chk["ok"] is True and chk["bad-count"] == 0 and not chk["bad-pages"], chk
    assert chk["pages-checked"] > 0, chk
    if pages is not None:
        assert chk["pages-checked"] == pages, chk
    return chk


async def wait_active_with_bytes(src: Daemon, min_bytes: int, timeout: float = 20.0) -> dict[str, Any]:
    """Poll until the migration is active and has sent at least ``min_bytes``."""

    async def probe() -> dict[str, Any] | None:
        info = await src.query_migrate()
        assert info.get("status") in ("setup", "active"), f"migration ended early: {info}"
        if info["status"] == "active" and info["ram"]["transferred"] >= min_bytes:
            return info
        return None

    return await src.wait_until(f"an active migration past {min_bytes} bytes", probe, timeout)


# ---------------------------------------------------------------------------------------------
# 1. idle guest


async def test_idle_guest_migrates_bit_exact(daemons: Daemons) -> None:
    async with daemons.dest(paused=True) as dst, daemons.source(ram="128M", fill="random") as src:
        await prepare(src)
        before = await src.ram_digest()
        src_info, dst_info = await migrate_and_wait(src, dst)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert src_info["ram"]["total"] == 128 * MiB
        assert src_info["ram"]["transferred"] >= 128 * MiB  # random fill: every page is sent
        d = await assert_same_guest(src, dst)
        assert d["blocks"] == before
        # a stopped destination is "paused"; cont runs it (no workload: nothing else to see)
        await dst.execute("cont")
        assert await dst.run_state() == "running"
        assert await src.run_state() == "postmigrate"
        await assert_clean(dst, pages=128 * MiB // PAGE)


# ---------------------------------------------------------------------------------------------
# 2. a guest dirtying pages fast, but converging


async def test_dirtying_guest_converges(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="256M", fill="random", workload="hotset:rate=50000,size=16M") as src,
    ):
        await prepare(src, downtime_limit=300)
        src_info, dst_info = await migrate_and_wait(src, dst)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        ram = src_info["ram"]
        assert ram["dirty-sync-count"] >= 2, src_info
        # pages the vCPU wrote after they were sent went again: more than one copy of RAM
        assert ram["normal"] > 256 * MiB // PAGE, src_info
        assert src_info["downtime"] >= 0
        await assert_same_guest(src, dst)
        await assert_clean(dst, pages=256 * MiB // PAGE)


# ---------------------------------------------------------------------------------------------
# 3. the destination runs the workload on


async def test_destination_runs_the_workload_on(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=False) as dst,
        daemons.source(ram="128M", fill="random", workload="hotset:rate=20000,size=16M") as src,
    ):
        await prepare(src)
        src_info, dst_info = await migrate_and_wait(src, dst)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert await src.run_state() == "postmigrate"
        assert await dst.run_state() == "running"
        final = await src.digest()  # the source is stopped for good: its last state

        async def moved_on() -> bool:
            return (await dst.ram_digest()) != final["blocks"]

        # the destination's vCPU keeps writing from where the source stopped
        await dst.wait_until("the destination guest to write pages", moved_on, timeout=10)
        await trio.sleep(1.0)  # let it run on a little (the assertions do not depend on it)
        await dst.execute("stop")
        assert await dst.run_state() == "paused"
        d = await dst.digest()
        assert d["blocks"] != final["blocks"]
        # the CPU device holds the vCPU's write counter and workload position: it advanced
        assert d["devices"]["cpu:0"] != final["devices"]["cpu:0"]
        # the write counter itself is not exposed over QMP, so "beyond the source's" is shown
        # by the changed cpu device state above and by the clean self-check below
        await assert_clean(dst, pages=128 * MiB // PAGE)
        # and the source's final state was consistent too
        await assert_clean(src, pages=128 * MiB // PAGE)


# ---------------------------------------------------------------------------------------------
# 4. a guest that dirties more than the link carries


async def test_no_convergence_fails_and_source_keeps_running(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="64M", fill="zero", workload="uniform:rate=max") as src,
    ):
        await src.set_capabilities(return_path=True, auto_converge=False)
        await src.set_parameters(max_bandwidth=64 * MiB, downtime_limit=1, x_max_passes=3)
        passes: list[int] = []
        with src.qmp.events() as events:
            await src.migrate_to(dst)
            info = await src.wait_migration(timeout=40)
            while True:
                try:
                    ev = events.receive_nowait()
                except trio.WouldBlock:
                    break
                if ev["event"] == "MIGRATION_PASS":
                    passes.append(ev["data"]["pass"])
        assert info["status"] == "failed", info
        desc = info.get("error-desc", "")
        assert "did not converge" in desc and "3 passes" in desc, info
        assert len(passes) == 3, passes
        assert await src.run_state() == "running"
        # the guest really runs: its RAM keeps changing
        first = await src.ram_digest()

        async def changed() -> bool:
            return (await src.ram_digest()) != first

        await src.wait_until("the source guest to keep writing", changed, timeout=10)
        # the destination saw the stream end early, and holds no guest
        dinfo = await dst.wait_migration(timeout=10)
        assert dinfo["status"] == "failed", dinfo
        assert await dst.run_state() == "inmigrate"
        await assert_clean(src, pages=64 * MiB // PAGE)


async def test_auto_converge_throttles(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="64M", fill="zero", workload="uniform:rate=max") as src,
    ):
        await src.set_capabilities(return_path=True, auto_converge=True)
        await src.set_parameters(
            max_bandwidth=128 * MiB,
            downtime_limit=1,
            cpu_throttle_initial=50,
            cpu_throttle_increment=20,
            max_cpu_throttle=99,
            x_max_throttled_passes=2,
        )
        throttles: list[int] = []

        def record(info: dict[str, Any]) -> None:
            throttles.append(info.get("cpu-throttle-percentage", 0))

        with trio.fail_after(60):  # whatever the outcome: never hangs
            await src.migrate_to(dst)
            info = await src.wait_migration(timeout=60, on_poll=record)
        assert max(throttles) >= 50, f"auto-converge never throttled: {sorted(set(throttles))}"
        assert "cpu-throttle-percentage" not in info  # released when the migration ended
        if info["status"] == "completed":
            await assert_same_guest(src, dst)
            await assert_clean(dst, pages=64 * MiB // PAGE)
        else:
            assert info["status"] == "failed", info
            desc = info.get("error-desc", "")
            assert "did not converge" in desc and "CPU throttle" in desc, info
            assert await src.run_state() == "running"
            await assert_clean(src, pages=64 * MiB // PAGE)


# ---------------------------------------------------------------------------------------------
# 5. cancel


async def test_cancel_midway_then_migrate_again(daemons: Daemons) -> None:
    async with daemons.dest(paused=True) as dst, daemons.source(ram="256M", fill="random") as src:
        await prepare(src, max_bandwidth=32 * MiB)  # 8 s for all of RAM: cancel well before
        before = await src.ram_digest()
        await src.migrate_to(dst)
        await wait_active_with_bytes(src, 4 * MiB)
        await src.execute("migrate_cancel")
        info = await src.wait_migration(timeout=10)
        assert info["status"] == "cancelled", info
        assert info["ram"]["transferred"] < 200 * MiB, info  # really mid-way
        assert await src.run_state() == "running"
        assert await src.ram_digest() == before
        dinfo = await dst.wait_migration({"failed", "completed"}, timeout=10)
        assert dinfo["status"] == "failed", dinfo
        assert await dst.run_state() == "inmigrate"  # it holds no guest
        # the destination takes a new migration, which completes
        await src.set_parameters(max_bandwidth=FAST)
        src_info, dst_info = await migrate_and_wait(src, dst)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        d = await assert_same_guest(src, dst)
        assert d["blocks"] == before
        assert dst_info["x-refused-connections"] == 0


# ---------------------------------------------------------------------------------------------
# 6. destination dies


async def test_destination_killed_midway(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="128M", fill="random", workload="hotset:rate=20000,size=16M") as src,
    ):
        await prepare(src, max_bandwidth=32 * MiB)
        await src.migrate_to(dst)
        await wait_active_with_bytes(src, 8 * MiB)
        dst.kill(signal.SIGKILL)
        info = await src.wait_migration(timeout=20)
        assert info["status"] == "failed", info
        desc = info.get("error-desc", "")
        assert "destination" in desc or "connection" in desc, info
        assert await src.run_state() == "running"
        # the workload goes on: RAM keeps changing
        first = await src.ram_digest()

        async def changed() -> bool:
            return (await src.ram_digest()) != first

        await src.wait_until("the source guest to keep writing", changed, timeout=10)
        await assert_clean(src, pages=128 * MiB // PAGE)


# ---------------------------------------------------------------------------------------------
# 7. malformed streams


async def send_stream(dst: Daemon, data: bytes, *, close: bool) -> None:
    """Connect to the destination's migration port and send ``data``; with ``close`` shut it."""
    stream = await trio.open_tcp_stream("127.0.0.1", dst.port)
    async with stream:
        await stream.send_all(data)
        if close:
            await stream.send_eof()
        # the destination closes its end once it has given up on the stream
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass


async def wait_failure(dst: Daemon, needle: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        info = await dst.query_migrate()
        if info.get("status") == "failed" and needle in info.get("error-desc", ""):
            return info
        return None

    return await dst.wait_until(f"a failure naming {needle!r}", probe, timeout=10)


async def test_malformed_streams_then_real_migration(daemons: Daemons) -> None:
    enc = MainEncoder()
    header = enc.encode(StreamHeader()) + enc.encode(Configuration(MODEL_MACHINE))
    async with daemons.dest(paused=True) as dst:
        # a valid header, then a PART of a section that was never started
        await send_stream(dst, header + enc.encode(SectionPart(99)), close=False)
        info = await wait_failure(dst, "never started")
        assert "SECTION_PART" in info["error-desc"] and "99" in info["error-desc"], info
        # random bytes: no QEVM magic
        await send_stream(dst, bytes(range(7, 256)) * 4, close=False)
        await wait_failure(dst, "bad magic")
        # a stream cut in the middle of the RAM section's block list
        blocks = RamBlockList((RamBlockInfo("pc.ram", 64 * MiB),))
        start = enc.encode(SectionStart(2, "ram", 0, 4)) + enc.encode(blocks)
        await send_stream(dst, header + start[:-5], close=True)
        info = await wait_failure(dst, "stream ends in the middle")
        assert dst.alive()
        assert await dst.run_state() == "inmigrate"
        assert info["x-refused-connections"] == 0
        # ... and then a real migration goes through
        async with daemons.source(ram="64M", fill="random") as src:
            await prepare(src)
            src_info, dst_info = await migrate_and_wait(src, dst)
            assert_completed(src_info)
            assert_completed(dst_info, "dest")
            await assert_same_guest(src, dst)


# ---------------------------------------------------------------------------------------------
# 8. one incoming migration at a time


async def test_second_incoming_migration_refused(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="128M", fill="random") as src,
        daemons.source(ram="64M", fill="zero", paused=True) as intruder,
    ):
        await prepare(src, max_bandwidth=32 * MiB)
        await prepare(intruder)
        await src.migrate_to(dst)
        await wait_active_with_bytes(src, 2 * MiB)
        assert (await dst.query_migrate())["x-refused-connections"] == 0
        await intruder.migrate_to(dst)
        bad = await intruder.wait_migration(timeout=20)
        assert bad["status"] == "failed", bad
        assert "destination" in bad.get("error-desc", "") or "connection" in bad.get("error-desc", "")
        assert (await dst.query_migrate())["x-refused-connections"] == 1
        assert (await src.query_migrate())["status"] == "active"
        # the first migration goes on and completes (faster now)
        await src.set_parameters(max_bandwidth=FAST)
        src_info = await src.wait_migration(timeout=30)
        dst_info = await dst.wait_migration(timeout=10)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert dst_info["x-refused-connections"] == 1
        await assert_same_guest(src, dst)
        # the intruder's guest never left
        assert await intruder.run_state() == "prelaunch"


# ---------------------------------------------------------------------------------------------
# 9. the official qemu.qmp library drives a migration


async def test_qemu_qmp_library_drives_a_migration(daemons: Daemons) -> None:
    from qemu.qmp import QMPClient

    async with daemons.dest(paused=True) as dst, daemons.source(ram="64M", fill="random") as src:

        async def drive() -> dict[str, Any]:
            s, d = QMPClient("mig-source"), QMPClient("mig-dest")
            await s.connect(str(src.qmp_path))
            await d.connect(str(dst.qmp_path))
            try:
                await s.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "return-path", "state": True}]},
                )
                await s.execute("migrate-set-parameters", {"max-bandwidth": FAST})
                await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{dst.port}"})
                while True:
                    info = await s.execute("query-migrate")
                    if info["status"] in ("completed", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.05)
                return {
                    "info": info,
                    "dest-info": await d.execute("query-migrate"),
                    "src": await s.execute("query-guest-digest"),
                    "dst": await d.execute("query-guest-digest"),
                    "dst-status": await d.execute("query-status"),
                }
            finally:
                await s.disconnect()
                await d.disconnect()

        out = await trio.to_thread.run_sync(lambda: asyncio.run(asyncio.wait_for(drive(), 60)))
        assert_completed(out["info"])
        assert_completed(out["dest-info"], "dest")
        assert out["src"]["digest"] == out["dst"]["digest"]
        assert out["dst-status"] == {"running": False, "singlestep": False, "status": "paused"}


# ---------------------------------------------------------------------------------------------
# 10. no return path


async def test_without_return_path(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True, listen=None) as dst,
        daemons.source(ram="64M", fill="random", workload="hotset:rate=20000,size=8M") as src,
    ):
        assert await dst.listen_addresses() == []
        await dst.migrate_incoming("tcp:127.0.0.1:0")  # QEMU's -incoming defer + migrate-incoming
        assert dst.port
        await prepare(src, return_path=False)
        caps = {c["capability"]: c["state"] for c in await src.execute("query-migrate-capabilities")}
        assert caps["return-path"] is False
        src_info, dst_info = await migrate_and_wait(src, dst)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        await assert_same_guest(src, dst)
        await assert_clean(dst, pages=64 * MiB // PAGE)
