"""Delimiting device sections: vmdesc body lengths, the trailer, footer scan (protocol/vmdesc.py)."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ProtocolError
from protocol.events import DeviceSection
from protocol.vmdesc import body_length, find_vmdesc_trailer, split_by_footers, split_device_area

CAPTURES = Path("/work/shared/captures")
PRECOPY = (CAPTURES / "precopy-paused-pc32m.bin").read_bytes()
SNAPSHOT = (CAPTURES / "background-snapshot.bin").read_bytes()
POSTCOPY = (CAPTURES / "postcopy-main.bin").read_bytes()

RAM_END_AT = 275_851
RAM_END = bytes.fromhex("03 00000002 0000000000000010 7E 00000002")  # 18 bytes
AREA_AT = RAM_END_AT + len(RAM_END)  # first FULL section
EOF_AT = 288_726
VMDESC_AT = 288_727
PACKAGED_AT = 353_362

HOSTILE = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def footer(sid: int) -> bytes:
    return b"\x7e" + struct.pack(">I", sid)


def full(sid: int, idstr: str, inst: int = 0, ver: int = 1) -> bytes:
    name = idstr.encode()
    return b"\x04" + struct.pack(">I", sid) + bytes([len(name)]) + name + struct.pack(">II", inst, ver)


def precopy_desc() -> dict[str, Any]:
    found = find_vmdesc_trailer(PRECOPY)
    assert found is not None
    return json.loads(found[1])


def snapshot_area() -> tuple[int, int]:
    """(start, vmdesc offset) of background-snapshot.bin's device area: no RAM END there, the
    devices follow the last RAM PART's EOS and footer."""
    found = find_vmdesc_trailer(SNAPSHOT)
    assert found is not None
    eos_footer = struct.pack(">Q", 0x10) + footer(2)
    start = SNAPSHOT.rfind(eos_footer + b"\x04", 0, found[0]) + len(eos_footer)
    return start, found[0]


# ---------------------------------------------------------------- the precopy capture


def test_precopy_landmarks_and_trailer() -> None:
    assert PRECOPY[RAM_END_AT:AREA_AT] == RAM_END
    assert PRECOPY[AREA_AT : AREA_AT + 11] == bytes.fromhex("04 00000000 05") + b"timer"
    found = find_vmdesc_trailer(PRECOPY)
    assert found is not None
    at, js = found
    assert at == VMDESC_AT and PRECOPY[EOF_AT] == 0
    assert len(js) == 98_649 == struct.unpack_from(">I", PRECOPY, at + 1)[0]
    assert js.startswith(b'{"page_size": 4096')
    # start bounds the search; a memoryview works too
    assert find_vmdesc_trailer(memoryview(PRECOPY), start=VMDESC_AT) == found
    assert find_vmdesc_trailer(PRECOPY, start=VMDESC_AT + 1) is None


def test_precopy_split_device_area() -> None:
    desc = precopy_desc()
    area = PRECOPY[AREA_AT:VMDESC_AT]
    secs = split_device_area(area, desc, base_offset=AREA_AT)
    assert [(s.idstr, s.instance_id) for s in secs] == [
        (d["name"], d["instance_id"]) for d in desc["devices"]
    ]
    assert len(secs) == 30
    # every computed end is followed by 7E + id (independently re-walked here)
    pos = AREA_AT
    for sec, dev in zip(secs, desc["devices"], strict=True):
        hdr = full(sec.section_id, sec.idstr, sec.instance_id, sec.version_id)
        assert PRECOPY.startswith(hdr, pos)
        end = pos + len(hdr) + body_length(dev)
        assert PRECOPY[end : end + 5] == footer(sec.section_id)
        assert PRECOPY[pos + len(hdr) : end] == sec.body
        pos = end + 5
    assert pos == EOF_AT
    gs = secs[-1]
    assert gs.idstr == "globalstate" and gs.section_id == 0x28
    assert gs.body[:4] == b"\x00\x00\x00\x0a" and gs.body[4:13] == b"prelaunch" and len(gs.body) == 104


