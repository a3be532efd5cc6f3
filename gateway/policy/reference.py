"""The slow, obviously-correct evaluator: the semantics of a policy, written as plainly as possible.

It reads the ``PolicySpec`` directly, scans every list in order and re-derives everything per call.
The compiled engine (``engine``) must return exactly the same ``Decision`` for every message; a
Hypothesis property test (tests/property/test_policy_reference.py) holds them to it. It also records
a trace, which is how ``Policy.explain`` and ``edgeward policy explain`` show their reasoning.

Order of checks (docs/policy.md, "How a message is decided"):

message: site, denylist, registry, own namespace, grant, size limit  -> every route denied on failure
route:   jurisdiction, maintenance contract, whole-route forbid, drop obligation,
         then per field: prohibited, forbid, vault-only, residency, permit, remove obligation, quantize
         and, when nothing is left of a non-empty message, drop (drop_when_empty).
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

from gateway.model import Decision, MessageFacts, Route
from gateway.policy.spec import DestinationSpec, DeviceSpec, PolicySpec, When
from gateway.policy.validate import is_glob

__all__ = ["reference_decide", "topic_matches", "device_matches", "sort_rules"]


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT filter matching: '+' is exactly one level (maybe empty); a last '#' is this level and below."""
    f = filt.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True  # '#' as level i matches the parent (t has i levels) and anything longer
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def device_matches(pattern: str, device_id: str) -> bool:
    return fnmatchcase(device_id, pattern)


def sort_rules(ids: set[str], spec: PolicySpec) -> tuple[str, ...]:
    return tuple(sorted(ids, key=lambda r: (spec.rule_order.get(r, 0), r)))


def _subst(filt: str, site: str, device: str) -> str:
    return filt.replace("{site}", site).replace("{device}", device)


def _when(w: When, facts: MessageFacts, spec: PolicySpec, rule_id: str, errors: set[str]) -> bool | None:
    """True/False, or None when the condition cannot be evaluated (recorded as a rule error)."""
    failed = False
    if w.vendors is not None and not facts.vendor:
        errors.add(f"{rule_id}: condition on vendor but the message has no vendor")
        failed = True
    if w.device_types is not None and not facts.device_type:
        errors.add(f"{rule_id}: condition on device_type but the message has no device type")
        failed = True
    if failed:
        return None
    if w.devices is not None and not any(device_matches(p, facts.device_id) for p in w.devices):
        return False
    if w.device_types is not None and facts.device_type not in w.device_types:
        return False
    if w.vendors is not None and facts.vendor not in w.vendors:
        return False
    if w.streams is not None and facts.stream not in w.streams:
        return False
    if w.topics is not None and not any(
        topic_matches(_subst(f, spec.site, facts.device_id), facts.topic) for f in w.topics
    ):
        return False
    return True


def _lookup(entries: Any, device_id: str) -> Any:
    """An entry naming the id exactly wins over patterns; otherwise the first pattern that matches."""
    exact = next((e for e in entries if e.pattern == device_id and not is_glob(e.pattern)), None)
    if exact is not None:
        return exact
    return next((e for e in entries if device_matches(e.pattern, device_id)), None)


def _all_errors(spec: PolicySpec, facts: MessageFacts) -> tuple[str, ...]:
    errors: set[str] = set()
    for r in spec.rules:
        _when(r.when, facts, spec, r.rule_id, errors)
    for d in spec.destinations:
        for o in d.obligations:
            _when(o.when, facts, spec, o.rule_id, errors)
    return tuple(sorted(errors))


def reference_decide(spec: PolicySpec, revision: str, facts: MessageFacts,
                     trace: list[str] | None = None) -> Decision:
    def note(line: str) -> None:
        if trace is not None:
            trace.append(line)

    def deny_all(reason: str, rule: str, why: str) -> Decision:
        note(f"message denied: {reason} ({rule}): {why}")
        return Decision(revision, tuple(Route(d.name, False, rules=(rule,), reason=reason) for d in spec.destinations))

    if facts.site != spec.site:
        return deny_all("policy.site", "builtin.site", f"site {facts.site!r} is not {spec.site!r}")
    note(f"site {facts.site!r} ok")
    deny = _lookup(spec.denylist, facts.device_id)
    if deny is not None:
        return deny_all("policy.denylisted", deny.rule_id, f"device matches denylist entry {deny.pattern!r}")
    entry = _lookup(spec.devices, facts.device_id)
    if spec.require_registered and entry is None:
        return deny_all("policy.unknown_device", "builtin.registry", f"device {facts.device_id!r} is not registered")
    note(f"registry: {entry.rule_id if entry else 'unregistered'}")
    prefix = f"site/{facts.site}/dev/{facts.device_id}/"
    if not facts.topic.startswith(prefix):
        return deny_all("policy.namespace", "builtin.namespace", f"topic {facts.topic!r} is not under {prefix!r}")
    grant = None
    for g in spec.grants:
        if g.devices is not None and not any(device_matches(p, facts.device_id) for p in g.devices):
            continue
        if g.device_types is not None and facts.device_type not in g.device_types:
            continue
        if any(topic_matches(_subst(f, spec.site, facts.device_id), facts.topic) for f in g.topics):
            grant = g
            break
    if grant is None:
        return deny_all("policy.no_grant", "builtin.default_deny", f"no grant lets the device publish {facts.topic!r}")
    note(f"grant {grant.rule_id} lets the device publish {facts.topic!r}")
    dt = spec.device_types.get(facts.device_type)
    if dt is None or dt.max_size is None:
        return deny_all("policy.size_limit", "builtin.size_limit", f"no size limit for type {facts.device_type!r}")
    if facts.size > dt.max_size:
        return deny_all("policy.size_limit", dt.rule_id, f"size {facts.size} > {dt.max_size}")
    note(f"size {facts.size} <= {dt.max_size} ({dt.rule_id})")

    errors: set[str] = set()
    routes = tuple(_route(spec, d, facts, entry, grant.rule_id, errors, note) for d in spec.destinations)
    return Decision(revision, routes, _all_errors(spec, facts))


