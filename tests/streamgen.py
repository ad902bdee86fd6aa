"""Hypothesis strategies that build valid main-channel event sequences (shared by tests)."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import strategies as st

from protocol.events import (
    CompressedPage,
    Configuration,
    DeviceSection,
    EnableColo,
    EndOfStream,
    Event,
    OpenReturnPath,
    Packaged,
    Pages,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockInfo,
    RamBlockList,
    RamEos,
    RamHook,
    RecvBitmapRequest,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
)

PAGE = 4096
block_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
).map(lambda s: s)


@st.composite
def block_lists(draw: st.DrawFn) -> RamBlockList:
    names = draw(st.lists(block_names, min_size=1, max_size=4, unique=True))
    return RamBlockList(tuple(RamBlockInfo(n, draw(st.integers(1, 64)) * PAGE) for n in names))


@st.composite
def page_events(draw: st.DrawFn, blocks: RamBlockList) -> Event:
    b = draw(st.sampled_from(blocks.blocks))
    n_pages = b.used_length // PAGE
    kind = draw(st.sampled_from(["zero", "pages", "xbzrle", "compressed", "hook"]))
    if kind == "hook":
        return RamHook(draw(st.integers(0, 2**20)) * PAGE)
    if kind in ("zero", "pages"):
        count = draw(st.integers(1, 6))
        offs = (
            np.array(draw(st.lists(st.integers(0, n_pages - 1), min_size=count, max_size=count)), np.uint64)
            * PAGE
        )
        if kind == "zero":
            return ZeroPages(b.name, offs, draw(st.sampled_from([0, 0, 0, 0xFF])))
        seed = draw(st.integers(0, 2**32 - 1))
        data = np.random.default_rng(seed).integers(0, 256, size=(count, PAGE), dtype=np.uint8)
        return Pages(b.name, offs, data)
    off = draw(st.integers(0, n_pages - 1)) * PAGE
    payload = draw(st.binary(min_size=0, max_size=64))
    if kind == "xbzrle":
        return XbzrlePage(b.name, off, payload)
    return CompressedPage(b.name, off, payload)


simple_commands = st.one_of(
    st.just(OpenReturnPath()),
    st.builds(Ping, st.integers(0, 2**32 - 1)),
    st.just(PostcopyListen()),
    st.just(PostcopyRun()),
    st.just(EnableColo()),
    st.just(PostcopyResume()),
    st.just(PostcopyAdvise()),
    st.just(PostcopyAdvise(4096, 4096)),
)


@st.composite
def device_sections(draw: st.DrawFn, first_id: int) -> list[DeviceSection]:
    n = draw(st.integers(0, 4))
    out = []
    for i in range(n):
        idstr = draw(st.sampled_from(["timer", "cpu", "globalstate", "0000:00:01.3/piix4_pm", "serial"]))
        body = draw(st.binary(min_size=0, max_size=200))
        out.append(DeviceSection(first_id + i, idstr, draw(st.integers(0, 3)), draw(st.integers(1, 9)), body))
    return out


def vmdesc_for(devices: list[DeviceSection]) -> VmDescription:
    desc = {
        "page_size": PAGE,
        "devices": [
            {
                "name": d.idstr,
                "instance_id": d.instance_id,
                "vmsd_name": d.idstr,
                "version": d.version_id,
                "fields": [{"name": "data", "type": "buffer", "size": len(d.body)}],
            }
            for d in devices
        ],
    }
    return VmDescription(json.dumps(desc, separators=(",", ":")).encode())


@st.composite
def precopy_streams(draw: st.DrawFn) -> list[Event]:
    """A complete, valid precopy-like stream as events (pages not yet coalesced)."""
    blocks = draw(block_lists())
    config = Configuration(
        draw(st.sampled_from(["pc-i440fx-7.2", "pc-q35-7.2"])),
        draw(st.sampled_from([None, 12])),
        draw(
            st.one_of(
                st.none(), st.lists(st.sampled_from(["validate-uuid", "x-colo"]), max_size=2).map(tuple)
            )
        ),
        draw(st.one_of(st.none(), st.binary(min_size=16, max_size=16))),
    )
    evs: list[Event] = [StreamHeader(), config]
    evs += draw(st.lists(simple_commands, max_size=3))
    evs += [SectionStart(2, "ram", 0, 4), blocks, RamEos(), SectionFooter(2)]
    if draw(st.booleans()):
        b = draw(st.sampled_from(blocks.blocks))
        n = b.used_length // PAGE
        count = draw(st.integers(1, 12))
        evs.append(
            PostcopyRamDiscard(
                b.name, tuple((draw(st.integers(0, n - 1)) * PAGE, PAGE) for _ in range(count))
            )
        )
    for _ in range(draw(st.integers(0, 3))):
        evs.append(SectionPart(2))
        evs += draw(st.lists(page_events(blocks), max_size=6))
        evs += [RamEos(), SectionFooter(2)]
        if draw(st.booleans()):
            evs.append(draw(simple_commands))
    if draw(st.booleans()):
        evs.append(RecvBitmapRequest(draw(st.sampled_from(blocks.blocks)).name))
    if draw(st.booleans()):
        evs.append(Packaged(draw(st.binary(max_size=100))))
    evs.append(SectionEnd(2))
    evs += draw(st.lists(page_events(blocks), max_size=4))
    evs += [RamEos(), SectionFooter(2)]
    devices = draw(device_sections(3))
    for d in devices:
        evs += [d, SectionFooter(d.section_id)]
    evs.append(EndOfStream())
    if devices or draw(st.booleans()):
        evs.append(vmdesc_for(devices))
    return evs


def chunkings(data_len: int) -> st.SearchStrategy[list[int]]:
    """Cut points for feeding a stream in random chunks."""
    return st.lists(st.integers(0, max(0, data_len)), max_size=20).map(sorted)
