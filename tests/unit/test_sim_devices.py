"""Honest simulated payloads are valid against the catalogue, realistic in size, and reproducible."""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import pytest

from device_sim import DeviceSpec, PayloadFactory, make_fleet
from device_sim.devices import FLEET_WEIGHTS
from gateway.catalog import DEVICE_TYPES, ENVELOPE_FIELDS, HEALTH_STREAM, RESULT_STREAM, FieldSpec, schema_for
from gateway.errors import ConfigError

TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KINDS: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": float, "bool": bool, "bytes": bytes, "list": list, "records": list,
}
# Expected byte sizes per field (min, max), per the simulator's brief.
SIZES = {"image": (50_000, 500_000), "portrait": (15_000, 50_000), "face_crop": (5_000, 30_000),
         "face_template": (512, 512)}


def field_errors(f: FieldSpec, v: Any) -> list[str]:
    errs: list[str] = []
    if type(v) is not KINDS[f.kind] and not (f.kind == "float" and type(v) is float):
        return [f"{f.name}: kind {type(v).__name__}, want {f.kind}"]
    if f.kind == "str":
        if len(v) > f.max_len:
            errs.append(f"{f.name}: {len(v)} chars > {f.max_len}")
        if f.pattern and re.fullmatch(f.pattern, v) is None:
            errs.append(f"{f.name}: {v!r} !~ {f.pattern}")
    if f.kind == "bytes" and len(v) > f.max_len:
        errs.append(f"{f.name}: {len(v)} bytes > {f.max_len}")
    if f.kind in ("int", "float"):
        if f.lo is not None and v < f.lo or f.hi is not None and v > f.hi:
            errs.append(f"{f.name}: {v} outside [{f.lo}, {f.hi}]")
    if f.kind == "float" and f.precision:
        digits = round(-math.log10(f.precision))
        if round(v, digits) != v or abs(v / f.precision - round(v / f.precision)) > 1e-6:
            errs.append(f"{f.name}: {v} not at precision {f.precision}")
    if f.kind == "list":
        if len(v) > f.max_len:
            errs.append(f"{f.name}: {len(v)} items > {f.max_len}")
        errs += [f"{f.name}[]: {x!r} not {f.item}" for x in v if type(x) is not KINDS[f.item]]
    if f.kind == "records":
        if len(v) > f.max_len:
            errs.append(f"{f.name}: {len(v)} records > {f.max_len}")
        want = dict(f.subfields)
        for rec in v:
            if not isinstance(rec, dict) or set(rec) != set(want):
                errs.append(f"{f.name}: record keys {sorted(rec)} != {sorted(want)}")
                continue
            errs += [f"{f.name}.{k}: {rec[k]!r} not {kd}" for k, kd in want.items() if type(rec[k]) is not KINDS[kd]]
    return errs


def payload_errors(device_type: str, stream: str, p: dict[str, Any]) -> list[str]:
    schema = schema_for(device_type, stream)
    assert schema is not None
    errs = [f"unknown field {k}" for k in p if k not in schema.by_name and k not in ENVELOPE_FIELDS]
    errs += [f"missing {f.name}" for f in schema.fields if f.required and f.name not in p]
    errs += [f"missing envelope {k}" for k in ENVELOPE_FIELDS if k not in p]
    for f in schema.fields:
        if f.name in p:
            errs += field_errors(f, p[f.name])
    return errs


def one_of_each() -> list[DeviceSpec]:
    return make_fleet(len(DEVICE_TYPES))


@pytest.mark.parametrize("device_type", sorted(DEVICE_TYPES))
def test_result_and_health_payloads_match_the_catalogue(device_type: str) -> None:
    spec = next(s for s in one_of_each() if s.device_type == device_type)
    factory = PayloadFactory(spec, seed=7)
    kind = DEVICE_TYPES[device_type]
    for seq in range(1, 61):
        stream = RESULT_STREAM if seq % 3 else HEALTH_STREAM
        p = factory.make(stream, seq, TS + seq * 1000)
        assert payload_errors(device_type, stream, p) == [], (stream, seq)
        assert p["seq"] == seq and p["ts"] == TS + seq * 1000
        wire = factory.encode(p)
        assert len(wire) <= kind.max_payload
        assert msgpack.unpackb(wire, raw=False) == p  # bytes stay bin, strings stay str


