"""On-disk VM image: what ``mig_dest --store DIR`` writes after a completed migration and what
``mig_source --image PATH`` loads to migrate the guest out again.

Format ``qemu-live-migration-image``, version 1
===============================================

An image is a **directory**::

    IMAGE/
      manifest.json            description of everything below (UTF-8 JSON object)
      ram/000-pc.ram.raw       one raw file per RAM block, in block-list order
      ram/001-rom_etc_acpi_tables.raw
      ...
      devices.bin              the device (FULL) section bodies, concatenated in stream order
      vmdesc.json              the VMDESCRIPTION JSON trailer exactly as received (optional)

RAM files hold the block's bytes at their block offsets (``size`` bytes, block offset 0 = file
offset 0). They are written sparsely: only the 1 MiB chunks that contain a non-zero byte are
written, the rest is left as a hole (``ftruncate``), so a mostly-zero 1 GiB block costs little
disk. Readers must not care (a hole reads as zeros).

``manifest.json``::

    {
      "format": "qemu-live-migration-image",
      "version": 1,                       # readers refuse any other version
      "created": "2024-05-01T12:00:00.123456Z",   # UTC, ISO 8601
      "source": "mig-dest tcp:0.0.0.0:4444 from 10.0.0.1:53211",   # free text: where it came from
      "machine_type": "pc-i440fx-7.2",    # the resolved machine type of the CONFIGURATION section
      "config": {                         # CONFIGURATION section fields (JSON values; uuid as hex)
        "machine_type": "pc-i440fx-7.2", "target_page_bits": null,
        "capabilities": null, "uuid": null
      },
      "page_size": 4096,
      "digest": "xxh3_128",               # algorithm of every "xxh3_128" field (hex, big-endian)
      "ram_blocks": [                     # in the order of the stream's block list
        {"name": "pc.ram", "size": 134217728, "file": "ram/000-pc.ram.raw",
         "xxh3_128": "<32 hex digits>", "nonzero_chunks": 101}
      ],
      "devices": {
        "file": "devices.bin", "size": 33170, "xxh3_128": "...",
        "sections": [                     # in stream order
          {"idstr": "timer", "instance_id": 0, "version_id": 2, "section_id": 0,
           "offset": 0, "size": 24}        # body = devices.bin[offset:offset+size]
        ]
      },
      "vmdesc": {"file": "vmdesc.json", "size": 98649, "xxh3_128": "..."},   # or null
      "extra": {}                         # free JSON object for the writer (stats, capabilities...)
    }

Rules: file names are relative paths inside the image (no ``..``, not absolute); every listed
file's length equals its ``size`` and its xxh3-128 digest (of the whole file content, holes read
as zeros) equals the manifest's; device sections tile ``devices.bin`` contiguously from offset 0;
``section_id`` is optional (the source's handle for the section; a writer replaying the image may
renumber). Block names and sizes are those of the stream's MEM_SIZE list; the RAM section's own
section id, if wanted, goes into ``extra``.

Atomicity: :func:`write_image` builds the image in a hidden temporary directory next to the target
(``.NAME.tmp-XXXX``), fsyncs every file and the directory, then renames it to the target and
fsyncs the parent. A crash or an exception before the rename leaves no image at the target
(exceptions also delete the temporary directory), so a reader never sees a partial image. The
writer refuses an existing target unless ``overwrite=True`` (then the old image is moved aside,
the new one renamed in, and the old one deleted).

:func:`read_image` validates the manifest (a malformed one raises :class:`ImageError` naming the
field), checks every file's size and (by default) digest, and maps RAM files read-only with
``numpy.memmap`` (``mmap=False`` loads them into arrays instead).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import xxhash

FORMAT_NAME = "qemu-live-migration-image"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEVICES_FILE = "devices.bin"
VMDESC_FILE = "vmdesc.json"
RAM_DIR = "ram"
PAGE_SIZE = 4096
CHUNK = 1 << 20  # sparse-write and hashing granularity
DIGEST = "xxh3_128"

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DeviceRecord",
    "Image",
    "ImageError",
    "read_image",
    "write_image",
]


class ImageError(Exception):
    """A malformed, incomplete or corrupted image (or arguments that cannot make one)."""


class DeviceRecord(NamedTuple):
    """One device (FULL) section: header fields and its raw body. Plain 4-tuples
    ``(idstr, instance_id, version_id, body)`` are accepted wherever a DeviceRecord is."""

    idstr: str
    instance_id: int
    version_id: int
    body: bytes
    section_id: int | None = None


@dataclass
class Image:
    """A loaded image. ``blocks`` keeps the manifest's block order."""

    path: Path
    manifest: dict[str, Any]
    machine_type: str
    config: dict[str, Any]
    blocks: dict[str, np.ndarray]  # name -> uint8 (size,), read-only memmap or array
    devices: list[DeviceRecord]
    vmdesc: bytes | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def created(self) -> str:
        return str(self.manifest["created"])

    @property
    def source(self) -> str:
        return str(self.manifest.get("source", ""))


