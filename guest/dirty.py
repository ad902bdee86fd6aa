"""Dirty-page logging with a race-free get-and-clear, like KVM's KVM_GET_DIRTY_LOG.

The vCPU process writes pages in batches. For each batch it reads ``ACTIVE`` and ``LOGGING`` from
the shared header once, writes the pages, updates their generations and then sets their bytes in
bitmap ``ACTIVE``. It answers control requests only between batches.

``sync()`` flips ``ACTIVE`` and then *fences*: it sends the vCPU a request and waits for the ack.
The ack comes between two batches, so every batch that could have read the old index has
finished, its bits included; every later batch marks the other bitmap. Only then is the old
bitmap read and cleared. Hence a write is either in the bitmap returned now (and the migration
reads the page afterwards, seeing that write or a newer one) or in the next one: never lost. When
the vCPU is stopped (paused, never started, or crashed) no batch is in flight and the flip needs no
fence. :meth:`DirtyLog.start` fences too, so that no batch that started before logging was enabled
(and therefore does not log) is still writing when it returns.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from .shared import H_ACTIVE, H_LOGGING, SharedState

Fence = Callable[[], None]


class DirtyLog:
    """The dirty log of the workload's block; ``fence`` is ``None`` when the vCPU is stopped."""

    def __init__(self, shared: SharedState) -> None:
        self._shared = shared
        self._lock = threading.Lock()

    @property
    def logging(self) -> bool:
        return bool(self._shared.get(H_LOGGING))

    def start(self, fence: Fence | None) -> None:
        """Clear both bitmaps and start logging; on return every new write is logged."""
        with self._lock:
            s = self._shared
            s.set(H_LOGGING, 0)
            if fence is not None:
                fence()  # no batch may still be marking while we clear
            s.bitmaps.fill(0)
            s.set(H_ACTIVE, 0)
            s.set(H_LOGGING, 1)
            if fence is not None:
                fence()  # batches that read LOGGING == 0 have finished

    def stop(self) -> None:
        """Stop logging (a batch in flight may still mark: harmless)."""
        with self._lock:
            self._shared.set(H_LOGGING, 0)

    def sync(self, fence: Fence | None) -> np.ndarray:
        """Get-and-clear: a bool per page, True for pages written since the previous sync."""
        with self._lock:
            s = self._shared
            old = s.get(H_ACTIVE)
            s.set(H_ACTIVE, 1 - old)  # the other bitmap was cleared by the previous sync
            if fence is not None:
                fence()
            bm = s.bitmaps[old]
            out = bm.view(np.bool_).copy()
            bm.fill(0)
            return out
