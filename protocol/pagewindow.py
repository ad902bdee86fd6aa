"""Speculative page windows: predicted PAGE records received straight into guest RAM (sans-I/O).

In a page run every record is ``be64(offset | PAGE | CONTINUE)`` followed by the page, and the
next offset is almost always the previous one plus a page. A :class:`PageWindow` lays out the
next ``k`` records of such a prediction as a scatter list, [header slot 0, RAM page P,
header slot 1, RAM page P+1, ...], so that one ``recvmsg`` puts every page where it belongs
with no copy in user space. Afterwards :meth:`PageWindow.verified` checks the received headers
against the prediction; the records from the first mismatch on (and a record cut short) are
handed back to the decoder in stream order with :meth:`PageWindow.copy_out`, and the RAM pages
they touched are cleared with :meth:`PageWindow.scrub`.

That clearing is what makes speculation safe: the caller only predicts pages it has not written
yet in this stream, which are zero, so zeroing restores them exactly. The syscall is the
caller's (``mig_dest.scatter``); nothing here does I/O.
"""

from __future__ import annotations

import numpy as np

from .events import TARGET_PAGE_SIZE, RamFlag

PAGE = TARGET_PAGE_SIZE
PAGE_REC = 8 + PAGE
PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)
IOV_MAX = 1024  # Linux UIO_MAXIOV: two segments per record
MAX_RECORDS = IOV_MAX // 2


class PageWindow:
    """One reusable scatter layout of up to ``max_records`` predicted PAGE records."""

    def __init__(self, max_records: int = MAX_RECORDS) -> None:
        if not 1 <= max_records <= MAX_RECORDS:
            raise ValueError(f"max_records must be 1..{MAX_RECORDS}")
        self.max_records = max_records
        self._hdr = np.zeros(max_records, dtype=">u8")  # header slots, wire byte order
        self._hdr_bytes = self._hdr.view(np.uint8).reshape(max_records, 8)
        self._iov = np.empty((2 * max_records, 2), dtype=np.uint64)
        hdr_addr = self._hdr.ctypes.data
        self._iov[0::2, 0] = hdr_addr + 8 * np.arange(max_records, dtype=np.uint64)
        self._iov[0::2, 1] = 8
        self._iov[1::2, 1] = PAGE
        self._page_steps = PAGE * np.arange(max_records, dtype=np.uint64)
        self._pages: np.ndarray | None = None
        self._first = 0
        self._k = 0
        self._held = b""

    @property
    def size(self) -> int:
        """Bytes the open window spans: its ``k`` whole records."""
        return self._k * PAGE_REC

    def open(self, pages: np.ndarray, first: int, k: int, held: bytes | memoryview) -> np.ndarray:
        """Lay out records for ``pages[first : first + k]`` (a C-contiguous (n, PAGE) uint8 RAM
        array, which must stay alive until :meth:`close`) whose first ``len(held)`` bytes are
        already known. Returns the iovec array (rows of address, length) of the bytes still to
        receive: a view valid until the next ``open``."""
        if pages.ndim != 2 or pages.shape[1] != PAGE or not pages.flags.c_contiguous:
            raise ValueError("a page window needs a C-contiguous (n, PAGE) page array")
        if not 1 <= k <= self.max_records or first < 0 or first + k > len(pages):
            raise ValueError(f"window of {k} records at page {first} does not fit")
        h = len(held)
        if h >= PAGE_REC:
            raise ValueError("the held bytes must be less than one record")
        self._pages, self._first, self._k, self._held = pages, first, k, bytes(held)
        iov = self._iov
        base = pages.ctypes.data + first * PAGE
        iov[1 : 2 * k : 2, 0] = base + self._page_steps[:k]
        iov[1, 1] = PAGE
        iov[0, 0] = self._hdr.ctypes.data
        iov[0, 1] = 8
        if h < 8:  # the rest of header 0, then everything after it
            iov[0, 0] += h
            iov[0, 1] = 8 - h
            return iov[: 2 * k]
        iov[1, 0] += h - 8  # the rest of page 0
        iov[1, 1] = PAGE - (h - 8)
        return iov[1 : 2 * k]

    def close(self) -> None:
        self._pages = None
        self._held = b""

    def fill_held(self) -> None:
        """Put the held bytes where the layout has them (header slot 0, the start of page 0):
        call it once anything was received, before checking and handing back."""
        h = self._held
        if not h:
            return
        assert self._pages is not None
        self._hdr_bytes[0, : min(len(h), 8)] = np.frombuffer(h[:8], dtype=np.uint8)
        if len(h) > 8:
            self._pages[self._first, : len(h) - 8] = np.frombuffer(h[8:], dtype=np.uint8)

    def verified(self, got: int) -> int:
        """How many whole records at the start of the window, out of the ``got`` bytes it holds
        (held ones included), carry the predicted header."""
        full = min(got // PAGE_REC, self._k)
        if not full:
            return 0
        expected = (np.arange(self._first, self._first + full, dtype=np.uint64) << np.uint64(12)) | np.uint64(
            PAGE_CONT
        )
        ok = self._hdr[:full] == expected
        return full if ok.all() else int(np.argmin(ok))

    def copy_out(self, start: int, stop: int, out: np.ndarray) -> None:
        """The window's bytes ``[start, stop)`` in stream order into ``out`` (uint8, that long)."""
        pages = self._pages
        assert pages is not None and 0 <= start <= stop <= self.size and len(out) == stop - start
        hdr, first = self._hdr_bytes, self._first
        pos, o = start, 0
        while pos < stop:
            j, r = divmod(pos, PAGE_REC)
            if r == 0 and stop - pos >= PAGE_REC:  # whole records: two strided copies
                n = (stop - pos) // PAGE_REC
                recs = out[o : o + n * PAGE_REC].reshape(n, PAGE_REC)
                recs[:, :8] = hdr[j : j + n]
                recs[:, 8:] = pages[first + j : first + j + n]
                pos += n * PAGE_REC
                o += n * PAGE_REC
                continue
            end = min(stop, (j + 1) * PAGE_REC)  # a piece of record j
            if r < 8:
                end = min(end, j * PAGE_REC + 8)
                out[o : o + end - pos] = hdr[j, r : end - j * PAGE_REC]
            else:
                out[o : o + end - pos] = pages[first + j, r - 8 : end - j * PAGE_REC - 8]
            o += end - pos
            pos = end

    def scrub(self, keep: int, got: int) -> None:
        """Zero the RAM pages of records ``keep`` on that received any byte of the ``got``: they
        were zero before the window was opened (never written in this stream)."""
        pages = self._pages
        assert pages is not None
        if got <= keep * PAGE_REC:
            return
        last = (got - 1) // PAGE_REC
        if (got - 1) % PAGE_REC < 8:  # the last byte is a header's: its page is untouched
            last -= 1
        if last >= keep:
            pages[self._first + keep : self._first + last + 1] = 0
