"""Page-level helpers both the precopy and the postcopy senders use."""

from __future__ import annotations

from typing import Any

import numpy as np

PAGE = 4096


def zero_pages_mask(pages: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Which of these pages (``pages[rows]``, all when None) are all zero. A page with a
    non-zero first word cannot be, so only the rest are read in full: random data costs one
    word per page, not 4 KiB, and no page is gathered."""
    words = pages.view(np.uint64)
    if rows is None:
        rows = np.arange(len(words))
        zero = words[:, 0] == 0
    else:
        zero = words[rows, 0] == 0
    cand = np.flatnonzero(zero)
    if len(cand):
        zero[cand] = ~words[rows[cand]].any(axis=1)
    return zero


def hole_pages(block: Any) -> np.ndarray:
    """Per page: True where the block's memory was never allocated (so it reads as zero)."""
    holes = np.ones(block.n_pages, dtype=bool)
    for start, stop in block.data_ranges():
        holes[start // PAGE : -(-stop // PAGE)] = False
    return holes
