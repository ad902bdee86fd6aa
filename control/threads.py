"""Blocking work on a worker thread that never outlives the trio task that owns it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio


async def run_owned_thread(work: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``work`` on a worker thread. If the calling task is cancelled, ``stop()`` (which
    must make ``work`` return soon) is called and the task waits, shielded, until ``work`` has
    returned: no thread is left using a socket or buffer its owner is about to close."""
    done = threading.Event()

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    try:
        await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except trio.Cancelled:
        stop()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(done.wait)
        raise
