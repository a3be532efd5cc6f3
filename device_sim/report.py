"""The leak report: per technique, what hostile firmware tried and what reached any destination.

Measured, never claimed: every secret the simulator planted (ground truth) is searched for, in its raw,
hex and base64 forms, in everything each destination received after decryption — field values,
topics and device names — and low-bit channels are decoded from the delivered numbers. A message is
*detected* when the gateway's audit log holds a reason code or a cut for its exact bytes (matched by
payload digest), *neutralised* when nothing of its secret arrived anywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from device_sim.hostile import lowbit_decode, secret_forms
from device_sim.truth import GroundTruth, SentRecord
from gateway.catalog import schema_for
from gateway.detect import SUBFIELD_PRECISION

__all__ = ["Delivered", "TechniqueRow", "leak_report", "format_report", "lowbits_in"]


@dataclass
class Delivered:
    """Everything the destinations received, decrypted."""

    by_msg: dict[tuple[str, int], list[tuple[str, str, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    corpus: bytearray = field(default_factory=bytearray)
    names: bytearray = field(default_factory=bytearray)

    def add(self, destination: str, device: str, stream: str, seq: int, fields: dict[str, Any], topic: str) -> None:
        self.by_msg[(device, seq)].append((destination, stream, fields))
        self.corpus += msgpack.packb(fields, use_bin_type=True) + b"\0"
        self.names += f"{topic}\0{device}\0".encode()


@dataclass(frozen=True, slots=True)
class TechniqueRow:
    technique: str
    attempts: int  # hostile messages sent plus hostile actions (connects, subscriptions, wills...)
    detected: int  # hostile messages the gateway named (a reason code or a cut in the audit log)
    refused: int  # actions or publishes the broker refused (ACL, identity) before the gateway saw them
    neutralised: int
    leaked: int  # attempts with secret bytes found at any destination

    def to_json(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "detected": self.detected, "refused_by_broker": self.refused,
                "neutralised": self.neutralised, "leaked": self.leaked}


def lowbits_in(fields: dict[str, Any], device_type: str, stream: str) -> bytes:
    """The bytes a low-bit channel would carry in these delivered numbers (one per float)."""
    schema = schema_for(device_type, stream)
    out = []
    for spec in schema.fields if schema else ():
        v = fields.get(spec.name)
        if v is None:
            continue
        if spec.kind == "float":
            out.append(lowbit_decode(v, spec.precision))
        elif spec.kind == "records":
            p = SUBFIELD_PRECISION.get((spec.name, "weight_kg"))
            for rec in v:
                if p is not None and "weight_kg" in rec:
                    out.append(lowbit_decode(rec["weight_kg"], p))
    return bytes(out)


_EXTERNAL_ONLY = frozenset({"burst", "timing"})


def _leaked(rec: SentRecord, got: Delivered) -> bool:
    secret = rec.secret or b""
    delivered = got.by_msg.get((rec.device_id, rec.seq), [])
    if rec.technique in _EXTERNAL_ONLY:
        # Volume and inter-message timing are the channel itself: it leaks whenever such a message
        # reaches a destination outside the site with its timing intact (no re-timing yet).
        return any(dest != "local_vault" for dest, _, _ in delivered)
    if not secret:
        return False
    if rec.technique == "size_modulation":
        return any(isinstance(v, bytes) and len(v) % 256 == secret[0]
                   for _, _, fields in delivered for v in fields.values())
    if rec.technique == "low_bits":
        return any(lowbits_in(f, rec.device_type, s) == secret for _, s, f in got.by_msg.get((rec.device_id, rec.seq), []))
    forms = secret_forms(secret)
    if any(f in got.names for f in forms):
        return True
    if rec.technique == "topic_encoding":
        return False  # topic data can only surface in topics and names (checked above)
    if len(secret) >= 8 and any(f in got.corpus for f in forms):
        return True
    if len(secret) < 4:
        return False  # too short to tell from chance in a payload
    return any(any(f in msgpack.packb(fields, use_bin_type=True) for f in forms) for _, _, fields in delivered)


def leak_report(truth: GroundTruth, got: Delivered, audit_records: Iterable[dict[str, Any]]) -> list[TechniqueRow]:
    flagged: set[str] = set()
    for r in audit_records:
        if "digest" in r and ("reason" in r or "trailer_cut" in r):
            flagged.add(r["digest"])
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for rec in truth.sent_records:
        if not rec.technique:
            continue
        row = rows[rec.technique]
        row[0] += 1
        leaked = _leaked(rec, got)
        row[1] += rec.sha256 in flagged
        row[3] += not leaked
        row[4] += leaked
    for rec in truth.failed:
        if getattr(rec, "technique", ""):
            row = rows[rec.technique]
            row[0] += 1
            row[2] += 1
            row[3] += 1
    for a in truth.actions:
        if a.action == "publish":
            continue  # counted with the sent/failed records above
        row = rows[a.technique]
        row[0] += 1
        if a.action == "timing":  # the bit rides in the delay before message `seq`
            leaked = any(dest != "local_vault" for dest, _, _ in got.by_msg.get((a.device_id, a.seq), []))
            row[3] += not leaked
            row[4] += leaked
            continue
        refused = a.outcome.startswith(("puback:135", "suback:135", "connack:1", "failed", "retrievable:no",
                                        "received:0"))
        leaked = bool(a.secret) and any(f in got.names or f in got.corpus for f in secret_forms(a.secret or b""))
        row[2] += refused
        row[3] += not leaked
        row[4] += leaked
    return [TechniqueRow(t, *v) for t, v in sorted(rows.items())]


def format_report(rows: list[TechniqueRow]) -> str:
    head = f"  {'technique':22} {'attempts':>8} {'detected':>8} {'refused':>8} {'neutralised':>11} {'leaked':>6}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        lines.append(f"  {r.technique:22} {r.attempts:>8} {r.detected:>8} {r.refused:>8} {r.neutralised:>11} {r.leaked:>6}")
    return "\n".join(lines)