def _route(spec: PolicySpec, d: DestinationSpec, facts: MessageFacts, entry: DeviceSpec | None, grant_id: str,
           errors: set[str], say: Callable[[str], None]) -> Route:

    def deny(reason: str, rule: str, why: str, removed: tuple[tuple[str, str], ...] = ()) -> Route:
        say(f"[{d.name}] denied: {reason} ({rule}): {why}")
        return Route(d.name, False, removed=removed, rules=sort_rules({grant_id, rule}, spec), reason=reason)

    if d.jurisdiction not in spec.allowed_jurisdictions:
        return deny("policy.jurisdiction", "builtin.jurisdiction", f"jurisdiction {d.jurisdiction!r} not allowed")
    if d.requires_contract:
        vendor = spec.vendors.get(facts.vendor)
        has = vendor is not None and vendor.maintenance_contract
        if has and entry is not None and entry.maintenance is False:
            has = False
        if not has:
            return deny("policy.no_contract", "builtin.contract", f"vendor {facts.vendor!r} has no maintenance contract")
    for r in spec.rules:
        if r.effect == "forbid" and r.whole_route and (r.destinations is None or d.name in r.destinations):
            if _when(r.when, facts, spec, r.rule_id, errors) is not False:
                return deny("policy.forbid", r.rule_id, "forbidden for this destination")
    for o in d.obligations:
        if o.kind != "drop" or _when(o.when, facts, spec, o.rule_id, errors) is False:
            continue
        for name, cls in facts.fields:
            if (o.fields is not None and name in o.fields) or (o.classes is not None and cls in o.classes):
                return deny("policy.drop", o.rule_id, f"field {name!r} ({cls}) drops the message here")

    going: list[str] = []
    removed: list[tuple[str, str]] = []
    quantize: list[tuple[str, float]] = []
    used: set[str] = {grant_id}
    for name, cls in facts.fields:
        reason, rule = "", ""
        if cls == "prohibited":
            reason, rule = "policy.prohibited_class", "builtin.prohibited"
        if not reason:
            for r in spec.rules:
                if r.effect != "forbid" or r.whole_route:
                    continue
                if r.destinations is not None and d.name not in r.destinations:
                    continue
                if r.classes is not None and cls not in r.classes:
                    continue
                if r.fields is not None and name not in r.fields:
                    continue
                if _when(r.when, facts, spec, r.rule_id, errors) is not False:
                    reason, rule = "policy.forbid", r.rule_id
                    break
        dc = spec.data_classes.get(cls)
        if not reason and dc is not None and dc.vault_only and d.transport != "vault":
            reason, rule = "policy.vault_only", "builtin.vault_only"
        if not reason and dc is not None and dc.reside is not None and d.jurisdiction not in dc.reside:
            reason, rule = "policy.residency", "builtin.residency"
        permit = None
        if not reason:
            for r in spec.rules:
                if r.effect != "permit":
                    continue
                if r.destinations is not None and d.name not in r.destinations:
                    continue
                if r.classes is None and cls not in spec.data_classes:
                    continue  # '*' means every class the policy knows, never an unknown one
                if r.classes is not None and cls not in r.classes:
                    continue
                if r.fields is not None and name not in r.fields:
                    continue
                if _when(r.when, facts, spec, r.rule_id, errors):
                    permit = r.rule_id
                    break
            if permit is None:
                reason, rule = "policy.class_not_allowed", "builtin.default_deny"
        if reason:
            if d.on_disallowed_field == "deny":
                return deny(reason, rule, f"field {name!r} ({cls}) is not allowed and the destination denies")
            say(f"[{d.name}] field {name!r} ({cls}) removed: {reason} ({rule})")
            removed.append((name, reason))
            used.add(rule)
            continue
        redacted = False
        for o in d.obligations:
            if o.kind != "remove":
                continue
            if (o.fields is not None and name in o.fields) or (o.classes is not None and cls in o.classes):
                if _when(o.when, facts, spec, o.rule_id, errors) is not False:
                    say(f"[{d.name}] field {name!r} ({cls}) removed: policy.redact ({o.rule_id})")
                    removed.append((name, "policy.redact"))
                    used.add(o.rule_id)
                    redacted = True
                    break
        if redacted:
            continue
        assert permit is not None
        used.add(permit)
        going.append(name)
        say(f"[{d.name}] field {name!r} ({cls}) goes: permitted by {permit}")
        for o in d.obligations:
            if o.kind != "quantize":
                continue
            step = next((s for f, s in o.steps if f == name), None)
            if step is not None and _when(o.when, facts, spec, o.rule_id, errors) is not False:
                quantize.append((name, step))
                used.add(o.rule_id)
                say(f"[{d.name}] field {name!r} quantised to step {step} ({o.rule_id})")
                break
    if d.drop_when_empty and facts.fields and not going:
        return deny("policy.empty", "builtin.empty", "no field of the message may go here", tuple(removed))
    say(f"[{d.name}] allowed: {len(going)} field(s) go, {len(removed)} removed")
    return Route(d.name, True, tuple(going), tuple(removed), tuple(quantize), sort_rules(used, spec), "")