def test_precopy_split_by_footers_agrees() -> None:
    desc = precopy_desc()
    area = PRECOPY[AREA_AT:VMDESC_AT]
    by_desc = split_device_area(area, desc, base_offset=AREA_AT)
    by_footer, rest = split_by_footers(area, base_offset=AREA_AT)
    assert by_footer == by_desc
    assert AREA_AT + rest == EOF_AT
    # with the trailer still attached the scan stops at the same EOF
    secs, rest2 = split_by_footers(PRECOPY[AREA_AT:], base_offset=AREA_AT)
    assert secs == by_desc and rest2 == rest


def test_struct_sizes_include_nested_subsections() -> None:
    """Spec check on real JSON: a struct field's size equals its described fields+subsections."""
    desc = precopy_desc()
    checked = with_subs = 0

    def walk(obj: dict[str, Any]) -> None:
        nonlocal checked, with_subs
        for f in obj.get("fields", []):
            nested = f.get("struct") or (f if f.get("type") == "tmp" else None)
            if nested is not None:
                inner = {"fields": nested["fields"], "subsections": nested.get("subsections", [])}
                assert body_length(inner) == f["size"], f["name"]
                checked += 1
                with_subs += bool(nested.get("subsections"))
                walk(nested)
        for sub in obj.get("subsections", []):
            walk(sub)

    for dev in desc["devices"]:
        walk(dev)
    assert checked > 100 and with_subs >= 1  # pckbd's "kbd" struct carries a subsection


# ---------------------------------------------------------------- background snapshot


def test_snapshot_device_area() -> None:
    start, vd = snapshot_area()
    assert SNAPSHOT[start : start + 11] == bytes.fromhex("04 00000000 05") + b"timer"
    desc = json.loads(find_vmdesc_trailer(SNAPSHOT)[1])  # type: ignore[index]
    area = SNAPSHOT[start:vd]
    secs = split_device_area(area, desc, base_offset=start)
    assert len(secs) == len(desc["devices"]) == 31
    assert "kvmclock" in [s.idstr for s in secs]  # a KVM guest, unlike the precopy capture
    by_footer, rest = split_by_footers(area, base_offset=start)
    assert by_footer == secs and rest == len(area) - 1 and area[rest] == 0


# ---------------------------------------------------------------- postcopy PACKAGED blob


def test_postcopy_packaged_blob() -> None:
    assert POSTCOPY[PACKAGED_AT : PACKAGED_AT + 9] == bytes.fromhex("08 0007 0004 00003287")
    blob = POSTCOPY[PACKAGED_AT + 9 : PACKAGED_AT + 9 + 0x3287]
    assert len(blob) == 12_935
    assert blob[:5] == bytes.fromhex("08 0004 0000")  # LISTEN, skipped by the caller
    base = PACKAGED_AT + 9 + 5
    for stop_at_eof in (False, True):
        secs, rest = split_by_footers(blob[5:], base_offset=base, stop_at_eof=stop_at_eof)
        assert len(secs) == 31
        assert secs[0].idstr == "timer" and secs[-1].idstr == "globalstate"
        assert secs[-1].section_id == 0x29
        assert secs[-1].body[4:11] == b"running"
        assert blob[5 + rest :] == bytes.fromhex("08 0002 0004 00000003 08 0005 0000")  # PING 3, RUN
    # the stream continues with PING 4
    assert POSTCOPY[PACKAGED_AT + 9 + 12_935 :].startswith(bytes.fromhex("08 0002 0004 00000004"))


# ---------------------------------------------------------------- find_vmdesc_trailer


def trailer(js: bytes) -> bytes:
    return b"\x06" + struct.pack(">I", len(js)) + js


def test_trailer_generic_and_negative() -> None:
    js = b'{"devices": [], "page_size": 4096}'  # not starting with page_size: generic path
    buf = b"\x01\x02\x03\x00" + trailer(js)
    assert find_vmdesc_trailer(buf) == (4, js)
    assert find_vmdesc_trailer(trailer(b"{}")) == (0, b"{}")
    assert find_vmdesc_trailer(buf[:-1]) is None  # incomplete
    assert find_vmdesc_trailer(buf + b" ") is None
    assert find_vmdesc_trailer(b"\x00\x06\x00\x00\x00\x04{}}") is None  # length disagrees
    assert find_vmdesc_trailer(b"\x00\x06\x00\x00\x00\x03{}}") == (1, b"{}}")  # JSON validity is the caller's
    assert find_vmdesc_trailer(b"") is None
    assert find_vmdesc_trailer(b"}") is None
    # JSON with a NUL byte is not QEMU's (it escapes control characters): not found
    assert find_vmdesc_trailer(trailer(b'{"a":"\x00"}')) is None
    # a fake candidate in earlier device data ending at the same place loses to the real one
    real = trailer(b'{"page_size": 4096, "devices": []}')
    fake_js = b"{" + b"x" * 20 + b"\x00" + real
    fake = b"\x06" + struct.pack(">I", len(fake_js)) + fake_js
    assert find_vmdesc_trailer(b"\x00" + fake) == (1 + len(fake) - len(real), real[5:])


