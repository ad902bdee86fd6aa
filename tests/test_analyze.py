"""mig-analyze over every capture: counts as in the captures' README, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.analyze import main

CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "captures"

MAIN = {
    "precopy-paused-pc32m.bin": (8273, 49, 0),
    "background-snapshot.bin": (8214, 108, 0),
    "multifd-main.bin": (8216, 0, 0),
    "xbzrle-main.bin": (16387, 166, 4),
    "postcopy-main.bin": (16348, 166, 0),
}


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    rc = main(["--json", *args])
    out = capsys.readouterr().out
    return rc, json.loads(out)


@pytest.mark.parametrize("name", sorted(MAIN))
def test_main_captures(capsys: pytest.CaptureFixture[str], name: str) -> None:
    rc, report = run_json(capsys, str(CAPTURES / name))
    assert rc == 0
    blocks = report["ram_blocks"]
    got = tuple(sum(b[k] for b in blocks.values()) for k in ("zero", "normal", "xbzrle"))
    assert got == MAIN[name]
    assert "pc.ram" in blocks
    assert all({"idstr", "instance_id", "version_id", "size"} <= set(d) for d in report["devices"])
    assert report["devices"], "every capture carries device state"


def test_postcopy_commands_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    _, report = run_json(capsys, str(CAPTURES / "postcopy-main.bin"))
    names = [c["name"] for c in report["commands"]]
    assert names[:3] == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE"]
    assert names.count("POSTCOPY_RAM_DISCARD") == 5
    pkg = names.index("PACKAGED")
    assert names[pkg + 1 :] == ["POSTCOPY_LISTEN", "PING", "POSTCOPY_RUN", "PING"]
    discard = report["commands"][names.index("POSTCOPY_RAM_DISCARD")]
    assert discard["block"] == "pc.ram" and discard["ranges"] == [[0, 0x2000000]]
    assert report["commands"][pkg]["length"] == 12935
    assert any(d.get("in_package") for d in report["devices"])


def test_resumed_stream(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, "--no-header", str(CAPTURES / "postcopy-recovery-resume-main.bin"))
    assert rc == 0
    assert (report["totals"]["zero"], report["totals"]["normal"]) == (6675, 69)
    names = [c["name"] for c in report["commands"]]
    assert names == ["RECV_BITMAP"] * 6 + ["POSTCOPY_RESUME"]


def test_return_paths(capsys: pytest.CaptureFixture[str]) -> None:
    rc, report = run_json(capsys, "--return-path", str(CAPTURES / "postcopy-return.bin"))
    assert rc == 0
    names = [m["name"] for m in report["messages"]]
    assert names[:5] == ["PONG", "PONG", "PONG", "REQ_PAGES", "PONG"]
    assert names[-1] == "SHUT" and len(names) == 28
    rc, report = run_json(capsys, "--return-path", str(CAPTURES / "postcopy-recovery-resume-return.bin"))
    assert [m["name"] for m in report["messages"]][:7] == ["RECV_BITMAP"] * 6 + ["RESUME_ACK"]


def test_multifd_channels(capsys: pytest.CaptureFixture[str]) -> None:
    counts = []
    for name in ("multifd-chan-a.bin", "multifd-chan-b.bin"):
        rc, report = run_json(capsys, "--multifd", str(CAPTURES / name))
        assert rc == 0
        counts.append(sum(b["normal"] for b in report["ram_blocks"].values()))
    assert counts == [3, 105]


def test_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(CAPTURES / "precopy-paused-pc32m.bin")]) == 0
    out = capsys.readouterr().out
    assert "globalstate" in out and "pc.ram" in out and "START" in out


@pytest.mark.parametrize("cut", [5, 100, 5000, 280000, 300000])
def test_truncated_stream_exits_1_without_traceback(tmp_path: Path, cut: int) -> None:
    raw = (CAPTURES / "precopy-paused-pc32m.bin").read_bytes()[:cut]
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw)
    proc = subprocess.run(
        [sys.executable, "-m", "protocol.analyze", "--json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "protocol error" in proc.stderr
    err = json.loads(proc.stdout)["error"]
    assert isinstance(err["offset"], int) and err["reason"]


def test_corrupted_stream(tmp_path: Path) -> None:
    raw = bytearray((CAPTURES / "postcopy-main.bin").read_bytes())
    raw[0xC4] = 0x09  # a SECTION_PART byte becomes an unknown record type
    bad = tmp_path / "bad.bin"
    bad.write_bytes(raw)
    proc = subprocess.run(
        [sys.executable, "-m", "protocol.analyze", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
