"""Values that cross module boundaries: what the policy is asked, and what it answers.

The policy engine sees ``MessageFacts`` (names and data classes, never values) and returns a
``Decision``; the pipeline applies the decision to the decoded payload and the audit log stores the
decision as it is. All values are frozen and slotted.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Final

__all__ = ["MessageFacts", "Route", "Decision"]


def _probe() -> None:
    """Compiled by mypyc, a module's functions are built-in functions; from source, Python functions."""


COMPILED: Final = not isinstance(_probe, types.FunctionType)  # gateway/_native.py: all modules or none
_FACT_NAMES: Final = ("device_id", "device_type", "vendor", "site", "topic", "stream", "size", "fields")


@dataclass(frozen=True, slots=True, init=False)
class MessageFacts:
    """What the policy decides on. ``fields`` is ``((name, data_class), ...)`` in payload order.

    Built for every message. The dataclass's own ``__init__`` is Python even when compiled (1.3 µs, a
    ``object.__setattr__`` a field); compiled, the stores below go straight into the object (0.03 µs).
    Frozen, equal, hashable and printed as a dataclass either way."""

    device_id: str
    device_type: str
    vendor: str
    site: str
    topic: str
    stream: str
    size: int
    fields: tuple[tuple[str, str], ...]

    def __init__(self, device_id: str, device_type: str, vendor: str, site: str, topic: str, stream: str,
                 size: int, fields: tuple[tuple[str, str], ...]) -> None:
        if COMPILED:  # a native class: its attributes are stored directly, past the frozen __setattr__
            self.device_id = device_id  # type: ignore[misc]
            self.device_type = device_type  # type: ignore[misc]
            self.vendor = vendor  # type: ignore[misc]
            self.site = site  # type: ignore[misc]
            self.topic = topic  # type: ignore[misc]
            self.stream = stream  # type: ignore[misc]
            self.size = size  # type: ignore[misc]
            self.fields = fields  # type: ignore[misc]
        else:  # from source, the frozen __setattr__ refuses a plain store: what the dataclass does
            values = (device_id, device_type, vendor, site, topic, stream, size, fields)
            for name, value in zip(_FACT_NAMES, values):
                object.__setattr__(self, name, value)


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
