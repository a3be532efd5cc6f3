"""device_sim.lean without a broker: ground-truth merging, file limits; the broker's rendered limits."""

from __future__ import annotations

import resource
from pathlib import Path

from device_sim.devices import make_fleet
from device_sim.lean import LeanFleet, merge_truths, raise_nofile
from device_sim.truth import GroundTruth, SentRecord
from gateway.runtime.broker import BrokerConfig, nofile_target


def _rec(dev: str, seq: int) -> SentRecord:
    return SentRecord(dev, "body_scanner", "result", seq, f"site/S/dev/{dev}/result", 10, "0" * 64, 1.0)


def test_merge_truths_keeps_every_record_and_counts_connects() -> None:
    a = GroundTruth(sent_records=[_rec("bs-00001", 1), _rec("bs-00001", 2)], started_at=5.0, ended_at=9.0)
    a.connects["bs-00001"] += 1
    b = GroundTruth(sent_records=[_rec("bs-00002", 1)], started_at=4.0, ended_at=10.0)
    b.connects["bs-00002"] += 2
    m = merge_truths([a, b])
    assert m.sent == 3 and [r.seq for r in m.sent_records if r.device_id == "bs-00001"] == [1, 2]
    assert m.connects == {"bs-00001": 1, "bs-00002": 2}
    assert (m.started_at, m.ended_at) == (4.0, 10.0)


def test_raise_nofile_reaches_at_least_the_request_within_the_hard_limit() -> None:
    soft0, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    got = raise_nofile(min(soft0, 256))
    assert got >= min(soft0, 256)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] >= hard


def test_nofile_target_never_lowers_the_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert nofile_target(16)[0] >= soft


def test_offered_rate_matches_the_catalogue() -> None:
    specs = make_fleet(80)
    f = LeanFleet(specs, port=1, rate_scale=2.0, health_interval_s=5.0)
    want = sum(2.0 / s.kind.result_interval_s + 0.2 for s in specs)
    assert abs(f.offered_rate - want) < 1e-9


def test_broker_config_renders_connection_limits(tmp_path: Path) -> None:
    conf = BrokerConfig(port=12345, workdir=tmp_path, max_open_files=50_000).render()
    assert "max_connections -1" in conf
    assert "RLIMIT_NOFILE" in conf and "50000" in conf
