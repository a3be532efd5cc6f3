"""A gateway that loses its ingest connection while intake is paused (here: the disk is full) must
reconnect at once and stay paused, and lose nothing once the disk has room again.

The subscription is answered only by reading, and a paused gateway does not read: the reconnect used
to wait for a SUBACK it could not see, time out after 10 s, and connect again over the live
connection, over and over, for as long as the disk stayed full."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_sim import Fleet, make_fleet
from gateway.audit.chain import iter_records, verify_chain
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig
from tests.integration.test_faults import POLICY_DIR, _FullDisk, _until


@pytest.mark.broker
async def test_reconnect_while_disk_full_stays_paused_and_loses_nothing(broker: MosquittoBroker,
                                                                         tmp_path: Path) -> None:
    policy = load_policy(POLICY_DIR)
    cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None)
    gw = Gateway(cfg, policy)
    rx = DestinationReceiver("127.0.0.1", broker.port, gw.keyring, keep=False)
    await rx.start()
    stop = asyncio.Event()
    async with gw:
        serve = asyncio.create_task(gw.serve(stop))
        fleet = Fleet(make_fleet(20, seed=11), port=broker.port, seed=11, rate_scale=6, drop_every_s=None)
        run = asyncio.create_task(fleet.run(6.0))
        await asyncio.sleep(1.0)
        name = gw.vault._fh.name
        gw.vault._fh.close()
        _FullDisk.full = True
        gw.vault._fh = _FullDisk(name, "ab")
        await _until(lambda: gw.status()["disk_full"], 10, "disk full noticed")
        gw.ingest.abort()  # the ingest connection drops while intake is paused
        await _until(lambda: gw.stats.reconnects == 1 and gw.ingest.connected, 10, "reconnected")
        received = gw.stats.received
        await asyncio.sleep(12.0)  # longer than the SUBACK wait
        assert "disk_full" in gw.status()["paused"]
        assert gw.stats.received <= received + 1_000  # intake stays stopped (one read in hand at most)
        assert gw.stats.reconnects == 1 and gw.stats.connect_failures == 0, "one drop, one reconnect"
        _FullDisk.full = False  # space returns
        truth = await run
        await _until(lambda: not gw.status()["disk_full"], 10, "resumed")
        await _until(lambda: gw.stats.decided + sum(gw.stats.rejected.values()) >= truth.sent, 30, "decided")
        assert await gw.drain(20), gw.status()
        stop.set()
        await serve
    await rx.stop()
    records = list(iter_records(cfg.state_dir / "audit"))
    # each message decided exactly once; what was in hand at the drop came again and was recognised
    decided = [(r["dev"], r["seq"]) for r in records
               if "dev" in r and "seq" in r and "event" not in r and r.get("reason") != "dedupe.duplicate"]
    assert len(decided) == len(set(decided)) == truth.sent
    assert verify_chain(cfg.state_dir / "audit").ok
