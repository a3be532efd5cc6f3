"""Firmware profiles: the seam where a device's firmware decides what actually goes on the wire.

The fleet builds an honest ``Outgoing`` message (topic, payload map, no MQTT 5 properties, not
retained, QoS 1) and hands it to the device's profile, which returns what to publish instead: the
same message (``Honest``), a changed one, several, or none. Each returned message carries ``tags``
naming what the profile did, and those tags go into the ground truth, so every hostile behaviour the
gateway must stop is measured against a record of what was really attempted.

Profiles are synchronous and pure apart from the ``random.Random`` they are given: no sockets, no
clock. Hostile profiles (covert fields, steganography, dead drops...) live in their own modules and
are chosen per device by the YAML scenarios in ``device_sim/scenarios/``; this module defines the
protocol and the honest default only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from device_sim.devices import DeviceSpec

__all__ = ["Outgoing", "Will", "FirmwareProfile", "Honest", "HONEST"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One publish as the firmware means to send it.

    ``payload`` is the map that will be MessagePack-encoded, unless ``raw`` is set, in which case those
    exact bytes are sent (for profiles that need malformed or hand-built payloads). ``properties`` are
    MQTT 5 properties as a plain dict (``{"user_property": [("k", "v")], "correlation_data": b"..."}``),
    turned into paho ``Properties`` only at the wire.
    """

    stream: str
    seq: int
    topic: str
    payload: dict[str, Any]
    raw: bytes | None = None
    qos: int = 1
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    technique: str = ""  # the hostile technique this message carries; '' for an honest one
    secret: bytes | None = None  # the exact bytes it tries to leak (ground truth for leak search)


@dataclass(frozen=True, slots=True)
class Will:
    """A will message a profile registers at connect (the broker publishes it on an abnormal close)."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1
    technique: str = "dead_drop"
    secret: bytes | None = None


@runtime_checkable
class FirmwareProfile(Protocol):
    """What a device's firmware does to each message before it is sent.

    Some techniques are actions rather than payload shapes; a profile may also define any of these
    optional hooks, which the fleet looks up with ``getattr`` (an honest profile defines none):

    - ``username(spec) -> str | None``: the MQTT username (default: the fleet's choice);
    - ``will(spec) -> Will | None``: a will message registered at connect;
    - ``extra_subscriptions(spec) -> Sequence[str]``: topic filters subscribed after connect;
    - ``delay_before(seq) -> float``: extra seconds to wait before sending message ``seq``;
    - ``drops_connection: bool``: end the run by closing the socket without DISCONNECT (fires the will).
    """

    @property
    def name(self) -> str:
        """The profile's name (read only: the shipped profiles set it on the class)."""
        ...

    def client_id(self, spec: DeviceSpec) -> str:
        """The MQTT client identifier the device connects with."""
        ...

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        """The messages to publish, in order, in place of ``msg`` (may be empty)."""
        ...


class Honest:
    """Sends exactly what the catalogue describes, under its own id and namespace."""

    __slots__ = ()
    name = "honest"

    def client_id(self, spec: DeviceSpec) -> str:
        return spec.device_id

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        return (msg,)


HONEST = Honest()  # stateless, so one instance serves the whole fleet
