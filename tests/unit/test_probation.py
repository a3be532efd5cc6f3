"""Holding excess volume (``burst_hold_s``): what a device sends beyond its normal-rate allowance waits,
and leaves as soon as the device has paid for it out of that allowance by slowing down, or when the
hold is over; a device that keeps bursting pays nothing back and keeps it held until then."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from device_sim.devices import DeviceSpec, PayloadFactory, encode, make_fleet
from gateway.catalog import RESULT_STREAM
from gateway.detect import RateBaseline
from gateway.policy import load_policy
from gateway.runtime.mqtt import Message
from gateway.runtime.service import PROBATION_CATCH_UP, PROBATION_REFILL, Gateway, GatewayConfig
from gateway.runtime.shared_state import SharedDeviceState

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
HOLD_S = 30.0


def _gateway(state: Path, shared: Any = None) -> Gateway:
    """A site's gateway (excess volume held HOLD_S), driven by calling its ingest callback directly;
    with ``shared``, a worker on that SharedDeviceState view."""
    gw = Gateway(GatewayConfig(state_dir=state, port=1, burst_hold_s=HOLD_S, isolate_after=0),
                 load_policy(POLICY_DIR), dedupe=shared, rate=shared)
    gw.ingest.ack = lambda pid, ack_id=None: None  # type: ignore[method-assign]
    return gw


def _xray_units(n: int) -> list[DeviceSpec]:
    return [spec for spec in make_fleet(24, seed=5) if spec.device_type == "xray_baggage"][:n]


def _results(spec: DeviceSpec, seqs: range, ms: int, *, pids: int = 0) -> list[Message]:
    """Result messages ``seqs`` of one device, at QoS 1 with packet ids ``pids + seq``."""
    return [Message(spec.topic(RESULT_STREAM), encode(PayloadFactory(spec, 1).make(RESULT_STREAM, seq, ms)),
                    1, False, pids + seq, False, False) for seq in seqs]


def test_held_excess_leaves_once_the_allowance_has_paid_for_it(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    try:
        slowed, bursting = _xray_units(2)
        ms = int(time.time() * 1000)
        start = time.monotonic()
        gw._on_messages(_results(slowed, range(1, 6), ms))
        p = gw._probation[slowed.device_id]
        assert p.held and p.tokens < 0.0, "a device first seen has earned one message of allowance, not 5"
        owed_s = -p.tokens / p.rate  # the allowance has paid for what is held after this long
        assert 0.0 < owed_s < HOLD_S / 2
        gw._on_messages(_results(bursting, range(1, 21), ms, pids=100))
        assert gw._probation[bursting.device_id].held

        gw._release_held(start + owed_s / 2)
        assert p.held, "still owed: the hold stays"
        gw._release_held(start + owed_s + 0.5)
        assert not p.held, "paid for out of the allowance: no reason to wait out the whole hold"
        assert gw._probation[bursting.device_id].held, "20 at once (inside its baseline): owed for longer"
        queued = [ref[2] for ob in gw.outboxes.values() for _, _, ref in ob.queue]
        assert queued.count(slowed.device_id) >= 5, "all of it, into its re-timed batch"

        gw._release_held(start + HOLD_S + 2.0)  # the hold is over without a trip: the rest goes too
        assert not gw._probation[bursting.device_id].held and gw._probation_bytes == 0
    finally:
        gw.audit.close()


def test_a_restart_backlog_is_credited_not_held(tmp_path: Path) -> None:
    """After a restart the broker delivers every device's backlog at once; the gateway caused that
    burst, so each device's allowance is credited its downtime (as the rate baseline is), and honest
    backlog is not held for the whole hold."""
    xray, beyond = _xray_units(2)
    ms = int(time.time() * 1000)

    first = _gateway(tmp_path)
    refill, _slack = first._nominal_limits("xray_baggage")
    down_s = 60.0  # its backlog stays inside its rate baseline's burst (75 s of normal traffic)
    backlog = int(refill / PROBATION_REFILL * down_s)  # what it sent at its normal rate meanwhile
    assert backlog >= 5
    first._on_messages(_results(xray, range(1, backlog + 1), ms))
    assert xray.device_id in first._holding, "a device first seen has one message of allowance"
    first._flush_out()
    first.audit.close()
    for f in (tmp_path / "audit").glob("audit-*.jsonl"):  # the gateway stopped down_s ago
        os.utime(f, (time.time() - down_s, time.time() - down_s))

    again = _gateway(tmp_path)
    try:
        again._on_messages(_results(xray, range(backlog + 1, 2 * backlog + 1), ms))
        assert xray.device_id not in again._holding, "its downtime's backlog: credited, not a debt"
        assert again.stats.held == 0
        credit = PROBATION_CATCH_UP * refill * down_s  # 2.5 x its normal traffic over the downtime
        again._on_messages(_results(beyond, range(1, int(credit) + 10), ms, pids=1000))
        assert beyond.device_id in again._holding, "a credit, not a pass: more than it is still held"
    finally:
        again.audit.close()


def test_an_ingest_outage_credits_known_devices_but_not_what_they_held(tmp_path: Path) -> None:
    gw = _gateway(tmp_path)
    try:
        quiet, bursting = _xray_units(2)
        ms = int(time.time() * 1000)
        gw._on_messages(_results(quiet, range(1, 2), ms))
        gw._on_messages(_results(bursting, range(1, 21), ms, pids=100))
        assert quiet.device_id not in gw._holding and bursting.device_id in gw._holding
        refill = gw._probation[quiet.device_id].rate
        out_s = 60.0
        backlog = int(refill / PROBATION_REFILL * out_s)
        gw._last_read = time.monotonic() - out_s  # nothing read from any device for a minute
        gw._on_messages(_results(quiet, range(2, 2 + backlog), ms))
        assert quiet.device_id not in gw._holding, "the outage's backlog is credited"
        before = gw._probation[bursting.device_id].tokens
        gw._on_messages(_results(bursting, range(21, 22), ms, pids=100))
        assert bursting.device_id in gw._holding, "what it held was sent before the outage: still owed"
        assert gw._probation[bursting.device_id].tokens < before + refill * out_s / 2
    finally:
        gw.audit.close()


def test_workers_hold_against_one_allowance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With workers the broker spreads a device's messages over them. Each worker held against a whole
    allowance, so an x8 burst split 4/4 between two went out whole (measured: 5 of 32 burst groups
    intact in a 120 s timing-burst run on `edgeward run --workers 2`). The allowance is now one per
    device in the shared state: two workers hold what one gateway holds."""
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    xray, other = _xray_units(2)
    ms = int(time.time() * 1000)

    def burst(gateways: list[Gateway]) -> int:
        n = len(gateways)

        def send(seqs: range) -> None:  # the broker spreads a device's messages over the workers in turn
            for seq in seqs:
                gateways[seq % n]._on_messages(_results(xray, range(seq, seq + 1), ms))

        send(range(1, 3))  # every worker knows the device
        p = gateways[0]._probation[xray.device_id]
        for k in range(int(p.cap / p.rate / 5.0) + 1):  # long enough to refill the whole slack
            clock[0] += 5.0
            for gw in gateways:  # another device keeps the ingest busy: no outage, no credit
                gw._on_messages(_results(other, range(k + 1, k + 2), ms, pids=1000 + k))
                gw._release_held(clock[0])  # as the deliverer does
        assert not any(gw._holding for gw in gateways)
        send(range(3, 3 + int(p.cap) + 4))  # a burst a little beyond the slack, all at once
        return sum(len(p.held) for gw in gateways if (p := gw._holding.get(xray.device_id)) is not None)

    one = _gateway(tmp_path / "one")
    state = SharedDeviceState(capacity=64, window=64, stripes=4, rate=RateBaseline(), workers=2)
    workers = [_gateway(tmp_path / f"w{i}", state.for_worker(i)) for i in range(2)]
    try:
        alone = burst([one])
        assert alone >= 1, "the burst goes beyond the slack: cut by the hold"
        assert burst(workers) == alone
    finally:
        for gw in (one, *workers):
            gw.audit.close()
        state.close()


