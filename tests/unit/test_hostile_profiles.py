"""Every hostile profile names its technique and the exact secret it tries to leak, the secret is
really in what goes on the wire, and the whole thing is a function of the seed. Scenarios load,
validate, and assign profiles deterministically; ground truth with actions survives JSONL."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from typing import Any

import msgpack
import pytest

from device_sim import GroundTruth, Outgoing, PayloadFactory, SentRecord, make_fleet
from device_sim.hostile import (
    PROFILES,
    ForeignNamespace,
    Impersonation,
    SubscribeProbe,
    TimingChannel,
    TopicEncoding,
    lowbit_decode,
    make_profile,
    secret_forms,
)
from device_sim.scenario import load_scenario, parse_scenario, scenario_names
from device_sim.truth import HostileAction
from gateway.catalog import schema_for
from gateway.errors import ConfigError
from gateway.guards import check_payload

NOW = 1_750_000_000_000
FLEET = make_fleet(16, seed=1)


def run_profile(name: str, seed: int, **options: Any) -> list[Outgoing]:
    out: list[Outgoing] = []
    for spec in FLEET:
        f = PayloadFactory(spec, seed)
        prof = make_profile(name, spec, seed=seed, **options)
        for seq in range(1, 25):
            stream = "result" if seq % 2 else "status/health"
            msg = Outgoing(stream, seq, spec.topic(stream), f.make(stream, seq, NOW))
            out += prof.shape(msg, random.Random(seq))  # the rng must not matter
    return out


def _wire(o: Outgoing) -> bytes:
    """Everything a publish puts on the wire: topic, payload bytes, properties."""
    data = o.raw if o.raw is not None else msgpack.packb(o.payload, use_bin_type=True)
    props = b""
    for v in o.properties.values():
        for x in (v if isinstance(v, list) else [v]):
            for y in (x if isinstance(x, tuple) else (x,)):
                props += (y if isinstance(y, bytes) else str(y).encode()) + b"\0"
    return o.topic.encode() + b"\0" + data + b"\0" + props


def _carried(o: Outgoing) -> bool:
    assert o.secret is not None
    wire = _wire(o)
    if any(form in wire for form in secret_forms(o.secret)):
        return True
    if o.technique == "low_bits":  # the bytes live in decimal digits below the precision
        schema = schema_for(next(s.device_type for s in FLEET if f"/dev/{s.device_id}/" in o.topic), o.stream)
        assert schema is not None
        got = []
        for spec in schema.fields:
            if spec.kind == "float":
                got.append(lowbit_decode(o.payload[spec.name], spec.precision))
            elif spec.kind == "records":
                got += [lowbit_decode(r["weight_kg"], 0.1) for r in o.payload[spec.name]]
        return bytes(got) == o.secret
    if o.technique == "burst":
        return True  # the burst carries volume, not bytes
    if o.technique == "size_modulation":
        img = next(v for k, v in o.payload.items() if k == "image")
        return len(img) % 256 == o.secret[0]
    return False


PAYLOAD_PROFILES = sorted(n for n in PROFILES if n not in ("subscribe_probe", "timing", "impersonation"))


@pytest.mark.parametrize("name", PAYLOAD_PROFILES)
def test_profile_marks_technique_and_secret_that_is_really_on_the_wire(name: str) -> None:
    msgs = run_profile(name, seed=5)
    hostile = [o for o in msgs if o.technique]
    assert hostile, f"{name} did nothing to a 16-device fleet"
    for o in hostile:
        assert o.technique == PROFILES[name].technique
        assert o.secret, o
        assert o.tags[0] == o.technique
        assert _carried(o), (name, o.tags)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_is_deterministic_per_seed(name: str) -> None:
    a, b, c = run_profile(name, seed=7), run_profile(name, seed=7), run_profile(name, seed=8)
    assert a == b
    if any(o.technique for o in a):
        assert [o.secret for o in a if o.technique] != [o.secret for o in c if o.technique]


def test_honest_remainder_stays_valid() -> None:
    """Messages a profile leaves alone (``every``) are the honest payload, valid against the catalogue."""
    msgs = run_profile("free_text", seed=3, every=3)
    honest = [o for o in msgs if not o.technique]
    assert honest and len(honest) > len(msgs) // 2
    for o in honest:
        device_type = next(s.device_type for s in FLEET if f"/dev/{s.device_id}/" in o.topic)
        schema = schema_for(device_type, o.stream)
        assert schema is not None
        check_payload(schema, o.payload, now_ms=NOW)


def test_free_text_and_trailers_pass_the_schema_guard() -> None:
    """What only the detectors can stop really does get past today's guard."""
    for name in ("free_text", "image_trailer", "low_bits"):
        for o in run_profile(name, seed=2):
            if o.technique:
                device_type = next(s.device_type for s in FLEET if f"/dev/{s.device_id}/" in o.topic)
                check_payload(schema_for(device_type, o.stream), o.payload, now_ms=NOW)  # type: ignore[arg-type]


