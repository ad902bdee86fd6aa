"""Speculative page windows (protocol.pagewindow, mig_dest.scatter) and mig-dest's receive loop
with them: for any stream in any recv chunking, receiving predicted page records straight into
guest RAM must end exactly as the plain path (everything through the decoder's buffer) does."""

from __future__ import annotations

import ctypes
import socket
from typing import Any

import numpy as np
import pytest
import structlog
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from control.params import Capabilities, MigrationStatus, Parameters, StatusMachine
from mig_dest import scatter
from mig_dest.incoming import IncomingError, IncomingInfo, IncomingMigration
from protocol.decoder import MainDecoder, PagePrediction
from protocol.encoder import MainEncoder
from protocol.errors import ProtocolError
from protocol.events import (
    Configuration,
    EndOfStream,
    Event,
    Pages,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    XbzrlePage,
    ZeroPages,
)
from protocol.pagewindow import PAGE, PAGE_CONT, PAGE_REC, PageWindow
from protocol.xbzrle import encode_xbzrle

from .streamgen import device_sections, vmdesc_for

# ---------------------------------------------------------------------------- the window alone


def _records(first: int, k: int, rng: np.random.Generator) -> tuple[bytes, np.ndarray]:
    """k CONTINUE PAGE records for pages first.. as wire bytes, and their pages."""
    pages = rng.integers(0, 256, size=(k, PAGE), dtype=np.uint8)
    hdr = ((np.arange(first, first + k, dtype=np.uint64) << np.uint64(12)) | np.uint64(PAGE_CONT)).astype(
        ">u8"
    )
    recs = np.empty((k, PAGE_REC), dtype=np.uint8)
    recs[:, :8] = hdr.view(np.uint8).reshape(k, 8)
    recs[:, 8:] = pages
    return recs.tobytes(), pages


