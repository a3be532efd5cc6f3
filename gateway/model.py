"""Values that cross module boundaries: what the policy is asked, and what it answers.

The policy engine sees ``MessageFacts`` (names and data classes, never values) and returns a
``Decision``; the pipeline applies the decision to the decoded payload and the audit log stores the
decision as it is. All values are frozen and slotted.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MessageFacts", "Route", "Decision"]


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the policy decides on. ``fields`` is ``((name, data_class), ...)`` in payload order."""

    device_id: str
    device_type: str
    vendor: str
    site: str
    topic: str
    stream: str
    size: int
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Route:
    """The decision for one destination.

    ``fields`` are the fields that go (in payload order); ``removed`` pairs each withheld field with
    its reason code; ``quantize`` pairs a field with the step it must be rounded to before it goes;
    ``rules`` are the ids of the rules that decided; ``reason`` is the deny reason code ('' if allowed).
    """

    destination: str
    allow: bool
    fields: tuple[str, ...] = ()
    removed: tuple[tuple[str, str], ...] = ()
    quantize: tuple[tuple[str, float], ...] = ()
    rules: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The whole answer for one message: a route per destination, the revision that produced it,
    and any rule errors met on the way (an erroring rule never grants)."""

    revision: str
    routes: tuple[Route, ...]
    errors: tuple[str, ...] = ()

    @property
    def allowed(self) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.allow)
