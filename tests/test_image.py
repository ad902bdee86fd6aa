"""guest.image: the on-disk VM image (round trip, sparse RAM files, atomic writes, corruption)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guest.image as image_mod
from guest.image import (
    CHUNK,
    FORMAT_NAME,
    FORMAT_VERSION,
    DeviceRecord,
    ImageError,
    read_image,
    write_image,
)

MiB = 1 << 20


def _blocks(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    ram = np.zeros(8 * MiB, dtype=np.uint8)
    ram[: 3 * 4096] = rng.integers(0, 256, 3 * 4096, dtype=np.uint8)
    ram[5 * MiB + 17] = 0xAB  # one byte in the middle of an otherwise zero chunk
    bios = rng.integers(0, 256, 256 * 1024, dtype=np.uint8)
    small = np.full(4096, 7, dtype=np.uint8)
    return [("pc.ram", ram), ("pc.bios", bios), ("/rom@etc/acpi/rsdp", small)]


DEVICES = [
    DeviceRecord("timer", 0, 2, b"\x01" * 24, 0),
    DeviceRecord("dma", 0, 1, b"\x02" * 75, 12),
    DeviceRecord("dma", 1, 1, b"", 13),  # empty bodies are legal
]
CONFIG = {"machine_type": "pc-i440fx-7.2", "target_page_bits": None, "capabilities": None, "uuid": None}


def _write(path: Path, **kw: Any) -> Path:
    rng = np.random.default_rng(1)
    args: dict[str, Any] = dict(
        machine_type="pc-i440fx-7.2",
        config=CONFIG,
        blocks=_blocks(rng),
        devices=DEVICES,
        vmdesc=b'{"page_size": 4096, "devices": []}',
        extra={"ram_section_id": 2, "stats": {"normal": 3}},
        source="test",
    )
    args.update(kw)
    return write_image(path, **args)


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path: Path, mmap: bool) -> None:
    target = _write(tmp_path / "img")
    img = read_image(target, mmap=mmap)
    want = _blocks(np.random.default_rng(1))
    assert list(img.blocks) == [n for n, _ in want]  # block-list order kept
    for name, arr in want:
        assert np.array_equal(img.blocks[name], arr), name
    assert img.devices == DEVICES
    assert img.vmdesc == b'{"page_size": 4096, "devices": []}'
    assert img.machine_type == "pc-i440fx-7.2"
    assert img.config == CONFIG
    assert img.extra == {"ram_section_id": 2, "stats": {"normal": 3}}
    assert img.source == "test"
    assert img.created.endswith("Z")
    m = json.loads((target / "manifest.json").read_text())
    assert (m["format"], m["version"]) == (FORMAT_NAME, FORMAT_VERSION)
    assert [b["file"] for b in m["ram_blocks"]] == [
        "ram/000-pc.ram.raw",
        "ram/001-pc.bios.raw",
        "ram/002-rom_etc_acpi_rsdp.raw",
    ]
    if mmap:
        assert isinstance(img.blocks["pc.ram"], np.memmap)
        with pytest.raises(ValueError):  # read-only: a loader must not scribble on the image
            img.blocks["pc.ram"][0] = 1


def test_plain_tuples_memoryview_and_no_vmdesc(tmp_path: Path) -> None:
    buf = bytearray(b"\x05" * 8192)
    target = write_image(
        tmp_path / "img",
        machine_type="pc-q35-7.2",
        config={},
        blocks=[("pc.ram", memoryview(buf))],
        devices=[("globalstate", 0, 1, b"\x00\x00\x00\x08running\x00")],
        vmdesc=None,
        extra={},
    )
    img = read_image(target)
    assert img.vmdesc is None
    assert img.devices == [DeviceRecord("globalstate", 0, 1, b"\x00\x00\x00\x08running\x00", None)]
    assert bytes(img.blocks["pc.ram"]) == bytes(buf)


def test_sparse_ram_files(tmp_path: Path) -> None:
    big = np.zeros(256 * MiB, dtype=np.uint8)
    big[100 * MiB + 5] = 1
    big[-1] = 2
    target = write_image(
        tmp_path / "img", machine_type="pc", config={}, blocks=[("pc.ram", big)], devices=[], extra={}
    )
    m = json.loads((target / "manifest.json").read_text())
    assert m["ram_blocks"][0]["nonzero_chunks"] == 2
    f = target / m["ram_blocks"][0]["file"]
    st = f.stat()
    assert st.st_size == 256 * MiB
    # two 1 MiB chunks written; allow for filesystem allocation granularity
    assert st.st_blocks * 512 <= 8 * CHUNK, f"RAM file not sparse: {st.st_blocks * 512} bytes allocated"
    img = read_image(target)
    assert np.array_equal(img.blocks["pc.ram"], big)


def test_refuses_existing_target_unless_overwrite(tmp_path: Path) -> None:
    target = _write(tmp_path / "img")
    with pytest.raises(FileExistsError):
        _write(target)
    _write(target, source="second", overwrite=True)
    assert read_image(target).source == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img"]  # old copy and temp dirs gone


def _failing_devices() -> Any:
    yield DeviceRecord("timer", 0, 2, b"x")
    raise RuntimeError("migration failed mid-way")


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="mid-way"):
        _write(tmp_path / "img", devices=_failing_devices())
    assert list(tmp_path.iterdir()) == []


def test_failure_at_publish_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(image_mod, "_publish", boom)
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "img")
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_extra_rejected_without_residue(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="JSON"):
        _write(tmp_path / "img", extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_writer_leaves_only_a_hidden_temp(tmp_path: Path) -> None:
    """A writer killed before the rename (simulated: the temp dir of a dead writer) never makes
    the target appear; readers see 'not an image'."""
    (tmp_path / ".img.tmp-dead").mkdir()
    (tmp_path / ".img.tmp-dead" / "manifest.json").write_text("{")
    with pytest.raises(ImageError, match=r"no manifest\.json"):
        read_image(tmp_path / "img")


def _manifest(target: Path) -> dict[str, Any]:
    return json.loads((target / "manifest.json").read_text())


def _corrupt_byte(f: Path, offset: int) -> None:
    with open(f, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


def test_corrupted_ram_file_detected(tmp_path: Path) -> None:
    target = _write(tmp_path / "img")
    f = target / _manifest(target)["ram_blocks"][0]["file"]
    _corrupt_byte(f, 5 * MiB + 17)
    with pytest.raises(ImageError, match=r"ram_blocks\['pc.ram'\].*corrupted"):
        read_image(target)
    read_image(target, verify=False)  # sizes still fine: loads without the digest check


def test_corrupted_device_file_and_vmdesc_detected(tmp_path: Path) -> None:
    target = _write(tmp_path / "img")
    _corrupt_byte(target / "devices.bin", 30)
    with pytest.raises(ImageError, match=r"devices.*corrupted"):
        read_image(target)
    target2 = _write(tmp_path / "img2")
    _corrupt_byte(target2 / "vmdesc.json", 3)
    with pytest.raises(ImageError, match=r"vmdesc.*corrupted"):
        read_image(target2)


def test_truncated_and_missing_files_detected(tmp_path: Path) -> None:
    target = _write(tmp_path / "img")
    f = target / _manifest(target)["ram_blocks"][1]["file"]
    os.truncate(f, 4096)
    with pytest.raises(ImageError, match=r"is 4096 bytes, manifest says 262144"):
        read_image(target, verify=False)
    f.unlink()
    with pytest.raises(ImageError, match="missing"):
        read_image(target)


def _mutations() -> list[tuple[str, Any, str]]:
    def setk(path: list[Any], value: Any) -> Any:
        def f(m: dict[str, Any]) -> None:
            d = m
            for k in path[:-1]:
                d = d[k]
            if value is _DEL:
                del d[path[-1]]
            else:
                d[path[-1]] = value

        return f

    return [
        ("format", setk(["format"], "other"), "format"),
        ("version", setk(["version"], 2), "version 2 is not supported"),
        ("machine", setk(["machine_type"], _DEL), "machine_type is missing"),
        ("config", setk(["config"], []), "config must be a dict"),
        ("page", setk(["page_size"], 65536), "page_size"),
        ("blocks", setk(["ram_blocks"], {}), "ram_blocks must be a list"),
        ("size", setk(["ram_blocks", 0, "size"], -1), r"ram_blocks\[0\].size"),
        ("escape", setk(["ram_blocks", 0, "file"], "../../etc/passwd"), "relative path inside"),
        ("absolute", setk(["ram_blocks", 0, "file"], "/etc/passwd"), "relative path inside"),
        ("dup", setk(["ram_blocks", 1, "name"], "pc.ram"), "duplicate block name"),
        ("digest", setk(["ram_blocks", 0, "xxh3_128"], "xyz"), "32 lower-case hex"),
        ("tiling", setk(["devices", "sections", 1, "offset"], 30), "tile"),
        ("cover", setk(["devices", "size"], 1000), "cover"),
        ("idstr", setk(["devices", "sections", 0, "idstr"], 5), "idstr must be a str"),
        ("vmdesc", setk(["vmdesc"], _DEL), "vmdesc is missing"),
    ]


class _Del:
    pass


_DEL = _Del()


@pytest.mark.parametrize(("label", "mutate", "message"), _mutations(), ids=[m[0] for m in _mutations()])
def test_malformed_manifest_refused(tmp_path: Path, label: str, mutate: Any, message: str) -> None:
    target = _write(tmp_path / "img")
    m = _manifest(target)
    mutate(m)
    (target / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ImageError, match=message) as exc:
        read_image(target)
    assert "malformed manifest" in str(exc.value)


def test_manifest_not_json(tmp_path: Path) -> None:
    target = _write(tmp_path / "img")
    (target / "manifest.json").write_text("{ not json")
    with pytest.raises(ImageError, match="not valid JSON"):
        read_image(target)
    (target / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ImageError, match="not a JSON object"):
        read_image(target)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="given twice"):
        _write(tmp_path / "a", blocks=[("x", np.ones(4096, np.uint8)), ("x", np.ones(4096, np.uint8))])
    with pytest.raises(ImageError, match="empty"):
        _write(tmp_path / "b", blocks=[("x", np.zeros(0, np.uint8))])
    with pytest.raises(ImageError, match="machine_type"):
        _write(tmp_path / "c", machine_type="")
    assert list(tmp_path.iterdir()) == []