def _scatter_into(iov: np.ndarray, data: bytes) -> int:
    """What recvmsg would do with ``data`` queued: fill the segments in order."""
    done = 0
    for addr, length in iov.tolist():
        n = min(length, len(data) - done)
        if n <= 0:
            break
        ctypes.memmove(addr, data[done : done + n], n)
        done += n
    return done


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(1, 6),
    first=st.integers(0, 4),
    held=st.integers(0, PAGE_REC - 1),
    bad=st.one_of(st.none(), st.integers(0, 5)),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_window_keeps_what_matches_and_gives_back_the_rest_in_order(
    k: int, first: int, held: int, bad: int | None, frac: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    stream, want = _records(first, k, rng)
    stream = bytearray(stream)
    if bad is not None and bad < k:  # a misprediction: a record whose header is not the guess
        stream[bad * PAGE_REC + 7] ^= 0x40
    held = min(held, len(stream))
    ram = np.zeros((first + k + 2, PAGE), dtype=np.uint8)
    win = PageWindow(8)
    iov = win.open(ram, first, k, bytes(stream[:held]))
    assert int(iov[:, 1].sum()) == k * PAGE_REC - held
    got = held + _scatter_into(iov, bytes(stream[held : held + int(frac * (len(stream) - held))]))
    win.fill_held()
    good = win.verified(got)
    expect_good = got // PAGE_REC if bad is None or bad >= k else min(bad, got // PAGE_REC)
    assert good == expect_good
    assert np.array_equal(ram[first : first + good], want[:good])
    start = max(good * PAGE_REC, held)
    out = np.zeros(got - start, dtype=np.uint8)
    win.copy_out(start, got, out)
    assert out.tobytes() == bytes(stream[start:got])
    win.scrub(good, got)
    win.close()
    assert not ram[first + good :].any() and not ram[:first].any()


def test_window_refuses_what_does_not_fit() -> None:
    ram = np.zeros((4, PAGE), dtype=np.uint8)
    win = PageWindow(2)
    with pytest.raises(ValueError):
        win.open(ram, 3, 2, b"")
    with pytest.raises(ValueError):
        win.open(ram, 0, 3, b"")
    with pytest.raises(ValueError):
        win.open(ram[:, :100], 0, 1, b"")
    with pytest.raises(ValueError):
        PageWindow(513)


def test_recv_iov_scatters_a_real_socket() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        rng = np.random.default_rng(1)
        data, pages = _records(0, 3, rng)
        ram = np.zeros((3, PAGE), dtype=np.uint8)
        win = PageWindow(3)
        iov = win.open(ram, 0, 3, b"")
        assert scatter.recv_iov(b.fileno(), iov) == (0, False)  # nothing queued
        a.sendall(data[:3000])
        assert scatter.recv_iov(b.fileno(), iov) == (3000, False)
        a.sendall(data[3000:])
        iov = win.open(ram, 0, 3, data[:3000])  # the rest, after a "held" start
        assert scatter.recv_iov(b.fileno(), iov) == (len(data) - 3000, False)
        win.fill_held()
        assert win.verified(len(data)) == 3
        assert np.array_equal(ram, pages)
        a.close()
        assert scatter.recv_iov(b.fileno(), iov) == (0, True)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------- decoder API


def test_decoder_predicts_only_right_after_a_page_record() -> None:
    enc = MainEncoder()
    blocks = RamBlockList((RamBlockInfo("ram", 4 * PAGE),))
    data = b"".join(
        enc.encode(e)
        for e in [
            StreamHeader(),
            SectionStart(2, "ram", 0, 4),
            blocks,
            RamEos(),
            SectionFooter(2),
            SectionPart(2),
        ]
    )
    page = np.ones((1, PAGE), dtype=np.uint8)
    dec = MainDecoder(zero_copy=True)
    dec.feed(data)
    list(dec.events())
    assert dec.page_prediction() is None  # a section part: no page yet
    dec.feed(enc.encode(Pages("ram", np.array([PAGE], np.uint64), page)))
    list(dec.events())
    assert dec.page_prediction() == PagePrediction("ram", 2 * PAGE, 0)
    rec = enc.encode(Pages("ram", np.array([2 * PAGE], np.uint64), page))
    dec.feed(rec[:10])
    assert dec.page_prediction() == PagePrediction("ram", 2 * PAGE, 10)
    assert bytes(dec.held()) == rec[:10]
    before = dec.offset
    dec.take_pages(2)  # pages 2 and 3, taken outside
    assert dec.offset == before + 2 * PAGE_REC - 10 + 10 and dec.buffered == 0
    assert dec.page_prediction() is None  # page 4 would lie past the block
    dec.feed(enc.encode(ZeroPages("ram", np.array([0], np.uint64), 0)))
    list(dec.events())
    assert dec.page_prediction() is None
    with pytest.raises(RuntimeError):
        dec.take_pages(1)


def test_decoder_does_not_predict_past_a_held_header_that_differs() -> None:
    enc = MainEncoder()
    blocks = RamBlockList((RamBlockInfo("ram", 8 * PAGE),))
    page = np.ones((1, PAGE), dtype=np.uint8)
    dec = MainDecoder(zero_copy=True)
    for e in [
        StreamHeader(),
        SectionStart(2, "ram", 0, 4),
        blocks,
        Pages("ram", np.array([0], np.uint64), page),
    ]:
        dec.feed(enc.encode(e))
    list(dec.events())
    assert dec.page_prediction() == PagePrediction("ram", PAGE, 0)
    dec.feed(enc.encode(Pages("ram", np.array([5 * PAGE], np.uint64), page))[:9])  # a gap
    assert dec.page_prediction() is None


# ---------------------------------------------------------------------------- the receive loop


class _Block:
    def __init__(self, n_pages: int) -> None:
        self.pages = np.zeros((n_pages, PAGE), dtype=np.uint8)
        self.n_pages = n_pages


class _Guest:
    def __init__(self, blocks: list[tuple[str, int]]) -> None:
        self.blocks = {name: _Block(size // PAGE) for name, size in blocks}
        self.devices: list[Any] = []

    def store_opaque_device(self, dev: Any) -> None:
        self.devices.append(dev)

    def close(self) -> None:
        pass


class _ChunkReader:
    """A connection whose data arrives in the given chunks: a read returns at most what has
    arrived, and each wait delivers the next chunk."""

    def __init__(self, data: bytes, cuts: list[int]) -> None:
        self.data = data
        self.bounds = [c for c in sorted(set(cuts)) if 0 < c < len(data)] + [len(data)]
        self.pos = 0
        self.arrived = self.bounds.pop(0)

    def _take(self, n: int) -> bytes:
        n = min(n, self.arrived - self.pos)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def recv_into(self, buffer: memoryview) -> int:
        if self.pos == self.arrived:
            if self.pos == len(self.data):
                return 0
            raise BlockingIOError
        chunk = self._take(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def recv_iov(self, iov: np.ndarray) -> tuple[int, bool]:
        if self.pos == self.arrived:
            return 0, self.pos == len(self.data)
        return _scatter_into(iov, self._take(int(iov[:, 1].sum()))), False

    async def wait_readable(self) -> None:
        if self.pos == self.arrived and self.bounds:
            self.arrived = self.bounds.pop(0)
        await trio.lowlevel.checkpoint()

    async def wait_for(self, n: int, timeout: float) -> None:
        await self.wait_readable()


@st.composite
def page_streams(draw: st.DrawFn) -> list[Event]:
    """Precopy streams rich in page runs: gaps, re-sent pages, zero pages, XBZRLE pages, block
    switches and section ends between and inside runs."""
    sizes = draw(st.lists(st.integers(1, 32), min_size=1, max_size=3))
    blocks = RamBlockList(tuple(RamBlockInfo(f"blk{i}", n * PAGE) for i, n in enumerate(sizes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    evs: list[Event] = [StreamHeader(), Configuration("pc-i440fx-7.2"), SectionStart(2, "ram", 0, 4)]
    evs += [blocks, RamEos(), SectionFooter(2)]

    def pages_of(b: RamBlockInfo) -> list[Event]:
        n = b.used_length // PAGE
        kind = draw(st.sampled_from(["run", "run", "run", "pages", "zero", "fill", "xbzrle"]))
        if kind == "run":
            start = draw(st.integers(0, n - 1))
            offs = np.arange(start, draw(st.integers(start + 1, n)), dtype=np.uint64)
        else:
            offs = np.array(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=6)), dtype=np.uint64)
        offs *= np.uint64(PAGE)
        if kind in ("zero", "fill"):
            return [ZeroPages(b.name, offs, 0 if kind == "zero" else 0x5A)]
        if kind == "xbzrle":
            new = np.zeros(PAGE, dtype=np.uint8)
            new[rng.integers(0, PAGE, 5)] = rng.integers(1, 256, 5, dtype=np.uint8)
            delta = encode_xbzrle(np.zeros(PAGE, dtype=np.uint8), new)
            assert delta is not None
            return [XbzrlePage(b.name, int(offs[0]), delta)]
        return [Pages(b.name, offs, rng.integers(0, 256, size=(len(offs), PAGE), dtype=np.uint8))]

    for _ in range(draw(st.integers(1, 3))):
        evs.append(SectionPart(2))
        for _ in range(draw(st.integers(1, 6))):
            evs += pages_of(draw(st.sampled_from(blocks.blocks)))
        evs += [RamEos(), SectionFooter(2)]
    evs.append(SectionEnd(2))
    for _ in range(draw(st.integers(0, 2))):
        evs += pages_of(draw(st.sampled_from(blocks.blocks)))
    evs += [RamEos(), SectionFooter(2)]
    devices = draw(device_sections(3))
    for d in devices:
        evs += [d, SectionFooter(d.section_id)]
    evs += [EndOfStream(), vmdesc_for(devices)]
    return evs


async def _receive(data: bytes, cuts: list[int], speculate: bool, window: int) -> dict[str, Any]:
    """Run mig-dest's receive loop over ``data``; what it ended with."""
    log: list[tuple[Any, ...]] = []
    taken = [0]
    inc = IncomingMigration(
        guest_factory=lambda blocks, machine: _Guest(blocks),
        caps=Capabilities(),
        params=Parameters(),
        status=StatusMachine(),
        info=IncomingInfo(),
        emit=lambda name, data: None,
        log=structlog.get_logger("test"),
        model_machine_type="model",
    )
    inc.status.to(MigrationStatus.SETUP)
    inc.window_records = window
    dec = MainDecoder(zero_copy=True, initial_capacity=1 << 16)
    inc._dec = dec
    plain_handle = inc._handle

    async def handle(ev: Event, stream: Any) -> None:
        if isinstance(ev, Pages):
            log.extend(("page", ev.block, int(o), ev.data[i].tobytes()) for i, o in enumerate(ev.offsets))
        elif isinstance(ev, ZeroPages):
            log.extend(("zero", ev.block, int(o), ev.fill) for o in ev.offsets)
        else:
            log.append((ev,))
        await plain_handle(ev, stream)

    inc._handle = handle  # type: ignore[method-assign]
    plain_take = dec.take_pages

    def take_pages(k: int) -> None:
        pred = dec.page_prediction()
        assert pred is not None
        ram = inc._pages[pred.block]
        first = pred.offset // PAGE
        log.extend(("page", pred.block, (first + i) * PAGE, ram[first + i].tobytes()) for i in range(k))
        taken[0] += k
        plain_take(k)

    dec.take_pages = take_pages  # type: ignore[method-assign]
    if not speculate:
        inc._speculate = lambda *args: None  # type: ignore[method-assign]
    error: tuple[str, str] | None = None
    try:
        await inc._pump(_ChunkReader(data, cuts), dec, None)  # type: ignore[arg-type]
    except (ProtocolError, IncomingError) as err:
        error = (type(err).__name__, str(err))
    stats = inc.info.stats
    return {
        "log": log,
        "error": error,
        "ram": {name: b.pages.tobytes() for name, b in inc.guest.blocks.items()} if inc.guest else None,
        "written": {name: w.tobytes() for name, w in inc._written.items()},
        "stats": (stats.transferred, stats.normal, stats.normal_bytes, stats.duplicate, stats.xbzrle_pages),
        "consumed": (dec.bytes_consumed, dec.offset, dec.buffered),
        "devices": inc.guest.devices if inc.guest else None,
        "done": inc._done,
        "taken": taken[0],
    }


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(events=page_streams(), data=st.data())
def test_speculative_receive_equals_the_plain_path(events: list[Event], data: st.DataObject) -> None:
    enc = MainEncoder()
    stream = b"".join(enc.encode(e) for e in events)
    if data.draw(st.booleans(), label="truncated"):  # the source goes away mid-stream
        stream = stream[: data.draw(st.integers(0, len(stream) - 1), label="length")]
    # reads of a typical size, jittered, plus cuts next to record boundaries (partial records and
    # headers at the end of a read)
    step = data.draw(st.integers(len(stream) // 300 + 1, 3 * PAGE_REC), label="step")
    jitter = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="jitter seed"))
    cuts = [c + int(jitter.integers(-step // 2, step // 2 + 1)) for c in range(step, len(stream), step)]
    cuts += data.draw(
        st.lists(
            st.integers(0, len(stream) // PAGE_REC).flatmap(
                lambda j: st.integers(max(0, j * PAGE_REC - 9), j * PAGE_REC + 9)
            ),
            max_size=10,
        ),
        label="cuts",
    )
    window = data.draw(st.integers(1, 6), label="window")
    plain = trio.run(_receive, stream, cuts, False, window)
    spec = trio.run(_receive, stream, cuts, True, window)
    event("speculated" if spec["taken"] else "nothing taken outside the decoder")
    event(f"ends with {plain['error'][0] if plain['error'] else 'no error'}")
    assert spec["error"] == plain["error"]
    assert spec["log"] == plain["log"]
    assert spec["ram"] == plain["ram"]
    assert spec["written"] == plain["written"]
    assert spec["stats"] == plain["stats"]
    assert spec["consumed"] == plain["consumed"]
    assert spec["devices"] == plain["devices"]
    assert spec["done"] == plain["done"]
    if plain["error"] is None:
        assert plain["done"] and plain["stats"][0] == len(stream)


def test_speculation_takes_a_long_run_straight_into_ram() -> None:
    """The fast path really runs: a 40-page run arrives in one chunk and only its first page
    (which the prediction needs) goes through the decoder."""
    rng = np.random.default_rng(5)
    blocks = RamBlockList((RamBlockInfo("ram", 64 * PAGE),))
    pages = rng.integers(0, 256, size=(40, PAGE), dtype=np.uint8)
    events: list[Event] = [StreamHeader(), SectionStart(2, "ram", 0, 4), blocks, RamEos(), SectionFooter(2)]
    events += [SectionPart(2), Pages("ram", np.arange(40, dtype=np.uint64) * np.uint64(PAGE), pages)]
    events += [RamEos(), SectionFooter(2), EndOfStream()]
    stream = b"".join(MainEncoder().encode(e) for e in events)
    first_page_end = stream.index(pages[0].tobytes()) + PAGE
    spec = trio.run(_receive, stream, [first_page_end], True, 16)
    assert len([e for e in spec["log"] if e[0] == "page"]) == 40
    assert spec["taken"] == 39
    assert spec["error"] is None and spec["done"] is False  # no vmdesc: still waits for one
    ram = np.frombuffer(spec["ram"]["ram"], dtype=np.uint8).reshape(64, PAGE)
    assert np.array_equal(ram[:40], pages) and not ram[40:].any()
