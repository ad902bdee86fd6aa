"""mig-analyze: print what is in a QEMU 7.2 migration stream (main channel, return path or
multifd channel).

Exit status 0 when the whole stream decoded, 1 on a protocol error (printed with its offset and
reason, never a traceback), 2 on usage or I/O errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from .decoder import MainDecoder
from .errors import ProtocolError
from .events import (
    ColoEvent,
    CompressedPage,
    Configuration,
    DeviceSection,
    EnableColo,
    EndOfStream,
    Event,
    MultifdInit,
    MultifdPacket,
    OpenReturnPath,
    Packaged,
    Pages,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RamBlockList,
    RamEos,
    RamHook,
    RecvBitmapRequest,
    RpPong,
    RpRecvBitmap,
    RpReqPages,
    RpResumeAck,
    RpShut,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamHeader,
    VmDescription,
    XbzrlePage,
    ZeroPages,
)

CHUNK = 1 << 20
PAGE_REC = 8 + 4096


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _command_dict(ev: Event) -> dict[str, Any]:
    """A command (or return-path message) as {"name": ..., fields...}."""
    out: dict[str, Any] = {"name": _COMMAND_NAMES.get(type(ev), type(ev).__name__)}
    for f in dataclasses.fields(ev):  # type: ignore[arg-type]
        value = getattr(ev, f.name)
        if isinstance(value, bytes):
            out[f.name if f.name != "data" else "length"] = len(value) if f.name == "data" else value.hex()
        elif isinstance(value, tuple):
            out[f.name] = [list(v) if isinstance(v, tuple) else v for v in value]
        elif hasattr(value, "name") and not isinstance(value, str):
            out[f.name] = value.name
        else:
            out[f.name] = value
    return out


_COMMAND_NAMES: dict[type, str] = {
    OpenReturnPath: "OPEN_RETURN_PATH",
    Ping: "PING",
    PostcopyAdvise: "POSTCOPY_ADVISE",
    PostcopyListen: "POSTCOPY_LISTEN",
    PostcopyRun: "POSTCOPY_RUN",
    PostcopyRamDiscard: "POSTCOPY_RAM_DISCARD",
    Packaged: "PACKAGED",
    EnableColo: "ENABLE_COLO",
    PostcopyResume: "POSTCOPY_RESUME",
    RecvBitmapRequest: "RECV_BITMAP",
    RpShut: "SHUT",
    RpPong: "PONG",
    RpReqPages: "REQ_PAGES",
    RpRecvBitmap: "RECV_BITMAP",
    RpResumeAck: "RESUME_ACK",
}


class MainReport:
    """Accumulates what a main-channel stream holds."""

    def __init__(self) -> None:
        self.header: int | None = None
        self.configuration: dict[str, Any] | None = None
        self.ram_blocks: dict[str, dict[str, int]] = {}
        self.block_list: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.devices: list[dict[str, Any]] = []
        self.sections: list[dict[str, Any]] = []
        self.eof = False
        self.vmdesc_size: int | None = None
        self.total_bytes = 0

    def _block(self, name: str) -> dict[str, int]:
        return self.ram_blocks.setdefault(
            name,
            {
                "zero": 0,
                "normal": 0,
                "xbzrle": 0,
                "compressed": 0,
                "zero_bytes": 0,
                "normal_bytes": 0,
                "xbzrle_bytes": 0,
                "compressed_bytes": 0,
            },
        )

    def _section(self, kind: str, section_id: int, idstr: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": kind, "section_id": section_id}
        if idstr is not None:
            entry["idstr"] = idstr
        self.sections.append(entry)
        return entry

    def add(self, ev: Event, *, in_package: bool = False) -> None:
        if isinstance(ev, ZeroPages):
            b = self._block(ev.block)
            b["zero"] += len(ev)
            b["zero_bytes"] += 9 * len(ev)
            self._count_in_section("zero", len(ev))
        elif isinstance(ev, Pages):
            b = self._block(ev.block)
            b["normal"] += len(ev)
            b["normal_bytes"] += PAGE_REC * len(ev)
            self._count_in_section("normal", len(ev))
        elif isinstance(ev, XbzrlePage):
            b = self._block(ev.block)
            b["xbzrle"] += 1
            b["xbzrle_bytes"] += 11 + len(ev.delta)
            self._count_in_section("xbzrle", 1)
        elif isinstance(ev, CompressedPage):
            b = self._block(ev.block)
            b["compressed"] += 1
            b["compressed_bytes"] += 12 + len(ev.data)
            self._count_in_section("compressed", 1)
        elif isinstance(ev, RamBlockList):
            self.block_list = [
                {k: v for k, v in dataclasses.asdict(b).items() if v is not None} for b in ev.blocks
            ]
            for b in ev.blocks:
                self._block(b.name)
        elif isinstance(ev, StreamHeader):
            self.header = ev.version
        elif isinstance(ev, Configuration):
            self.configuration = {k: v for k, v in dataclasses.asdict(ev).items() if v is not None}
            if "uuid" in self.configuration:
                self.configuration["uuid"] = ev.uuid.hex() if ev.uuid else None
        elif isinstance(ev, SectionStart):
            self._section("start", ev.section_id, ev.idstr)
        elif isinstance(ev, SectionPart):
            self._section("part", ev.section_id)
        elif isinstance(ev, SectionEnd):
            self._section("end", ev.section_id)
        elif isinstance(ev, DeviceSection):
            dev = {
                "idstr": ev.idstr,
                "instance_id": ev.instance_id,
                "version_id": ev.version_id,
                "section_id": ev.section_id,
                "size": len(ev.body),
            }
            if in_package:
                dev["in_package"] = True
            self.devices.append(dev)
            entry = self._section("full", ev.section_id, ev.idstr)
            entry["size"] = len(ev.body)
        elif isinstance(ev, EndOfStream):
            if not in_package:
                self.eof = True
        elif isinstance(ev, VmDescription):
            self.vmdesc_size = len(ev.json_bytes)
        elif isinstance(ev, tuple(_COMMAND_NAMES)):
            cmd = _command_dict(ev)
            if in_package:
                cmd["in_package"] = True
            self.commands.append(cmd)
        elif isinstance(ev, (RamEos, SectionFooter, RamHook)):
            pass

    def _count_in_section(self, key: str, n: int) -> None:
        if self.sections:
            s = self.sections[-1]
            s[key] = s.get(key, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {
            "channel": "main",
            "bytes": self.total_bytes,
            "header_version": self.header,
            "configuration": self.configuration,
            "block_list": self.block_list,
            "ram_blocks": self.ram_blocks,
            "totals": {
                k: sum(b[k] for b in self.ram_blocks.values())
                for k in ("zero", "normal", "xbzrle", "compressed")
            },
            "commands": self.commands,
            "devices": self.devices,
            "sections": self.sections,
            "eof": self.eof,
            "vmdesc_bytes": self.vmdesc_size,
        }


def analyze_main(chunks: Iterable[bytes], *, header: bool = True) -> MainReport:
    report = MainReport()
    dec = MainDecoder(
        expect_header=header,
        zero_copy=True,
        lenient_blocks=not header,
        assume_ram_section=not header,
    )

    def consume(evs: Iterable[Event]) -> None:
        for ev in evs:
            report.add(ev)
            if isinstance(ev, Packaged):
                _analyze_package(ev, dec, report)

    for chunk in chunks:
        report.total_bytes += len(chunk)
        dec.feed(chunk)
        consume(dec.events())
    consume(dec.end_of_input())
    return report


def _analyze_package(ev: Packaged, outer: MainDecoder, report: MainReport) -> None:
    """A PACKAGED blob is a header-less sub-stream: decode it with the outer stream's context."""
    sub = MainDecoder(
        expect_header=False,
        known_blocks=outer.blocks,
        sections=outer.sections,
        lenient_blocks=outer._lenient_blocks,
        base_offset=outer.offset - len(ev.data),
        channel="main (PACKAGED blob)",
    )
    sub.feed(ev.data)
    for e in [*sub.events(), *sub.end_of_input()]:
        report.add(e, in_package=True)


