"""Faults on the way out, against real Mosquitto brokers: a destination's uplink goes away (its data
waits in the encrypted spool, or is dropped with a reason when it may not rest at the edge), a
destination stops acknowledging (backpressure reaches ingest, memory stays bounded), and the disk
fills (intake stops, an alert is raised, and it resumes by itself; also when the ingest connection
drops meanwhile). Nothing is lost in any of them.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from device_sim import Fleet, make_fleet
from gateway.audit.chain import iter_records, verify_chain
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig
from tests.conftest import start_broker

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
REMOTE = ("customs_nl", "eu_hub", "vendor_maintenance")


async def _until(cond: Any, timeout: float, what: str) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _first_arrivals(rx: DestinationReceiver) -> dict[tuple[str, str], list[int]]:
    """(destination, device) -> the sequence numbers in the order they first arrived."""
    out: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rx.messages:
        out[(r.header.destination, r.header.device)].append(r.header.seq)
    return out


@pytest.mark.broker
async def test_uplink_outage_spools_in_order_and_drops_what_may_not_rest(broker: MosquittoBroker,
                                                                      tmp_path: Path) -> None:
    dest_broker = start_broker(tmp_path / "dest-broker")  # the destinations' side, cut mid-run
    try:
        policy = load_policy(POLICY_DIR)
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None,
                            uplinks={d: ("127.0.0.1", dest_broker.port) for d in REMOTE},
                            uplink_down_after_s=0.5, spool_drain_rate=400.0)
        gw = Gateway(cfg, policy)
        rx = DestinationReceiver("127.0.0.1", dest_broker.port, gw.keyring, keep=True)
        await rx.start()
        stop = asyncio.Event()
        async with gw:
            serve = asyncio.create_task(gw.serve(stop))
            fleet = Fleet(make_fleet(24, seed=3), port=broker.port, seed=3, rate_scale=6, drop_every_s=None)
            run = asyncio.create_task(fleet.run(7.0))
            await asyncio.sleep(1.5)
            dest_broker.stop()  # the uplink is cut
            await _until(lambda: gw.status()["destinations"]["customs_nl"]["state"] == "down", 10, "down")
            await asyncio.sleep(2.0)
            during = gw.status()["destinations"]
            assert during["customs_nl"]["backlog"] > 0, during["customs_nl"]
            assert during["eu_hub"]["state"] == "down" and "backlog" not in during["eu_hub"]
            assert gw.status()["ingest"] == "connected"  # intake carries on
            dest_broker.start()  # the destination returns, on the same port
            await rx.start()  # its persistent session resumes
            truth = await run
            await _until(lambda: gw.status()["destinations"]["customs_nl"]["state"] == "up"
                         and gw.status()["destinations"]["customs_nl"]["backlog"] == 0, 30, "spool drained")
            assert await gw.drain(20)
            await asyncio.sleep(0.5)
            status = gw.status()
            stop.set()
            await serve
        await rx.stop()
        assert truth.sent == gw.stats.decided + sum(gw.stats.rejected.values())
        s = status["destinations"]
        assert status["stats"]["spooled"].get("customs_nl", 0) > 0
        # customs_nl may rest at the edge: every envelope arrives, each once, in order per device
        assert rx.counts["customs_nl"] == gw.stats.forwarded["customs_nl"]
        for (dest, _dev), seqs in _first_arrivals(rx).items():
            if dest == "customs_nl":
                assert seqs == sorted(seqs)
        # eu_hub and the vendor may not: what could not go was dropped with a reason, and counted
        for dest in ("eu_hub", "vendor_maintenance"):
            dropped = s[dest]["undelivered"].get("uplink.unreachable", 0)
            assert rx.counts[dest] + dropped == gw.stats.forwarded[dest], (dest, s[dest])
        assert s["eu_hub"]["undelivered"]["uplink.unreachable"] > 0
        records = list(iter_records(cfg.state_dir / "audit"))
        undelivered = [r for r in records if r.get("event") == "undelivered"]
        assert len(undelivered) == sum(gw.stats.undelivered.values())
        assert all(r["reason"] == "uplink.unreachable" and "dev" in r and "seq" in r for r in undelivered)
        kinds = [r.get("kind") for r in records if r.get("event") == "alert"]
        assert "destination_down" in kinds and "destination_up" in kinds
        assert verify_chain(cfg.state_dir / "audit").ok
        # the spool never held plaintext: no device id appears in its files
        for f in (cfg.state_dir / "spool" / "customs_nl").rglob("*"):
            if f.is_file():
                assert b"xr-000" not in f.read_bytes() and b"site/" not in f.read_bytes()
    finally:
        dest_broker.stop()


@pytest.mark.broker
async def test_full_spool_refuses_new_and_loses_nothing(broker: MosquittoBroker, tmp_path: Path) -> None:
    """when_full: refuse_new: intake stops (the broker holds the rest) and everything arrives later."""
    dest_broker = start_broker(tmp_path / "dest-broker")
    try:
        policy = load_policy(POLICY_DIR)
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None,
                            uplinks={"customs_nl": ("127.0.0.1", dest_broker.port)},
                            uplink_down_after_s=0.3, spool_drain_rate=2000.0)
        gw = Gateway(cfg, policy)
        ob = gw.outboxes["customs_nl"]
        assert ob.spool is not None and ob.when_full == "refuse_new"
        ob.spool.max_bytes = 40_000  # a few dozen envelopes
        rx = DestinationReceiver("127.0.0.1", dest_broker.port, gw.keyring, keep=True)
        await rx.start()
        stop = asyncio.Event()
        async with gw:
            serve = asyncio.create_task(gw.serve(stop))
            dest_broker.stop()
            fleet = Fleet(make_fleet(24, seed=5), port=broker.port, seed=5, rate_scale=6, drop_every_s=None)
            truth = await fleet.run(4.0)
            await _until(lambda: gw.status()["destinations"]["customs_nl"]["state"] == "full", 10, "spool full")
            assert "spool:customs_nl" in gw.status()["paused"]
            held = truth.sent - gw.stats.received
            assert held > 0  # the broker is holding what the gateway refused to take
            dest_broker.start()
            await rx.start()
            await _until(lambda: gw.stats.decided + sum(gw.stats.rejected.values()) == truth.sent, 60,
                         "every message decided")
            await _until(lambda: rx.counts["customs_nl"] == gw.stats.forwarded["customs_nl"], 30, "delivered")
            stop.set()
            await serve
        await rx.stop()
        assert gw.stats.undelivered.get("customs_nl:spool.dropped_oldest", 0) == 0
        assert rx.counts["customs_nl"] == gw.stats.forwarded["customs_nl"]
        assert verify_chain(cfg.state_dir / "audit").ok
    finally:
        dest_broker.stop()


@pytest.mark.broker
async def test_stuck_destination_backpressure_keeps_memory_bounded(broker: MosquittoBroker, tmp_path: Path) -> None:
    """A destination that stops acknowledging (its broker frozen with SIGSTOP, the TCP connection up):
    unacknowledged envelopes stop at max_pending, intake pauses, and all flows once it wakes."""
    dest_broker = start_broker(tmp_path / "dest-broker")
    try:
        policy = load_policy(POLICY_DIR)
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None, max_pending=150,
                            retime=False, uplinks={d: ("127.0.0.1", dest_broker.port) for d in REMOTE},
                            uplink_down_after_s=60)
        gw = Gateway(cfg, policy)
        rx = DestinationReceiver("127.0.0.1", dest_broker.port, gw.keyring, keep=False)
        await rx.start()
        stop = asyncio.Event()
        async with gw:
            serve = asyncio.create_task(gw.serve(stop))
            fleet = Fleet(make_fleet(30, seed=7), port=broker.port, seed=7, rate_scale=10, drop_every_s=None)
            run = asyncio.create_task(fleet.run(5.0))
            await asyncio.sleep(0.5)
            assert dest_broker.proc is not None
            pid = dest_broker.proc.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                peak = 0
                for _ in range(40):
                    await asyncio.sleep(0.1)
                    peak = max(peak, gw.status()["uplink_backlog"])
                paused = gw.status()["paused"]
            finally:
                os.kill(pid, signal.SIGCONT)
            truth = await run
            await _until(lambda: gw.stats.decided + sum(gw.stats.rejected.values()) == truth.sent, 60, "decided")
            assert await gw.drain(30)
            stop.set()
            await serve
        await rx.stop()
        assert paused and "backpressure" in paused
        assert peak <= cfg.max_pending + 1_000  # bounded by the window plus one read batch
        for d in REMOTE:
            assert rx.counts[d] == gw.stats.forwarded[d]
    finally:
        dest_broker.stop()


class _FullDisk(io.FileIO):
    full = True

    def write(self, b):  # type: ignore[override]
        if _FullDisk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def _fill_vault_disk(gw: Gateway) -> None:
    """The vault's volume fills up: every write to it fails with ENOSPC until ``_FullDisk.full`` is
    set False."""
    name = gw.vault._fh.name
    gw.vault._fh.close()
    _FullDisk.full = True
    gw.vault._fh = _FullDisk(name, "ab")


def _decided(state_dir: Path) -> list[tuple[str, int]]:
    """(device, seq) of every decision in the audit log; a redelivery recognised as such is not one."""
    return [(r["dev"], r["seq"]) for r in iter_records(state_dir / "audit")
            if "dev" in r and "seq" in r and "event" not in r and r.get("reason") != "dedupe.duplicate"]


@pytest.mark.broker
@pytest.mark.parametrize("drop", [False, True], ids=["disk-full", "ingest-drops-while-paused"])
async def test_disk_full_stops_intake_alerts_and_resumes(broker: MosquittoBroker, tmp_path: Path,
                                                         drop: bool) -> None:
    """With ``drop`` the ingest connection also drops while intake is paused. The subscription is
    answered only by reading, and a paused gateway does not read: the reconnect used to wait for a
    SUBACK it could not see, time out, and connect again over the live connection for as
    long as the disk stayed full (then the ingest stayed down). A resumed session keeps its
    subscriptions: the gateway reconnects at once and stays paused."""
    policy = load_policy(POLICY_DIR)
    cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None,
                        subscribe_timeout_s=2.0)
    gw = Gateway(cfg, policy)
    rx = DestinationReceiver("127.0.0.1", broker.port, gw.keyring, keep=False)
    await rx.start()
    stop = asyncio.Event()
    async with gw:
        serve = asyncio.create_task(gw.serve(stop))
        fleet = Fleet(make_fleet(20, seed=9), port=broker.port, seed=9, rate_scale=6, drop_every_s=None)
        run = asyncio.create_task(fleet.run(5.0))
        await asyncio.sleep(1.0)
        _fill_vault_disk(gw)
        await _until(lambda: gw.status()["disk_full"], 10, "disk full noticed")
        assert "disk_full" in gw.status()["paused"]
        if drop:
            gw.ingest.abort()
            await _until(lambda: gw.stats.reconnects == 1 and gw.ingest.connected, 10, "reconnected")
        received = gw.stats.received
        await asyncio.sleep(3.0 if drop else 1.0)  # with a drop: longer than the SUBACK wait
        assert gw.stats.received <= received + 1_000  # intake stopped (one read in hand at most)
        assert "disk_full" in gw.status()["paused"]
        assert gw.stats.reconnects == int(drop) and gw.stats.connect_failures == 0
        _FullDisk.full = False  # space returns
        truth = await run
        await _until(lambda: not gw.status()["disk_full"], 10, "resumed")
        await _until(lambda: gw.stats.decided + sum(gw.stats.rejected.values()) >= truth.sent, 60, "decided")
        assert await gw.drain(20)
        stop.set()
        await serve
    await rx.stop()
    records = list(iter_records(cfg.state_dir / "audit"))
    # each message decided exactly once (with a drop, what was in hand came again and was recognised)
    decided = _decided(cfg.state_dir)
    assert len(decided) == len(set(decided)) == truth.sent
    kinds = [r.get("kind") for r in records if r.get("event") == "alert"]
    assert "disk_full" in kinds and "disk_ok" in kinds
    # one alert for the episode, not one per failed retry (the disk stayed full for seconds)
    assert kinds.count("disk_full") == 1 and gw.stats.disk_full_events == 1
    ok = next(r for r in records if r.get("event") == "alert" and r.get("kind") == "disk_ok")
    assert ok.get("retries", 0) >= 1, ok
    assert verify_chain(cfg.state_dir / "audit").ok


@pytest.mark.broker
@pytest.mark.parametrize("sessions", ["lost", "shared-subscription"])
async def test_broker_restart_while_disk_full(tmp_path: Path, sessions: str) -> None:
    """A reconnect while the disk is full, the other ways back.

    - ``lost``: the broker comes back without the gateway's session (its persistence lost), so
      nothing is subscribed.
    - ``shared-subscription``: a worker (``edgeward run --workers``) whose session the broker
      restores. Its shared subscription receives nothing until subscribed again
      (test_workers.py pins that), so the resumed session must not be taken as subscribed.

    Either way the gateway subscribes anew, stays paused until the disk has room, and then takes
    what devices send (checked with a fleet started after the disk returned)."""
    shared = sessions == "shared-subscription"
    broker = start_broker(tmp_path / "broker", persistence=shared)
    try:
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None,
                            subscribe_timeout_s=2.0, share_group="edgeward" if shared else None)
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
                if shared:
                    broker.stop()  # written to its persistence file: the session comes back
                else:
                    broker.kill()
                broker.start()  # same port
                await _until(lambda: gw.stats.reconnects == 1 and gw.ingest.connected, 10, "reconnected")
                failed = gw.stats.connect_failures  # attempts while the broker was down
                await asyncio.sleep(3.0)  # longer than the SUBACK wait
                assert "disk_full" in gw.status()["paused"]
                assert gw.stats.connect_failures == failed, "connected once the broker was back"
            finally:
                _FullDisk.full = False  # space returns
            await _until(lambda: not gw.status()["disk_full"], 15, "resumed")
            before = gw.stats.decided
            taken = {d.device_id for d in first}
            second = [d for d in make_fleet(30, seed=13) if d.device_id not in taken]  # its own sequences
            truth = await Fleet(second, port=broker.port, seed=13, rate_scale=6, drop_every_s=None).run(2.0)
            await _until(lambda: gw.stats.decided - before >= truth.sent, 20, "the new fleet decided")
            assert gw.stats.decided - before == truth.sent
            assert await gw.drain(20), gw.status()
            stop.set()
            await serve
        assert verify_chain(cfg.state_dir / "audit").ok
    finally:
        broker.stop()


@pytest.mark.parametrize("share_group", [None, "edgeward"], ids=["gateway", "worker"])
async def test_start_on_a_full_disk_with_a_backlog_waits_for_space(tmp_path: Path, share_group: str | None) -> None:
    """A gateway (or a restarted worker) starting while its disk is full, with messages waiting in its
    session. The broker sends them before it answers the SUBSCRIBE; the first ones fill no disk, so
    intake pauses and the answer cannot be read. Start-up used to wait for it, time out and exit (a
    chaos run's restarted worker died so, and a supervisor would have restarted it into the same
    end). The gateway now starts, stays paused, and decides the backlog once there is room."""
    broker = start_broker(tmp_path / "broker")
    try:
        policy = load_policy(POLICY_DIR)
        cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, rate_headroom=None,
                            subscribe_timeout_s=2.0, share_group=share_group)
        async with Gateway(cfg, policy):
            pass  # the session and its subscription, then gone
        truth = await Fleet(make_fleet(10, seed=21), port=broker.port, seed=21, rate_scale=6,
                            drop_every_s=None).run(1.5)
        sent = {(t.device_id, t.seq) for t in truth.sent_records}
        gw = Gateway(cfg, policy)
        _fill_vault_disk(gw)
        stop = asyncio.Event()
        try:
            async with gw:  # before: TimeoutError, the SUBACK behind a backlog it had stopped reading
                serve = asyncio.create_task(gw.serve(stop))
                await _until(lambda: gw.status()["disk_full"], 10, "disk full noticed")
                await asyncio.sleep(2.5)  # longer than the SUBACK wait
                assert "disk_full" in gw.status()["paused"]
                assert gw.stats.reconnects == 0 and gw.stats.connect_failures == 0
                _FullDisk.full = False  # space returns
                await _until(lambda: not gw.status()["disk_full"], 15, "resumed")
                await _until(lambda: sent <= set(_decided(cfg.state_dir)), 20, "the backlog decided")
                assert await gw.drain(20), gw.status()
                stop.set()
                await serve
        finally:
            _FullDisk.full = False
        assert sorted(_decided(cfg.state_dir)) == sorted(sent)  # each once
        assert verify_chain(cfg.state_dir / "audit").ok
    finally:
        broker.stop()