@pytest.mark.parametrize("device_type", sorted(DEVICE_TYPES))
def test_binary_fields_have_realistic_sizes_and_jpeg_markers(device_type: str) -> None:
    spec = next(s for s in one_of_each() if s.device_type == device_type)
    factory = PayloadFactory(spec, seed=1)
    fields = [f for f in DEVICE_TYPES[device_type].result.fields if f.kind == "bytes"]
    sizes: dict[str, list[int]] = {f.name: [] for f in fields}
    for seq in range(1, 41):
        p = factory.result(seq, TS)
        for f in fields:
            v = p[f.name]
            lo, hi = SIZES[f.name]
            assert lo <= len(v) <= min(hi, f.max_len), (f.name, len(v))
            sizes[f.name].append(len(v))
            if f.cls == "image" or f.name in ("portrait", "face_crop"):
                assert v[:3] == b"\xff\xd8\xff" and v[-2:] == b"\xff\xd9"
                # The end-of-image marker occurs once: nothing honest looks like appended data.
                assert v.find(b"\xff\xd9") == len(v) - 2
    for name, got in sizes.items():
        if name != "face_template":  # a template has a fixed length; images do not
            assert len(set(got)) > 20, f"{name}: sizes do not vary"


def test_health_fields_are_device_specific() -> None:
    spec = DeviceSpec("xr-00001", "xray_baggage", "AMS-T1")
    f = PayloadFactory(spec, seed=0)
    h1, h2 = f.health(1, TS), f.health(2, TS + 60_000)
    assert h1["serial_number"] == "SN-XR-00001"
    assert h2["uptime_s"] - h1["uptime_s"] == 60  # uptime follows the device clock


def test_payloads_are_deterministic_for_a_seed() -> None:
    for spec in one_of_each():
        a, b, c = PayloadFactory(spec, seed=3), PayloadFactory(spec, seed=3), PayloadFactory(spec, seed=4)
        for seq in (1, 2, 17):
            assert a.encode(a.result(seq, TS)) == b.encode(b.result(seq, TS))
            assert a.encode(a.health(seq, TS)) == b.encode(b.health(seq, TS))
        # A different seed, or a different sequence number, gives a different message.
        assert a.encode(a.result(5, TS)) != c.encode(c.result(5, TS))
        assert a.encode(a.result(5, TS)) != a.encode(a.result(6, TS))


def test_payload_does_not_depend_on_call_order() -> None:
    spec = DeviceSpec("fg-00001", "face_egate", "AMS-T1")
    a, b = PayloadFactory(spec, seed=0), PayloadFactory(spec, seed=0)
    first = a.result(3, TS)
    b.health(1, TS), b.result(1, TS), b.health(2, TS)
    assert b.result(3, TS) == first


def test_fleet_ids_are_unique_prefixed_and_cover_every_family() -> None:
    fleet = make_fleet(1000, site="LHR-T5", seed=0)
    assert len(fleet) == 1000
    assert len({s.device_id for s in fleet}) == 1000
    for s in fleet:
        prefix = DEVICE_TYPES[s.device_type].id_prefix
        assert re.fullmatch(rf"{prefix}-\d{{5}}", s.device_id), s.device_id
        assert s.site == "LHR-T5"
        assert s.topic("result") == f"site/LHR-T5/dev/{s.device_id}/result"
    counts = {t: sum(s.device_type == t for s in fleet) for t in DEVICE_TYPES}
    for t, w in FLEET_WEIGHTS.items():
        assert abs(counts[t] - 1000 * w) <= 2, (t, counts[t])
    # The first eight of the connect order already cover every family.
    assert {s.device_type for s in fleet[:8]} == set(DEVICE_TYPES)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 16, 33])
def test_small_fleets(n: int) -> None:
    fleet = make_fleet(n)
    assert len(fleet) == n == len({s.device_id for s in fleet})
    if n >= 8:
        assert {s.device_type for s in fleet} == set(DEVICE_TYPES)


def test_fleet_seed_and_type_selection() -> None:
    assert make_fleet(50, seed=1) == make_fleet(50, seed=1)
    assert sorted(make_fleet(50, seed=1), key=lambda s: s.device_id) == sorted(
        make_fleet(50, seed=2), key=lambda s: s.device_id)
    only = make_fleet(10, types=["mobile_border", "id_reader"])
    assert {s.device_type for s in only} == {"mobile_border", "id_reader"}
    with pytest.raises(ConfigError):
        make_fleet(3, types=["toaster"])


def test_the_checker_rejects_what_the_gateway_would() -> None:
    """The validity tests above only mean something if the checker can say no."""
    spec = DeviceSpec("fg-00001", "face_egate", "AMS-T1")
    good = PayloadFactory(spec, seed=0).result(1, TS)
    assert payload_errors("face_egate", "result", good) == []
    bad = [
        {**good, "covert": 1},
        {k: v for k, v in good.items() if k != "nationality"},
        {**good, "nationality": "nl"},
        {**good, "match_score": 0.9004},
        {**good, "match_score": 1.5},
        {**good, "document_number": "X" * 13},
        {k: v for k, v in good.items() if k != "ts"},
    ]
    for p in bad:
        assert payload_errors("face_egate", "result", p) != [], p
