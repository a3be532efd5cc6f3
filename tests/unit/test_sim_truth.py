"""Ground truth counts only acknowledged messages and survives a JSONL round trip unchanged."""

from __future__ import annotations

from pathlib import Path

from device_sim import GroundTruth, Honest, Outgoing, SentRecord
from device_sim.devices import DeviceSpec
from device_sim.firmware import FirmwareProfile
from device_sim.truth import FailedRecord, Outage


def sample() -> GroundTruth:
    gt = GroundTruth(started_at=1.0, ended_at=2.0)
    gt.sent_records += [
        SentRecord("xr-00001", "xray_baggage", "result", 1, "site/A/dev/xr-00001/result", 3, "ab" * 32, 1.5,
                   b"\x81\x01\x02", 1.4),
        SentRecord("mb-00001", "mobile_border", "status/health", 2, "site/A/dev/mb-00001/status/health", 9,
                   "cd" * 32, 1.6, None, 1.2, "honest", ("x",)),
    ]
    gt.failed.append(FailedRecord("mb-00001", "mobile_border", "result", 3, "t", 5, "ef" * 32, 1.7, "boom"))
    gt.outages.append(Outage("mb-00001", 1.1, 1.3, 1))
    gt.connects.update({"xr-00001": 1, "mb-00001": 2})
    return gt


def test_counts_exclude_failures() -> None:
    gt = sample()
    assert gt.sent == 2
    assert gt.by_device == {"xr-00001": 1, "mb-00001": 1}
    assert gt.by_type == {"xray_baggage": 1, "mobile_border": 1}
    assert gt.reconnects("mb-00001") == 1 and gt.reconnects("xr-00001") == 0


def test_jsonl_round_trip(tmp_path: Path) -> None:
    gt = sample()
    path = tmp_path / "truth.jsonl"
    gt.to_jsonl(path)
    back = GroundTruth.from_jsonl(path)
    assert back.sent_records == gt.sent_records
    assert back.failed == gt.failed
    assert back.outages == gt.outages
    assert back.connects == gt.connects
    assert (back.started_at, back.ended_at) == (1.0, 2.0)


def test_honest_profile_is_the_identity() -> None:
    import random

    h = Honest()
    assert isinstance(h, FirmwareProfile)
    spec = DeviceSpec("tc-00001", "temp_check", "A")
    msg = Outgoing("result", 1, spec.topic("result"), {"seq": 1})
    assert h.shape(msg, random.Random(0)) == (msg,)
    assert h.client_id(spec) == "tc-00001"
