"""The leak report finds a planted secret wherever it arrived, and only there."""

from __future__ import annotations

import base64
import math
import random

from device_sim.report import Delivered, decode_timing, leak_report, timing_channels
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


def test_unmeasured_volume_and_timing_fall_back_to_reaching_an_external_destination() -> None:
    truth = GroundTruth()
    truth.actions.append(HostileAction("et-00001", "timing", "timing", "timing", seq=2, outcome="delay_s:0.2"))
    truth.sent_records.append(_rec("", 2, None))
    got = Delivered()
    got.add("eu_hub", "et-00001", "result", 2, {}, "t")  # no arrival or header time: cannot be decoded
    rows = {r.technique: r for r in leak_report(truth, got, [])}
    assert rows["timing"].leaked == 1 and rows["timing"].detail["measured"] is False


def _burst_truth(groups: int) -> GroundTruth:
    truth = GroundTruth()
    for g in range(1, groups + 1):
        truth.sent_records.append(_rec("", g * 16, None))  # the base message (honest-shaped)
        truth.sent_records += [_rec("burst", g * 16 + i, b"\x01") for i in range(1, 8)]
    return truth


def test_burst_leaks_only_groups_that_arrive_whole_off_site() -> None:
    truth = _burst_truth(3)
    got = Delivered()
    for i in range(8):  # group 1: all 8 at eu_hub, so the destination reads the count
        got.add("eu_hub", "et-00001", "result", 16 + i, {}, "t")
    for i in range(3):  # group 2: the rate baseline let 3 of 8 through; the count is the gateway's
        got.add("eu_hub", "et-00001", "result", 32 + i, {}, "t")
    for i in range(8):  # group 3: whole, but only in the on-site vault
        got.add("local_vault", "et-00001", "result", 48 + i, {}, "")
    row = {r.technique: r for r in leak_report(truth, got, [])}["burst"]
    assert (row.attempts, row.leaked, row.neutralised) == (21, 7, 14)
    assert row.detail == {"groups": 3, "intact_at_destination": 1, "cut_by_gateway": 2, "bits_capacity": 4}


def test_a_sequence_channel_leaks_only_where_a_destination_read_the_device_s_number() -> None:
    truth = GroundTruth()
    seqs = [(n << 16) | 0xBEEF for n in (1, 2, 3)]
    truth.sent_records += [_rec("seq_channel", q, b"\xbe\xef") for q in seqs]
    got = Delivered()
    got.add("eu_hub", "et-00001", "result", seqs[0], {}, "t")  # the number as the device sent it: leaked
    got.add("eu_hub", "et-00001", "result", seqs[1], {}, "t", wire_seq=b"\x00" * 14 + b"\xbe\xef")  # hidden
    got.add("local_vault", "et-00001", "result", seqs[2], {}, "")  # on site only
    row = {r.technique: r for r in leak_report(truth, got, [])}["seq_channel"]
    assert (row.attempts, row.leaked, row.neutralised) == (3, 1, 2)


UNIT = 0.2


def _timing_log(*, batch_s: float = 0.0, keep_ts: bool = True, n: int = 160, seed: int = 5) -> tuple[GroundTruth, Delivered]:
    """One timing device: a message about every second (0.9-1.1 s), a 0.2 s delay before each 1 bit,
    delivered to eu_hub; arrival times optionally released only at multiples of ``batch_s``."""
    rng = random.Random(seed)
    truth = GroundTruth()
    got = Delivered()
    t = prev = 100.0
    for seq in range(1, n + 1):
        bit = rng.getrandbits(1)
        truth.actions.append(HostileAction("xr-00001", "timing", "timing", "timing", seq=seq,
                                           outcome=f"delay_s:{UNIT * bit:.3f}"))
        send = max(t, prev) + UNIT * bit
        prev = send + 0.004
        arrival = send + rng.uniform(0.001, 0.004)
        if batch_s:
            arrival = math.ceil(arrival / batch_s) * batch_s
        got.add("eu_hub", "xr-00001", "result", seq, {}, "t", arrival=arrival,
                ts=int(send * 1000) if keep_ts else None)
        t += rng.uniform(0.9, 1.1)
    return truth, got


def test_timing_with_intact_arrival_times_is_decoded_and_reported_leaked() -> None:
    truth, got = _timing_log(keep_ts=False)
    row = {r.technique: r for r in leak_report(truth, got, [], permutations=999)}["timing"]
    assert row.leaked == row.attempts == 160 and row.neutralised == 0
    d = row.detail
    assert d["measured"] and d["leaking_devices"] == ["xr-00001"] and d["bits_sent"] == 160
    best = d["best_decoder"][0]
    assert best["clock"] == "arrival" and best["agree"] >= 0.9 * best["bits"] and d["bits_recovered"] > 80


def test_timing_quantised_to_1s_batches_measured_honestly() -> None:
    """Messages about 1 s apart, 0.2 s delays, arrivals released at whole seconds, device timestamps
    removed: what the best threshold decoder still gets (the figure the re-timing work needs)."""
    truth, got = _timing_log(batch_s=1.0, keep_ts=False)
    ch = timing_channels(truth, got, permutations=999)
    best = min(ch["decodes"], key=lambda d: d.p_value)
    # A 1 s batch does not make the channel disappear: a 0.2 s delay still pushes a message over a
    # batch boundary about 1 time in 5, so the gaps stay correlated with the bits, but only weakly.
    assert best.agree / best.bits < 0.75
    assert best.info_bits < 0.2 * best.bits  # far below the unbatched channel (test above: > 0.5 / bit)
    # And with the batch as long as several messages' spacing, nothing is found at all.
    truth, got = _timing_log(batch_s=5.0, keep_ts=False)
    row = {r.technique: r for r in leak_report(truth, got, [], permutations=999)}["timing"]
    assert row.leaked == 0 and row.detail["leaking_devices"] == []


def test_timing_leaks_through_device_timestamps_whatever_the_batching() -> None:
    truth, got = _timing_log(batch_s=5.0, keep_ts=True)
    ch = timing_channels(truth, got, permutations=999)
    assert list(ch["leaking"]) == ["xr-00001"] and ch["leaking"]["xr-00001"].clock == "header_ts"


def test_decode_timing_threshold_cannot_split_tied_gaps() -> None:
    agree, _, p = decode_timing([1.0] * 50, [0, 1] * 25, permutations=99)
    assert agree == 25 and p > 0.5  # every gap equal: the decoder can only guess one value