# ==================================================================== writing


def write_image(
    path: str | os.PathLike[str],
    *,
    machine_type: str,
    config: Mapping[str, Any],
    blocks: Sequence[tuple[str, np.ndarray | memoryview | bytes]],
    devices: Iterable[DeviceRecord | tuple[str, int, int, bytes]],
    vmdesc: bytes | None = None,
    extra: Mapping[str, Any] | None = None,
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write an image directory at ``path`` atomically (see the module docstring); return it.

    ``blocks``: (name, content) in block-list order; content is any buffer of the block's bytes
    (a numpy uint8 array, a memoryview of shared memory...), read once, never modified.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"image target {target} already exists")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        manifest = _write_contents(
            tmp,
            machine_type=machine_type,
            config=config,
            blocks=blocks,
            devices=devices,
            vmdesc=vmdesc,
            extra=extra,
            source=source,
        )
        _write_file_synced(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False).encode() + b"\n")
        _fsync_dir(tmp / RAM_DIR)
        _fsync_dir(tmp)
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_contents(
    tmp: Path,
    *,
    machine_type: str,
    config: Mapping[str, Any],
    blocks: Sequence[tuple[str, np.ndarray | memoryview | bytes]],
    devices: Iterable[DeviceRecord | tuple[str, int, int, bytes]],
    vmdesc: bytes | None,
    extra: Mapping[str, Any] | None,
    source: str,
) -> dict[str, Any]:
    if not isinstance(machine_type, str) or not machine_type:
        raise ImageError("machine_type must be a non-empty string")
    (tmp / RAM_DIR).mkdir()
    ram_entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, (name, content) in enumerate(blocks):
        if not isinstance(name, str) or not name:
            raise ImageError(f"RAM block #{i}: name must be a non-empty string")
        if name in seen:
            raise ImageError(f"RAM block {name!r} given twice")
        seen.add(name)
        arr = _as_u8(content)
        if arr.size == 0:
            raise ImageError(f"RAM block {name!r} is empty")
        rel = f"{RAM_DIR}/{i:03d}-{_safe_name(name)}.raw"
        digest, nonzero = _write_sparse(tmp / rel, arr)
        ram_entries.append(
            {"name": name, "size": int(arr.size), "file": rel, DIGEST: digest, "nonzero_chunks": nonzero}
        )

    sections: list[dict[str, Any]] = []
    h = xxhash.xxh3_128()
    offset = 0
    with open(tmp / DEVICES_FILE, "wb") as f:
        for i, dev in enumerate(devices):
            rec = DeviceRecord(*dev)
            if not isinstance(rec.idstr, str) or not rec.idstr:
                raise ImageError(f"device #{i}: idstr must be a non-empty string")
            body = bytes(rec.body)
            f.write(body)
            h.update(body)
            entry: dict[str, Any] = {
                "idstr": rec.idstr,
                "instance_id": int(rec.instance_id),
                "version_id": int(rec.version_id),
            }
            if rec.section_id is not None:
                entry["section_id"] = int(rec.section_id)
            entry |= {"offset": offset, "size": len(body)}
            sections.append(entry)
            offset += len(body)
        _flush_sync(f)

    vmdesc_entry: dict[str, Any] | None = None
    if vmdesc is not None:
        vb = bytes(vmdesc)
        _write_file_synced(tmp / VMDESC_FILE, vb)
        vmdesc_entry = {"file": VMDESC_FILE, "size": len(vb), DIGEST: xxhash.xxh3_128_hexdigest(vb)}

    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "source": str(source),
        "machine_type": machine_type,
        "config": dict(config),
        "page_size": PAGE_SIZE,
        "digest": DIGEST,
        "ram_blocks": ram_entries,
        "devices": {"file": DEVICES_FILE, "size": offset, DIGEST: h.hexdigest(), "sections": sections},
        "vmdesc": vmdesc_entry,
        "extra": dict(extra or {}),
    }
    try:
        json.dumps(manifest)
    except (TypeError, ValueError) as e:
        raise ImageError(f"config/extra must be JSON-serialisable: {e}") from e
    return manifest


