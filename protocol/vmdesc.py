"""Delimiting device (FULL) sections, which QEMU does not length-prefix (WIRE.md §2.7, §2.8).

Two ways:

* :func:`split_device_area` walks the device area with body lengths computed from the
  stream's own VMDESCRIPTION JSON (:func:`body_length`), checking every header, footer and the
  final EOF against it. This is exact for precopy and snapshot streams; the trailer is found
  with :func:`find_vmdesc_trailer`.
* :func:`split_by_footers` finds each body's end by searching for the section footer
  ``7E be32 id`` followed by a well-formed record, backtracking on false positives. It works
  where there is no vmdesc (PACKAGED blobs in postcopy, COLO device state, truncated streams)
  and stops at the first record that is not a FULL section, for the caller to parse.

The JSON is attacker-controlled: everything read from it is type- and range-checked and every
problem is a :class:`ProtocolError`.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ProtocolError
from .events import DeviceSection

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")

SECTION_FULL = 0x04
SECTION_FOOTER = 0x7E
VMDESCRIPTION = 0x06
EOF = 0x00
COMMAND = 0x08

# subsections nest only a few levels in QEMU; a cap keeps hostile JSON cheap
MAX_SUBSECTION_DEPTH = 64
# footer scan: bytes it may search, as a multiple of the area size, before giving up
FOOTER_SCAN_WORK_FACTOR = 64

# MIG_CMD_* payload lengths (QEMU 7.2 savevm.c): the allowed values, or an int minimum
_COMMAND_LEN: dict[int, tuple[int, ...] | int] = {
    1: (0,),  # OPEN_RETURN_PATH
    2: (4,),  # PING
    3: (0, 16),  # POSTCOPY_ADVISE
    4: (0,),  # POSTCOPY_LISTEN
    5: (0,),  # POSTCOPY_RUN
    6: 20,  # POSTCOPY_RAM_DISCARD
    7: (4,),  # PACKAGED
    8: (0,),  # ENABLE_COLO
    9: (0,),  # POSTCOPY_RESUME
    10: 1,  # RECV_BITMAP: cstr8 block name
}


# ---------------------------------------------------------------- body lengths from vmdesc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _label(obj: Mapping[str, Any]) -> str:
    for key in ("name", "vmsd_name"):
        v = obj.get(key)
        if isinstance(v, str):
            return repr(v)
    return "(unnamed)"


def _field_length(f: object, where: str, k: int) -> int:
    if not isinstance(f, dict):
        raise ProtocolError(f"VMDESCRIPTION {where}: field #{k} is not an object")
    name = f.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"VMDESCRIPTION {where}: field #{k} has no string 'name'")
    if not isinstance(f.get("type"), str):
        raise ProtocolError(f"VMDESCRIPTION {where}: field {name!r} has no string 'type'")
    size = f.get("size")
    if not _is_int(size) or size < 0:
        raise ProtocolError(
            f"VMDESCRIPTION {where}: field {name!r} 'size' must be a non-negative integer, got {size!r}"
        )
    n = f.get("array_len", 1)
    if not _is_int(n) or n < 1:
        raise ProtocolError(
            f"VMDESCRIPTION {where}: field {name!r} 'array_len' must be a positive integer, got {n!r}"
        )
    if "struct" in f and not isinstance(f["struct"], dict):
        raise ProtocolError(f"VMDESCRIPTION {where}: field {name!r} 'struct' is not an object")
    # a struct's (or tmp's) "size" is what QEMU measured on the wire, nested subsections
    # included: it is authoritative, the nested description is not needed
    return size * n


def body_length(device_entry: object) -> int:
    """Byte length of a section body described by one vmdesc ``devices`` entry (WIRE.md §2.8).

    Σ fields ``size * (array_len or 1)`` + Σ subsections ``1 + 1 + len(vmsd_name) + 4 +`` their
    own body length. Also accepts a ``struct`` object or a subsection (same shape). An
    old-style entry's top-level ``size`` must agree with its fields.
    """
    if not isinstance(device_entry, dict):
        raise ProtocolError("VMDESCRIPTION device entry is not an object")
    top = _label(device_entry)
    total = 0
    stack: list[tuple[dict[str, Any], str, int]] = [(device_entry, f"device {top}", 0)]
    while stack:
        obj, where, depth = stack.pop()
        fields = obj.get("fields")
        if not isinstance(fields, list):
            raise ProtocolError(f"VMDESCRIPTION {where} has no 'fields' list")
        for k, f in enumerate(fields):
            total += _field_length(f, where, k)
        subs = obj.get("subsections", [])
        if not isinstance(subs, list):
            raise ProtocolError(f"VMDESCRIPTION {where}: 'subsections' is not a list")
        for k, sub in enumerate(subs):
            if not isinstance(sub, dict):
                raise ProtocolError(f"VMDESCRIPTION {where}: subsection #{k} is not an object")
            name = sub.get("vmsd_name")
            if not isinstance(name, str):
                raise ProtocolError(f"VMDESCRIPTION {where}: subsection #{k} has no string 'vmsd_name'")
            try:
                nb = len(name.encode("utf-8", errors="surrogatepass"))
            except UnicodeError:  # pragma: no cover - surrogatepass encodes every str
                nb = 256
            if not 0 < nb <= 255:
                raise ProtocolError(
                    f"VMDESCRIPTION {where}: subsection name {name!r} does not fit a cstr8 ({nb} bytes)"
                )
            if depth + 1 > MAX_SUBSECTION_DEPTH:
                raise ProtocolError(
                    f"VMDESCRIPTION {where}: subsections nested deeper than {MAX_SUBSECTION_DEPTH}"
                )
            total += 1 + 1 + nb + 4  # 0x05, cstr8 name, be32 version_id
            stack.append((sub, f"{where} subsection {name!r}", depth + 1))
    if "size" in device_entry:
        size = device_entry["size"]
        if not _is_int(size) or size != total:
            raise ProtocolError(
                f"VMDESCRIPTION device {top}: 'size' {size!r} disagrees with its fields ({total} bytes)"
            )
    return total


# ---------------------------------------------------------------- the trailer


def _rfind_byte(mv: memoryview, value: int, lo: int, hi: int, chunk: int = 1 << 16) -> int:
    """Last index of ``value`` in mv[lo:hi], or -1 (chunked: no copy of the whole buffer)."""
    needle = bytes((value,))
    while hi > lo:
        a = max(lo, hi - chunk)
        i = bytes(mv[a:hi]).rfind(needle)
        if i >= 0:
            return a + i
        hi = a
    return -1


def find_vmdesc_trailer(buf: bytes | bytearray | memoryview, start: int = 0) -> tuple[int, bytes] | None:
    """Find a complete VMDESCRIPTION record ending exactly at the end of ``buf``.

    Returns (index in ``buf`` of the 0x06 byte, the JSON bytes) or None. The record is
    ``06 be32 len`` + ``len`` bytes starting with ``{`` (and, as it ends the buffer, ending with
    ``}``), with its 0x06 byte at index >= ``start``. Like analyze-migration.py it relies on the
    JSON containing no NUL byte (QEMU escapes control characters), so only the bytes after the
    last NUL are searched: cheap even for a buffer of many MB. The highest-placed candidate wins
    (an earlier one would have to contain the later record in its JSON, which is impossible for
    valid JSON). The byte before the record (EOF) is not checked here.
    """
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n - start < 7 or mv[n - 1] != 0x7D:  # smallest record: 06 00000002 "{}"
        return None
    last_nul = _rfind_byte(mv, 0, start, n)
    lo = max(start, last_nul - 4)  # the length field may hold NULs, the JSON may not
    tail = bytes(mv[lo:n])

    def check(q: int) -> bool:  # q: index of "{" in tail
        if q < 5 or tail[q - 5] != VMDESCRIPTION:
            return False
        return _be32.unpack_from(tail, q - 4)[0] == len(tail) - q

    # QEMU writes "page_size" first: the common case is one rfind
    q = tail.rfind(b'{"page_size"')
    while q >= 0:
        if check(q):
            return lo + q - 5, tail[q:]
        q = tail.rfind(b'{"page_size"', 0, q)
    arr = np.frombuffer(tail, dtype=np.uint8)
    cand = np.flatnonzero(arr[5:] == 0x7B) + 5
    cand = cand[arr[cand - 5] == VMDESCRIPTION]
    if cand.size:  # compare every candidate's be32 with its distance to the end at once
        wide = arr.astype(np.int64, copy=False)
        lengths = (wide[cand - 4] << 24) | (wide[cand - 3] << 16) | (wide[cand - 2] << 8) | wide[cand - 1]
        cand = cand[lengths == len(tail) - cand]
    if cand.size:
        q = int(cand[-1])
        return lo + q - 5, tail[q:]
    return None


# ---------------------------------------------------------------- record headers


def _full_header(
    data: bytes, pos: int, base_offset: int, what: str = "FULL section"
) -> tuple[int, str, int, int, int]:
    """Parse a START/FULL header at ``pos``: (section_id, idstr, instance_id, version_id, end)."""
    if pos + 6 > len(data):
        raise ProtocolError(f"truncated {what} header", offset=base_offset + pos)
    section_id = _be32.unpack_from(data, pos + 1)[0]
    n = data[pos + 5]
    end = pos + 6 + n + 8
    if end > len(data):
        raise ProtocolError(f"truncated {what} header (section id {section_id})", offset=base_offset + pos)
    idstr = data[pos + 6 : pos + 6 + n].decode("utf-8", errors="surrogateescape")
    instance_id, version_id = struct.unpack_from(">II", data, pos + 6 + n)
    return section_id, idstr, instance_id, version_id, end


def _plausible_full(data: bytes, pos: int, prev_id: int) -> int | None:
    """Header end of a believable FULL/START header at ``pos`` (for the footer scan), or None."""
    if pos + 6 > len(data):
        return None
    section_id = _be32.unpack_from(data, pos + 1)[0]
    n = data[pos + 5]
    end = pos + 6 + n + 8
    if n == 0 or end > len(data) or section_id == prev_id:  # ids are unique per handler
        return None
    name = data[pos + 6 : pos + 6 + n]
    if min(name) < 0x20 or max(name) > 0x7E:  # QEMU idstrs are printable ASCII
        return None
    return end


def _plausible_command(data: bytes, pos: int) -> bool:
    if pos + 5 > len(data):
        return False
    cmd, length = struct.unpack_from(">HH", data, pos + 1)
    if cmd not in _COMMAND_LEN or pos + 5 + length > len(data):
        return False
    allowed = _COMMAND_LEN[cmd]
    return length >= allowed if isinstance(allowed, int) else length in allowed


# ---------------------------------------------------------------- delimiting with the vmdesc


def _devices(vmdesc: object) -> list[Any]:
    if not isinstance(vmdesc, dict):
        raise ProtocolError("VMDESCRIPTION is not a JSON object")
    devices = vmdesc.get("devices")
    if not isinstance(devices, list):
        raise ProtocolError("VMDESCRIPTION has no 'devices' list")
    return devices


def split_device_area(
    area: bytes | bytearray | memoryview,
    vmdesc: object,
    *,
    base_offset: int,
    footers: bool = True,
) -> list[DeviceSection]:
    """Delimit the device area with the stream's own vmdesc (parsed JSON).

    ``area`` runs from the first FULL section header up to and including the top-level EOF
    byte that precedes the VMDESCRIPTION record; ``base_offset`` is the absolute stream offset
    of ``area[0]``. Each record must be a FULL header whose (idstr, instance_id) is the next
    ``devices`` entry (and whose version_id equals the entry's ``version``, when given), a body
    of :func:`body_length` bytes, and (with ``footers``) ``7E`` + the same section id; after
    the last device exactly one EOF byte. Returns one :class:`DeviceSection` per device, in
    stream order (footers are implied, not returned).
    """
    data = bytes(area)
    devices = _devices(vmdesc)
    total = len(devices)
    out: list[DeviceSection] = []
    pos = 0
    for k, entry in enumerate(devices):
        if not isinstance(entry, dict):
            raise ProtocolError(f"VMDESCRIPTION device entry #{k} is not an object")
        name = entry.get("name")
        inst = entry.get("instance_id")
        if not isinstance(name, str) or not _is_int(inst):
            raise ProtocolError(
                f"VMDESCRIPTION device entry #{k} needs a string 'name' and an integer 'instance_id'",
                offset=base_offset + pos,
            )
        want = f"device {name!r} instance {inst} (VMDESCRIPTION entry #{k} of {total})"
        if pos >= len(data):
            raise ProtocolError(f"device area ends where {want} should start", offset=base_offset + pos)
        kind = data[pos]
        if kind != SECTION_FULL:
            if kind == EOF:
                found = f"EOF after {k} device section(s)"
            elif kind == COMMAND:
                found = "a COMMAND record (not supported among device sections)"
            else:
                found = f"record type 0x{kind:02x}"
            raise ProtocolError(
                f"expected the FULL section (0x04) of {want}, found {found}",
                offset=base_offset + pos,
                section=name,
            )
        section_id, idstr, instance_id, version_id, hdr_end = _full_header(data, pos, base_offset)
        if (idstr, instance_id) != (name, inst):
            raise ProtocolError(
                f"FULL section {idstr!r} instance {instance_id} (id {section_id}) where the "
                f"VMDESCRIPTION lists {want}",
                offset=base_offset + pos,
                section=idstr,
            )
        version = entry.get("version")
        if version is not None and (not _is_int(version) or version != version_id):
            raise ProtocolError(
                f"{want}: section header says version {version_id}, VMDESCRIPTION says {version!r}",
                offset=base_offset + pos,
                section=idstr,
            )
        try:
            length = body_length(entry)
        except ProtocolError as err:
            raise ProtocolError(err.reason, offset=base_offset + pos, section=idstr) from None
        body_end = hdr_end + length
        need = body_end + (5 if footers else 0) + 1  # footer, then at least the EOF byte
        if need > len(data):
            raise ProtocolError(
                f"{want}: body of {length} bytes (from VMDESCRIPTION) runs past the end of the "
                f"device area ({len(data) - hdr_end} bytes left)",
                offset=base_offset + hdr_end,
                section=idstr,
            )
        if footers:
            expect = bytes((SECTION_FOOTER,)) + _be32.pack(section_id)
            got = data[body_end : body_end + 5]
            if got != expect:
                raise ProtocolError(
                    f"{want}: expected footer {expect.hex(' ')} after the {length}-byte body, "
                    f"found {got.hex(' ')}",
                    offset=base_offset + body_end,
                    section=idstr,
                )
            nxt = body_end + 5
        else:
            nxt = body_end
        out.append(DeviceSection(section_id, idstr, instance_id, version_id, data[hdr_end:body_end]))
        pos = nxt
    if pos >= len(data):
        raise ProtocolError("device area ends without the EOF byte", offset=base_offset + pos)
    if data[pos] != EOF:
        kind = data[pos]
        if kind == SECTION_FULL:
            found = "another FULL section"
            with contextlib.suppress(ProtocolError):
                found += f" ({_full_header(data, pos, base_offset)[1]!r})"
        else:
            found = f"record type 0x{kind:02x}"
        raise ProtocolError(
            f"expected EOF after the {total} device(s) listed in VMDESCRIPTION, found {found}",
            offset=base_offset + pos,
        )
    if pos + 1 != len(data):
        raise ProtocolError(
            f"{len(data) - pos - 1} unexpected byte(s) between EOF and VMDESCRIPTION",
            offset=base_offset + pos + 1,
        )
    return out


# ---------------------------------------------------------------- delimiting by footers


class _Frame:
    __slots__ = ("body_start", "footer", "hdr", "pos", "search_from")

    def __init__(self, pos: int, hdr: tuple[int, str, int, int, int]) -> None:
        self.pos = pos
        self.hdr = hdr
        self.body_start = hdr[4]
        self.search_from = hdr[4]
        self.footer = -1


def split_by_footers(
    area: bytes | bytearray | memoryview,
    *,
    base_offset: int,
    stop_at_eof: bool = True,
) -> tuple[list[DeviceSection], int]:
    """Delimit consecutive FULL sections at the start of ``area`` by their footers (§2.8 opt. 2).

    Returns ``(sections, rest)``: the leading FULL sections and the index in ``area`` of the
    first byte after the last footer — where a non-FULL record begins (EOF, a COMMAND such as
    PING 3 / RUN at the end of a PACKAGED blob, a START/PART/END) or ``len(area)``. The caller
    parses from ``rest`` on. ``area`` not starting with 0x04 gives ``([], 0)``.

    A body ends at an occurrence of ``7E be32 id`` followed by the end of ``area`` or by a
    well-formed record: a FULL/START header with a printable idstr and another id (its own
    footer must then be found too, recursively), a COMMAND with a known number and a valid
    length that fits, a PART/END header, or (when ``stop_at_eof``) EOF followed by the end or
    by a VMDESCRIPTION byte. Pass ``stop_at_eof=False`` for PACKAGED blobs, which never contain
    EOF in 7.2. Candidates are tried in order with backtracking, and the total search work is
    bounded, so hostile input costs at most ~``FOOTER_SCAN_WORK_FACTOR`` passes over ``area``.
    """
    data = bytes(area)
    size = len(data)
    if not size or data[0] != SECTION_FULL:
        return [], 0
    path = [_Frame(0, _full_header(data, 0, base_offset))]
    failed: set[int] = set()  # header positions from which no parse succeeds
    worst = path[0]  # deepest frame that ran out of candidates, for the error message
    budget = FOOTER_SCAN_WORK_FACTOR * size + (1 << 20)
    rest = -1
    while path:
        fr = path[-1]
        sid = fr.hdr[0]
        pattern = bytes((SECTION_FOOTER,)) + _be32.pack(sid)
        c = data.find(pattern, fr.search_from)
        budget -= (c + 5 if c >= 0 else size) - fr.search_from
        if budget < 0:
            raise ProtocolError(
                "footer scan gave up: too many false footer candidates (ambiguous or hostile device state)",
                offset=base_offset + fr.pos,
                section=fr.hdr[1],
            )
        if c < 0:
            failed.add(fr.pos)
            if fr.pos >= worst.pos:
                worst = fr
            path.pop()
            continue
        fr.search_from = c + 1
        fr.footer = c
        nxt = c + 5
        if nxt == size:
            rest = nxt
            break
        kind = data[nxt]
        if kind == SECTION_FULL:
            if nxt in failed:
                continue
            end = _plausible_full(data, nxt, sid)
            if end is not None:
                path.append(_Frame(nxt, _full_header(data, nxt, base_offset)))
            continue
        if kind == COMMAND:
            ok = _plausible_command(data, nxt)
        elif kind == 0x01:
            ok = _plausible_full(data, nxt, sid) is not None
        elif kind in (0x02, 0x03):
            ok = nxt + 5 <= size
        elif kind == EOF:
            ok = stop_at_eof and (nxt + 1 == size or data[nxt + 1] == VMDESCRIPTION)
        else:
            ok = False
        if ok:
            rest = nxt
            break
    if rest < 0:
        sid, idstr = worst.hdr[0], worst.hdr[1]
        raise ProtocolError(
            f"no footer 7E {sid:08x} followed by a well-formed record found for FULL section "
            f"{idstr!r} (id {sid})",
            offset=base_offset + worst.pos,
            section=idstr,
        )
    return [
        DeviceSection(fr.hdr[0], fr.hdr[1], fr.hdr[2], fr.hdr[3], data[fr.body_start : fr.footer])
        for fr in path
    ], rest