def test_a_trip_seen_by_one_worker_withdraws_what_another_holds(tmp_path: Path) -> None:
    """The worker that sees a device trip its baseline withdraws what it holds of the device; another
    worker holding some of the same burst must not let it go when its hold is over."""
    xray = _xray_units(1)[0]
    ms = int(time.time() * 1000)
    state = SharedDeviceState(capacity=64, window=64, stripes=4, rate=RateBaseline(), workers=2)
    w0, w1 = (_gateway(tmp_path / f"w{i}", state.for_worker(i)) for i in range(2))
    try:
        w1._on_messages(_results(xray, range(1, 11), ms))  # a burst: held by the worker that got it
        assert xray.device_id in w1._holding and not w1.stats.rejected
        seq = 11
        while not w0.stats.rejected and seq < 2_000:  # more of it, to the other worker, until it trips
            w0._on_messages(_results(xray, range(seq, seq + 1), ms))
            seq += 1
        assert w0.stats.rejected["detect.burst"] == 1
        def queued() -> int:
            return sum(ref[2] == xray.device_id for ob in w1.outboxes.values() for _, _, ref in ob.queue)

        before = queued()  # its first message, inside the allowance, went on
        w1._release_held(time.monotonic() + HOLD_S + 1.0)  # its hold is over, and w1 saw no trip itself
        assert xray.device_id not in w1._holding
        assert queued() == before, "withdrawn, not released"
        assert sum(n for k, n in w1.stats.undelivered.items() if k.endswith(":withheld:detect.burst")) >= 9
    finally:
        for gw in (w0, w1):
            gw.audit.close()
        state.close()