def test_trailer_search_is_fast_on_big_buffers() -> None:
    big = bytearray(8 << 20)  # 8 MiB of device/page data
    big[::7] = b"\x7b" * len(big[::7])
    buf = bytes(big) + trailer(PRECOPY[VMDESC_AT + 5 :])
    t = time.perf_counter()
    for _ in range(20):
        found = find_vmdesc_trailer(buf)
    assert found == (len(big), PRECOPY[VMDESC_AT + 5 :])
    assert (time.perf_counter() - t) / 20 < 0.05
    # a buffer ending in "}" with no trailer and no NUL at all: one numpy pass
    noise = (b"{" * 3 + b"\x06\x01\x02\x03") * (1 << 19) + b"}"
    t = time.perf_counter()
    assert find_vmdesc_trailer(noise) is None
    assert time.perf_counter() - t < 2.0


# ---------------------------------------------------------------- body_length


def test_body_length_rules() -> None:
    assert body_length({"fields": []}) == 0
    f = {"name": "a", "type": "uint32", "size": 4}
    assert body_length({"fields": [f, {**f, "array_len": 3}]}) == 16
    sub = {"vmsd_name": "dev/sub", "version": 1, "fields": [f]}
    assert body_length({"fields": [f], "subsections": [sub]}) == 4 + 1 + 1 + 7 + 4 + 4
    nested = {**sub, "subsections": [{"vmsd_name": "dev/sub/x", "version": 1, "fields": []}]}
    assert body_length({"fields": [], "subsections": [nested]}) == (6 + 7 + 4) + (6 + 9)
    # old style: the top-level size must agree
    old = {"name": "x", "size": 9, "fields": [{"name": "data", "type": "buffer", "size": 9}]}
    assert body_length(old) == 9
    with pytest.raises(ProtocolError, match="disagrees"):
        body_length({**old, "size": 10})


BAD_ENTRIES: list[tuple[object, str]] = [
    ([], "not an object"),
    ({"name": "d"}, "no 'fields' list"),
    ({"fields": {}}, "no 'fields' list"),
    ({"fields": [1]}, "not an object"),
    ({"fields": [{"type": "u8", "size": 1}]}, "'name'"),
    ({"fields": [{"name": "a", "size": 1}]}, "'type'"),
    ({"fields": [{"name": "a", "type": "u8"}]}, "'size'"),
    ({"fields": [{"name": "a", "type": "u8", "size": -1}]}, "'size'"),
    ({"fields": [{"name": "a", "type": "u8", "size": 1.0}]}, "'size'"),
    ({"fields": [{"name": "a", "type": "u8", "size": True}]}, "'size'"),
    ({"fields": [{"name": "a", "type": "u8", "size": "4"}]}, "'size'"),
    ({"fields": [{"name": "a", "type": "u8", "size": 1, "array_len": 0}]}, "'array_len'"),
    ({"fields": [{"name": "a", "type": "u8", "size": 1, "array_len": None}]}, "'array_len'"),
    ({"fields": [{"name": "a", "type": "struct", "size": 1, "struct": []}]}, "'struct'"),
    ({"fields": [], "subsections": {}}, "not a list"),
    ({"fields": [], "subsections": [3]}, "not an object"),
    ({"fields": [], "subsections": [{"fields": []}]}, "'vmsd_name'"),
    ({"fields": [], "subsections": [{"vmsd_name": 5, "fields": []}]}, "'vmsd_name'"),
    ({"fields": [], "subsections": [{"vmsd_name": "x" * 256, "fields": []}]}, "cstr8"),
    ({"fields": [], "subsections": [{"vmsd_name": "", "fields": []}]}, "cstr8"),
    ({"fields": [], "subsections": [{"vmsd_name": "a/b"}]}, "no 'fields' list"),
]


