"""In-memory stand-ins for unit tests of the pure core (never used by integration tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mqtt5

from gateway.catalog import DEVICE_TYPES
from gateway.model import Decision, MessageFacts, Route


@dataclass(frozen=True)
class FakeDestination:
    name: str
    transport: str
    topic: str
    jurisdiction: str


@dataclass(frozen=True)
class FakeDevice:
    device_id: str
    device_type: str
    vendor: str


class FakePolicy:
    """Vault gets everything; 'customs' gets verdict-class fields only; 'vendor' nothing."""

    revision = "fake-rev"
    site = "AMS-T1"

    def __init__(self) -> None:
        self.destinations = {
            "vault": FakeDestination("vault", "vault", "", "on_prem"),
            "customs": FakeDestination("customs", "mqtt", "edgeward/out/customs", "NL"),
            "vendor": FakeDestination("vendor", "mqtt", "edgeward/out/vendor", "CN"),
        }

    def device(self, device_id: str) -> FakeDevice | None:
        prefix = device_id.split("-")[0]
        for t in DEVICE_TYPES.values():
            if t.id_prefix == prefix:
                return FakeDevice(device_id, t.name, "acme")
        return None

    def decide(self, facts: MessageFacts) -> Decision:
        names = tuple(n for n, _ in facts.fields)
        verdicts = tuple(n for n, c in facts.fields if c == "verdict")
        removed = tuple((n, "policy.class_not_allowed") for n, c in facts.fields if c != "verdict")
        return Decision(
            self.revision,
            (
                Route("vault", True, names, rules=("vault-all",)),
                Route("customs", True, verdicts, removed, rules=("customs-verdicts",)),
                Route("vendor", False, rules=("default-deny",), reason="policy.default_deny"),
            ),
        )


class FakeTransport:
    """What an asyncio transport is to ``runtime.mqtt._Protocol``: it records the writes and keeps them
    as its buffer until ``drain``. With a protocol and ``high``, a buffer past ``high`` bytes pauses the
    protocol's writing and ``drain`` resumes it, as asyncio's transports do."""

    def __init__(self, proto: Any = None, high: int | None = None, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.proto, self.high, self.buffered = proto, high, buffered

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.buffered += len(data)
        if self.high is not None and self.buffered > self.high:
            self.proto.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        if self.proto is not None:
            self.proto.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def packets_in(writes: list[bytes], kind: type) -> list[Any]:
    """The packets in ``writes``, in order; each must be of ``kind`` (anything else fails the test)."""
    out = []
    for data in writes:
        mv, pos = memoryview(data), 0
        while pos < len(data):
            pkt, n = mqtt5.read(mv[pos:])
            pos += n
            assert type(pkt) is kind
            out.append(pkt)
    return out


def pubacks_in(writes: list[bytes]) -> list[int]:
    """The packet ids of the PUBACKs in ``writes``, in order (anything else fails the test)."""
    return [pkt.packet_id for pkt in packets_in(writes, mqtt5.PubAckPacket)]
