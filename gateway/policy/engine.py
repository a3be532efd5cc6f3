"""The compiled policy: an indexed plan built once per revision, and ``decide`` on it.

``Policy.decide`` is pure: no I/O, clock, logging or asyncio; the same facts always give the same
``Decision`` (object, even: decisions are memoised). The plan indexes what the reference evaluator
scans: deny-list, registry and grants by exact device id (globs kept in short ordered lists), grant
filters pre-split, and per destination the forbids, permits by data class and obligations. Its answers
must equal ``reference.reference_decide`` exactly; the property test holds it to that.

Memoisation: a decision depends only on the facts except ``size``, and on ``size`` only through
"within the type's limit", so decisions are cached on (device_id, device_type, vendor, site, topic,
stream, fields, size_ok). The cache is bounded (``MEMO_SIZE`` keys, sized for a site's fleet: a device
has a key per stream and field set) and drops its older half when full: it is a pure function's memo,
never a source of truth. (Cleared whole at 16,384 keys, it thrashed past ~8,000 devices: a fleet that
sends in turn then missed on every message.) Below it, the decision of a granted message is memoised on
what its routes read (grant, contract, fields, vendor, type, stream; device and topic too when a
condition names devices or topics) and its errors, so a device's first message costs the lookups, not
the route plan nor hashing a new Decision. Equal decisions are also shared: every device whose
facts give the same answer gets the same ``Decision`` object, so what a caller derives from one
decision (the pipeline's audit fragment and delivery plan) is derived once for all of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase, translate
from itertools import islice
from types import MappingProxyType
from typing import Any

from gateway.model import Decision, MessageFacts, Route
from gateway.policy.diagnostics import Diagnostic
from gateway.policy.reference import reference_decide
from gateway.policy.spec import DestinationSpec, DeviceSpec, GrantSpec, ObligationSpec, PolicySpec, RuleSpec, When
from gateway.policy.validate import is_glob

__all__ = ["Policy", "Destination", "DeviceEntry", "MEMO_SIZE", "GATEWAY_USER", "canonical_revision"]

MEMO_SIZE = 1 << 16  # ~190 B a key (decisions are shared): ~12 MB at worst, whatever devices send
GATEWAY_USER = "edgeward-gateway"


def _drop_older_half(memo: dict[Any, Any]) -> None:
    """Forget the first-inserted half of a full memo (dicts keep insertion order): a fleet larger than
    the memo then re-plans its older keys, not every key at every turn as clearing it would."""
    for k in list(islice(memo, len(memo) // 2)):
        del memo[k]


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    jurisdiction: str
    trust: str
    transport: str  # "vault" | "mqtt"
    topic: str  # MQTT topic prefix; "" for the vault
    rest_at_edge: bool
    recipient_key: str | None
    retime_ms: int = 0
    spool_max_mb: float = 256.0
    spool_when_full: str = "refuse_new"
    bundle: int = 1  # envelopes per MQTT message at most


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    device_id: str
    device_type: str
    vendor: str
    maintenance: bool


def canonical_revision(data: Any) -> str:
    """sha256 over the canonical JSON of the policy data (first 16 hex digits).

    Comments, quoting and layout do not change it; order does, because order is meaning here (the
    first matching rule, the order of routes)."""
    try:
        blob = json.dumps(data, separators=(",", ":"))
    except (TypeError, ValueError):  # a YAML date or the like in a description: still hashable as text
        blob = json.dumps(data, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _split_filter(f: str, site: str) -> tuple[str, tuple[str, ...], bool, bool]:
    """(filter with {site} filled, its levels, has {device}, is exact)."""
    f = f.replace("{site}", site)
    return f, tuple(f.split("/")), "{device}" in f, "+" not in f and "#" not in f


def _levels_match(f: tuple[str, ...], t: list[str]) -> bool:
    n = len(t)
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= n or (level != "+" and level != t[i]):
            return False
    return len(f) == n


def _globs_regex(patterns: list[str]) -> re.Pattern[str]:
    """One regex for ``fnmatchcase`` against each pattern in turn: alternative ``_s<i>`` is pattern i,
    and an alternation tries its alternatives in order, so ``match(...).lastgroup`` names the first
    pattern that matches (one C call for what was a Python loop of fnmatch calls)."""
    return re.compile("|".join(f"(?P<_s{i}>{translate(p)})" for i, p in enumerate(patterns)))


class _Selector:
    """Exact ids in a dict, globs in an ordered list. An exact entry wins over any pattern; among
    patterns (and among duplicate exact entries) the first in policy order wins."""

    __slots__ = ("exact", "globs", "_rx", "_by_group")

    def __init__(self, entries: list[Any]) -> None:
        """``entries``: specs with ``.pattern`` and ``.order``, in policy order."""
        patterns = [e.pattern for e in entries]
        joined = "\n".join(patterns)
        self._rx: re.Pattern[str] | None = None
        self._by_group: dict[str | None, Any] = {}
        if "*" not in joined and "?" not in joined and "[" not in joined:  # the common case, at C speed
            # reversed, so that the first of duplicate exact entries is the one left in the dict
            self.exact: dict[str, Any] = dict(zip(reversed(patterns), reversed(entries)))
            self.globs: list[tuple[int, str, Any]] = []
            return
        self.exact = {e.pattern: e for e in reversed(entries) if not is_glob(e.pattern)}
        self.globs = sorted(((e.order, e.pattern, e) for e in entries if is_glob(e.pattern)), key=lambda g: g[0])
        self._rx = _globs_regex([p for _, p, _ in self.globs])
        self._by_group = {f"_s{i}": item for i, (_, _, item) in enumerate(self.globs)}

    def first(self, device_id: str) -> Any:
        hit = self.exact.get(device_id)
        if hit is not None:
            return hit
        rx = self._rx
        if rx is None:
            return None
        m = rx.match(device_id)
        return None if m is None else self._by_group[m.lastgroup]


class _Grant:
    __slots__ = ("spec", "order", "rule_id", "globs", "types", "filters", "_rx")

    def __init__(self, g: GrantSpec, site: str) -> None:
        self.spec = g
        self.order = g.order
        self.rule_id = g.rule_id
        self.types = g.device_types
        self.globs = None if g.devices is None else tuple(g.devices)
        # a pattern selects its own text (an id with glob characters in it) or what it matches
        self._rx = None if self.globs is None else re.compile(
            "|".join(f"{re.escape(p)}\\Z|{translate(p)}" for p in self.globs) or "(?!)")  # none: no device
        self.filters = tuple(_split_filter(f, site) for f in g.topics)

    def selects(self, device_id: str, device_type: str) -> bool:
        if self.types is not None and device_type not in self.types:
            return False
        return self._rx is None or self._rx.match(device_id) is not None

    def matches(self, device_id: str, topic: str, levels: list[str]) -> bool:
        for text, flevels, has_device, exact in self.filters:
            if has_device:
                text = text.replace("{device}", device_id)
                if exact:
                    if text == topic:
                        return True
                    continue
                if _levels_match(tuple(text.split("/")), levels):
                    return True
            elif exact:
                if text == topic:
                    return True
            elif _levels_match(flevels, levels):
                return True
        return False


def _when(w: When, facts: MessageFacts, site: str) -> bool | None:
    if w.vendors is not None and not facts.vendor or w.device_types is not None and not facts.device_type:
        return None
    if w.devices is not None and not any(fnmatchcase(facts.device_id, p) for p in w.devices):
        return False
    if w.device_types is not None and facts.device_type not in w.device_types:
        return False
    if w.vendors is not None and facts.vendor not in w.vendors:
        return False
    if w.streams is not None and facts.stream not in w.streams:
        return False
    if w.topics is not None:
        levels = facts.topic.split("/")
        if not any(
            _levels_match(tuple(f.replace("{site}", site).replace("{device}", facts.device_id).split("/")), levels)
            for f in w.topics
        ):
            return False
    return True


class _DestPlan:
    __slots__ = (
        "spec", "name", "jur_ok", "requires_contract", "deny_mode", "drop_empty", "route_forbids", "field_forbids",
        "permits", "block", "drops", "removes", "quantize", "has_when",
    )

    def __init__(self, d: DestinationSpec, spec: PolicySpec) -> None:
        self.spec = d
        self.name = d.name
        self.jur_ok = d.jurisdiction in spec.allowed_jurisdictions
        self.requires_contract = d.requires_contract
        self.deny_mode = d.on_disallowed_field == "deny"
        self.drop_empty = d.drop_when_empty
        mine = [r for r in spec.rules if r.destinations is None or d.name in r.destinations]
        self.route_forbids = tuple(r for r in mine if r.effect == "forbid" and r.whole_route)
        self.field_forbids = tuple(r for r in mine if r.effect == "forbid" and not r.whole_route)
        permits = [r for r in mine if r.effect == "permit"]
        classes = set(spec.data_classes) | {c for r in permits for c in (r.classes or ())}
        known = set(spec.data_classes)
        self.permits: dict[str, tuple[RuleSpec, ...]] = {
            c: tuple(r for r in permits if (r.classes is None and c in known) or (r.classes and c in r.classes))
            for c in classes
        }
        self.block: dict[str, tuple[str, str]] = {"prohibited": ("policy.prohibited_class", "builtin.prohibited")}
        for c, dc in spec.data_classes.items():
            if c == "prohibited":
                continue
            if dc.vault_only and d.transport != "vault":
                self.block[c] = ("policy.vault_only", "builtin.vault_only")
            elif dc.reside is not None and d.jurisdiction not in dc.reside:
                self.block[c] = ("policy.residency", "builtin.residency")
        self.drops = tuple(o for o in d.obligations if o.kind == "drop")
        self.removes = tuple(o for o in d.obligations if o.kind == "remove")
        self.quantize: dict[str, tuple[tuple[ObligationSpec, float], ...]] = {}
        for o in d.obligations:
            if o.kind == "quantize":
                for f in dict.fromkeys(f for f, _ in o.steps):  # the first step an obligation gives a field
                    step = next(s for f2, s in o.steps if f2 == f)
                    self.quantize[f] = (*self.quantize.get(f, ()), (o, step))


class Policy:
    """A compiled, validated policy revision. Build it with ``compile_policy`` or ``load_policy``."""

    def __init__(self, spec: PolicySpec, *, revision: str, source: str,
                 warnings: list[Diagnostic] | Callable[[], list[Diagnostic]]) -> None:
        self.spec = spec
        self.revision = revision
        self.source = source
        self.site = spec.site
        self.jurisdiction = spec.jurisdiction
        self._warnings = warnings
        self.destinations: Mapping[str, Destination] = MappingProxyType({
            d.name: Destination(d.name, d.jurisdiction, d.trust, d.transport, d.topic, d.rest_at_edge,
                                d.recipient_key, d.retime_ms, d.spool_max_mb, d.spool_when_full, d.bundle)
            for d in spec.destinations
        })
        self.size_limits: Mapping[str, int] = MappingProxyType(
            {t.name: t.max_size for t in spec.device_types.values() if t.max_size is not None}
        )
        self._order = spec.rule_order
        self._deny = _Selector(list(spec.denylist))
        self._registry = _Selector(list(spec.devices))
        # grants indexed by exact device id / device type; each grant's filters are split the first
        # time a message needs them (a 10k-device site should not pay for devices that never speak)
        by_device: dict[str, list[GrantSpec]] = {}
        by_type: dict[str, list[GrantSpec]] = {}
        generic: list[GrantSpec] = []
        for g in spec.grants:
            devs = g.devices
            if devs is not None and len(devs) == 1 and "*" not in devs[0] and "?" not in devs[0] and "[" not in devs[0]:
                lst = by_device.get(devs[0])
                if lst is None:
                    by_device[devs[0]] = [g]
                else:
                    lst.append(g)
            elif devs is not None and not any(is_glob(p) for p in devs):
                for p in dict.fromkeys(devs):
                    by_device.setdefault(p, []).append(g)
            elif devs is None and g.device_types is not None:
                for t in g.device_types:
                    by_type.setdefault(t, []).append(g)
            else:
                generic.append(g)
        self._grants_by_device = by_device
        self._grants_by_type = by_type
        self._grants_generic = generic
        self._compiled_grants: dict[int, _Grant] = {}
        self._dests = tuple(_DestPlan(d, spec) for d in spec.destinations)
        conditioned: tuple[RuleSpec | ObligationSpec, ...] = (
            *spec.rules, *(o for d in spec.destinations for o in d.obligations))
        self._fallible = tuple(
            (r.rule_id, r.when.vendors is not None, r.when.device_types is not None)
            for r in conditioned
            if r.when.vendors is not None or r.when.device_types is not None
        )
        self._memo: dict[tuple[Any, ...], Decision] = {}
        self.planned = 0  # decisions planned, not taken from the memo (each costs ~27 us: BENCHMARKS.md §3)
        self._shared: dict[Decision, Decision] = {}  # equal decisions -> one object (bounded like the memo)
        # The routes once a grant is found depend on the device only through conditions on devices or
        # topics; without any, devices of the same type, vendor, stream and fields share their routes.
        self._routes_memo: dict[tuple[Any, ...], Decision] = {}
        self._routes_see_device = any(
            r.when.devices is not None or r.when.topics is not None for r in conditioned
        )
        self._denials: dict[tuple[str, str], Decision] = {}
        self._limits = {t.name: (t.max_size, t.rule_id) for t in spec.device_types.values()}
        self._contracts = frozenset(v.name for v in spec.vendors.values() if v.maintenance_contract)

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        """The policy's warnings (``lint.*``, ``ref.*``), computed the first time they are asked for."""
        if callable(self._warnings):
            self._warnings = self._warnings()
        return tuple(self._warnings)

    # -- registry ------------------------------------------------------------------------------------
    def device(self, device_id: str) -> DeviceEntry | None:
        d: DeviceSpec | None = self._registry.first(device_id)
        if d is None:
            return None
        return DeviceEntry(device_id, d.device_type, d.vendor, d.vendor in self._contracts and d.maintenance is not False)

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(sorted((r for r, o in self._order.items() if o > 0), key=self._order.__getitem__))

    # -- deciding ------------------------------------------------------------------------------------
    def decide(self, facts: MessageFacts) -> Decision:
        limit = self._limits.get(facts.device_type)
        size_ok = limit is not None and limit[0] is not None and facts.size <= limit[0]
        key = (facts.device_id, facts.device_type, facts.vendor, facts.site, facts.topic, facts.stream,
               facts.fields, size_ok)
        hit = self._memo.get(key)
        if hit is None:
            if len(self._memo) >= MEMO_SIZE:
                _drop_older_half(self._memo)
            hit = self._memo[key] = self._decide(facts, size_ok)
            self.planned += 1
        return hit

    def _share(self, decision: Decision) -> Decision:
        """The one object for every Decision equal to ``decision`` (hashing one walks its routes)."""
        hit = self._shared.get(decision)
        if hit is None:
            if len(self._shared) >= MEMO_SIZE:  # only with conditions that name devices or topics
                self._shared.clear()
            hit = self._shared[decision] = decision
        return hit

    def decide_uncached(self, facts: MessageFacts) -> Decision:
        """``decide`` without the memo (for measuring the plan itself)."""
        limit = self._limits.get(facts.device_type)
        return self._decide(facts, limit is not None and limit[0] is not None and facts.size <= limit[0])

    def explain(self, facts: MessageFacts) -> tuple[Decision, list[str]]:
        """The decision and a readable trace of how the reference evaluator reached it."""
        trace: list[str] = []
        decision = reference_decide(self.spec, self.revision, facts, trace)
        return decision, trace

    def _deny_all(self, reason: str, rule: str) -> Decision:
        # one shared Decision per (reason, rule): hostile traffic that is denied outright costs no memory
        hit = self._denials.get((reason, rule))
        if hit is None:
            rules = (rule,)
            hit = Decision(self.revision, tuple(Route(d.name, False, rules=rules, reason=reason) for d in self._dests))
            self._denials[(reason, rule)] = hit
        return hit

    def _sorted(self, ids: set[str]) -> tuple[str, ...]:
        order = self._order
        return tuple(sorted(ids, key=lambda r: (order.get(r, 0), r)))

    def _decide(self, facts: MessageFacts, size_ok: bool) -> Decision:
        if facts.site != self.site:
            return self._deny_all("policy.site", "builtin.site")
        device_id = facts.device_id
        e = self._deny.first(device_id)
        if e is not None:
            return self._deny_all("policy.denylisted", e.rule_id)
        entry: DeviceSpec | None = self._registry.first(device_id)
        if entry is None and self.spec.require_registered:
            return self._deny_all("policy.unknown_device", "builtin.registry")
        topic = facts.topic
        if not topic.startswith(f"site/{facts.site}/dev/{device_id}/"):
            return self._deny_all("policy.namespace", "builtin.namespace")
        cands = [*self._grants_by_device.get(device_id, ()), *self._grants_by_type.get(facts.device_type, ()),
                 *self._grants_generic]
        if len(cands) > 1:
            cands.sort(key=lambda g: g.order)
        levels = topic.split("/")
        grant = None
        compiled = self._compiled_grants
        for gs in cands:
            g = compiled.get(gs.order)
            if g is None:
                g = compiled[gs.order] = _Grant(gs, self.site)
            if g.selects(device_id, facts.device_type) and g.matches(device_id, topic, levels):
                grant = g
                break
        if grant is None:
            return self._deny_all("policy.no_grant", "builtin.default_deny")
        if not size_ok:
            lim = self._limits.get(facts.device_type)
            return self._deny_all("policy.size_limit", "builtin.size_limit" if lim is None or lim[0] is None
                                  else lim[1])
        errors: tuple[str, ...] = ()
        if self._fallible and (not facts.vendor or not facts.device_type):
            errs = set()
            for rid, on_vendor, on_type in self._fallible:
                if on_vendor and not facts.vendor:
                    errs.add(f"{rid}: condition on vendor but the message has no vendor")
                if on_type and not facts.device_type:
                    errs.add(f"{rid}: condition on device_type but the message has no device type")
            errors = tuple(sorted(errs))
        has_contract = facts.vendor in self._contracts and (entry is None or entry.maintenance is not False)
        gid = grant.rule_id
        # What _route reads of the facts: fields, vendor, type, stream (and device and topic only
        # through `when` conditions that name them); site is the policy's own.
        key = (gid, has_contract, facts.fields, facts.vendor, facts.device_type, facts.stream,
               *((facts.device_id, facts.topic) if self._routes_see_device else ()), errors)
        hit = self._routes_memo.get(key)
        if hit is None:
            routes = tuple(self._route(d, facts, has_contract, gid) for d in self._dests)
            if len(self._routes_memo) >= MEMO_SIZE:
                _drop_older_half(self._routes_memo)
            hit = self._routes_memo[key] = self._share(Decision(self.revision, routes, errors))
        return hit

    def _route(self, d: _DestPlan, facts: MessageFacts, has_contract: bool, gid: str) -> Route:
        if not d.jur_ok:
            return Route(d.name, False, rules=self._sorted({gid, "builtin.jurisdiction"}), reason="policy.jurisdiction")
        if d.requires_contract and not has_contract:
            return Route(d.name, False, rules=self._sorted({gid, "builtin.contract"}), reason="policy.no_contract")
        site = self.site
        for r in d.route_forbids:
            if r.when.always or _when(r.when, facts, site) is not False:
                return Route(d.name, False, rules=self._sorted({gid, r.rule_id}), reason="policy.forbid")
        fields = facts.fields
        for o in d.drops:
            if not o.when.always and _when(o.when, facts, site) is False:
                continue
            for name, cls in fields:
                if (o.fields is not None and name in o.fields) or (o.classes is not None and cls in o.classes):
                    return Route(d.name, False, rules=self._sorted({gid, o.rule_id}), reason="policy.drop")
        going: list[str] = []
        removed: list[tuple[str, str]] = []
        quantize: list[tuple[str, float]] = []
        used = {gid}
        for name, cls in fields:
            reason = rule = ""
            if cls == "prohibited":
                reason, rule = "policy.prohibited_class", "builtin.prohibited"
            else:
                for r in d.field_forbids:
                    if r.classes is not None and cls not in r.classes:
                        continue
                    if r.fields is not None and name not in r.fields:
                        continue
                    if r.when.always or _when(r.when, facts, site) is not False:
                        reason, rule = "policy.forbid", r.rule_id
                        break
                if not reason:
                    blocked = d.block.get(cls)
                    if blocked is not None:
                        reason, rule = blocked
            permit = None
            if not reason:
                for r in d.permits.get(cls, ()):  # a class the policy does not know: only an explicit permit
                    if r.fields is not None and name not in r.fields:
                        continue
                    if r.when.always or _when(r.when, facts, site):
                        permit = r.rule_id
                        break
                if permit is None:
                    reason, rule = "policy.class_not_allowed", "builtin.default_deny"
            if reason:
                if d.deny_mode:
                    return Route(d.name, False, rules=self._sorted({gid, rule}), reason=reason)
                removed.append((name, reason))
                used.add(rule)
                continue
            redacted = False
            for o in d.removes:
                if (o.fields is not None and name in o.fields) or (o.classes is not None and cls in o.classes):
                    if o.when.always or _when(o.when, facts, site) is not False:
                        removed.append((name, "policy.redact"))
                        used.add(o.rule_id)
                        redacted = True
                        break
            if redacted:
                continue
            assert permit is not None
            used.add(permit)
            going.append(name)
            for o, step in d.quantize.get(name, ()):
                if o.when.always or _when(o.when, facts, site) is not False:
                    quantize.append((name, step))
                    used.add(o.rule_id)
                    break
        if d.drop_empty and fields and not going:
            return Route(d.name, False, removed=tuple(removed), rules=self._sorted({gid, "builtin.empty"}),
                         reason="policy.empty")
        return Route(d.name, True, tuple(going), tuple(removed), tuple(quantize), self._sorted(used), "")

    # -- broker ACL ----------------------------------------------------------------------------------
    def render_acl(self) -> str:
        """A Mosquitto ``acl_file`` for this policy (pattern lines: no per-device enumeration)."""
        site = self.site
        lines = [
            f"# Mosquitto ACL generated by Edgeward from policy revision {self.revision} (site {site}).",
            "# Do not edit: edit the policy and re-render. Devices authenticate by client certificate,",
            "# whose CN (= the device id) Mosquitto uses as the username (%u).",
            "",
            "# The gateway reads every device namespace and writes only its own uplink topics.",
            f"user {GATEWAY_USER}",
            f"topic read site/{site}/dev/#",
            "topic write edgeward/#",
            "",
            "# Every other client (a registered device): write only under its own namespace,",
            "# read only its own command topic. Pattern lines apply to all users.",
            f"pattern write site/{site}/dev/%u/#",
            f"pattern read site/{site}/cmd/%u",
            "",
        ]
        return "\n".join(lines)
