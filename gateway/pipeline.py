"""The hot path, without I/O: one device message in, deliveries and one audit record out.

    topic, payload ─► topic guard ─► registry ─► size ─► decode ─► schema guard ─► dedupe
                  ─► policy.decide ─► project + quantise ─► canonical encode ─► seal ─► deliveries

``Pipeline.process`` never raises for anything a device can send: a rejection becomes an ``Outcome``
with a reason code, and the audit record says why. It never forwards device bytes verbatim, never
passes MQTT properties on, and never writes a field value into the audit record. Writing, sending
and acknowledging belong to ``gateway.runtime``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from gateway.audit.chain import JsonList
from gateway.catalog import DEVICE_TYPES, schema_for
from gateway.codec import DEFAULT_LIMITS, Limits, decode, pack_canonical
from gateway.crypto.envelope import pack_header, seal_packed
from gateway.crypto.keys import DataKeyring
from gateway.crypto.seqid import SeqIds
from gateway.dedupe import DedupeWindow
from gateway.detect import RateBaseline, device_id_suspicious, scan_text_fields, strip_image_trailers
from gateway.errors import RejectedMessage
from gateway.guards import check_payload, parse_topic
from gateway.model import Decision, MessageFacts

__all__ = ["PolicyLike", "DestinationLike", "DeviceLike", "Delivery", "Outcome", "Pipeline"]


class DestinationLike(Protocol):
    name: str
    transport: str
    topic: str
    jurisdiction: str


class DeviceLike(Protocol):
    device_id: str
    device_type: str
    vendor: str


class PolicyLike(Protocol):
    revision: str
    site: str

    @property
    def destinations(self) -> Mapping[str, Any]: ...

    def device(self, device_id: str) -> Any: ...

    def decide(self, facts: MessageFacts) -> Decision: ...


class SeqCheck(Protocol):
    """Sequence dedupe: a DedupeWindow, or the workers' shared state."""

    def is_new(self, device: str, seq: int) -> bool: ...


class RateCheck(Protocol):
    """Per-device rate and volume baseline: a RateBaseline, or the workers' shared state."""

    def observe(self, device: str, size: int, now: float, *, device_type: str) -> str | None: ...


class Delivery(NamedTuple):
    """One sealed envelope for one destination (a tuple: built several times per message)."""

    destination: str
    transport: str  # "vault" | "mqtt"
    topic: str  # MQTT topic for mqtt transport, "" for the vault
    envelope: bytes


@dataclass(slots=True, init=False)
class Outcome:
    """What happened to one message. ``reason`` is '' when it was decided by the policy.

    Its ``__init__`` is written out: compiled, it is native (the dataclass's is Python code)."""

    device: str
    stream: str
    seq: int
    ts: int
    reason: str
    duplicate: bool
    deliveries: list[Delivery]
    decision: Decision | None
    facts: MessageFacts | None
    record: dict[str, Any]

    def __init__(self, device: str, stream: str, seq: int, ts: int, reason: str = "") -> None:
        self.device = device
        self.stream = stream
        self.seq = seq
        self.ts = ts
        self.reason = reason
        self.duplicate = False
        self.deliveries = []
        self.decision = None
        self.facts = None
        self.record = {}


