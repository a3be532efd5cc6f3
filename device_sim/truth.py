"""Ground truth of a simulator run: what every device actually got acknowledged by the broker.

A message is *sent* only once its QoS-1 PUBACK arrived; a publish that raised is recorded in
``failed`` with the error and is never counted as sent (whether the broker kept it is unknown, which
is exactly why it is kept apart). Detection and loss figures are measured against this record, so it
must never claim more than the broker confirmed. Records carry the payload's SHA-256; the bytes
themselves only when the run was asked to keep them.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SentRecord", "FailedRecord", "Outage", "HostileAction", "GroundTruth"]


@dataclass(frozen=True, slots=True)
class SentRecord:
    """One PUBACKed publish. ``t_sent`` is the wall clock when the publish was issued (the payload's
    ``ts`` is taken from the same instant); ``t_made`` when the device produced the reading, earlier
    than ``t_sent`` when it waited in a store-and-forward buffer. ``profile`` and ``tags`` say which
    firmware shaped the message and what it did to it (``()`` for an honest message)."""

    device_id: str
    device_type: str
    stream: str
    seq: int
    topic: str
    size: int
    sha256: str
    t_sent: float
    payload: bytes | None = None
    t_made: float = 0.0
    profile: str = "honest"
    tags: tuple[str, ...] = ()
    technique: str = ""  # the hostile technique this message carries ('' when honest)
    secret: bytes | None = None  # the exact bytes it tries to leak, as put on the wire


@dataclass(frozen=True, slots=True)
class FailedRecord:
    """A publish that raised (or could not be attempted before the run ended): not sent."""

    device_id: str
    device_type: str
    stream: str
    seq: int
    topic: str
    size: int
    sha256: str
    t_attempt: float
    error: str
    profile: str = "honest"
    tags: tuple[str, ...] = ()
    technique: str = ""
    secret: bytes | None = None


@dataclass(frozen=True, slots=True)
class Outage:
    """A device offline from ``t_down`` to ``t_up`` (wall clock); ``buffered`` messages it produced
    meanwhile and sent after reconnecting."""

    device_id: str
    t_down: float
    t_up: float
    buffered: int


@dataclass(frozen=True, slots=True)
class HostileAction:
    """One thing a hostile firmware tried, with what came of it.

    ``action`` is what it was on the wire: ``publish`` (one per hostile message, sent or not),
    ``connect`` (a client id or username chosen to carry data, or another device's id), ``subscribe``
    (one per filter), ``will`` (a will message registered at connect), ``timing`` (one bit put in the
    delay before a message), ``retrieve`` (a second client trying to read a dead drop). ``secret`` is
    the exact bytes it tried to leak (``None`` when the action carries no data, e.g. a probe).
    ``outcome`` is what the broker answered, as ``<what>:<value>``: ``puback:0``, ``puback:135``,
    ``suback:135``, ``received:12``, ``connack:0``, ``retrievable:yes``, ``failed:<error>``.
    """

    device_id: str
    profile: str
    technique: str
    action: str
    seq: int = 0
    topic: str = ""
    secret: bytes | None = None
    outcome: str = ""
    t: float = 0.0
    detail: str = ""


@dataclass(slots=True)
class GroundTruth:
    """Everything a run did, in publish order per device. Mutable while the run fills it."""

    sent_records: list[SentRecord] = field(default_factory=list)
    failed: list[FailedRecord] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    actions: list[HostileAction] = field(default_factory=list)  # every hostile action, in order
    connects: Counter[str] = field(default_factory=Counter)  # successful CONNACKs per device
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def sent(self) -> int:
        return len(self.sent_records)

    @property
    def by_device(self) -> Counter[str]:
        return Counter(r.device_id for r in self.sent_records)

    @property
    def by_type(self) -> Counter[str]:
        return Counter(r.device_type for r in self.sent_records)

    @property
    def hostile_records(self) -> list[SentRecord]:
        """The acknowledged messages that carried a hostile technique."""
        return [r for r in self.sent_records if r.technique]

    @property
    def bytes_sent(self) -> int:
        return sum(r.size for r in self.sent_records)

    def reconnects(self, device_id: str) -> int:
        """Connections after the first one."""
        return max(0, self.connects[device_id] - 1)

    def to_jsonl(self, path: str | Path) -> None:
        """One JSON object per line, ``kind`` first; payload bytes (if kept) as base64."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "run", "started_at": self.started_at, "ended_at": self.ended_at,
                                "connects": dict(self.connects)}) + "\n")
            for kind, records in (("sent", self.sent_records), ("failed", self.failed), ("outage", self.outages),
                                  ("action", self.actions)):
                for r in records:
                    f.write(json.dumps({"kind": kind, **_jsonable(asdict(r))}) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> GroundTruth:
        truth = cls()
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                obj = json.loads(line)
                kind = obj.pop("kind")
                if kind == "run":
                    truth.started_at, truth.ended_at = obj["started_at"], obj["ended_at"]
                    truth.connects.update(obj["connects"])
                    continue
                if "tags" in obj:
                    obj["tags"] = tuple(obj["tags"])
                for key in ("payload", "secret"):
                    if obj.get(key) is not None:
                        obj[key] = base64.b64decode(obj[key])
                if kind == "sent":
                    truth.sent_records.append(SentRecord(**obj))
                elif kind == "failed":
                    truth.failed.append(FailedRecord(**obj))
                elif kind == "outage":
                    truth.outages.append(Outage(**obj))
                elif kind == "action":
                    truth.actions.append(HostileAction(**obj))
                else:
                    raise ValueError(f"{path}: unknown record kind {kind!r}")
        return truth


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    for key in ("payload", "secret"):
        if isinstance(out.get(key), bytes):
            out[key] = base64.b64encode(out[key]).decode("ascii")
    return out
