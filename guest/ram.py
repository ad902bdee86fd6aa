"""Guest RAM blocks: named, memfd-backed, shared-mapped memory with numpy views.

A block is one memfd mapped ``MAP_SHARED``: the vCPU process maps the very same pages (its fd
travels over the control socket), so the workload's writes are the guest's RAM, with no copy and
without the daemon's GIL. Memory is allocated lazily by the kernel: a fresh block costs nothing
until a page is written. Reading a never-written page of a memfd DOES allocate it (shmem fills
holes on read faults), so whole-block readers (digest, check) walk the file's data ranges with
``SEEK_DATA``/``SEEK_HOLE`` and treat holes as zeros without touching them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import xxhash

PAGE_SIZE = 4096
PAGE_WORDS = PAGE_SIZE // 8

# The random fill is defined per 64 MiB chunk (one generator per chunk, seeded from
# (seed, block name, chunk index)) so that any chunk can be regenerated on its own: the checker
# verifies chunk by chunk and the filler runs chunks on both cores. Within a chunk, values are drawn
# in 4 MiB pieces to bound temporary memory; the piece size is part of the definition.
FILL_CHUNK = 64 << 20
FILL_PIECE = 4 << 20
# QEMU's RAM block idstr goes on the wire behind a one-byte length.
MAX_NAME_BYTES = 255

FillKind = Literal["zero", "random"]

HUGE_PAGE = 2 << 20  # x86-64 PMD size
MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in writable, without writing to them
MADV_COLLAPSE = 25  # Linux 6.1: back a range with huge pages now, whatever the sysfs THP policy
_MAP_FIXED = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_c_int = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _c_int, _c_int, _c_int, ctypes.c_long]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _address(m: mmap.mmap) -> int:
    """Where ``m`` is mapped (the temporary array's export ends with this call)."""
    return int(np.frombuffer(m, dtype=np.uint8).ctypes.data)


def map_memfd_huge_aligned(fd: int, length: int) -> tuple[mmap.mmap, int]:
    """Map ``length`` bytes of ``fd`` shared at a 2 MiB-aligned address: ``(mapping, start)``.

    A PMD can map a huge shmem page only where address and file offset are both 2 MiB-aligned,
    and Python's mmap picks an arbitrary address. So a Python mmap of ``length`` + 2 MiB
    reserves the range (its buffer tracking and its munmap on close cover ours too) and the
    memfd is mapped MAP_FIXED over its first aligned address; the data starts ``start`` bytes
    into the returned mapping.
    """
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    reserve = mmap.mmap(-1, length + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=rw)
    try:
        base = _address(reserve)
        start = -base % HUGE_PAGE
        got = _libc.mmap(base + start, length, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if got != base + start:
            err = ctypes.get_errno()
            raise OSError(err, f"mapping guest memory at a 2 MiB boundary: {os.strerror(err)}")
    except BaseException:
        reserve.close()
        raise
    return reserve, start


def _madvise(address: int, length: int, advice: int) -> int:
    """madvise through ctypes, which releases the GIL (mmap.madvise holds it): 0 or an errno."""
    return 0 if _libc.madvise(address, length, advice) == 0 else ctypes.get_errno()


@dataclass(frozen=True)
class Fill:
    """How a guest's RAM blocks were initialised: all zero, or seeded random bytes."""

    kind: FillKind = "zero"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("zero", "random"):
            raise ValueError(f"fill kind must be 'zero' or 'random', not {self.kind!r}")
        if not 0 <= self.seed < 1 << 64:
            raise ValueError(f"fill seed must fit in 64 bits unsigned, got {self.seed}")


def name_key(name: str) -> int:
    """A stable 64-bit key of a block name (seeds its fill and salts its page contents)."""
    return xxhash.xxh64_intdigest(name.encode())


def random_fill_chunk(name: str, seed: int, chunk_index: int, nbytes: int) -> np.ndarray:
    """The random fill of chunk ``chunk_index`` (``nbytes`` long) of block ``name``, as uint64.

    Deterministic in (name, seed, chunk index, nbytes); numpy's ``Generator.integers`` releases the
    GIL for large draws (measured: 2 threads fill twice as fast), unlike ``PCG64.random_raw``.
    """
    if nbytes % 8:
        raise ValueError("random fill chunks are whole 64-bit words")
    key = name_key(name)
    ss = np.random.SeedSequence(entropy=seed, spawn_key=(key >> 32, key & 0xFFFFFFFF, chunk_index))
    gen = np.random.Generator(np.random.PCG64(ss))
    out = np.empty(nbytes // 8, dtype=np.uint64)
    piece = FILL_PIECE // 8
    for start in range(0, len(out), piece):
        stop = min(start + piece, len(out))
        out[start:stop] = gen.integers(0, 1 << 64, stop - start, dtype=np.uint64)
    return out


def _check_size(size: int, what: str) -> None:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what} must be an int, got {type(size).__name__}")
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"{what} must be a positive multiple of {PAGE_SIZE}, got {size}")


def check_block_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a RAM block needs a non-empty name")
    if "\0" in name:
        raise ValueError(f"RAM block name {name!r} contains a NUL byte")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"RAM block name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")


