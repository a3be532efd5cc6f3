"""The leak report finds a planted secret wherever it arrived, and only there."""

from __future__ import annotations

import base64

from device_sim.report import Delivered, leak_report
from device_sim.truth import GroundTruth, HostileAction, SentRecord

SECRET = b"\x13\x37secret-bytes\x00\xff"


def _rec(technique: str, seq: int, secret: bytes | None = SECRET, digest: str = "d") -> SentRecord:
    return SentRecord("et-00001", "trace_detector", "result", seq, "site/AMS-T1/dev/et-00001/result", 100,
                      f"{digest}{seq}", 0.0, technique=technique, secret=secret)


def test_secret_found_in_any_form_counts_as_leaked_and_detection_is_by_digest() -> None:
    truth = GroundTruth()
    truth.sent_records += [_rec("free_text", 1), _rec("free_text", 2, b"another secret 42"),
                           _rec("covert_field", 3, b"a third secret!!"), _rec("", 4, None)]
    got = Delivered()
    got.add("customs_nl", "et-00001", "result", 1, {"sample_id": base64.b64encode(SECRET).decode()}, "t")
    got.add("customs_nl", "et-00001", "result", 2, {"sample_id": "S1234567"}, "t")
    audit = [{"digest": "d2", "reason": "detect.base64"}, {"digest": "d3", "reason": "guard.unknown_field"}]
    rows = {r.technique: r for r in leak_report(truth, got, audit)}
    assert set(rows) == {"free_text", "covert_field"}  # honest messages are not reported
    assert (rows["free_text"].attempts, rows["free_text"].detected, rows["free_text"].leaked) == (2, 1, 1)
    assert (rows["covert_field"].detected, rows["covert_field"].leaked, rows["covert_field"].neutralised) == (1, 0, 1)


def test_volume_and_timing_leak_when_they_reach_an_external_destination() -> None:
    truth = GroundTruth()
    truth.sent_records += [_rec("burst", 1, b"\x01"), _rec("burst", 2, b"\x01")]
    truth.actions.append(HostileAction("et-00001", "timing", "timing", "timing", seq=2, outcome="delay_s:0.2"))
    got = Delivered()
    got.add("local_vault", "et-00001", "result", 1, {}, "")
    got.add("eu_hub", "et-00001", "result", 2, {}, "t")
    rows = {r.technique: r for r in leak_report(truth, got, [])}
    assert rows["burst"].leaked == 1 and rows["burst"].neutralised == 1  # the vault is on site
    assert rows["timing"].leaked == 1
