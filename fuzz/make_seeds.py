"""Regenerate the seed corpora in fuzz/corpus/ (small files; committed). Run from the repo root:

    python fuzz/make_seeds.py

Decode seeds: one valid payload per device type and stream, and one of each hostile shape the issue
names (NaN/inf, extension types, timestamps, duplicate keys, deep nesting, wide maps and arrays).
Policy seeds: the shipped policy files and small snippets exercising each section and YAML feature.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import struct
from pathlib import Path

import msgpack

ROOT = Path(__file__).resolve().parent
NOW = 1_800_000_000_000


def _write(directory: Path, name: str, data: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}-{hashlib.sha1(data).hexdigest()[:10]}").write_bytes(data)


def decode_seeds(out: Path) -> None:
    health = {"seq": 1, "ts": NOW, "serial_number": "SN-0001", "firmware_version": "1.2.3", "uptime_s": 5,
              "internal_temp_c": 41.5, "error_codes": [3, 7]}
    results = {
        "xray_baggage": {"bag_tag": "0123456789", "image": b"\xff\xd8jpeg\xff\xd9", "verdict": "clear",
                         "detected_items": ["laptop"], "operator_id": "OP1234", "passenger_ref": "PAX0123ABCD"},
        "cargo_scanner": {"container_id": "MSCU1234567", "manifest": [{"hs_code": "8471", "description": "pcs",
                          "weight_kg": 12.5}], "image": b"img", "verdict": "alarm", "driver_id": "DRV123456",
                          "licence_plate": "AB-123"},
        "trace_detector": {"sample_id": "S1234567", "substances": ["RDX"], "alarm": True},
        "face_egate": {"face_template": b"\x01" * 32, "match_score": 0.981, "document_number": "X1234567",
                       "nationality": "NLD", "liveness": True},
        "mobile_border": {"gps_lat": 52.30812, "gps_lon": 4.76412, "image": b"img", "verdict": "clear"},
    }
    _write(out, "health", msgpack.packb(health))
    for name, fields in results.items():
        _write(out, name, msgpack.packb({"seq": 2, "ts": NOW, **fields}, use_bin_type=True))
    v = b"\x81\xa1v"
    hostile = {
        "nan": v + b"\xcb" + struct.pack(">d", math.nan),
        "inf": v + b"\xca" + struct.pack(">f", math.inf),
        "ext": v + b"\xd4\x05\x00",
        "ext_neg": v + b"\xc7\x03\xfe" + b"abc",
        "timestamp": v + msgpack.packb(msgpack.Timestamp(-(2**40), 0), datetime=False),
        "dup_key": b"\x82\xa1a\x01\xa1a\x02",
        "deep": v + b"\x91" * 40 + b"\x01",
        "wide_map": v + b"\xdf\xff\xff\xff\xff",
        "wide_array": v + b"\xdd\xff\xff\xff\xff",
        "bad_utf8": b"\x81\xa2\xc3\x28\x01",
        "nested_bytes_key": msgpack.packb({"a": {"x": 1, b"y": 2}}, use_bin_type=True),
        "trailing": msgpack.packb({"a": 1}) + b"\x00",
        "int_key": b"\x81\x01\x01",
    }
    for name, data in hostile.items():
        _write(out, name, data)


def policy_seeds(out: Path) -> None:
    shipped = ROOT.parent / "policies"
    for p in sorted(shipped.glob("*.yaml")):
        _write(out, p.stem, p.read_bytes())
    snippets = {
        "minimal": "edgeward_policy: 1\nsite: S\njurisdiction: NL\n",
        "flow": "{edgeward_policy: 1, site: S, rules: [{id: r, effect: permit, destinations: '*', classes: [pii]}]}\n",
        "anchors": "a: &x [1, 2]\nb: *x\n",
        "tags": "a: !!int 3\nb: !!str x\nc: !!binary aGk=\n",
        "multi_doc": "a: 1\n---\nb: 2\n",
        "dup": "site: A\nsite: B\n",
        "block": "description: |\n  line one\n  line two\n",
        "dest": "destinations:\n  v: {jurisdiction: on_prem, transport: vault, trust: site}\n",
    }
    for name, text in snippets.items():
        _write(out, name, text.encode())


if __name__ == "__main__":
    for target, make in (("decode", decode_seeds), ("policy", policy_seeds)):
        d = ROOT / "corpus" / target
        shutil.rmtree(d, ignore_errors=True)
        make(d)
        print(target, len(list(d.iterdir())), "seeds")
