"""A destination's side of an MQTT uplink, for the demo, tests and benchmarks.

It stands in for the customs system, the EU hub and the vendor's service: subscribes to the uplink
topic tree with a persistent QoS-1 session, opens each envelope with the key it holds (proving the
data arrived encrypted and intact), and counts what each destination received, duplicates included,
with the end-to-end latency from the device's timestamp. With ``keep`` it also keeps every envelope
it opened, with its arrival time (monotonic), for leak measurements. A bundle (several envelopes in
one MQTT message, gateway.crypto.envelope) is opened envelope by envelope, each counted as if it had
come alone on ``<destination topic>/<device>/<stream>``.

A real destination sees 16 opaque bytes where the header's sequence is (gateway.crypto.seqid). This
stand-in is the operator's tool as well: when its keyring has the site's sequence key (``seq_ids``,
as a ``DataKeyring`` does) it reads the device's sequence back, so the harnesses can match what
arrived against ground truth; ``hidden_seqs`` counts the headers that carried a hidden sequence.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.codec import decode
from gateway.crypto.envelope import BUNDLE_PREFIX, Header, open_envelope, unbundle
from gateway.crypto.keys import DataKeyLookup
from gateway.errors import CryptoError
from gateway.runtime.mqtt import Message, MqttClient

__all__ = ["DestinationReceiver", "Received"]


@dataclass(frozen=True, slots=True)
class Received:
    """One envelope as its destination got it. ``arrival`` is the destination's ``time.monotonic()``
    when the batch holding it was read off the socket (0.0 when unknown): the timing a destination can
    observe, which is what a timing channel leaks through (``device_sim.report``)."""

    topic: str
    header: Header
    fields: dict[str, Any]
    arrival: float = 0.0
    wire_seq: int | bytes | None = None  # the header's sequence as the destination saw it (None: header.seq)


@dataclass
class DestinationReceiver:
    host: str
    port: int
    keyring: DataKeyLookup  # a DataKeyring, or anything that finds its keys the same way
    topic_filter: str = "edgeward/out/#"
    client_id: str = "edgeward-destinations"
    keep: bool = False
    clock: Callable[[], float] = time.time
    counts: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    undecryptable: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    openers: dict[str, Any] = field(default_factory=dict)  # destination -> RecipientOpener
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    hidden_seqs: int = 0
    bundled: int = 0  # envelopes (not duplicates) that came in bundles
    _seen: set[tuple[str, str, str, int | bytes]] = field(default_factory=set)
    _client: MqttClient | None = None

    async def start(self) -> None:
        self._client = MqttClient(
            host=self.host, port=self.port, client_id=self.client_id, on_messages=self._on_messages,
            username=self.username, password=self.password,
        )
        await self._client.connect()
        await self._client.subscribe((self.topic_filter, 1))

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.disconnect()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _on_messages(self, batch: list[Message]) -> None:
        arrival = time.monotonic()  # the read: every message of this batch arrived together
        now = self.clock()
        assert self._client is not None
        for m in batch:
            parts = m.topic.split("/")
            opener = self.openers.get(parts[2]) if len(parts) > 2 else None
            try:
                envelopes = unbundle(m.payload)
            except CryptoError:
                self.undecryptable += 1
                envelopes = []
            bundled = m.payload.startswith(BUNDLE_PREFIX)
            for env in envelopes:
                self._open(m.topic, env, opener, bundled, arrival, now)
            if m.packet_id is not None:
                self._client.ack(m.packet_id)

    def _open(self, topic: str, env: bytes, opener: Any, bundled: bool, arrival: float, now: float) -> None:
        try:
            if opener is not None:
                header, plaintext = opener.open(env)
            else:
                header, plaintext = open_envelope(self.keyring, env)
            fields = decode(plaintext)
        except (CryptoError, Exception):  # noqa: BLE001 - counted, never trusted
            self.undecryptable += 1
            return
        if bundled:  # the topic it would have had alone
            topic = f"{topic}/{header.device}/{header.stream}"
        wire_seq = header.seq
        if type(header.seq) is bytes:
            self.hidden_seqs += 1
            seq_ids = getattr(self.keyring, "seq_ids", None)
            real = seq_ids.reveal(header.device, header.seq) if seq_ids is not None else None
            if real is not None:
                header = dataclasses.replace(header, seq=real)
        key = (header.destination, header.device, header.stream, header.seq)
        if key in self._seen:
            self.duplicates += 1
            return
        self._seen.add(key)
        self.counts[header.destination] += 1
        self.bundled += bundled
        self.latencies_ms.append(now * 1000 - header.ts)
        if self.keep:
            self.messages.append(Received(topic, header, fields, arrival, wire_seq))