def analyze_return_path(chunks: Iterable[bytes]) -> dict[str, Any]:
    from .return_path import ReturnPathDecoder

    dec = ReturnPathDecoder()
    messages: list[dict[str, Any]] = []
    total = 0

    def consume(evs: Iterable[Event]) -> None:
        for ev in evs:
            d = _command_dict(ev)
            if isinstance(ev, RpRecvBitmap):
                d["bitmap"] = len(ev.bitmap)
                d["pages_received"] = sum(bin(b).count("1") for b in ev.bitmap)
            if isinstance(ev, ColoEvent):
                d = {"name": ev.message.name, "value": ev.value}
            messages.append(d)

    for chunk in chunks:
        total += len(chunk)
        dec.feed(chunk)
        consume(dec.events())
    dec.end_of_input()
    return {"channel": "return-path", "bytes": total, "messages": messages}


def analyze_multifd(chunks: Iterable[bytes]) -> dict[str, Any]:
    from .multifd import MultifdChannelDecoder

    dec = MultifdChannelDecoder()
    out: dict[str, Any] = {
        "channel": "multifd",
        "bytes": 0,
        "init": None,
        "packets": 0,
        "sync_packets": 0,
        "ram_blocks": {},
    }

    def consume(evs: Iterable[Event]) -> None:
        for ev in evs:
            if isinstance(ev, MultifdInit):
                out["init"] = {"channel_id": ev.channel_id, "uuid": ev.uuid.hex(), "version": ev.version}
            elif isinstance(ev, MultifdPacket):
                out["packets"] += 1
                out["sync_packets"] += bool(ev.flags & MultifdPacket.SYNC)
                if ev.normal_pages:
                    b = out["ram_blocks"].setdefault(ev.block, {"zero": 0, "normal": 0, "xbzrle": 0})
                    b["normal"] += ev.normal_pages

    for chunk in chunks:
        out["bytes"] += len(chunk)
        dec.feed(chunk)
        consume(dec.events())
    dec.end_of_input()
    return out