@pytest.mark.parametrize(("entry", "match"), BAD_ENTRIES)
def test_body_length_rejects(entry: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        body_length(entry)


def test_body_length_deep_nesting() -> None:
    entry: dict[str, Any] = {"fields": []}
    cur = entry
    for i in range(70):
        sub: dict[str, Any] = {"vmsd_name": f"s{i}", "fields": []}
        cur["subsections"] = [sub]
        cur = sub
    with pytest.raises(ProtocolError, match="nested deeper"):
        body_length(entry)


# ---------------------------------------------------------------- split_device_area errors


def small_stream() -> tuple[bytes, dict[str, Any]]:
    desc = {
        "page_size": 4096,
        "devices": [
            {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
             "fields": [{"name": "a", "type": "int64", "size": 8}]},
            {"name": "dma", "instance_id": 1, "vmsd_name": "dma", "version": 1,
             "fields": [{"name": "r", "type": "uint8", "size": 1, "array_len": 3}],
             "subsections": [{"vmsd_name": "dma/x", "version": 1,
                              "fields": [{"name": "b", "type": "uint16", "size": 2}]}]},
        ],
    }  # fmt: skip
    dma_body = b"\x01\x02\x03" + b"\x05\x05dma/x\x00\x00\x00\x01" + b"\xbe\xef"
    area = (
        full(3, "timer", 0, 2) + b"T" * 8 + footer(3)
        + full(9, "dma", 1, 1) + dma_body + footer(9)
        + b"\x00"
    )  # fmt: skip
    return area, desc


def test_small_stream_splits() -> None:
    area, desc = small_stream()
    secs = split_device_area(area, desc, base_offset=100)
    assert secs == [
        DeviceSection(3, "timer", 0, 2, b"T" * 8),
        DeviceSection(9, "dma", 1, 1, b"\x01\x02\x03\x05\x05dma/x\x00\x00\x00\x01\xbe\xef"),
    ]
    assert split_by_footers(area, base_offset=100) == (secs, len(area) - 1)
    # without footers (send-section-footer off)
    nofoot = area.replace(footer(3), b"").replace(footer(9), b"")
    assert split_device_area(nofoot, desc, base_offset=0, footers=False) == secs
    assert split_device_area(b"\x00", {"devices": []}, base_offset=0) == []


def expect(area: bytes, desc: object, match: str, offset: int | None = None) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        split_device_area(area, desc, base_offset=1000)
    if offset is not None:
        assert info.value.offset == 1000 + offset
    return info.value


def test_split_device_area_errors() -> None:
    area, desc = small_stream()
    timer_end = len(full(3, "timer", 0, 2)) + 8
    # lying sizes: the footer check names the device, the offset and both byte strings
    lie = copy.deepcopy(desc)
    lie["devices"][0]["fields"][0]["size"] = 9
    err = expect(area, lie, r"device 'timer' instance 0 .*expected footer 7e 00 00 00 03", timer_end + 1)
    assert err.section == "timer"
    lie["devices"][0]["fields"][0]["size"] = 7
    expect(area, lie, "expected footer", timer_end - 1)
    lie["devices"][0]["fields"][0]["size"] = 10**6
    expect(area, lie, "runs past the end")
    # wrong device order / names / instance / version
    swapped = copy.deepcopy(desc)
    swapped["devices"].reverse()
    expect(
        area,
        swapped,
        r"FULL section 'timer' instance 0 \(id 3\) where the VMDESCRIPTION lists device 'dma'",
        0,
    )
    inst = copy.deepcopy(desc)
    inst["devices"][1]["instance_id"] = 0
    expect(area, inst, "where the VMDESCRIPTION lists")
    ver = copy.deepcopy(desc)
    ver["devices"][0]["version"] = 3
    expect(area, ver, "version 2, VMDESCRIPTION says 3")
    # count mismatches
    more = copy.deepcopy(desc)
    more["devices"].append({"name": "x", "instance_id": 0, "fields": []})
    expect(area, more, r"found EOF after 2 device section\(s\)", len(area) - 1)
    fewer = copy.deepcopy(desc)
    fewer["devices"].pop()
    expect(
        area, fewer, r"expected EOF after the 1 device\(s\).*another FULL section \('dma'\)", timer_end + 5
    )
    # trailing bytes, missing EOF, commands and junk
    expect(area + b"\x00", desc, "between EOF and VMDESCRIPTION", len(area))
    expect(area[:-1], desc, "without the EOF byte|runs past the end")
    cmd = area[: timer_end + 5] + bytes.fromhex("08 0002 0004 00000003") + area[timer_end + 5 :]
    expect(cmd, desc, "COMMAND record", timer_end + 5)
    expect(b"\x02" + area[1:], desc, "record type 0x02", 0)
    expect(area[:10], desc, "truncated")
    # malformed JSON shapes
    expect(area, [], "not a JSON object")
    expect(area, {"devices": {}}, "'devices' list")
    expect(area, {"devices": [7]}, "entry #0 is not an object")
    expect(area, {"devices": [{"name": "timer"}]}, "integer 'instance_id'")
    expect(area, {"devices": [{"name": "timer", "instance_id": 0}]}, "no 'fields' list", 0)


# ---------------------------------------------------------------- split_by_footers specifics


def test_footer_scan_skips_false_positives() -> None:
    # body of section 1 contains 7E 00000001 followed by junk, then by a plausible FULL header
    # (id 7) that has no footer anywhere: both candidates must be rejected
    fake_hdr = full(7, "ghost")
    body1 = b"ab" + footer(1) + b"\xff\xff" + footer(1) + fake_hdr + b"cd"
    area = full(1, "one") + body1 + footer(1) + full(2, "two") + b"xyz" + footer(2) + b"\x00"
    secs, rest = split_by_footers(area, base_offset=0)
    assert [(s.section_id, s.body) for s in secs] == [(1, body1), (2, b"xyz")]
    assert area[rest:] == b"\x00"
    # a candidate followed by EOF that is not the end: rejected when EOF is not acceptable
    body = b"q" + footer(5) + b"\x00" + b"r"
    area2 = full(5, "five") + body + footer(5) + bytes.fromhex("08 0005 0000")
    assert split_by_footers(area2, base_offset=0) == ([DeviceSection(5, "five", 0, 1, body)], len(area2) - 5)
    # the candidate "7E id 00 <end>" is accepted only with stop_at_eof
    tail = full(5, "five") + b"q" + footer(5) + b"\x00"
    assert split_by_footers(tail, base_offset=0)[1] == len(tail) - 1
    with pytest.raises(ProtocolError, match="no footer"):
        split_by_footers(tail, base_offset=0, stop_at_eof=False)


def test_footer_scan_backtracks_across_sections() -> None:
    # section 1's first footer candidate leads to a chain of two fake sections (ids 5, 6) that
    # dead-ends in junk after the last fake footer; the real split is found by backtracking
    fake = full(5, "five") + b"zz" + footer(5) + full(6, "six") + b"yy" + footer(6) + b"\xee"
    body1 = b"a" + footer(1) + fake
    area = full(1, "one") + body1 + footer(1) + full(2, "two") + b"b" + footer(2)
    secs, rest = split_by_footers(area, base_offset=0)
    assert [(s.section_id, s.body) for s in secs] == [(1, body1), (2, b"b")]
    assert rest == len(area)


def test_footer_scan_errors_and_non_full_start() -> None:
    assert split_by_footers(b"", base_offset=0) == ([], 0)
    assert split_by_footers(b"\x00", base_offset=0) == ([], 0)
    assert split_by_footers(bytes.fromhex("08 0005 0000"), base_offset=0) == ([], 0)
    with pytest.raises(ProtocolError, match="truncated") as info:
        split_by_footers(b"\x04\x00\x00", base_offset=50)
    assert info.value.offset == 50
    area = full(1, "one") + b"abc" + footer(1) + full(2, "two") + b"no footer here"
    with pytest.raises(ProtocolError, match=r"'two' \(id 2\)") as info:
        split_by_footers(area, base_offset=10)
    assert info.value.offset == 10 + len(full(1, "one")) + 3 + 5


def test_footer_scan_work_is_bounded() -> None:
    # every position looks like a footer of section 1 followed by a plausible header of a
    # section without a footer: the scan must give up (or finish) quickly, with ProtocolError
    unit = footer(1) + full(2, "x")
    area = full(1, "one") + unit * 20_000
    t = time.perf_counter()
    with pytest.raises(ProtocolError):
        split_by_footers(area, base_offset=0)
    assert time.perf_counter() - t < 10


# ---------------------------------------------------------------- hostile inputs


def _mutate(obj: Any, path: list[int], value: Any) -> Any:
    """Replace the node reached by walking ``path`` (indices into children) with ``value``."""
    if not path:
        return value
    if isinstance(obj, dict) and obj:
        keys = sorted(obj)
        k = keys[path[0] % len(keys)]
        return {**obj, k: _mutate(obj[k], path[1:], value)}
    if isinstance(obj, list) and obj:
        i = path[0] % len(obj)
        return [*obj[:i], _mutate(obj[i], path[1:], value), *obj[i + 1 :]]
    return value


JSON_KEYS = [
    "name",
    "instance_id",
    "fields",
    "subsections",
    "size",
    "array_len",
    "vmsd_name",
    "type",
    "struct",
]
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda c: (
        st.lists(c, max_size=4) | st.dictionaries(st.sampled_from([*JSON_KEYS, "devices"]), c, max_size=5)
    ),
    max_leaves=12,
)