def _as_u8(content: np.ndarray | memoryview | bytes) -> np.ndarray:
    if isinstance(content, np.ndarray):
        if content.dtype != np.uint8:
            content = content.view(np.uint8)
        return content.reshape(-1)
    return np.frombuffer(content, dtype=np.uint8)


def _safe_name(name: str) -> str:
    """A file-name fragment for a block name ("/rom@etc/acpi/tables" -> "rom_etc_acpi_tables");
    the index prefix keeps names unique."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[:64] or "block"


def _write_sparse(path: Path, arr: np.ndarray) -> tuple[str, int]:
    """Write ``arr`` leaving all-zero 1 MiB chunks as holes; return (digest, non-zero chunks)."""
    h = xxhash.xxh3_128()
    nonzero = 0
    size = int(arr.size)
    with open(path, "wb") as f:
        f.truncate(size)  # the holes: reads as zeros, costs no blocks
        for start in range(0, size, CHUNK):
            chunk = arr[start : start + CHUNK]
            h.update(chunk)  # the digest covers the zeros too: it is of the file's content
            if chunk.any():
                f.seek(start)
                f.write(chunk)
                nonzero += 1
        _flush_sync(f)
    return h.hexdigest(), nonzero


def _write_file_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        _flush_sync(f)


def _flush_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        # rename of a directory onto a missing name is atomic; onto an existing (empty) one too,
        # but a concurrent writer that got there first must not be clobbered: fail instead
        os.rename(tmp, target)
    elif overwrite:
        old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        raise FileExistsError(f"image target {target} already exists")
    _fsync_dir(target.parent)


# ==================================================================== reading


def read_image(path: str | os.PathLike[str], *, verify: bool = True, mmap: bool = True) -> Image:
    """Load and check an image (see the module docstring). Raises :class:`ImageError`.

    ``verify``: check every file's xxh3-128 digest (reads everything once; sizes are always
    checked). ``mmap``: RAM blocks as read-only ``numpy.memmap`` (else arrays in memory).
    """
    root = Path(path)
    mpath = root / MANIFEST
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{root}: not an image (no {MANIFEST})") from None
    except OSError as e:
        raise ImageError(f"{mpath}: cannot read: {e}") from e
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ImageError(f"{mpath}: not valid JSON: {e}") from None
    _validate_manifest(m, mpath)

    blocks: dict[str, np.ndarray] = {}
    for b in m["ram_blocks"]:
        f = _checked_file(root, b, f"ram_blocks[{b['name']!r}]", verify)
        blocks[b["name"]] = (
            np.memmap(f, dtype=np.uint8, mode="r", shape=(b["size"],))
            if mmap
            else np.fromfile(f, dtype=np.uint8)
        )

    dv = m["devices"]
    dfile = _checked_file(root, dv, "devices", verify)
    data = dfile.read_bytes()
    devices = [
        DeviceRecord(
            s["idstr"],
            s["instance_id"],
            s["version_id"],
            data[s["offset"] : s["offset"] + s["size"]],
            s.get("section_id"),
        )
        for s in dv["sections"]
    ]
    vmdesc = None
    if m["vmdesc"] is not None:
        vmdesc = _checked_file(root, m["vmdesc"], "vmdesc", verify).read_bytes()
    return Image(root, m, m["machine_type"], m["config"], blocks, devices, vmdesc, m["extra"])


def _checked_file(root: Path, entry: Mapping[str, Any], what: str, verify: bool) -> Path:
    f = root / entry["file"]
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{root}: {what}: file {entry['file']!r} is missing") from None
    if size != entry["size"]:
        raise ImageError(
            f"{root}: {what}: file {entry['file']!r} is {size} bytes, manifest says {entry['size']}"
        )
    if verify:
        digest = _file_digest(f)
        if digest != entry[DIGEST]:
            raise ImageError(
                f"{root}: {what}: file {entry['file']!r} is corrupted (xxh3_128 {digest}, "
                f"manifest says {entry[DIGEST]})"
            )
    return f


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        buf = bytearray(4 * CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# ---- manifest validation: every field a reader relies on, with the field named in the error


def _validate_manifest(m: Any, where: Path) -> None:
    def fail(msg: str) -> ImageError:
        return ImageError(f"{where}: malformed manifest: {msg}")

    if not isinstance(m, dict):
        raise fail("not a JSON object")
    if m.get("format") != FORMAT_NAME:
        raise fail(f"format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("version") != FORMAT_VERSION:
        raise fail(f"version {m.get('version')!r} is not supported (this reader knows {FORMAT_VERSION})")
    _require(m, "machine_type", str, fail)
    if not m["machine_type"]:
        raise fail("machine_type is empty")
    _require(m, "created", str, fail)
    _require(m, "config", dict, fail)
    _require(m, "extra", dict, fail)
    if m.get("page_size") != PAGE_SIZE:
        raise fail(f"page_size {m.get('page_size')!r}, expected {PAGE_SIZE}")
    if m.get("digest") != DIGEST:
        raise fail(f"digest {m.get('digest')!r}, expected {DIGEST!r}")
    if "source" in m and not isinstance(m["source"], str):
        raise fail("source must be a string")

    _require(m, "ram_blocks", list, fail)
    names: set[str] = set()
    files: set[str] = set()
    for i, b in enumerate(m["ram_blocks"]):
        what = f"ram_blocks[{i}]"
        if not isinstance(b, dict):
            raise fail(f"{what} is not an object")
        _require(b, "name", str, fail, what)
        if not b["name"] or b["name"] in names:
            raise fail(f"{what}: empty or duplicate block name {b['name']!r}")
        names.add(b["name"])
        _require_int(b, "size", fail, what, minimum=1)
        _require_file(b, fail, what, files)
        _require_digest(b, fail, what)

    dv = m.get("devices")
    if not isinstance(dv, dict):
        raise fail("devices must be an object")
    _require_int(dv, "size", fail, "devices", minimum=0)
    _require_file(dv, fail, "devices", files)
    _require_digest(dv, fail, "devices")
    _require(dv, "sections", list, fail, "devices")
    expect = 0
    for i, s in enumerate(dv["sections"]):
        what = f"devices.sections[{i}]"
        if not isinstance(s, dict):
            raise fail(f"{what} is not an object")
        _require(s, "idstr", str, fail, what)
        if not s["idstr"]:
            raise fail(f"{what}: empty idstr")
        for k in ("instance_id", "version_id"):
            _require_int(s, k, fail, what, minimum=0)
        if "section_id" in s and s["section_id"] is not None:
            _require_int(s, "section_id", fail, what, minimum=0)
        _require_int(s, "offset", fail, what, minimum=0)
        _require_int(s, "size", fail, what, minimum=0)
        if s["offset"] != expect:
            raise fail(f"{what}: offset {s['offset']}, expected {expect} (sections must tile the file)")
        expect += s["size"]
    if expect != dv["size"]:
        raise fail(f"devices: sections cover {expect} bytes, file size is {dv['size']}")

    vd = m.get("vmdesc", "missing")
    if vd == "missing":
        raise fail("vmdesc is missing (null when there is none)")
    if vd is not None:
        if not isinstance(vd, dict):
            raise fail("vmdesc must be an object or null")
        _require_int(vd, "size", fail, "vmdesc", minimum=0)
        _require_file(vd, fail, "vmdesc", files)
        _require_digest(vd, fail, "vmdesc")


def _require(d: Mapping[str, Any], key: str, typ: type, fail: Any, what: str = "") -> None:
    label = f"{what}.{key}" if what else key
    if key not in d:
        raise fail(f"{label} is missing")
    if not isinstance(d[key], typ):
        raise fail(f"{label} must be a {typ.__name__}, got {type(d[key]).__name__}")


def _require_int(d: Mapping[str, Any], key: str, fail: Any, what: str, *, minimum: int) -> None:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise fail(f"{what}.{key} must be an integer >= {minimum}, got {v!r}")


def _require_digest(d: Mapping[str, Any], fail: Any, what: str) -> None:
    v = d.get(DIGEST)
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{32}", v):
        raise fail(f"{what}.{DIGEST} must be 32 lower-case hex digits, got {v!r}")


def _require_file(d: Mapping[str, Any], fail: Any, what: str, seen: set[str]) -> None:
    v = d.get("file")
    if not isinstance(v, str) or not v:
        raise fail(f"{what}.file must be a non-empty string, got {v!r}")
    p = PurePosixPath(v)
    # the image must be self-contained: a manifest must not point outside its directory
    if p.is_absolute() or ".." in p.parts or "\\" in v or p.name == MANIFEST:
        raise fail(f"{what}.file {v!r} must be a relative path inside the image")
    norm = str(p)
    if norm in seen:
        raise fail(f"{what}.file {v!r} is used twice")
    seen.add(norm)
