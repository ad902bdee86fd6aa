"""mig-bench protocol: encode/decode throughput of 1 GiB synthetic streams, beside memcpy.

Every figure is measured in the same run on the same bytes, so the ratios hold whatever the
machine: memcpy copies the stream in the same 1 MiB chunks the decoder is fed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from protocol.decoder import MainDecoder
from protocol.encoder import MainEncoder
from protocol.events import (
    Pages,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    ZeroPages,
)

PAGE = 4096
CHUNK = 1 << 20
RUN = 256  # pages per encoded run, as the source sends them


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best = float("inf")
    result = None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def _prologue(enc: MainEncoder, size: int) -> bytes:
    return b"".join(
        enc.encode(e)
        for e in (
            StreamHeader(),
            SectionStart(2, "ram", 0, 4),
            RamBlockList((RamBlockInfo("pc.ram", size),)),
            RamEos(),
            SectionFooter(2),
            SectionPart(2),
        )
    )


def build_stream(ram: np.ndarray, zero: bool) -> tuple[np.ndarray, float]:
    """Encode all pages of ``ram`` into one stream; returns it and the encode time."""
    n = len(ram)
    enc = MainEncoder()
    head = np.frombuffer(_prologue(enc, n * PAGE), np.uint8)
    rec = 9 if zero else PAGE + 8
    tail = np.frombuffer(enc.encode(RamEos()) + enc.encode(SectionFooter(2)), np.uint8)
    out = np.empty(len(head) + n * rec + len("pc.ram") + 1 + len(tail), np.uint8)
    out[: len(head)] = head
    pos = len(head)
    offsets = np.arange(n, dtype=np.uint64) * PAGE
    t = time.perf_counter()
    for a in range(0, n, RUN):
        if zero:
            recs = enc.zero_pages("pc.ram", offsets[a : a + RUN])
        else:
            recs = enc.pages_from("pc.ram", offsets[a : a + RUN], ram[a : a + RUN], None)
        out[pos : pos + len(recs)] = recs
        pos += len(recs)
    elapsed = time.perf_counter() - t
    out[pos : pos + len(tail)] = tail
    pos += len(tail)
    return out[:pos], elapsed


def decode_stream(stream: np.ndarray, ram: np.ndarray | None) -> int:
    """Feed in CHUNK pieces through writable()/commit() (as a socket would); count pages.
    With ``ram``, also apply every page into it (what the destination does)."""
    dec = MainDecoder(zero_copy=True)
    pages = 0
    for a in range(0, len(stream), CHUNK):
        piece = stream[a : a + CHUNK]
        view = dec.writable(len(piece))
        np.frombuffer(view, np.uint8, count=len(piece))[:] = piece
        dec.commit(len(piece))
        for ev in dec.events():
            if isinstance(ev, Pages):
                pages += len(ev)
                if ram is not None:
                    ram[(ev.offsets >> np.uint64(12)).astype(np.intp)] = ev.data
            elif isinstance(ev, ZeroPages):
                pages += len(ev)
    dec.end_of_input()
    return pages


def memcpy_chunks(stream: np.ndarray) -> None:
    buf = np.empty(CHUNK, np.uint8)
    for a in range(0, len(stream), CHUNK):
        piece = stream[a : a + CHUNK]
        buf[: len(piece)] = piece


def run(size: int = 1 << 30, repeat: int = 3) -> dict[str, Any]:
    n = size // PAGE
    rng = np.random.default_rng(7)
    ram = rng.integers(0, 256, size=(n, PAGE), dtype=np.uint8)
    zero_ram = np.zeros((n, PAGE), np.uint8)
    dest = np.zeros((n, PAGE), np.uint8)
    dest[:] = 1  # touch destination memory before timing (first touch is not the decoder's cost)

    rand_stream, _ = build_stream(ram, zero=False)
    enc_t, _ = _best(lambda: build_stream(ram, zero=False)[1], repeat)
    enc_t = min(enc_t, _best(lambda: build_stream(ram, zero=False)[1], 1)[0])
    dec_t, pages = _best(lambda: decode_stream(rand_stream, None), repeat)
    assert pages == n, f"decoded {pages} pages of {n}"
    apply_t, _ = _best(lambda: decode_stream(rand_stream, dest), repeat)
    assert np.array_equal(dest[:: n // 64], ram[:: n // 64]), "applied pages differ"
    mem_t, _ = _best(lambda: memcpy_chunks(rand_stream), repeat)

    zero_stream, zenc_t = build_stream(zero_ram, zero=True)
    zdec_t, zpages = _best(lambda: decode_stream(zero_stream, None), repeat)
    assert zpages == n
    zmem_t, _ = _best(lambda: memcpy_chunks(zero_stream), repeat)

    gb = size / 1e9
    return {
        "guest_bytes": size,
        "random": {
            "stream_bytes": len(rand_stream),
            "encode_GBps": gb / enc_t,
            "decode_GBps": gb / dec_t,
            "decode_apply_GBps": gb / apply_t,
            "memcpy_GBps": len(rand_stream) / 1e9 / mem_t,
            "decode_vs_memcpy": mem_t / dec_t,
        },
        "zero": {
            "stream_bytes": len(zero_stream),
            "pages": n,
            "encode_Mpages_per_s": n / zenc_t / 1e6,
            "decode_Mpages_per_s": n / zdec_t / 1e6,
            "decode_guest_GBps": gb / zdec_t,
            "memcpy_GBps": len(zero_stream) / 1e9 / zmem_t,
        },
    }


def report(r: dict[str, Any]) -> str:
    rnd, z = r["random"], r["zero"]
    return "\n".join(
        [
            f"protocol benchmark: {r['guest_bytes'] / 2**30:.2f} GiB of guest pages, 1 MiB chunks",
            f"  random pages: decode {rnd['decode_GBps']:.2f} GB/s, decode+apply to RAM "
            f"{rnd['decode_apply_GBps']:.2f} GB/s, encode {rnd['encode_GBps']:.2f} GB/s",
            f"                memcpy of the same stream {rnd['memcpy_GBps']:.2f} GB/s; "
            f"decode/memcpy time ratio {rnd['decode_vs_memcpy']:.2f}",
            f"  zero pages:   decode {z['decode_Mpages_per_s']:.2f} M pages/s "
            f"({z['decode_guest_GBps']:.1f} GB/s of guest RAM), "
            f"encode {z['encode_Mpages_per_s']:.2f} M pages/s",
            f"                memcpy of the same stream {z['memcpy_GBps']:.2f} GB/s",
            f"  targets: random decode >= 3 GB/s: {'PASS' if rnd['decode_GBps'] >= 3 else 'FAIL'}; "
            f"zero decode >= 2 M pages/s: {'PASS' if z['decode_Mpages_per_s'] >= 2 else 'FAIL'}",
        ]
    )
