"""The ingest connection breaks while a message's deliveries still wait in a re-timing batch: the
broker redelivers it, dedupe calls the redelivery a duplicate, and its PUBACK must wait until those
deliveries are done (acknowledged at once, a kill -9 before the batch leaves would lose them)."""

from __future__ import annotations

import time
from pathlib import Path

from device_sim.devices import PayloadFactory, encode, make_fleet
from gateway.catalog import RESULT_STREAM
from gateway.policy import load_policy
from gateway.runtime.mqtt import Message
from gateway.runtime.service import Gateway, GatewayConfig

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def test_a_duplicate_redelivery_is_acknowledged_only_when_the_first_deliveries_are_done(tmp_path: Path) -> None:
    gw = Gateway(GatewayConfig(state_dir=tmp_path, port=1, rate_headroom=None), load_policy(POLICY_DIR))
    acks: list[int] = []
    gw.ingest.ack = lambda pid, ack_id=None: acks.append(pid)  # type: ignore[method-assign]
    try:
        queued: list[tuple[object, ...]] = []
        for spec in make_fleet(6, seed=1):  # a device whose results some MQTT destination receives
            payload = encode(PayloadFactory(spec, 1).make(RESULT_STREAM, 1, int(time.time() * 1000)))
            msg = Message(spec.topic(RESULT_STREAM), payload, 1, False, 7, False, False)
            gw._on_messages([msg])
            queued = [ref for ob in gw.outboxes.values() for _, _, ref in ob.queue]
            if queued:
                break
        assert queued and acks == [], "waits in a re-timing batch, not acknowledged yet"

        gw._reset_pending()  # the ingest connection broke; the broker redelivers with a new packet id
        gw._on_messages([Message(msg.topic, msg.payload, 1, False, 3, True, False)])
        assert gw.stats.duplicates == 1
        assert acks == [], "the redelivery must wait for the deliveries still in the batch"
        for ref in queued:
            gw._settle(ref)  # the destinations' brokers acknowledge the batch
        assert acks == [3]
    finally:
        gw.audit.close()
