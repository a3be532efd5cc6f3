"""Built-in guards: topic identity, exact schema, quantisation."""

from __future__ import annotations

import pytest

from gateway.catalog import DEVICE_TYPES, schema_for
from gateway.errors import RejectedMessage
from gateway.guards import check_payload, parse_topic

NOW = 1_800_000_000_000


def test_parse_topic() -> None:
    assert parse_topic("site/AMS-T1/dev/xr-00001/result", "AMS-T1") == ("xr-00001", "result")
    assert parse_topic("site/AMS-T1/dev/xr-00001/status/health", "AMS-T1") == ("xr-00001", "status/health")


@pytest.mark.parametrize(
    ("topic", "code"),
    [
        ("site/AMS-T1/dev/xr-00001/other", "guard.topic_stream"),
        ("site/AMS-T1/dev/xr-00001/result/extra", "guard.topic_stream"),
        ("site/LHR-T5/dev/xr-00001/result", "guard.topic_site"),
        ("edgeward/out/customs_nl/x", "guard.topic"),
        ("site/AMS-T1/dev//result", "guard.topic"),
    ],
)
def test_topic_outside_namespace_rejected(topic: str, code: str) -> None:
    with pytest.raises(RejectedMessage) as info:
        parse_topic(topic, "AMS-T1")
    assert info.value.code == code


def _temp(**over: object) -> dict[str, object]:
    p: dict[str, object] = {"seq": 1, "ts": NOW, "temperature_c": 36.6, "face_crop": b"\xff\xd8x\xff\xd9", "alarm": False}
    p.update(over)
    return p


def test_valid_payload_passes_and_is_quantised() -> None:
    schema = schema_for("temp_check", "result")
    assert schema is not None
    fields, seq, ts = check_payload(schema, _temp(temperature_c=36.612345678), now_ms=NOW)
    assert (seq, ts) == (1, NOW)
    assert fields["temperature_c"] == 36.6
    assert set(fields) == {"temperature_c", "face_crop", "alarm"}


@pytest.mark.parametrize(
    ("over", "code"),
    [
        ({"covert": 1}, "guard.unknown_field"),
        ({"temperature_c": "36"}, "guard.bad_value"),
        ({"temperature_c": 99.0}, "guard.bad_value"),
        ({"alarm": 1}, "guard.bad_value"),
        ({"seq": 0}, "guard.bad_envelope"),
        ({"seq": True}, "guard.bad_envelope"),
        ({"ts": 1}, "guard.bad_timestamp"),
        ({"face_crop": b"x" * 50_000}, "guard.bad_value"),
    ],
)
def test_schema_violations_rejected(over: dict[str, object], code: str) -> None:
    schema = schema_for("temp_check", "result")
    assert schema is not None
    with pytest.raises(RejectedMessage) as info:
        check_payload(schema, _temp(**over), now_ms=NOW)
    assert info.value.code == code
    assert "36" not in info.value.detail  # never a value in the detail


def test_missing_field_rejected() -> None:
    schema = schema_for("temp_check", "result")
    assert schema is not None
    p = _temp()
    del p["alarm"]
    with pytest.raises(RejectedMessage) as info:
        check_payload(schema, p, now_ms=NOW)
    assert info.value.code == "guard.missing_field"


def test_every_type_has_both_streams() -> None:
    for name in DEVICE_TYPES:
        assert schema_for(name, "result") is not None
        assert schema_for(name, "status/health") is not None
