"""Warnings about a policy that is valid but probably not what its author meant.

Never errors: a policy with warnings goes live. Each lint explains, in its hint, why the rule cannot
do what it says (unreachable), is overridden by a forbid (shadowed), or lets a device write into
another device's namespace (the built-in namespace check still stops it, but the grant is a mistake).
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate, chain, repeat
from typing import TYPE_CHECKING

from gateway.policy.spec import PolicySpec

if TYPE_CHECKING:
    from gateway.policy.validate import _V

__all__ = ["lint"]


def _namespace_reach(levels: list[str], site: str) -> str:
    """'own', 'foreign' or 'never' for a grant filter against the namespace site/<site>/dev/<id>/..."""
    want = ("site", site, "dev")
    for i, w in enumerate(want):
        if i >= len(levels):
            return "never"
        lv = levels[i]
        if lv == "#":
            return "foreign"
        if lv != "+" and lv != w and not (i == 1 and lv == "{site}"):
            return "never"
    if len(levels) < 4:
        return "never"
    if levels[3] in ("+", "#"):
        return "foreign"
    if len(levels) == 4:
        return "never"  # the namespace needs a level below the device id
    return "own"


def lint(spec: PolicySpec, v: _V) -> None:
    path_of = v.ids
    registered = {d.pattern for d in spec.devices}
    prefix = f"site/{spec.site}/dev/"
    # fast path, at C speed: a single-device grant whose every filter starts with its own namespace
    single = [g for g in spec.grants if g.devices is not None and len(g.devices) == 1]
    own = [prefix + g.devices[0] + "/" for g in single]  # type: ignore[index]  # single: devices is set
    counts = [len(g.topics) for g in single]
    flat_topics = list(chain.from_iterable(g.topics for g in single))
    flat_own = list(chain.from_iterable(map(repeat, own, counts)))
    oks = list(map(str.startswith, flat_topics, flat_own))
    fine = {g.order for g in single}
    if not all(oks):  # find the few offending grants by index, without a Python loop over all of them
        ends = list(accumulate(counts))
        i = oks.index(False)
        while True:
            fine.discard(single[bisect_right(ends, i)].order)
            try:
                i = oks.index(False, i + 1)
            except ValueError:
                break
    todo = spec.grants if spec.require_registered else [g for g in spec.grants if g.order not in fine]
    for g in todo:
        if g.order in fine and not (spec.require_registered and g.devices):
            continue
        gp: tuple[str | int, ...] | None = None
        for j, f in enumerate(g.topics):
            if f.startswith(prefix):  # fast path: the usual site/<site>/dev/<id>/...
                dev, sep, tail = f[len(prefix):].partition("/")
                if sep and dev not in ("+", "#") and (
                    dev == "{device}" or (g.devices is not None and len(g.devices) == 1 and g.devices[0] == dev)
                ):
                    continue
            gp = gp or path_of.get(g.rule_id, ("grants",))
            levels = f.split("/")
            reach = _namespace_reach(levels, spec.site)
            if reach == "never":
                v.warn((*gp, "topics", j), "lint.unreachable_grant",
                       f"{f!r} is outside every device namespace site/{spec.site}/dev/<id>/...",
                       "the built-in namespace check runs first, so this filter can never grant anything")
            elif reach == "foreign":
                v.warn((*gp, "topics", j), "lint.foreign_namespace",
                       f"{f!r} reaches into other devices' namespaces",
                       "use {device} for the device's own id; the namespace check stops it anyway")
            elif levels[3] != "{device}" and not (
                g.devices is not None and len(g.devices) == 1 and g.devices[0] == levels[3]
            ):
                v.warn((*gp, "topics", j), "lint.foreign_namespace",
                       f"{f!r} names device {levels[3]!r} but the grant is for {', '.join(g.devices or ['*'])}",
                       "use {device} so each device is granted only its own namespace")
        if spec.require_registered and g.devices:
            gp = gp or path_of.get(g.rule_id, ("grants",))
            for j, d in enumerate(g.devices):
                if "*" not in d and "?" not in d and "[" not in d and d not in registered and not any(
                    _glob(p, d) for p in registered
                ):
                    v.warn((*gp, "devices", j), "lint.unreachable_grant", f"device {d!r} is not registered",
                           "require_registered is on, so an unregistered device is denied before grants")

    forbids = [r for r in spec.rules if r.effect == "forbid" and r.when.always and r.fields is None]
    dests = {d.name: d for d in spec.destinations}
    for r in spec.rules:
        if r.effect != "permit":
            continue
        rp = path_of.get(r.rule_id, ("rules",))
        if r.classes is not None and "prohibited" in r.classes:
                v.warn(rp, "lint.prohibited_permit", "'prohibited' is never allowed anywhere, whatever a rule says",
                           "remove it from the rule")
        targets = ([dests[n] for n in sorted(r.destinations) if n in dests] if r.destinations is not None
                   else list(dests.values()))
        reachable = []
        for dst in targets:
            if dst.jurisdiction not in spec.allowed_jurisdictions:
                continue
            cls = r.classes if r.classes is not None else frozenset(spec.data_classes)
            for c in cls:
                dc = spec.data_classes.get(c)
                if c == "prohibited" or dc is None:
                    continue
                if dc.vault_only and dst.transport != "vault":
                    continue
                if dc.reside is not None and dst.jurisdiction not in dc.reside:
                    continue
                reachable.append((dst.name, c))
        if not reachable:
            v.warn(rp, "lint.unreachable_rule", f"rule {r.rule_id!r} can never let a field through",
                   "its classes are prohibited, vault-only, may not reside there, or its destinations' "
                   "jurisdictions are not allowed")
            continue
        for fb in forbids:
            if all((fb.destinations is None or dn in fb.destinations)
                   and (fb.classes is None or c in fb.classes) for dn, c in reachable):
                v.warn(rp, "lint.shadowed_rule", f"rule {r.rule_id!r} is overridden by forbid {fb.rule_id!r}",
                       "a matching forbid always wins; remove one of the two")
                break


def _glob(pattern: str, name: str) -> bool:
    from fnmatch import fnmatchcase

    return ("*" in pattern or "?" in pattern or "[" in pattern) and fnmatchcase(name, pattern)
