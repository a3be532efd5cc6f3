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


def test_record_text_is_the_canonical_json_whatever_the_values(tmp_path: Path) -> None:
    from gateway.audit.chain import JsonList, _dumps, _encode_record

    routes = [{"dst": "vault", "allow": True, "rules": ["r1", "r2"]}, {"dst": "x", "allow": False, "reason": "p.e"}]
    records = [
        {"dev": "xr-00001", "seq": 7, "size": 0, "digest": "ab" * 32, "rev": "r", "routes": JsonList(routes)},
        # the decided-message shape once chained (a template), and the same keys with other value types
        {"dev": "xr-00001", "stream": "result", "seq": 2**63 - 1, "digest": "ab" * 32, "size": 9, "rev": "r\u00e9\"",
         "routes": JsonList(routes), "i": 0, "prev": "0" * 64},
        {"dev": "xr-00001", "stream": "result", "seq": True, "digest": "ab" * 32, "size": 9.0, "rev": None,
         "routes": list(routes), "i": 0, "prev": "0" * 64},
        {"zeta": "ünïcode \u2028 \"q\" \\ \n\t\x00", "a": -3, "b": True, "c": None, "d": 1.5e-05, "e": [1, 2.0],
         "f": {"y": 1, "x": [{"k": False}]}, "g": 2**70, "hh": JsonList(), "ii": "", "routes": JsonList(routes)},
        {},
    ]
    for rec in records:
        plain = {k: list(v) if isinstance(v, JsonList) else v for k, v in rec.items()}
        assert _encode_record(rec) == _dumps(plain)
    # the same lines, and the chain verifies, whether or not a value carries its text
    a, b = AuditLog(tmp_path / "a"), AuditLog(tmp_path / "b")
    for rec in records:
        a.append(dict(rec))
        b.append({k: list(v) if isinstance(v, JsonList) else v for k, v in rec.items()})
    assert a._buf == b._buf
    a.close()
    b.close()
    assert verify_chain(tmp_path / "a").ok
    shared = JsonList(routes)
    assert shared == routes and json.loads(shared.json) == routes
