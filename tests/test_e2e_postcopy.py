"""End to end postcopy: mig-source and mig-dest as real processes over loopback.

The guests dirty memory faster than the link carries (precopy alone would never converge), so
the source switches to postcopy: the destination runs the guest before it has all of its RAM, its
vCPU faults on missing pages and requests them, and background pages keep arriving. The proof of
"no page lost" is the destination's self-check (every page holds its latest write) once it is
stopped; with a paused destination, the digests of both guests are equal.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from .cutproxy import CutProxy
from .daemons import Daemon, Daemons, assert_completed, daemons

__all__ = ["daemons"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MiB = 1 << 20
PAGE = 4096
SLOW = 32 * MiB  # bytes/s: far below what the workload dirties


async def enable_postcopy(src: Daemon, dst: Daemon, *, preempt: bool = False, **params: int) -> None:
    await src.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt)
    await dst.set_capabilities(postcopy_ram=True, postcopy_preempt=preempt)
    await src.set_parameters(**{"max_bandwidth": SLOW, **params})


def faults_min(dst_info: dict[str, Any]) -> int:
    """Requested pages that came on the preempt channel: at least one per fault that was not
    served by a background page first (some are), and never more than were requested."""
    return 1 if dst_info["x-postcopy-requests"] else 0


async def assert_clean(d: Daemon, pages: int) -> dict[str, Any]:
    if await d.run_state() == "running":
        await d.execute("stop")
    chk = await d.check()
    assert chk["ok"] is True and chk["bad-count"] == 0 and not chk["bad-pages"], chk
    assert chk["pages-checked"] == pages, chk
    return chk


async def test_postcopy_auto_switch_paused_destination_is_identical(daemons: Daemons) -> None:
    """The policy switches by itself after passes that do not converge; the paused destination
    ends with the very guest the source stopped."""
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="128M", fill="random", workload="uniform:rate=max,size=64M") as src,
    ):
        await enable_postcopy(src, dst, x_postcopy_after_passes=2, downtime_limit=10)
        await src.migrate_to(dst)
        src_info = await src.wait_migration(timeout=60)
        dst_info = await dst.wait_migration(timeout=10)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert src_info["ram"]["dirty-sync-count"] >= 3, src_info  # two passes, then the switch
        assert dst_info["x-postcopy-state"] == "end", dst_info
        assert sorted(src_info["x-pongs"]) == [1, 2, 3, 4], src_info  # PING 1..4 all answered
        s, d = await src.digest(), await dst.digest()
        assert s["status"] == "postmigrate" and d["status"] == "paused", (s, d)
        assert s["digest"] == d["digest"], (s, d)
        await assert_clean(dst, 128 * MiB // PAGE)


@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt-channel"])
async def test_postcopy_running_destination_faults_pages_in(daemons: Daemons, preempt: bool) -> None:
    """migrate-start-postcopy during the first pass; the destination's vCPU runs at once and
    faults: its requests are served first while background pages stream (with postcopy-preempt,
    requested pages come on a second connection)."""
    async with (
        daemons.dest(paused=False) as dst,
        daemons.source(ram="128M", fill="random", workload="hotset:rate=max,size=32M") as src,
    ):
        await enable_postcopy(src, dst, preempt=preempt, max_postcopy_bandwidth=64 * MiB)
        await src.migrate_to(dst)
        await src.execute("migrate-start-postcopy")
        seen: set[str] = set()
        src_info = await src.wait_migration(timeout=60, on_poll=lambda i: seen.add(i.get("status", "")))
        dst_info = await dst.wait_migration(timeout=10)
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert "postcopy-active" in seen, seen
        if preempt:  # requested pages came on the preempt channel
            assert dst_info["x-postcopy-preempt"]["channels"] == 1, dst_info
            assert dst_info["x-postcopy-preempt"]["pages"] >= faults_min(dst_info), dst_info
        else:
            assert "x-postcopy-preempt" not in dst_info, dst_info
        assert src_info["ram"]["postcopy-requests"] > 0, src_info
        assert src_info["ram"]["postcopy-requests"] == dst_info["x-postcopy-requests"], (src_info, dst_info)
        faults = dst_info["x-postcopy-faults"]
        assert faults["faults"] > 0, dst_info
        assert dst_info["postcopy-blocktime"] >= 0 and len(dst_info["postcopy-vcpu-blocktime"]) == 1
        assert faults["p50-us"] <= faults["p99-us"] <= faults["max-us"], faults
        assert await dst.run_state() == "running"
        assert await src.run_state() == "postmigrate"
        await trio.sleep(0.5)  # it runs on with all of its RAM
        await assert_clean(dst, 128 * MiB // PAGE)


@pytest.mark.parametrize("preempt", [False, True], ids=["main-channel", "preempt-channel"])
async def test_postcopy_recovers_from_three_broken_links(daemons: Daemons, preempt: bool) -> None:
    """A proxy cuts the connection three times during postcopy; each time both sides pause and
    recover (migrate-recover, migrate resume); no page is lost. With postcopy-preempt the
    requested-pages channel is cut too, and opened again after each recovery."""
    channels = 2 if preempt else 1
    async with (
        daemons.dest(paused=False) as dst,
        daemons.source(ram="128M", fill="random", workload="hotset:rate=max,size=32M") as src,
        trio.open_nursery() as nursery,
    ):
        assert dst.port is not None
        proxy = CutProxy(dst.port)
        await nursery.start(proxy.serve)
        # slow background streaming: postcopy lasts long enough to be cut three times
        await enable_postcopy(src, dst, preempt=preempt, max_postcopy_bandwidth=12 * MiB)
        await src.execute("migrate", {"uri": proxy.uri})
        await src.execute("migrate-start-postcopy")
        await src.wait_migration({"postcopy-active"}, timeout=20)
        for cut in range(3):
            await trio.sleep(0.8)
            assert proxy.cut() == channels, f"cut {cut}: not every channel was open"
            s = await src.wait_migration({"postcopy-paused"}, timeout=20)
            d = await dst.wait_migration({"postcopy-paused"}, timeout=20)
            assert "postcopy paused" in s.get("error-desc", ""), s
            assert "cannot complete" in d.get("error-desc", ""), d
            assert await dst.run_state() == "running"  # the guest runs on, blocked only on faults
            await dst.execute("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
            addr = (await dst.query_migrate())["x-recover-address"][0]
            proxy.target_port = int(addr["port"])
            await src.execute("migrate", {"uri": proxy.uri, "resume": True})
            await src.wait_migration({"postcopy-active", "completed"}, timeout=20)
            await dst.wait_migration({"postcopy-active", "completed"}, timeout=20)
        src_info = await src.wait_migration(timeout=90)
        dst_info = await dst.wait_migration(timeout=10)
        nursery.cancel_scope.cancel()
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        assert proxy.connections == 4 * channels and proxy.cuts == 3
        await assert_clean(dst, 128 * MiB // PAGE)


async def test_postcopy_refuses_cancel_and_bad_resume(daemons: Daemons) -> None:
    async with (
        daemons.dest(paused=True) as dst,
        daemons.source(ram="64M", fill="random", workload="uniform:rate=max,size=32M") as src,
    ):
        with pytest.raises(Exception, match="no paused migration"):
            await src.execute("migrate", {"uri": dst.uri(), "resume": True})
        with pytest.raises(Exception, match="Migrate recover can only be run when postcopy is paused"):
            await dst.execute("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
        with pytest.raises(Exception, match="postcopy"):
            await src.execute("migrate-start-postcopy")  # capability not set
        await enable_postcopy(src, dst, max_postcopy_bandwidth=16 * MiB)
        await src.migrate_to(dst)
        await src.execute("migrate-start-postcopy")
        await src.wait_migration({"postcopy-active"}, timeout=20)
        with pytest.raises(Exception, match="cannot cancel a migration in postcopy"):
            await src.execute("migrate_cancel")
        src_info = await src.wait_migration(timeout=60)
        assert_completed(src_info)
        assert_completed(await dst.wait_migration(timeout=10), "dest")
        s, d = await src.digest(), await dst.digest()
        assert s["digest"] == d["digest"]


async def test_postcopy_resume_to_wrong_addresses_pauses_again(daemons: Daemons) -> None:
    """A resume to an address nobody listens on, then to one that never answers, leaves the
    source paused (never failed: the guest's state is split), and a real recovery still works."""
    async with (
        daemons.dest(paused=False) as dst,
        daemons.source(ram="64M", fill="random", workload="hotset:rate=max,size=16M") as src,
        trio.open_nursery() as nursery,
    ):
        assert dst.port is not None
        proxy = CutProxy(dst.port)
        await nursery.start(proxy.serve)
        await enable_postcopy(src, dst, max_postcopy_bandwidth=8 * MiB, x_completion_timeout=2)
        await src.execute("migrate", {"uri": proxy.uri})
        await src.execute("migrate-start-postcopy")
        await src.wait_migration({"postcopy-active"}, timeout=20)
        await trio.sleep(0.5)
        proxy.cut()
        await src.wait_migration({"postcopy-paused"}, timeout=20)
        await dst.wait_migration({"postcopy-paused"}, timeout=20)

        async def paused_with(text: str) -> bool:
            info = await src.query_migrate()
            return info["status"] == "postcopy-paused" and text in info.get("error-desc", "")

        nobody = trio.socket.socket()
        await nobody.bind(("127.0.0.1", 0))
        port = nobody.getsockname()[1]
        nobody.close()  # nothing listens there now
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}", "resume": True})
        await src.wait_until("a failed reconnect", lambda: paused_with("cannot connect"), timeout=20)

        silent = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        held: list[trio.SocketStream] = []

        async def hold() -> None:
            async with silent:
                while True:
                    held.append(await silent.accept())  # accepts, never answers

        nursery.start_soon(hold)
        silent_port = silent.socket.getsockname()[1]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{silent_port}", "resume": True})
        await src.wait_until("an unanswered handshake", lambda: paused_with("did not answer"), timeout=20)
        assert held, "the source never connected to the silent listener"

        await dst.execute("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
        addr = (await dst.query_migrate())["x-recover-address"][0]
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}", "resume": True})
        src_info = await src.wait_migration(timeout=60)
        dst_info = await dst.wait_migration(timeout=10)
        nursery.cancel_scope.cancel()
        assert_completed(src_info)
        assert_completed(dst_info, "dest")
        await assert_clean(dst, 64 * MiB // PAGE)
