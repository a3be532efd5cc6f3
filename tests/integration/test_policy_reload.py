"""Hot reload under load against a real broker: valid revisions swap atomically between messages,
an invalid one never goes live (alert + audit), and no message is lost or decided twice."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from device_sim import Fleet, make_fleet
from gateway.audit.chain import iter_records, verify_chain
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.mqtt import Message, MqttClient
from gateway.runtime.reload import PolicyReloader
from gateway.runtime.service import Gateway, GatewayConfig

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


@pytest.mark.broker
async def test_hot_reload_under_load(broker: MosquittoBroker, tmp_path: Path) -> None:
    pol_dir = tmp_path / "policy"
    shutil.copytree(POLICY_DIR, pol_dir, ignore=shutil.ignore_patterns("cases"))
    site = pol_dir / "site.yaml"
    original = site.read_text()
    assert "match_score: 0.05" in original
    r0 = load_policy(pol_dir).revision

    alerts: list[dict[str, object]] = []

    def on_alerts(batch: list[Message]) -> None:
        for m in batch:
            alerts.append(json.loads(m.payload))
            if m.packet_id is not None:
                watcher.ack(m.packet_id)

    watcher = MqttClient(host="127.0.0.1", port=broker.port, client_id="operator", on_messages=on_alerts)
    await watcher.connect()
    await watcher.subscribe(("edgeward/alerts/#", 1))

    state = tmp_path / "gw"
    stop = asyncio.Event()
    async with Gateway(GatewayConfig(state_dir=state, port=broker.port), load_policy(pol_dir)) as gw:
        serve = asyncio.create_task(gw.serve(stop))
        reloader = PolicyReloader(gw, pol_dir, load_policy, interval=0.05)
        watch = asyncio.create_task(reloader.watch(stop))
        fleet = Fleet(make_fleet(24, seed=9), port=broker.port, seed=9, rate_scale=10.0,
                      health_interval_s=0.5, drop_every_s=None)
        run = asyncio.create_task(fleet.run(4.0))
        await asyncio.sleep(1.0)
        site.write_text(original.replace("match_score: 0.05", "match_score: 0.1"))      # valid: r1
        await asyncio.sleep(1.0)
        r1 = gw.policy.revision
        site.write_text(original.replace("destinations:", "destinations:\n  broken: [", 1))  # invalid
        await asyncio.sleep(1.0)
        assert gw.policy.revision == r1
        site.write_text(original.replace("match_score: 0.05", "match_score: 0.2"))      # valid: r2
        truth = await run
        await gw.drain(20)
        r2 = gw.policy.revision
        stop.set()
        await serve
        await watch
    await asyncio.sleep(0.2)
    await watcher.disconnect()

    assert len({r0, r1, r2}) == 3
    assert reloader.reloads == 2 and reloader.failures == 1
    assert [a["kind"] for a in alerts] == ["policy_reload_failed"]
    records = list(iter_records(state / "audit"))
    events = [r for r in records if r.get("event") == "policy.activated"]
    assert [(e["previous"], e["rev"]) for e in events] == [(r0, r1), (r1, r2)]
    # every message decided exactly once, under one complete revision, in swap order
    decided = [r for r in records if "routes" in r]
    assert Counter((r["dev"], r["seq"]) for r in decided) == Counter((t.device_id, t.seq) for t in truth.sent_records)
    order = {r0: 0, r1: 1, r2: 2}
    revs = [order[r["rev"]] for r in decided]
    assert revs == sorted(revs) and set(revs) == {0, 1, 2}
    assert verify_chain(state / "audit").ok