@HOSTILE
@given(st.lists(st.integers(0, 400), min_size=1, max_size=6), json_values)
def test_mutated_vmdesc_raises_only_protocol_error(path: list[int], value: Any) -> None:
    desc = _mutate(precopy_desc_cached(), path, value)
    area = PRECOPY[AREA_AT:VMDESC_AT]
    try:
        secs = split_device_area(area, desc, base_offset=AREA_AT)
    except ProtocolError:
        return
    # accepted: then it delimits exactly what the footers say
    assert secs == split_by_footers(area, base_offset=AREA_AT)[0]


@HOSTILE
@given(st.integers(0, 29), st.integers(-5, 5).filter(bool))
def test_lying_sizes_are_caught(dev: int, delta: int) -> None:
    desc = copy.deepcopy(precopy_desc_cached())
    fields = desc["devices"][dev]["fields"]
    fields.append({"name": "lie", "type": "buffer", "size": 0})
    fields[-1]["size"] = max(0, delta)
    if delta < 0:  # shrink an existing field instead
        for f in fields:
            if f["size"] * f.get("array_len", 1) >= -delta and "array_len" not in f:
                f["size"] += delta
                break
        else:
            return
    with pytest.raises(ProtocolError, match=repr(desc["devices"][dev]["name"])):
        split_device_area(PRECOPY[AREA_AT:VMDESC_AT], desc, base_offset=AREA_AT)


