"""One socket read can hold hundreds of PUBLISHes: the client hands them to the gateway in chunks and
writes what each chunk produced (its PUBACKs) before working on the next, so the first message of a
read does not wait for the last (the gateway-added latency at load is bounded by a chunk, not a read)."""

from __future__ import annotations

import mqtt5

from gateway.runtime.mqtt import MqttClient, _Protocol
from tests.fakes import FakeTransport, pubacks_in


def _publishes(n: int) -> bytes:
    return b"".join(
        mqtt5.PublishPacket(f"site/dev/{i}", b"x" * 40, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=i + 1).write()
        for i in range(n))


def _client(chunk: int) -> tuple[MqttClient, _Protocol, FakeTransport, list[tuple[int, int]]]:
    calls: list[tuple[int, int]] = []  # (first packet id, size) per on_messages call
    transport = FakeTransport()

    def on_messages(batch: list) -> None:
        # what was written before this chunk was handed over: every earlier chunk's PUBACKs
        acked = [pid for w in transport.writes for pid in pubacks_in([w])]
        assert acked == list(range(1, batch[0].packet_id)), "an earlier chunk's PUBACKs were not written first"
        calls.append((batch[0].packet_id, len(batch)))
        for m in batch:
            client.ack(m.packet_id)

    client = MqttClient(host="127.0.0.1", port=1, client_id="t", on_messages=on_messages, chunk=chunk)
    client.connected = True
    proto = _Protocol(client)
    proto.connection_made(transport)  # type: ignore[arg-type]
    return client, proto, transport, calls


def test_a_large_read_is_handed_over_in_chunks_each_acknowledged_before_the_next() -> None:
    client, proto, transport, calls = _client(chunk=64)
    data = _publishes(200)
    proto.data_received(data[:-7])  # the last packet arrives incomplete
    assert calls == [(1, 64), (65, 64), (129, 64), (193, 7)]
    assert [pid for w in transport.writes for pid in pubacks_in([w])] == list(range(1, 200))
    assert len(transport.writes) == 4
    proto.data_received(data[-7:])
    assert calls[-1] == (200, 1)
    assert [pid for w in transport.writes for pid in pubacks_in([w])] == list(range(1, 201))
    assert client.received == 200


def test_a_small_read_is_one_call() -> None:
    _, proto, transport, calls = _client(chunk=64)
    proto.data_received(_publishes(10))
    assert calls == [(1, 10)]
    assert len(transport.writes) == 1
