"""The lean simulator (device_sim.lean) against a real private Mosquitto: every device connects, every
PUBACKed message is in the ground truth with the payload the normal simulator would have sent, and
nothing is lost between the ground truth and the gateway's audit log (the benchmark's smoke run)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from device_sim import PayloadFactory, encode, make_fleet
from device_sim.lean import LeanFleet, raise_nofile, run_processes
from gateway.runtime.broker import MosquittoBroker

SIM_SCALE = Path(__file__).resolve().parents[2] / "benchmarks" / "sim_scale.py"


@pytest.mark.broker
def test_lean_fleet_connects_all_and_truth_matches_payloads(broker: MosquittoBroker) -> None:
    raise_nofile()
    specs = make_fleet(200, seed=3)
    fleet = LeanFleet(specs, port=broker.port, seed=3, rate_scale=2.0, health_interval_s=1.0, keep_payloads=True)
    truth = asyncio.run(fleet.run(3.0))
    assert len(truth.connects) == 200 and fleet.connect_failures == 0
    assert not truth.failed
    assert truth.sent >= 200  # health every second: at least one message from every device
    factories = {s.device_id: PayloadFactory(s, seed=3) for s in specs}
    seqs: dict[str, list[int]] = {}
    for r in truth.sent_records:
        assert r.payload is not None and hashlib.sha256(r.payload).hexdigest() == r.sha256
        obj = msgpack.unpackb(r.payload)
        assert obj["seq"] == r.seq and r.topic == f"site/AMS-T1/dev/{r.device_id}/{r.stream}"
        # The same bytes the normal simulator's PayloadFactory makes for (device, stream, seq, ts).
        fresh = PayloadFactory(factories[r.device_id].spec, seed=3)
        if r.stream == "result":
            assert encode(fresh.make(r.stream, r.seq, obj["ts"])) == r.payload
        seqs.setdefault(r.device_id, []).append(r.seq)
    for s in seqs.values():
        assert s == sorted(s) and len(set(s)) == len(s)  # one sequence per device, in order


@pytest.mark.broker
def test_lean_fleet_over_two_processes_merges_truth(broker: MosquittoBroker) -> None:
    specs = make_fleet(100)
    truth, refused = run_processes(specs, 2.0, processes=2, start_delay_s=2.0, port=broker.port,
                                   health_interval_s=1.0)
    assert refused == 0 and not truth.failed
    assert set(truth.connects) == {s.device_id for s in specs}
    assert set(truth.by_device) == {s.device_id for s in specs}


@pytest.mark.broker
def test_sim_scale_benchmark_smoke_loses_nothing() -> None:
    p = subprocess.run(
        [sys.executable, str(SIM_SCALE), "--devices", "200", "--seconds", "6", "--warm", "2",
         "--processes", "1", "--drain-timeout", "60", "--json"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(p.stdout)["rows"][0]
    assert row["connected"] == 200
    assert row["sent"] > 0 and row["lost"] == 0 and row["failed"] == 0
    assert row["gw_received"] >= row["sent"]
    assert row["gw_rss_kb_per_dev"] is not None and row["sim_rss_kb_per_dev"] is not None