class RamBlock:
    """One named block of guest RAM.

    ``size`` is the used length (what migrates); ``max_size`` (default: ``size``) is the mapping's
    extent, so :meth:`resize` works within it without remapping, like QEMU's resizable blocks.
    Views: ``array`` (flat uint8), ``pages`` ((n, 4096) uint8), ``words`` ((n, 512) uint64).
    """

    def __init__(self, name: str, size: int, *, max_size: int | None = None) -> None:
        check_block_name(name)
        _check_size(size, "block size")
        resizable = max_size is not None
        max_size = size if max_size is None else max_size
        _check_size(max_size, "block max_size")
        if max_size < size:
            raise ValueError(f"block {name!r}: max_size {max_size} is smaller than size {size}")
        # memfd names are for /proc display only (any bytes but NUL); cut to the kernel's limit.
        fd = os.memfd_create(("guest:" + name).encode()[:249].decode(errors="ignore"), os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max_size)  # sparse: no memory until pages are touched
            self._init(name, fd, size, max_size, resizable)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, name: str, fd: int, size: int, *, max_size: int | None = None) -> RamBlock:
        """Map an existing memfd (the vCPU process side). The block takes ownership of ``fd``."""
        self = cls.__new__(cls)
        max_size = size if max_size is None else max_size
        _check_size(size, "block size")
        _check_size(max_size, "block max_size")
        if os.fstat(fd).st_size < max_size:
            raise ValueError(f"block {name!r}: fd is smaller than {max_size} bytes")
        self._init(name, fd, size, max_size, max_size != size)
        return self

    @classmethod
    def from_pool(cls, name: str, size: int, pool: RamPool) -> RamBlock:
        """A block made of a preallocated pool: its memfd *and* its mapping, whose page tables
        are already populated, so the first write to each page costs no fault. Takes the pool."""
        check_block_name(name)
        _check_size(size, "block size")
        fd, mapping, start, pool_size = pool.take()
        if size > pool_size:
            raise ValueError(f"block {name!r} ({size:#x}) does not fit the pool ({pool_size:#x})")
        self = cls.__new__(cls)
        self._init(name, fd, size, pool_size, False, mapping, start)
        return self

    def _init(
        self,
        name: str,
        fd: int,
        size: int,
        max_size: int,
        resizable: bool,
        mapping: mmap.mmap | None = None,
        start: int = 0,
    ) -> None:
        """``mapping`` (default: a new one of the whole fd) holds the block from byte ``start``."""
        self.name = name
        self._resizable = resizable
        self._fd = fd
        self._max_size = max_size
        self._lock = threading.Lock()
        self._mmap: mmap.mmap | None = mapping or mmap.mmap(
            fd, max_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._start = start
        self._full = np.frombuffer(self._mmap, dtype=np.uint8, count=max_size, offset=start)
        self._set_size(size)

    def _set_size(self, size: int) -> None:
        self._size = size
        self.array: np.ndarray = self._full[:size]
        self.pages: np.ndarray = self.array.reshape(-1, PAGE_SIZE)
        self.words: np.ndarray = self.array.view(np.uint64).reshape(-1, PAGE_WORDS)

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def resizable(self) -> bool:
        """Whether the block was created with a ``max_size`` (QEMU: RAM_RESIZEABLE)."""
        return self._resizable

    @property
    def n_pages(self) -> int:
        return self._size // PAGE_SIZE

    @property
    def fd(self) -> int:
        """The memfd (for passing to another process); valid until :meth:`close`."""
        if self._mmap is None:
            raise ValueError(f"RAM block {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.n_pages} pages"
        return f"RamBlock({self.name!r}, size={self._size:#x}, {state})"

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ contents

    def fill_zero(self) -> None:
        """Zero the whole block and give its memory back (punches a hole in the memfd)."""
        self.discard(0, self._max_size)

    def discard(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset+length)`` by freeing it (MADV_REMOVE), like QEMU's discard.

        Page-aligned; far cheaper than writing zeros and leaves a hole that readers skip.
        """
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset < 0 or offset + length > self._max_size:
            raise ValueError(f"discard [{offset:#x}, +{length:#x}) is not page-aligned inside the block")
        if length:
            self._live_mmap().madvise(mmap.MADV_REMOVE, self._start + offset, length)

    def fill_random(self, seed: int, *, workers: int | None = None) -> None:
        """Fill the block with deterministic random bytes (see :func:`random_fill_chunk`).

        Chunks are generated in ``workers`` threads (default: up to 2, this machine's cores) since
        numpy's generator releases the GIL; peak temporary memory is one chunk per worker.
        """
        Fill("random", seed)  # validates the seed
        # Every page gets written: allocating them in one call is cheaper than a fault per page
        # (measured ~0.2 s vs ~0.5 s per GiB here).
        os.posix_fallocate(self.fd, 0, self._size)
        words = self.array.view(np.uint64)
        chunk_words = FILL_CHUNK // 8

        def one(ci: int) -> None:
            lo = ci * chunk_words
            hi = min(lo + chunk_words, len(words))
            words[lo:hi] = random_fill_chunk(self.name, seed, ci, (hi - lo) * 8)

        n_chunks = -(-len(words) // chunk_words)
        workers = min(workers or min(2, os.cpu_count() or 1), n_chunks)
        if workers <= 1:
            for ci in range(n_chunks):
                one(ci)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="ram-fill") as pool:
                list(pool.map(one, range(n_chunks)))

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """Yield ``(start, stop)`` byte ranges of the used length that may hold non-zero data.

        Everything outside them is a hole (reads as zero). Uses SEEK_DATA/SEEK_HOLE, which is
        page-granular on shmem, so a page that was written and then zeroed still counts as data.
        """
        fd, end, pos = self.fd, self._size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos
                    return
                raise
            if start >= end:
                return
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            yield start, stop
            pos = stop

    def allocated_bytes(self) -> int:
        """Memory the kernel has actually allocated for this block (all of max_size)."""
        return os.fstat(self.fd).st_blocks * 512

    def hash_into(self, h: xxhash.xxh3_128, chunk: int = 16 << 20) -> None:
        """Feed the used length's bytes to ``h`` in chunks, holes as zeros without touching them.

        xxhash releases the GIL on large updates, so this runs well in a worker thread.
        """
        arr = self.array  # our own reference keeps the mapping alive even if closed meanwhile
        zeros = np.zeros(min(chunk, max(self._size, PAGE_SIZE)), dtype=np.uint8)
        pos = 0
        for start, stop in list(self.data_ranges()):
            _hash_zeros(h, zeros, start - pos)
            for off in range(start, stop, chunk):
                h.update(arr[off : min(off + chunk, stop)])
            pos = stop
        _hash_zeros(h, zeros, self._size - pos)

    # ------------------------------------------------------------------ size

    def resize(self, new_size: int) -> None:
        """Change the used length within ``max_size`` (QEMU's ``qemu_ram_resize``).

        Shrinking discards the tail, so growing again shows zeros. Views taken before stay valid
        (the mapping does not move) but keep their old length.
        """
        _check_size(new_size, "new block size")
        if not self._resizable and new_size != self._size:
            raise ValueError(f"block {self.name!r} is not resizable (created without max_size)")
        if new_size > self._max_size:
            raise ValueError(
                f"block {self.name!r} cannot grow to {new_size:#x}: its max_size is {self._max_size:#x}"
            )
        with self._lock:
            if new_size < self._size:
                self.discard(new_size, self._size - new_size)
            self._set_size(new_size)

    # ------------------------------------------------------------------ teardown

    def _live_mmap(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"RAM block {self.name!r} is closed")
        return self._mmap

    def close(self) -> None:
        """Unmap and close. Idempotent.

        If someone still holds a numpy view, unmapping now would leave it dangling: the mapping
        is then released when the last view dies (the memfd's memory with it).
        """
        with self._lock:
            m, self._mmap = self._mmap, None
            if m is None:
                return
            self._full = self.array = self.pages = self.words = np.empty(0, np.uint8)
            # With numpy views still alive, unmapping would leave them dangling: the mmap object
            # then unmaps itself when the last view is gone.
            with contextlib.suppress(BufferError):
                m.close()
            os.close(self._fd)
            self._fd = -1


def _hash_zeros(h: xxhash.xxh3_128, zeros: np.ndarray, n: int) -> None:
    step = len(zeros)
    while n > 0:
        k = min(n, step)
        h.update(zeros[:k])
        n -= k


class RamPool:
    """Preallocated guest memory (QEMU's -mem-prealloc): a memfd mapped once and populated ahead
    of time, so an incoming migration does not pay a page fault per first write (several
    microseconds each on this kind of machine).

    The pool is backed by huge pages where the kernel can (MADV_COLLAPSE, Linux 6.1): shmem
    gets no transparent huge pages under the usual ``shmem_enabled=never``, and receiving into
    4 KiB pages costs a TLB miss per page, which made a 1 GiB receive ~1.5x slower here than into
    the huge pages QEMU's anonymous guest memory gets. Without them it falls back to 4 KiB pages.

    ``populate()`` is slow (it is the allocation, done early) and releases the GIL: run it in a
    worker thread. A pool is used once: :meth:`take` hands its fd and mapping to a RamBlock.
    """

    def __init__(self, size: int) -> None:
        _check_size(size, "pool size")
        self.size = size
        self._fd: int | None = os.memfd_create("guest:prealloc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._mmap: mmap.mmap | None
            self._mmap, self._start = map_memfd_huge_aligned(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        self._address = _address(self._mmap) + self._start
        # populate() works on raw addresses: close() and take() wait for its chunk to finish
        self._lock = threading.Lock()
        self._stop = False  # set first by close()/take(): the lock alone is not fair
        self.ready = False
        self.huge_bytes = 0  # how much of the pool huge pages back

    def populate(self, chunk: int = 64 << 20) -> None:
        """Allocate every page: huge pages where MADV_COLLAPSE gives them, 4 KiB pages elsewhere.

        MADV_COLLAPSE wants at least one resident page per 2 MiB range, so one 4 KiB page of each
        is faulted in first; the final MADV_POPULATE_WRITE maps the rest writable (on huge pages
        there is nothing left to do)."""
        collapse = True
        for off in range(0, self.size, chunk):
            with self._lock:
                if self._stop or self._mmap is None:  # closed or taken meanwhile
                    return
                collapse = self._populate_chunk(off, min(chunk, self.size - off), collapse)
        self.ready = True

    def _populate_chunk(self, off: int, n: int, collapse: bool) -> bool:
        """Populate ``[off, off+n)``; whether to keep trying huge pages."""
        addr = self._address + off
        whole = n // HUGE_PAGE * HUGE_PAGE  # huge pages for whole 2 MiB ranges only
        if collapse and whole:
            for sub in range(0, whole, HUGE_PAGE):
                _madvise(addr + sub, PAGE_SIZE, MADV_POPULATE_WRITE)
            err = _madvise(addr, whole, MADV_COLLAPSE)
            if err == 0:
                self.huge_bytes += whole
            elif err in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                collapse = False  # not on this kernel or policy: 4 KiB pages from here on
        if _madvise(addr, n, MADV_POPULATE_WRITE):  # before 5.14: touch one byte per page
            np.frombuffer(self._mmap, dtype=np.uint8, count=n, offset=self._start + off)[::PAGE_SIZE] = 0
        return collapse

    def take(self) -> tuple[int, mmap.mmap, int, int]:
        """``(fd, mapping, start, size)``: the pool's memory is at ``start`` bytes into ``mapping``."""
        self._stop = True
        with self._lock:
            if self._fd is None or self._mmap is None:
                raise ValueError("this RAM pool was already used")
            fd, m = self._fd, self._mmap
            self._fd = self._mmap = None
            return fd, m, self._start, self.size

    def close(self) -> None:
        self._stop = True
        with self._lock:
            if self._mmap is not None:
                self._mmap.close()
                self._mmap = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
