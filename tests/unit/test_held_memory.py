"""Sealed envelopes wait in memory for their re-timed batch and then for their uplink's PUBACK; images
make that large. Past ``max_held_mb`` ingest pauses (the broker keeps what it has not handed over)
until releases and acknowledgements bring the held bytes under half, and nothing is lost on the way."""

from __future__ import annotations

import time
from pathlib import Path

import mqtt5

from device_sim.devices import PayloadFactory, encode, make_fleet
from gateway.catalog import RESULT_STREAM
from gateway.policy import load_policy
from gateway.runtime.mqtt import Message
from gateway.runtime.service import Gateway, GatewayConfig
from tests.fakes import FakeTransport

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def test_ingest_pauses_while_batches_hold_too_many_bytes_and_resumes_after_the_release(tmp_path: Path) -> None:
    gw = Gateway(GatewayConfig(state_dir=tmp_path, port=1, rate_headroom=None, max_held_mb=0.25),
                 load_policy(POLICY_DIR))
    acks: list[int] = []
    gw.ingest.ack = lambda pid, ack_id=None: acks.append(pid)  # type: ignore[method-assign]
    try:
        now = int(time.time() * 1000)
        msgs = [Message(spec.topic(RESULT_STREAM), encode(PayloadFactory(spec, 1).make(RESULT_STREAM, 1, now)),
                        1, False, 10 + i, False, False)
                for i, spec in enumerate(make_fleet(24, seed=5))]
        gw._on_messages(msgs)
        assert gw._held_bytes() > 0.25 * 2**20, "the fleet's images should exceed the bound"  # X-ray images
        assert "memory" in gw._pause_reasons and gw.status()["held_mb"] > 0.25
        client = gw._default_link.client
        client.connected, client._window = True, 1000  # an uplink that takes the batch (no socket here)
        for ob in gw.outboxes.values():
            ob.next_release = 0.0  # the boundary has come: the batch moves to the uplink, still held
        gw._deliver_tick(0.02)
        assert sum(ob.queue_bytes for ob in gw.outboxes.values()) == 0
        assert "memory" in gw._pause_reasons, "published, not yet acknowledged: still in memory"
        for pid in list(gw._default_link.uplink_for):  # the uplink acknowledges everything
            client._on_control(mqtt5.PubAckPacket(pid))
        gw._flush_acks()
        assert gw._held_bytes() == 0 and "memory" not in gw._pause_reasons
        assert sorted(acks) == sorted(m.packet_id for m in msgs)  # every message acknowledged, none lost
    finally:
        gw.audit.close()


def test_bytes_waiting_in_an_uplink_socket_buffer_count_as_held(tmp_path: Path) -> None:
    """A broker that reads slower than the gateway writes leaves a second copy of what is in flight in
    the transport's buffer: it is memory too, so it counts against the bound."""
    gw = Gateway(GatewayConfig(state_dir=tmp_path, port=1, rate_headroom=None, max_held_mb=1.0),
                 load_policy(POLICY_DIR))
    try:
        assert gw._held_bytes() == 0
        gw.uplink._transport = FakeTransport(buffered=3 * 2**20)  # type: ignore[assignment]
        assert gw._held_bytes() == 3 * 2**20
        gw._on_messages([])
        assert "memory" in gw._pause_reasons
    finally:
        gw.audit.close()


def test_envelopes_held_for_excess_volume_count_as_held(tmp_path: Path) -> None:
    """Envelopes beyond a device's normal rate wait ``burst_hold_s`` in memory too: a fleet bursting
    images must meet the same bound, and what is withdrawn or released leaves the count."""
    gw = Gateway(GatewayConfig(state_dir=tmp_path, port=1, max_held_mb=0.25, burst_hold_s=30.0, isolate_after=0),
                 load_policy(POLICY_DIR))
    gw.ingest.ack = lambda pid, ack_id=None: None  # type: ignore[method-assign]
    try:
        now = int(time.time() * 1000)
        xray = [spec for spec in make_fleet(24, seed=5) if spec.device_type == "xray_baggage"][:2]
        assert len(xray) == 2
        msgs = [Message(spec.topic(RESULT_STREAM), encode(PayloadFactory(spec, 1).make(RESULT_STREAM, seq, now)),
                        1, False, 10 * seq + i, False, False)
                for seq in range(1, 13) for i, spec in enumerate(xray)]  # beyond their slack (~7)
        gw._on_messages(msgs)
        held = [e for p in gw._probation.values() for e in p.held]
        held_bytes = sum(len(e[3]) for e in held)
        queued = sum(ob.queue_bytes for ob in gw.outboxes.values())
        assert held and queued, "each device's first messages (its slack) are queued for their batch, the rest held"
        assert gw._held_bytes() == held_bytes + queued
        assert "memory" in gw._pause_reasons and gw.status()["held_mb"] > 0.25
        gw._withdraw(xray[0].device_id, "detect.burst")  # one trips its baseline: what it held never leaves
        gw._release_held(time.monotonic(), everything=True)  # the other's hold is over: into its batch
        assert gw._held_bytes() == sum(ob.queue_bytes for ob in gw.outboxes.values()) > queued
        assert not any(p.held for p in gw._probation.values())
    finally:
        gw.audit.close()