def test_action_profiles_expose_their_hooks() -> None:
    spec = FLEET[0]
    probe = SubscribeProbe(spec)
    assert set(probe.extra_subscriptions(spec)) >= {"#", "$SYS/#"}
    timing = TimingChannel(spec, seed=4, unit_s=0.1)
    bits = [timing.bit(s) for s in range(1, 8 * len(timing.secret) + 1)]
    assert bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8)) == timing.secret
    assert {timing.delay_before(s) for s in range(1, 33)} == {0.0, 0.1}
    imp = Impersonation(spec, victim="xr-00002")
    assert imp.client_id(spec) == "xr-00002"
    enc = TopicEncoding(spec, seed=1, encode_username=True)
    secret = enc.identity_secret(spec)
    assert secret and secret.hex() in enc.client_id(spec) and secret.hex() in (enc.username(spec) or "")
    dd = make_profile("dead_drop", spec, seed=1)
    will = dd.will(spec)  # type: ignore[attr-defined]
    assert will.retain and will.secret == will.payload and dd.drops_connection  # type: ignore[attr-defined]
    ns = ForeignNamespace(spec, victim="fg-00001")
    assert ns.victim == "fg-00001"


def test_make_profile_rejects_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match="unknown firmware profile"):
        make_profile("nope", FLEET[0])
    with pytest.raises(ConfigError, match="burst"):
        make_profile("burst", FLEET[0], colour="red")


# ------------------------------------------------------------------------------------------ scenarios


def test_shipped_scenarios_load_and_assign_deterministically() -> None:
    assert {"honest", "payload-leaks", "namespace-acl", "all-techniques"} <= set(scenario_names())
    for name in scenario_names():
        s = load_scenario(name)
        specs = s.fleet()
        a = {k: (type(v).__name__, getattr(v, "seed", None)) for k, v in s.profiles_for(specs).items()}
        b = {k: (type(v).__name__, getattr(v, "seed", None)) for k, v in s.profiles_for(specs).items()}
        assert a == b
    every = load_scenario("all-techniques")
    assigned = {p.name for p in every.profiles_for(every.fleet()).values()}
    assert assigned == set(PROFILES)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"profiles": [{"profile": "nope", "share": 0.1}]}, "unknown profile"),
        ({"profiles": [{"profile": "burst"}]}, "share"),
        ({"profiles": [{"profile": "burst", "share": 2}]}, "fraction"),
        ({"profiles": [{"profile": "burst", "share": 0.1, "colour": 1}]}, "unknown keys"),
        ({"fleet": {"types": ["toaster"]}}, "unknown device types"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_scenarios_are_config_errors(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_scenario(data, source="x.yaml")


def test_scenario_file_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("profiles: [{profile: covert_field, devices: [zz-00001]}]\n")
    s = load_scenario(p)
    with pytest.raises(ConfigError, match="not in the fleet"):
        s.profiles_for(s.fleet())
    with pytest.raises(ConfigError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------ ground truth


def test_ground_truth_with_secrets_and_actions_round_trips(tmp_path: Path) -> None:
    gt = GroundTruth(started_at=1.0, ended_at=2.0)
    gt.sent_records.append(SentRecord("xr-00001", "xray_baggage", "result", 1, "t", 3, "ab" * 32, 1.5,
                                      b"\x81", 1.4, "free_text", ("free_text", "field:x"), "free_text", b"\x00\xff"))
    gt.actions += [
        HostileAction("xr-00001", "free_text", "free_text", "publish", 1, "t", b"\x00\xff", "puback:0", 1.5, "x"),
        HostileAction("id-00001", "subscribe_probe", "subscribe_probe", "subscribe", topic="#", outcome="suback:135"),
    ]
    gt.to_jsonl(tmp_path / "t.jsonl")
    back = GroundTruth.from_jsonl(tmp_path / "t.jsonl")
    assert back.sent_records == gt.sent_records and back.actions == gt.actions
    assert back.hostile_records == gt.sent_records
    assert base64.b64encode(b"\x00\xff").decode() in (tmp_path / "t.jsonl").read_text()
