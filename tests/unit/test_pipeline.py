"""The whole pure pipeline with an in-memory policy: guards, dedupe, projection, sealing, audit record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import msgpack
import pytest

from gateway.codec import decode
from gateway.crypto.envelope import open_envelope
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.pipeline import Pipeline
from tests.fakes import FakePolicy

NOW = 1_800_000_000_000
TOPIC = "site/AMS-T1/dev/et-00004/result"


def _pipeline(tmp_path: Path) -> Pipeline:
    ring = DataKeyring(tmp_path / "dk.jsonl", load_or_create_kek(tmp_path / "kek.key"))
    return Pipeline(FakePolicy(), ring, clock_ms=lambda: NOW)


def _payload(seq: int = 1, **over: object) -> bytes:
    p: dict[str, object] = {
        "seq": seq, "ts": NOW, "sample_id": "S1234567", "substances": ["RDX"], "alarm": True,
    }
    p.update(over)
    return msgpack.packb(p)


def test_allowed_fields_only_reach_each_destination(tmp_path: Path) -> None:
    pl = _pipeline(tmp_path)
    out = pl.process(TOPIC, _payload())
    assert out.reason == ""
    got = {d.destination: d for d in out.deliveries}
    assert set(got) == {"vault", "customs"}
    hdr, pt = open_envelope(pl.keyring, got["customs"].envelope)
    assert (hdr.device, hdr.seq, hdr.destination) == ("et-00004", 1, "customs")
    assert decode(pt) == {"substances": ["RDX"], "alarm": True}
    assert got["customs"].topic == "edgeward/out/customs/et-00004/result"
    assert decode(open_envelope(pl.keyring, got["vault"].envelope)[1])["sample_id"] == "S1234567"


def test_duplicates_are_recorded_not_forwarded(tmp_path: Path) -> None:
    pl = _pipeline(tmp_path)
    assert pl.process(TOPIC, _payload(5)).deliveries
    again = pl.process(TOPIC, _payload(5))
    assert again.duplicate and not again.deliveries and again.record["reason"] == "dedupe.duplicate"


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        (TOPIC, b"\xc1garbage", "decode.not_a_map"),
        (TOPIC, b"\x81\xa1a\xc1", "decode.malformed"),
        ("site/AMS-T1/dev/zz-00001/result", _payload(), "guard.unknown_device"),
        (TOPIC, _payload(covert="x"), "guard.unknown_field"),
        (TOPIC, _payload(sample_id="S" + "9" * 40), "guard.bad_value"),
        (TOPIC, msgpack.packb({"seq": 1, "ts": NOW, "sample_id": "S1234567", "substances": ["x" * 10] * 5000}), "guard.too_large"),
        ("site/AMS-T1/dev/xr-00001/result/../../et-00004", _payload(), "guard.topic_stream"),
        ("edgeward/out/customs/x", _payload(), "guard.topic"),
    ],
)
def test_bad_input_rejected_with_reason_and_no_values_in_audit(
    tmp_path: Path, topic: str, payload: bytes, code: str
) -> None:
    pl = _pipeline(tmp_path)
    out = pl.process(topic, payload)
    assert out.reason == code
    assert not out.deliveries
    text = json.dumps(out.record)
    assert "S1234567" not in text and "RDX" not in text and "covert" not in text.replace("'covert'", "")
    # the next good message still goes through
    assert pl.process(TOPIC, _payload(2)).deliveries


def test_retained_publish_rejected(tmp_path: Path) -> None:
    assert _pipeline(tmp_path).process(TOPIC, _payload(), retain=True).reason == "guard.retained"


def test_audit_record_names_fields_and_rules_never_values(tmp_path: Path) -> None:
    out = _pipeline(tmp_path).process(TOPIC, _payload())
    rec = out.record
    assert rec["dev"] == "et-00004" and rec["seq"] == 1 and len(rec["digest"]) == 64
    routes = {r["dst"]: r for r in rec["routes"]}
    assert routes["customs"]["removed"] == [["sample_id", "policy.class_not_allowed"]]
    assert routes["vendor"] == {"dst": "vendor", "allow": False, "reason": "policy.default_deny", "rules": ["default-deny"]}
    assert "S1234567" not in json.dumps(rec)


def test_isolated_device_is_refused(tmp_path: Path) -> None:
    pl = _pipeline(tmp_path)
    pl.blocked = frozenset({"et-00004"})
    out = pl.process(TOPIC, _payload())
    assert out.reason == "guard.isolated" and not out.deliveries
    pl.blocked = frozenset()
    assert pl.process(TOPIC, _payload(2)).deliveries


def test_a_decision_object_reused_by_another_policy_is_planned_again(tmp_path: Path) -> None:
    """The pipeline plans per Decision object (routes in the audit record, projection, destination
    topic); a reloaded policy with other destinations must not inherit the old plan."""
    from tests.fakes import FakeDestination

    class Memo(FakePolicy):
        shared: ClassVar[dict[object, object]] = {}

        def decide(self, facts):  # type: ignore[no-untyped-def]
            return self.shared.setdefault(facts.fields, super().decide(facts))

    pl = _pipeline(tmp_path)
    pl.policy = Memo()
    first = pl.process(TOPIC, _payload(1))
    second = pl.process(TOPIC, _payload(2))
    assert first.decision is second.decision
    assert first.record["routes"] == second.record["routes"] == json.loads(json.dumps(first.record["routes"]))
    moved = Memo()
    moved.destinations["customs"] = FakeDestination("customs", "mqtt", "edgeward/out/moved", "NL")
    pl.policy = moved
    third = pl.process(TOPIC, _payload(3))
    assert third.decision is first.decision
    assert {d.destination: d.topic for d in third.deliveries}["customs"] == "edgeward/out/moved/et-00004/result"
