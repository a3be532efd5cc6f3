"""In-memory stand-ins for unit tests of the pure core (never used by integration tests)."""

from __future__ import annotations

from dataclasses import dataclass

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
