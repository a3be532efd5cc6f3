"""A resumed session redelivers its unacknowledged messages together with the CONNACK, before
``MqttClient.connect`` has returned: the PUBACKs the owner writes for them must reach the broker, or
Mosquitto redelivers the same messages on every later connection (the chaos run's "decided again
in every later gateway life")."""

from __future__ import annotations

import asyncio

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
