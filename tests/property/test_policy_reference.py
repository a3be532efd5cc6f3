"""The compiled engine and the slow reference evaluator agree on generated policies and messages.

Policies are generated as the plain data an operator's YAML gives and go through the normal compiler;
messages are drawn from the same small vocabularies so that grants, patterns, forbids and obligations
actually collide. Any difference in any route (allow, fields, removed, quantize, rules, reason) or in
the rule errors fails.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import PolicyError
from gateway.model import MessageFacts
from gateway.policy import compile_data
from gateway.policy.reference import reference_decide, topic_matches

DEVICES = ["d1", "d2", "d10", "x1"]
PATTERNS = [*DEVICES, "d*", "x?", "*", "d[12]"]
TYPES = ["xray_baggage", "body_scanner", "odd"]
VENDORS = ["acme", "shady", ""]
CLASSES = ["pii", "verdict", "telemetry", "biometric", "prohibited", "image", "weird"]
FIELDS = ["a", "b", "c", "serial"]
STREAMS = ["result", "status/health", "x"]
JURIS = ["on_prem", "NL", "EU", "CN"]
DESTS = ["vault", "hub", "vendor"]
LEVEL = st.sampled_from(["result", "status", "health", "x", "+", "{device}", "d1", "d2"])


def sub(xs: list[str], min_size: int = 0) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(xs), min_size=min_size, max_size=3, unique=True)


@st.composite
def filters(draw: Any) -> str:
    dev = draw(st.sampled_from(["{device}", "+", "d1", "d10", "#"]))
    if dev == "#":
        return "site/{site}/dev/#"
    rest = draw(st.lists(LEVEL, min_size=0, max_size=2))
    tail = draw(st.sampled_from(["", "/#"]))
    return "/".join(["site", draw(st.sampled_from(["{site}", "+", "S"])), "dev", dev, *rest]) + tail


@st.composite
def whens(draw: Any) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    w: dict[str, Any] = {}
    for key, pool in (("devices", PATTERNS), ("device_types", TYPES), ("vendors", VENDORS[:2]),
                      ("streams", STREAMS)):
        if draw(st.integers(0, 3)) == 3:
            w[key] = draw(sub(pool, 1))
    if draw(st.integers(0, 4)) == 4:
        w["topics"] = [draw(filters())]
    return w


def with_when(d: dict[str, Any], w: dict[str, Any] | None) -> dict[str, Any]:
    if w is not None:
        d["when"] = w
    return d


@st.composite
def policies(draw: Any) -> dict[str, Any]:
    dests: dict[str, Any] = {}
    for name in draw(sub(DESTS, 1)):
        body: dict[str, Any] = {
            "jurisdiction": draw(st.sampled_from(JURIS)),
            "transport": draw(st.sampled_from(["vault", "mqtt"])),
            "on_disallowed_field": draw(st.sampled_from(["remove", "deny"])),
            "requires_contract": draw(st.booleans()),
            "drop_when_empty": draw(st.booleans()),
        }
        obls = []
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["remove", "drop", "quantize"]))
            if kind == "quantize":
                o: dict[str, Any] = {"quantize": {f: draw(st.sampled_from([0.5, 1.0])) for f in draw(sub(FIELDS, 1))}}
            else:
                o = {kind: {"fields": draw(sub(FIELDS, 1))} if draw(st.booleans()) else {"classes": draw(sub(CLASSES, 1))}}
            obls.append(with_when(o, draw(whens())))
        if obls:
            body["obligations"] = obls
        dests[name] = body
    rules = []
    for _ in range(draw(st.integers(0, 6))):
        effect = draw(st.sampled_from(["permit", "permit", "forbid"]))
        r: dict[str, Any] = {"effect": effect,
                             "destinations": "*" if draw(st.integers(0, 4)) == 0 else draw(sub(DESTS, 1))}
        if effect == "permit" or draw(st.booleans()):
            r["classes"] = "*" if draw(st.integers(0, 3)) == 0 else draw(sub(CLASSES, 1))
        if draw(st.integers(0, 2)) == 2:
            r["fields"] = draw(sub(FIELDS, 1))
        rules.append(with_when(r, draw(whens())))
    return {
        "edgeward_policy": 1,
        "site": "S",
        "jurisdiction": "NL",
        "allowed_jurisdictions": JURIS if not draw(st.booleans()) else draw(sub(JURIS, 1)),
        "defaults": {"require_registered": draw(st.integers(0, 5)) == 5},
        "data_classes": {c: {"vault_only": draw(st.booleans())} if draw(st.booleans())
                         else {"reside": draw(sub(JURIS, 1))} for c in draw(sub(CLASSES[:4]))},
        "vendors": {"acme": {"maintenance_contract": True}, "shady": {"maintenance_contract": draw(st.booleans())}},
        "device_types": {t: {"max_size": draw(st.sampled_from([100, 100, 50]))}
                         for t in TYPES if draw(st.integers(0, 9)) != 9},
        "devices": [{"id": draw(st.sampled_from(PATTERNS)), "type": draw(st.sampled_from(TYPES)),
                     "vendor": draw(st.sampled_from(VENDORS[:2])),
                     **({"maintenance": draw(st.booleans())} if draw(st.booleans()) else {})}
                    for _ in range(draw(st.integers(0, 4)))],
        "denylist": draw(st.lists(st.sampled_from(PATTERNS), max_size=1)) if draw(st.integers(0, 5)) == 5 else [],
        "grants": [{"devices": draw(sub(PATTERNS, 1)) if draw(st.booleans()) else "*",
                    **({"device_types": draw(sub(TYPES, 1))} if draw(st.booleans()) else {}),
                    "topics": draw(st.lists(filters(), min_size=1, max_size=3))}
                   for _ in range(draw(st.integers(0, 3)))]
                  + ([{"devices": "*", "topics": ["site/{site}/dev/{device}/#"]}] if draw(st.integers(0, 3)) != 3 else []),
        "rules": rules,
        "destinations": dests,
    }


@st.composite
def messages(draw: Any) -> MessageFacts:
    device = draw(st.sampled_from(DEVICES))
    owner = draw(st.sampled_from([device] * 6 + ["d1", "d10"]))
    stream = draw(st.sampled_from(STREAMS))
    site = draw(st.sampled_from(["S"] * 6 + ["T"]))
    topic = f"site/{draw(st.sampled_from([site] * 4 + ['S']))}/dev/{owner}/{stream}"
    fields = tuple(draw(st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(CLASSES)), max_size=4)))
    return MessageFacts(device, draw(st.sampled_from([*TYPES] * 3 + [""])), draw(st.sampled_from(VENDORS)), site, topic,
                        stream, draw(st.sampled_from([0, 60, 60, 60, 100, 101])), fields)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies(), st.lists(messages(), min_size=1, max_size=8))
def test_engine_agrees_with_reference(data: dict[str, Any], msgs: list[MessageFacts]) -> None:
    try:
        policy = compile_data(data)
    except PolicyError:
        return  # the generator can produce invalid combinations (e.g. none); validity is tested elsewhere
    for f in msgs:
        expected = reference_decide(policy.spec, policy.revision, f)
        assert policy.decide_uncached(f) == expected, f
        assert policy.decide(f) == expected
        assert policy.decide(f) is policy.decide(f)


def _naive_match(filt: str, topic: str) -> bool:
    """MQTT matching by recursion on levels, as the spec reads."""

    def go(f: list[str], t: list[str]) -> bool:
        if not f:
            return not t
        if f[0] == "#":
            return True
        if not t:
            return False
        return (f[0] == "+" or f[0] == t[0]) and go(f[1:], t[1:])

    return go(filt.split("/"), topic.split("/"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "", "+"]), min_size=1, max_size=4), st.booleans(),
       st.lists(st.sampled_from(["a", "b", ""]), min_size=1, max_size=5))
def test_topic_matching(levels: list[str], hash_tail: bool, topic: list[str]) -> None:
    f = "/".join(levels + (["#"] if hash_tail else []))
    assert topic_matches(f, "/".join(topic)) == _naive_match(f, "/".join(topic))
    if hash_tail:  # 'a/#' matches its parent 'a'
        parent = "/".join(x if x != "+" else "p" for x in levels)
        assert topic_matches(f, parent)
