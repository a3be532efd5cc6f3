"""Outgoing flow control (``runtime.mqtt``): while the transport says its buffer is past the high-water
mark, QoS-1 publishes wait unencoded and in order; when it drains they go, none lost, none twice, and a
publish resent after a reconnect keeps its DUP flag even if it waited."""

from __future__ import annotations

import mqtt5

from gateway.runtime.mqtt import _WRITE_AT, MqttClient, _Protocol
from tests.fakes import FakeTransport, packets_in


def _publishes(writes: list[bytes]) -> list[mqtt5.PublishPacket]:
    return packets_in(writes, mqtt5.PublishPacket)


def _client(high: int) -> tuple[MqttClient, FakeTransport]:
    client = MqttClient(host="127.0.0.1", port=1, client_id="t")
    client.connected, client._window = True, 1000
    proto = _Protocol(client)
    sock = FakeTransport(proto, high)
    proto.connection_made(sock)  # type: ignore[arg-type]
    return client, sock


def test_publishes_wait_unencoded_while_the_socket_is_full_and_go_in_order_when_it_drains() -> None:
    client, sock = _client(high=2 * _WRITE_AT)
    payload = b"i" * (_WRITE_AT // 4)
    pids = [client.publish("edgeward/out/x", payload) for _ in range(40)]
    client.flush()
    sent = _publishes(sock.writes)
    assert 0 < len(sent) < 40, "the socket filled: the rest must wait"
    assert client.pending_out == 40 and len(client._waiting) == 40 - len(sent)
    assert sock.buffered <= 2 * _WRITE_AT + _WRITE_AT + 1024  # at most one write past the mark
    while len(_publishes(sock.writes)) < 40:
        before = len(sock.writes)
        sock.drain()
        assert len(sock.writes) > before, "a drained socket takes more"
    assert [p.packet_id for p in _publishes(sock.writes)] == pids  # in order, each once
    assert all(not p.duplicate for p in _publishes(sock.writes))


def test_resent_publishes_keep_their_dup_flag_while_they_wait_across_another_reconnect() -> None:
    client, sock = _client(high=10 * _WRITE_AT)
    payload = b"r" * (_WRITE_AT // 2)
    pids = [client.publish("edgeward/out/x", payload) for _ in range(6)]
    client.flush()
    assert len(client._inflight) == 6 and not client._waiting
    # reconnect 1: everything in flight goes again, DUP set, into a socket that fills at once
    sock.writes.clear()
    sock.high, sock.buffered = _WRITE_AT, 0
    client._resend_inflight()
    first = _publishes(sock.writes)
    assert 0 < len(first) < 6 and all(p.duplicate for p in first)
    # reconnect 2 before the socket drained: the ones sent again go again; the rest still wait
    sock.writes.clear()
    sock.buffered = 0
    client._write_paused = False
    client._resend_inflight()
    while len(client._waiting):
        sock.drain()
    resent = _publishes(sock.writes)
    assert [p.packet_id for p in resent] == pids and all(p.duplicate for p in resent)
    assert not client._dup_ids


def test_no_packet_id_is_handed_out_twice_while_65535_publishes_are_outstanding() -> None:
    import pytest

    from gateway.errors import BrokerError

    client, _ = _client(high=1 << 40)
    client._write_paused = True  # nothing leaves: every publish waits
    for _ in range(65535):
        client.publish("edgeward/out/x", b"")
    with pytest.raises(BrokerError):
        client.publish("edgeward/out/x", b"")