def _human(report: dict[str, Any]) -> str:
    lines: list[str] = []
    if report["channel"] != "main":
        lines.append(f"{report['channel']} stream, {report['bytes']} bytes")
        if report["channel"] == "return-path":
            for m in report["messages"]:
                fields = " ".join(f"{k}={v}" for k, v in m.items() if k != "name")
                lines.append(f"  {m['name']} {fields}".rstrip())
        else:
            lines.append(f"  init: {report['init']}")
            lines.append(f"  packets: {report['packets']} (sync {report['sync_packets']})")
            for name, b in report["ram_blocks"].items():
                lines.append(f"  {name}: {b['normal']} normal pages")
        return "\n".join(lines)
    lines.append(f"main stream, {report['bytes']} bytes, header version {report['header_version']}")
    if report["configuration"]:
        lines.append(f"configuration: {report['configuration']}")
    lines.append("sections in order:")
    prev = None
    repeat = 0
    for s in report["sections"]:
        text = f"  {s['type'].upper():5} id {s['section_id']}"
        if "idstr" in s:
            text += f" {s['idstr']}"
        counts = ", ".join(f"{k} {s[k]}" for k in ("zero", "normal", "xbzrle", "compressed") if k in s)
        if "size" in s:
            text += f" ({s['size']} bytes)"
        if counts:
            text += f": {counts}"
        if text == prev:
            repeat += 1
            continue
        if repeat:
            lines.append(f"    ... repeated {repeat} more times")
            repeat = 0
        lines.append(text)
        prev = text
    if repeat:
        lines.append(f"    ... repeated {repeat} more times")
    lines.append("RAM blocks:")
    for name, b in report["ram_blocks"].items():
        lines.append(
            f"  {name:28} zero {b['zero']:8} ({b['zero_bytes']} B)  normal {b['normal']:8} "
            f"({b['normal_bytes']} B)  xbzrle {b['xbzrle']:6} ({b['xbzrle_bytes']} B)"
            + (f"  compressed {b['compressed']}" if b["compressed"] else "")
        )
    t = report["totals"]
    lines.append(f"  {'total':28} zero {t['zero']:8}  normal {t['normal']:8}  xbzrle {t['xbzrle']:6}")
    lines.append("commands:")
    for c in report["commands"]:
        fields = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("name", "in_package"))
        lines.append(f"  {'[package] ' if c.get('in_package') else ''}{c['name']} {fields}".rstrip())
    lines.append(f"devices ({len(report['devices'])}):")
    for d in report["devices"]:
        lines.append(
            f"  {'[package] ' if d.get('in_package') else ''}{d['idstr']} instance {d['instance_id']} "
            f"version {d['version_id']}: {d['size']} bytes"
        )
    lines.append(
        f"EOF: {'yes' if report['eof'] else 'no'}; vmdesc: "
        f"{str(report['vmdesc_bytes']) + ' bytes' if report['vmdesc_bytes'] is not None else 'none'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mig-analyze", description=__doc__.splitlines()[0])
    ap.add_argument("file", help="stream file, or - for standard input")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--return-path", action="store_true", help="the file is a return-path byte stream")
    mode.add_argument("--no-header", action="store_true", help="a resumed postcopy stream (no QEVM header)")
    mode.add_argument("--multifd", action="store_true", help="the file is a multifd channel")
    args = ap.parse_args(argv)
    try:
        stream: BinaryIO = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as err:
        print(f"mig-analyze: {err}", file=sys.stderr)
        return 2
    try:
        with stream:
            if args.return_path:
                report = analyze_return_path(_chunks(stream))
            elif args.multifd:
                report = analyze_multifd(_chunks(stream))
            else:
                report = analyze_main(_chunks(stream), header=not args.no_header).to_json()
    except ProtocolError as err:
        if args.json:
            print(json.dumps({"error": err.to_dict()}))
        print(f"mig-analyze: protocol error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"mig-analyze: {err}", file=sys.stderr)
        return 2
    try:
        print(json.dumps(report) if args.json else _human(report))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into head: not an error of ours
        sys.stdout = None  # type: ignore[assignment]
    return 0


if __name__ == "__main__":
    sys.exit(main())