@HOSTILE
@given(json_values)
def test_random_json_raises_only_protocol_error(desc: Any) -> None:
    area, _ = small_stream()
    with contextlib.suppress(ProtocolError):
        split_device_area(area, desc, base_offset=0)
    with contextlib.suppress(ProtocolError):
        body_length(desc)


@HOSTILE
@given(st.lists(st.tuples(st.integers(0, 12_900), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())  # fmt: skip
def test_mutated_areas_raise_only_protocol_error(edits: list[tuple[int, int]], by_footers: bool) -> None:
    area = bytearray(PRECOPY[AREA_AT:VMDESC_AT])
    for pos, val in edits:
        area[pos % len(area)] = val
    try:
        if by_footers:
            _, rest = split_by_footers(bytes(area), base_offset=AREA_AT)
            assert 0 <= rest <= len(area)
        else:
            split_device_area(bytes(area), precopy_desc_cached(), base_offset=AREA_AT)
    except ProtocolError as err:
        assert err.offset is None or AREA_AT <= err.offset <= AREA_AT + len(area)


@HOSTILE
@given(st.binary(max_size=300))
def test_random_areas_raise_only_protocol_error(data: bytes) -> None:
    for area in (data, b"\x04" + data):
        with contextlib.suppress(ProtocolError):
            split_by_footers(area, base_offset=0)
        with contextlib.suppress(ProtocolError):
            split_device_area(
                area, {"devices": [{"name": "a", "instance_id": 0, "fields": []}]}, base_offset=0
            )
        found = find_vmdesc_trailer(area)
        assert found is None or area[found[0]] == 6


@functools.cache
def precopy_desc_cached() -> dict[str, Any]:
    """Parsed once; callers must not mutate it (they deep-copy or rebuild)."""
    return precopy_desc()