class Pipeline:
    """Applies guards, the policy and encryption to one message at a time.

    ``policy`` may be swapped between messages (hot reload) by assigning ``pipeline.policy``; each
    message is decided under exactly one revision.
    """

    def __init__(
        self,
        policy: PolicyLike,
        keyring: DataKeyring,
        *,
        limits: Limits = DEFAULT_LIMITS,
        dedupe: SeqCheck | None = None,
        clock_ms: Callable[[], int],
        recipients: Mapping[str, Any] | None = None,
        rate: RateCheck | None = None,
        enforce_rate: bool = True,
        seq_ids: SeqIds | None = None,
    ) -> None:
        self.policy = policy
        # The sequence an MQTT destination sees: the device's own hidden under the site's key
        # (gateway.crypto.seqid; the gateway always sets it). None: the device's own (unit tests).
        self.seq_ids = seq_ids
        self.keyring = keyring
        self.limits = limits
        self.dedupe: SeqCheck = dedupe if dedupe is not None else DedupeWindow()
        self.clock_ms = clock_ms
        # Destinations with their own public key: sealed so that only they can open it (not the site).
        self.recipients: Mapping[str, Any] = recipients or {}
        # Per-device rate and volume baselines: on unless a caller turns them off (load benchmarks).
        self.rate: RateCheck | None = rate if rate is not None else (RateBaseline() if enforce_rate else None)
        # Isolated devices: refused here too, so nothing slips through before the broker reloads its CRL.
        self.blocked: frozenset[str] | set[str] = frozenset()
        self._device_cache: dict[str, Any] = {}
        self._cache_for: PolicyLike | None = None
        # Per (device, stream) of the current policy: registry entry, type, schema, id check.
        self._lookups: dict[tuple[str, str], tuple[Any, Any, Any, str | None]] = {}
        # Per topic of a known device under the current policy: (device, stream, its lookup).
        self._topics: dict[str, tuple[str, str, tuple[Any, Any, Any, str | None]]] = {}
        # Per Decision object (the policy memoises them): its audit routes and the delivery plan.
        self._plans: dict[int, _Plan] = {}
        # Per schema and field names: the facts' ((name, data class), ...) tuple.
        self._field_classes: dict[tuple[int, tuple[str, ...]], tuple[tuple[str, str], ...]] = {}
        # The header timestamp a destination gets (ms), when the runtime re-times its uplink: the
        # release boundary the gateway chose, never the device's own clock (which would carry the
        # send time, and arbitrary low digits, to the destination). None: the device's `ts`.
        self.header_ts: Callable[[str], int | None] | None = None

    def _device(self, policy: PolicyLike, device: str) -> Any:
        """Registry lookup, memoised per policy object (patterns are matched once per device)."""
        if self._cache_for is not policy:
            self._new_policy(policy)
        cache = self._device_cache
        try:
            return cache[device]
        except KeyError:
            entry = policy.device(device)
            if entry is not None and len(cache) < 1_000_000:  # unknown ids are not cached: no growth
                cache[device] = entry
            return entry

    def _new_policy(self, policy: PolicyLike) -> None:
        self._device_cache = {}
        self._lookups = {}
        self._topics = {}
        self._plans = {}
        self._cache_for = policy

    def _lookup(self, policy: PolicyLike, device: str, stream: str) -> tuple[Any, Any, Any, str | None] | None:
        """(registry entry, device type, schema, device-id check) for a known device, memoised per
        policy object; None for an unknown device (not memoised: no growth from made-up ids)."""
        if self._cache_for is not policy:
            self._new_policy(policy)
        hit = self._lookups.get((device, stream))
        if hit is None:
            entry = self._device(policy, device)
            if entry is None:
                return None
            dtype = DEVICE_TYPES.get(entry.device_type)
            schema = schema_for(entry.device_type, stream)
            code = device_id_suspicious(device, dtype.id_prefix) if dtype is not None and schema is not None else None
            hit = (entry, dtype, schema, code)
            if len(self._lookups) >= 1_000_000:
                self._lookups.clear()
            self._lookups[(device, stream)] = hit
        return hit

    def _field_classes_for(self, schema: Any, fields: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        names = tuple(fields)
        key = (id(schema), names)
        hit = self._field_classes.get(key)
        if hit is None:
            by_name = schema.by_name
            hit = tuple((name, by_name[name].cls) for name in names)
            if len(self._field_classes) >= 100_000:
                self._field_classes.clear()
            # the schemas are the catalogue's (module constants), so an id is never reused
            self._field_classes[key] = hit
        return hit

    def _plan(self, policy: PolicyLike, decision: Decision) -> _Plan:
        """What a Decision means for every message it decides: its audit routes (canonical JSON
        written once) and, per allowed route, the sorted projection and the destination's transport."""
        if self._cache_for is not policy:
            self._new_policy(policy)
        plan = self._plans.get(id(decision))
        if plan is not None and plan.decision is decision:
            return plan
        destinations = policy.destinations
        allowed = []
        groups: dict[tuple[Any, ...], int] = {}
        for route in decision.routes:
            if not route.allow:
                continue
            # Built with sorted keys: the guards' values are canonical below the top level.
            names = tuple(sorted(route.fields))
            group = groups.setdefault((names, route.quantize), len(groups))
            dest = destinations[route.destination]
            prefix = f"{dest.topic}/" if dest.transport == "mqtt" else None
            allowed.append((route, names, route.quantize, dest.transport, prefix, group))
        plan = _Plan(decision, _audit_routes(decision), JsonList(decision.errors) if decision.errors else None,
                     tuple(allowed), len(groups) < len(allowed))
        if len(self._plans) >= 10_000:
            self._plans.clear()
        self._plans[id(decision)] = plan  # holds the decision, so its id is not reused meanwhile
        return plan

    def process(self, topic: str, payload: bytes, *, retain: bool = False) -> Outcome:
        policy = self.policy  # one revision for the whole message, whatever a reload does meanwhile
        digest = hashlib.sha256(payload).hexdigest()
        device = stream = ""
        seq = ts = 0
        try:
            if self._cache_for is not policy:
                self._new_policy(policy)
            hit = self._topics.get(topic)  # a known device's topic under this policy: parsed and looked up
            if hit is not None:
                device, stream, known = hit
            else:
                device, stream = parse_topic(topic, policy.site)
            if retain:
                raise RejectedMessage("guard.retained", "devices may not publish retained messages")
            if device in self.blocked:
                raise RejectedMessage("guard.isolated", "the device is isolated until an operator releases it")
            if hit is None:
                found = self._lookup(policy, device, stream)
                if found is None:
                    raise RejectedMessage("guard.unknown_device", "device is not in the registry")
                known = found
                if len(self._topics) >= 1_000_000:
                    self._topics.clear()
                self._topics[topic] = (device, stream, known)
            entry, dtype, schema, code = known
            if dtype is None or schema is None:
                raise RejectedMessage("guard.unknown_type", "device type has no schema")
            if code:
                raise RejectedMessage(code, "device id level is not <prefix>-<digits>")
            if len(payload) > dtype.max_payload:
                raise RejectedMessage("guard.too_large", f"{len(payload)} bytes > {dtype.max_payload} for type")
            now_ms = self.clock_ms()  # one reading for the rate baseline and the timestamp check
            if self.rate is not None:
                code = self.rate.observe(device, len(payload), now_ms / 1000, device_type=entry.device_type)
                if code:
                    raise RejectedMessage(code, "beyond the device type's normal rate or volume")
            values = decode(payload, self.limits)
            fields, seq, ts = check_payload(schema, values, now_ms=now_ms)
            # Covert channels in allowed fields: bytes after an image's end are cut; free text and ids
            # that look like encoded data are refused.
            fields, trailers = strip_image_trailers(schema, fields)
            hits = scan_text_fields(schema, fields)
            if hits:
                raise RejectedMessage(hits[0][1], f"field {hits[0][0]}")
        except RejectedMessage as exc:
            out = Outcome(device, stream, seq, ts, reason=exc.code)
            out.record = _record(out, topic, digest, len(payload), policy.revision, detail=exc.detail)
            return out

        out = Outcome(device, stream, seq, ts)
        if not self.dedupe.is_new(device, seq):
            out.duplicate = True
            out.reason = "dedupe.duplicate"
            out.record = _record(out, topic, digest, len(payload), policy.revision)
            return out

        facts = MessageFacts(
            device_id=device,
            device_type=entry.device_type,
            vendor=entry.vendor,
            site=policy.site,
            topic=topic,
            stream=stream,
            size=len(payload),
            fields=self._field_classes_for(schema, fields),
        )
        decision = policy.decide(facts)
        out.decision = decision
        out.facts = facts
        plan = self._plan(policy, decision)
        recipients = self.recipients
        header_ts = self.header_ts
        revision = decision.revision
        deliveries = out.deliveries
        plaintexts: dict[int, bytes] | None = {} if plan.shared else None
        seq_ids = self.seq_ids
        hidden_seq: bytes | None = None
        for route, names, quantize, transport, prefix, group in plan.allowed:
            plaintext = plaintexts.get(group) if plaintexts is not None else None
            if plaintext is None:
                projected = {name: fields[name] for name in names}
                for name, step in quantize:
                    if name in projected:
                        projected[name] = _quantise(projected[name], step)
                plaintext = pack_canonical(projected)
                if plaintexts is not None:
                    plaintexts[group] = plaintext
            hts = header_ts(route.destination) if header_ts is not None else None
            if prefix is not None and seq_ids is not None:  # leaves the site's own stores: hidden
                if hidden_seq is None:
                    hidden_seq = seq_ids.hide(device, seq)
                hseq: int | bytes = hidden_seq
            else:
                hseq = seq
            header = pack_header(device, stream, hseq, ts if hts is None else hts, route.destination, revision)
            sealer = recipients.get(route.destination)
            if sealer is None:
                envelope = seal_packed(self.keyring, header, plaintext)
            else:
                envelope = sealer.seal_packed(header, plaintext)
            topic_out = f"{prefix}{device}/{stream}" if prefix is not None else ""
            deliveries.append(Delivery(route.destination, transport, topic_out, envelope))
        rec: dict[str, Any] = {
            "dev": device,
            "stream": stream,
            "seq": seq,
            "digest": digest,
            "size": len(payload),
            "rev": revision,
            "routes": plan.routes,
        }
        if plan.errors is not None:
            rec["errors"] = plan.errors
        out.record = rec
        if trailers:
            out.record["trailer_cut"] = [[name, n] for name, n in trailers]
        return out


class _Plan(NamedTuple):
    decision: Decision
    routes: JsonList  # the audit record's "routes", shared by every record of this decision
    errors: JsonList | None
    # per allowed route: (route, sorted projected names, quantize, transport, mqtt topic prefix, group)
    allowed: tuple[tuple[Any, tuple[str, ...], tuple[tuple[str, float], ...], str, str | None, int], ...]
    shared: bool  # two routes project the same fields the same way: encode that plaintext once


def _quantise(value: Any, step: float) -> Any:
    if type(value) is float or type(value) is int:
        q = round(value / step) * step
        return round(q, 12)
    return value


def _record(out: Outcome, topic: str, digest: str, size: int, revision: str, *, detail: str = "") -> dict[str, Any]:
    """The audit record: names, codes and digests only. Never a field value."""
    rec: dict[str, Any] = {
        "dev": out.device,
        "stream": out.stream,
        "seq": out.seq,
        "digest": digest,
        "size": size,
        "rev": revision,
    }
    if out.reason:
        rec["reason"] = out.reason
        if detail:
            rec["detail"] = detail
        if not out.device:
            # The topic is attacker-chosen: keep only its digest when it did not parse.
            rec["topic_digest"] = hashlib.sha256(topic.encode("utf-8", "replace")).hexdigest()[:32]
    d = out.decision
    if d is not None:
        rec["routes"] = _audit_routes(d)
        if d.errors:
            rec["errors"] = JsonList(d.errors)
    return rec


def _audit_routes(d: Decision) -> JsonList:
    """A decision's routes as the audit record has them: names, rule ids and reason codes."""
    return JsonList(
        {
            "dst": r.destination,
            "allow": r.allow,
            **({"reason": r.reason} if r.reason else {}),
            **({"removed": [list(x) for x in r.removed]} if r.removed else {}),
            **({"quantized": [x[0] for x in r.quantize]} if r.quantize else {}),
            "rules": list(r.rules),
        }
        for r in d.routes
    )
