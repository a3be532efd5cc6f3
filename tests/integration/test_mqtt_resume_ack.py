"""A resumed session redelivers its unacknowledged messages together with the CONNACK, before
``MqttClient.connect`` has returned: the PUBACKs the owner writes for them must reach the broker, or
Mosquitto redelivers the same messages on every later connection (the chaos run's "decided again
in every later gateway life")."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.mqtt import Message, MqttClient


async def _life(port: int, *, ack: bool) -> list[Message]:
    got: list[Message] = []
    client: MqttClient

    def on_messages(batch: list[Message]) -> None:
        got.extend(batch)
        if ack:
            for m in batch:
                if m.packet_id is not None:
                    client.ack(m.packet_id)

    client = MqttClient(host="127.0.0.1", port=port, client_id="gw-resume", on_messages=on_messages)
    await client.connect()
    await client.subscribe(("t/#", 1))
    await asyncio.sleep(0.5)
    if ack:
        await client.disconnect()
    else:
        client.abort()  # kill -9: nothing acknowledged
        await asyncio.sleep(0.2)
    return got


@pytest.mark.broker
async def test_pubacks_for_messages_redelivered_with_the_connack_are_sent(broker: MosquittoBroker) -> None:
    first = asyncio.create_task(_life(broker.port, ack=False))
    await asyncio.sleep(0.2)
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="pub", clean_start=True)
    await pub.connect()
    for i in range(10):
        pub.publish(f"t/{i}", b"x")
    pub.flush()
    await asyncio.sleep(0.3)
    await pub.disconnect()
    assert len(await first) == 10
    again = await _life(broker.port, ack=True)  # redelivered at once, PUBACKed at once
    assert len(again) == 10 and all(m.duplicate for m in again)
    assert await _life(broker.port, ack=True) == []  # the broker had the PUBACKs: nothing comes back


@pytest.mark.broker
async def test_subscribe_waits_for_a_suback_queued_behind_a_resumed_backlog(broker: MosquittoBroker) -> None:
    """A restarted gateway resumes its session and Mosquitto sends the backlog before the SUBACK. As
    long as the backlog keeps coming, SUBSCRIBE is answered late, not lost: a fixed wait made a
    restart after a long outage fail at start (honest_fp.py --restart-at, 1,000 devices, 60 s down)."""
    n = 20_000
    first = MqttClient(host="127.0.0.1", port=broker.port, client_id="gw-backlog", on_messages=lambda b: None)
    await first.connect()
    await first.subscribe(("t/#", 1))
    await first.disconnect()
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="pub-backlog", clean_start=True)
    await pub.connect()
    for i in range(n):
        pub.publish(f"t/{i % 10}", b"x" * 100)
    pub.flush()
    while pub.pending_out:
        await asyncio.sleep(0.05)
    await pub.disconnect()

    got = 0
    busy_until = 0.0
    resume: asyncio.TimerHandle | None = None

    def slow(batch: list[Message]) -> None:  # a gateway busy 0.1 ms a message, its event loop free
        nonlocal got, busy_until, resume
        got += len(batch)
        for m in batch:
            if m.packet_id is not None:
                again.ack(m.packet_id)
        transport = again.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        busy_until = max(busy_until, loop.time()) + 0.0001 * len(batch)
        transport.pause_reading()
        if resume is not None:
            resume.cancel()
        resume = loop.call_at(busy_until, transport.resume_reading)

    again = MqttClient(host="127.0.0.1", port=broker.port, client_id="gw-backlog", on_messages=slow)
    t0 = time.monotonic()
    await again.connect()
    codes = await again.subscribe(("t/#", 1), timeout=0.4)  # the backlog alone takes ~2 s
    assert codes == [1]
    assert time.monotonic() - t0 > 0.4 and got > 0, "the SUBACK came behind the backlog, after the timeout"
    await again.disconnect()


@pytest.mark.broker
async def test_connect_over_a_live_connection_replaces_it(broker: MosquittoBroker) -> None:
    """A caller that connects again without closing first (the gateway's serve loop retrying after a
    failed SUBSCRIBE): the old connection goes, and its late ``connection_lost`` must not mark the new
    one lost (it did: the gateway's ingest stayed "disconnected" for good)."""
    got: list[Message] = []
    client = MqttClient(host="127.0.0.1", port=broker.port, client_id="gw-twice", on_messages=got.extend)
    await client.connect()
    first_closed = client.closed
    await client.connect()
    assert first_closed is not None and first_closed.done()  # the old connection is over for its waiters
    await client.subscribe(("twice/#", 0))
    await asyncio.sleep(0.2)  # the old transport's connection_lost has run by now
    assert client.connected and client.transport is not None and not client.closed.done()
    pub = MqttClient(host="127.0.0.1", port=broker.port, client_id="pub-twice", clean_start=True)
    await pub.connect()
    pub.publish("twice/a", b"x", qos=0)
    pub.flush()
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    assert [m.payload for m in got] == [b"x"]
    await pub.disconnect()
    await client.disconnect()
