"""A gateway that loses its ingest connection while intake is paused (here: the disk is full) must
reconnect at once and stay paused, and lose nothing once the disk has room again: on a resumed
session (the connection dropped) and on a new one (the broker came back without its sessions).

The subscription is answered only by reading, and a paused gateway does not read: the reconnect used
to wait for a SUBACK it could not see, time out after 10 s, and connect again over the live
connection, over and over, for as long as the disk stayed full."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_sim import Fleet, make_fleet
from gateway.audit.chain import verify_chain
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig
from tests.conftest import start_broker
from tests.integration.test_faults import POLICY_DIR, _decided, _FullDisk, _fill_vault_disk, _until


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
        _fill_vault_disk(gw)
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
    # each message decided exactly once; what was in hand at the drop came again and was recognised
    decided = _decided(cfg.state_dir)
    assert len(decided) == len(set(decided)) == truth.sent
    assert verify_chain(cfg.state_dir / "audit").ok


@pytest.mark.broker
async def test_broker_restart_without_its_sessions_while_disk_full(tmp_path: Path) -> None:
    """The other way back: the broker comes back without the gateway's session (its persistence
    lost), so nothing is subscribed. The gateway subscribes anew, stays paused until the disk has
    room, and then takes what devices send (checked with a fleet started after the disk returned)."""
    broker = start_broker(tmp_path / "broker", persistence=False)
    try:
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None)
        gw = Gateway(cfg, load_policy(POLICY_DIR))
        stop = asyncio.Event()
        async with gw:
            serve = asyncio.create_task(gw.serve(stop))
            await asyncio.sleep(0.2)
            _fill_vault_disk(gw)
            try:
                first = make_fleet(10, seed=12)
                fleet = Fleet(first, port=broker.port, seed=12, rate_scale=6, drop_every_s=None)
                await fleet.run(1.0)
                await _until(lambda: gw.status()["disk_full"], 10, "disk full noticed")
                broker.kill()
                broker.start()  # same port, no sessions
                await _until(lambda: gw.stats.reconnects == 1 and gw.ingest.connected, 10, "reconnected")
                failed = gw.stats.connect_failures  # attempts while the broker was down
                await asyncio.sleep(11.0)  # longer than the SUBACK wait
                assert "disk_full" in gw.status()["paused"]
                assert gw.stats.connect_failures == failed, "connected once the broker was back"
            finally:
                _FullDisk.full = False  # space returns
            await _until(lambda: not gw.status()["disk_full"], 15, "resumed")
            before = gw.stats.decided
            taken = {d.device_id for d in first}
            second = [d for d in make_fleet(30, seed=13) if d.device_id not in taken]  # its own sequences
            truth = await Fleet(second, port=broker.port, seed=13, rate_scale=6, drop_every_s=None).run(2.0)
            await _until(lambda: gw.stats.decided - before >= truth.sent, 20, "the new fleet's messages decided")
            assert gw.stats.decided - before == truth.sent
            assert await gw.drain(20), gw.status()
            stop.set()
            await serve
        assert verify_chain(cfg.state_dir / "audit").ok
    finally:
        broker.stop()
