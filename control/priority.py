"""Scheduling priority of the calling thread: bulk work yields the CPU to latency-critical work.

In postcopy a faulting vCPU waits for a round trip through both daemons. When the host's cores
are busy (here: the background stream on both sides and the vCPUs) every hop of that trip waits
for a core, up to a scheduler tick (4 ms here) each, unless the threads that stream in bulk run
at a lower priority than those on the fault path (the destination's fault thread, the source's
return-path reader, the vCPU). Measured with `mig-bench postcopy` on this 2-core machine: fault
latency p99 8-13 ms with equal priorities, 4.6-5.6 ms with the bulk threads at nice 10. A lower
priority is a weight, not a starvation: the background stream still gets every idle cycle and
its share of the busy ones (SCHED_IDLE measured no better and could starve it on a busy host,
with the guest split between two hosts).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

BULK_NICE = 10


def lower_thread_priority(log: Any = None) -> Callable[[], None]:
    """Put the calling thread at nice BULK_NICE (if it is not lower already); returns what puts
    it back, to be called from the same thread. Going back up needs CAP_SYS_NICE (root, or the
    systemd units' AmbientCapabilities); without it the thread stays low and the log says so."""
    tid = threading.get_native_id()
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        if old >= BULK_NICE:
            return lambda: None
        os.setpriority(os.PRIO_PROCESS, tid, BULK_NICE)
    except OSError as err:
        if log is not None:
            log.warning("could not lower the bulk thread's priority", error=str(err))
        return lambda: None

    def restore() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, old)
        except OSError as err:
            if log is not None:
                log.warning("could not restore the thread's priority (needs CAP_SYS_NICE)", error=str(err))

    return restore
