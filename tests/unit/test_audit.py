"""The audit chain verifies, and any tampering fails verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.audit.chain import AuditLog, verify_chain


def _write(d: Path, n: int = 20, per_file: int = 1000) -> None:
    log = AuditLog(d, max_records_per_file=per_file)
    for i in range(n):
        log.append({"dev": f"xr-{i:05d}", "seq": i + 1, "digest": "ab" * 16, "rev": "r"})
    log.close()


def test_chain_verifies_and_survives_reopen_and_rotation(tmp_path: Path) -> None:
    _write(tmp_path, 25, per_file=10)
    log = AuditLog(tmp_path, max_records_per_file=10)
    log.append({"dev": "late", "seq": 99})
    log.close()
    r = verify_chain(tmp_path)
    assert r.ok, r
    assert (r.records, r.files) == (26, 3)


def _lines(p: Path) -> list[str]:
    return p.read_text().splitlines(keepends=True)


@pytest.mark.parametrize("kind", ["flip", "delete", "reorder", "insert", "truncate_partial"])
def test_tampering_is_detected(tmp_path: Path, kind: str) -> None:
    _write(tmp_path)
    f = tmp_path / "audit-000001.jsonl"
    lines = _lines(f)
    if kind == "flip":
        data = bytearray(f.read_bytes())
        i = data.index(b"xr-00007")
        data[i + 3] ^= 0x01
        f.write_bytes(bytes(data))
    elif kind == "delete":
        del lines[5]
        f.write_text("".join(lines))
    elif kind == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
        f.write_text("".join(lines))
    elif kind == "insert":
        rec = json.loads(lines[2])
        lines.insert(3, json.dumps(rec) + "\n")
        f.write_text("".join(lines))
    elif kind == "truncate_partial":
        f.write_bytes(f.read_bytes()[:-7])
    assert not verify_chain(tmp_path).ok


def test_every_single_byte_flip_fails(tmp_path: Path) -> None:
    _write(tmp_path, 3)
    f = tmp_path / "audit-000001.jsonl"
    original = f.read_bytes()
    for i in range(len(original)):
        data = bytearray(original)
        data[i] ^= 0x01
        f.write_bytes(bytes(data))
        assert not verify_chain(tmp_path).ok, f"flip at byte {i} not detected"
    f.write_bytes(original)
    assert verify_chain(tmp_path).ok
