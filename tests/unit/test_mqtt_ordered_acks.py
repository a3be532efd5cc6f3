"""Ordered acknowledgements (``MqttClient(ordered_acks=True)``, the gateway's ingest): PUBACKs leave in
the order the broker sent the messages, whatever order the owner finishes them in, and each message is
acknowledged by its own ``ack_id``, because Mosquitto can send a second message under a packet id that
is still unacknowledged (it numbers queued messages when it queues them, eclipse-mosquitto#2431)."""

from __future__ import annotations

import time
from pathlib import Path

import mqtt5

from device_sim.devices import PayloadFactory, encode, make_fleet
from gateway.catalog import RESULT_STREAM
from gateway.policy import load_policy
from gateway.runtime.mqtt import Message, MqttClient, _Protocol
from gateway.runtime.service import Gateway, GatewayConfig
from tests.fakes import FakeTransport, pubacks_in


def _publish(pid: int, i: int) -> bytes:
    return mqtt5.PublishPacket(f"site/dev/{i}", b"x", qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid).write()


def _written(t: FakeTransport) -> list[int]:
    return pubacks_in(t.writes)


def _client(ack_wait_s: float = 10.0) -> tuple[MqttClient, _Protocol, FakeTransport, list[Message]]:
    got: list[Message] = []
    client = MqttClient(host="127.0.0.1", port=1, client_id="t", on_messages=got.extend, ordered_acks=True,
                        ack_wait_s=ack_wait_s)
    client.connected = True
    transport = FakeTransport()
    proto = _Protocol(client)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return client, proto, transport, got


def test_acks_leave_in_arrival_order_whatever_order_the_owner_finishes_in() -> None:
    client, proto, transport, got = _client()
    proto.data_received(b"".join(_publish(pid, i) for i, pid in enumerate([5, 6, 7, 8])))
    assert [m.packet_id for m in got] == [5, 6, 7, 8] and len({m.ack_id for m in got}) == 4
    before = len(transport.writes)
    client.ack(7, got[2].ack_id)
    client.ack(6, got[1].ack_id)
    client.flush()
    assert _written(transport) == [] and client.acks_waiting == 2, "5 is older and not acknowledged yet"
    client.ack(5, got[0].ack_id)
    client.flush()
    assert _written(transport) == [5, 6, 7] and client.acks_waiting == 0
    client.ack(8, got[3].ack_id)
    client.flush()
    assert _written(transport) == [5, 6, 7, 8] and len(transport.writes) == before + 2


def test_a_reused_packet_id_is_counted_and_each_message_acknowledged_on_its_own() -> None:
    client, proto, transport, got = _client()
    # the broker queued more than 65,535 messages: id 9 comes again while the first 9 is unacknowledged
    proto.data_received(_publish(9, 0) + _publish(10, 1) + _publish(9, 2))
    assert [m.packet_id for m in got] == [9, 10, 9] and client.reused_ids == 1
    first, second = got[0], got[2]
    assert first.ack_id != second.ack_id
    client.ack(9, second.ack_id)  # the younger one is done first: nothing may acknowledge the older
    client.ack(10, got[1].ack_id)
    client.flush()
    assert _written(transport) == []
    client.ack(9, first.ack_id)
    client.flush()
    # in arrival order: the broker deletes the older 9 on the first PUBACK, the younger on the second
    assert _written(transport) == [9, 10, 9]


def test_a_message_held_past_the_wait_stops_holding_the_others_back() -> None:
    client, proto, transport, got = _client(ack_wait_s=0.0)  # every wait is "too long" here
    proto.data_received(b"".join(_publish(pid, i) for i, pid in enumerate([1, 2, 3])))
    client.ack(2, got[1].ack_id)  # 1 is held (say a 30 s burst hold): 2 and 3 must not wait for it
    client.ack(3, got[2].ack_id)
    client.flush()
    assert _written(transport) == [2, 3] and client.acks_set_aside == 1
    client.ack(1, got[0].ack_id)  # done at last: acknowledged on its own
    client.flush()
    assert _written(transport) == [2, 3, 1] and client.acks_set_aside == 0


def test_release_writes_what_waits_and_a_lost_connection_forgets_everything() -> None:
    client, proto, transport, got = _client()
    proto.data_received(b"".join(_publish(pid, i) for i, pid in enumerate([1, 2, 3])))
    client.ack(3, got[2].ack_id)
    client.release_acks()  # stopping: what is finished is acknowledged; 1 and 2 are redelivered later
    client.flush()
    assert _written(transport) == [3]
    client._lost(None)
    assert client.acks_waiting == 0
    client.ack(1, got[0].ack_id)  # for a connection that is gone: not written on the next one
    assert client._out == []


def test_without_an_ack_id_an_acknowledgement_goes_as_it_is() -> None:
    client, proto, transport, _ = _client()
    proto.data_received(_publish(1, 0) + _publish(2, 1))
    client.ack(2)  # an owner that does not use ack ids (the destinations): written at once
    client.flush()
    assert _written(transport) == [2]


def test_the_gateway_keeps_two_messages_under_one_packet_id_apart(tmp_path: Path) -> None:
    policy = load_policy(Path(__file__).resolve().parents[2] / "policies")
    gw = Gateway(GatewayConfig(state_dir=tmp_path, port=1, rate_headroom=None, retime=False), policy)
    acks: list[tuple[int, int | None]] = []
    gw.ingest.ack = lambda pid, ack_id=None: acks.append((pid, ack_id))  # type: ignore[method-assign]
    try:
        now = int(time.time() * 1000)
        msgs = []
        for i, spec in enumerate(make_fleet(6, seed=1)):
            payload = encode(PayloadFactory(spec, 1).make(RESULT_STREAM, 1, now))
            msgs.append(Message(spec.topic(RESULT_STREAM), payload, 1, False, 9, False, False, 100 + i))
        gw._on_messages(msgs)  # six messages, all under packet id 9, each with its own ack id
        link = gw._default_link
        for pid in list(link.uplink_for):
            gw._on_uplink_ack(link, pid)
        assert sorted(acks) == [(9, 100 + i) for i in range(6)]  # each acknowledged once, by its own id
        assert not gw._pending
        assert gw.status()["ingest_acks"] == {"waiting": 0, "set_aside": 0, "reused_ids": 0}
    finally:
        gw.audit.close()
