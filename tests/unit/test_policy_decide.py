"""Decisions of the compiled engine: semantics, reasons, rule ids, errors, ACL."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.model import MessageFacts
from gateway.policy import compile_policy, load_policy, shadow_divergences

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
edgeward_policy: 1
site: S1
jurisdiction: NL
allowed_jurisdictions: [on_prem, NL, EU, CN]
vendors: {acme: {maintenance_contract: true}, shady: {}}
device_types: {xray_baggage: {max_size: 1000}}
devices:
  - {id: "xr-*", type: xray_baggage, vendor: acme}
  - {id: xr-00009, type: xray_baggage, vendor: acme, maintenance: false}
grants:
  - {id: own, devices: "*", topics: ["site/{site}/dev/{device}/result", "site/{site}/dev/{device}/status/#"]}
destinations:
  vault: {jurisdiction: on_prem, transport: vault}
  hub:
    jurisdiction: EU
    transport: mqtt
    obligations:
      - {id: q, quantize: {score: 0.5}}
      - {id: rm, remove: [note]}
  vendor:
    jurisdiction: CN
    transport: mqtt
    requires_contract: true
    obligations: [{id: nopii, drop: {classes: [pii]}}]
rules:
  - {id: all-vault, effect: permit, destinations: [vault], classes: "*"}
  - {id: hub-v, effect: permit, destinations: [hub], classes: [verdict, operational]}
  - {id: vendor-t, effect: permit, destinations: [vendor], classes: [telemetry]}
  - {id: no-op-hub, effect: forbid, destinations: [hub], fields: [operator_id]}
"""


def facts(device: str = "xr-00001", stream: str = "result", fields: tuple[tuple[str, str], ...] = (),
          size: int = 10, vendor: str = "acme", topic: str | None = None, site: str = "S1",
          device_type: str = "xray_baggage") -> MessageFacts:
    return MessageFacts(device, device_type, vendor, site, topic or f"site/S1/dev/{device}/{stream}", stream,
                        size, fields)


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return compile_policy(BASE)


def route(decision, name):  # type: ignore[no-untyped-def]
    return next(r for r in decision.routes if r.destination == name)


def test_routes_one_per_destination_in_declaration_order(policy) -> None:  # type: ignore[no-untyped-def]
    d = policy.decide(facts(fields=(("verdict", "verdict"),)))
    assert [r.destination for r in d.routes] == ["vault", "hub", "vendor"]
    assert d.revision == policy.revision


def test_projection_removes_fields_with_reasons(policy) -> None:  # type: ignore[no-untyped-def]
    f = facts(fields=(("verdict", "verdict"), ("bag_tag", "pii"), ("operator_id", "operational"),
                      ("score", "verdict"), ("note", "verdict")))
    d = policy.decide(f)
    hub = route(d, "hub")
    assert hub.allow and hub.fields == ("verdict", "score")
    assert hub.removed == (("bag_tag", "policy.class_not_allowed"), ("operator_id", "policy.forbid"),
                           ("note", "policy.redact"))
    assert hub.quantize == (("score", 0.5),)
    assert hub.rules == ("builtin.default_deny", "own", "hub-v", "no-op-hub", "q", "rm")
    vendor = route(d, "vendor")
    assert (vendor.allow, vendor.reason, vendor.rules) == (False, "policy.drop", ("own", "nopii"))


def test_message_level_denials(policy) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "policy.site": facts(site="S2"),
        "policy.namespace": facts(topic="site/S1/dev/xr-00002/result"),
        "policy.no_grant": facts(stream="debug"),
        "policy.size_limit": facts(size=1001),
        "policy.unknown_device": facts(device="zz-1"),
    }
    for reason, f in cases.items():
        d = policy.decide(f)
        assert {(r.allow, r.reason) for r in d.routes} == {(False, reason)}, reason
    assert route(policy.decide(facts(size=1000)), "vault").allow


def test_maintenance_contract(policy) -> None:  # type: ignore[no-untyped-def]
    health = (("uptime_s", "telemetry"),)
    assert route(policy.decide(facts(stream="status/health", fields=health)), "vendor").allow
    no = route(policy.decide(facts(stream="status/health", fields=health, vendor="shady")), "vendor")
    assert (no.allow, no.reason) == (False, "policy.no_contract")
    opted_out = route(policy.decide(facts(device="xr-00009", stream="status/health", fields=health)), "vendor")
    assert opted_out.reason == "policy.no_contract"
    assert policy.device("xr-00009").maintenance is False and policy.device("xr-00001").maintenance is True


def test_prohibited_is_never_allowed_even_by_explicit_permit() -> None:
    p = compile_policy(BASE + "  - {id: yes-prohibited, effect: permit, destinations: '*', classes: [prohibited]}\n")
    d = p.decide(facts(fields=(("ethnicity", "prohibited"), ("verdict", "verdict"))))
    for r in d.routes[:2]:
        assert ("ethnicity", "policy.prohibited_class") in r.removed and "ethnicity" not in r.fields
    assert any(w.code == "lint.prohibited_permit" for w in p.warnings)


def test_forbid_wins_over_permit_whatever_the_order() -> None:
    text = BASE.replace("rules:\n", "rules:\n  - {id: f-all, effect: forbid, destinations: [vault], classes: [pii]}\n")
    p = compile_policy(text)
    vault = route(p.decide(facts(fields=(("bag_tag", "pii"), ("v", "verdict")))), "vault")
    assert vault.fields == ("v",) and vault.removed == (("bag_tag", "policy.forbid"),)
    whole = compile_policy(BASE + "  - {id: f-route, effect: forbid, destinations: [vault]}\n")
    vault = route(whole.decide(facts(fields=(("v", "verdict"),))), "vault")
    assert (vault.allow, vault.reason, vault.rules) == (False, "policy.forbid", ("own", "f-route"))


def test_deny_mode_is_all_or_nothing() -> None:
    p = compile_policy(BASE.replace("jurisdiction: NL\n", "jurisdiction: NL\ndefaults: {on_disallowed_field: deny}\n", 1))
    hub = route(p.decide(facts(fields=(("verdict", "verdict"), ("bag_tag", "pii")))), "hub")
    assert (hub.allow, hub.reason) == (False, "policy.class_not_allowed")
    hub = route(p.decide(facts(fields=(("verdict", "verdict"), ("note", "verdict")))), "hub")
    assert hub.allow and hub.removed == (("note", "policy.redact"),)  # redaction never denies


def test_empty_message_and_drop_when_empty(policy) -> None:  # type: ignore[no-untyped-def]
    assert route(policy.decide(facts(fields=())), "hub").allow  # nothing to remove: goes (bench semantics)
    hub = route(policy.decide(facts(fields=(("bag_tag", "pii"),))), "hub")
    assert (hub.allow, hub.reason) == (False, "policy.empty")


def test_rule_that_errors_never_grants_and_is_recorded() -> None:
    text = BASE.replace("{id: hub-v, effect: permit, destinations: [hub], classes: [verdict, operational]}",
                        "{id: hub-v, effect: permit, destinations: [hub], classes: [verdict], when: {vendors: [acme]}}")
    p = compile_policy(text)
    ok = p.decide(facts(fields=(("v", "verdict"),)))
    assert route(ok, "hub").allow and ok.errors == ()
    err = p.decide(facts(fields=(("v", "verdict"),), vendor=""))
    assert not route(err, "hub").allow
    assert err.errors == ("hub-v: condition on vendor but the message has no vendor",)


def test_memoised_decisions_are_the_same_object_and_size_only_matters_at_the_limit(policy) -> None:  # type: ignore[no-untyped-def]
    a = policy.decide(facts(fields=(("v", "verdict"),), size=5))
    b = policy.decide(facts(fields=(("v", "verdict"),), size=999))
    assert a is b
    assert policy.decide_uncached(facts(fields=(("v", "verdict"),), size=5)) == a


def test_a_fleet_that_sends_in_turn_is_planned_once_per_device_and_stream(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # 10,000 devices x 2 streams, each sending in turn: cleared whole at 16,384 keys, the memo missed on
    # every message of the second turn. A full memo now forgets only its older half.
    from gateway.policy import engine

    p = compile_policy(BASE)
    fleet = [facts(device=f"xr-{i:05d}", stream=s, fields=(("v", "verdict"),))
             for i in range(10_000) for s in ("result", "status/health")]
    first = [p.decide(f) for f in fleet]
    assert p.planned == len(fleet)
    assert [p.decide(f) for f in fleet] == first and p.planned == len(fleet)
    # past the bound: the older half is planned again, the newer half still comes from the memo
    monkeypatch.setattr(engine, "MEMO_SIZE", 8_000)
    p._memo.clear()
    for f in fleet[:8_000]:
        p.decide(f)
    p.decide(fleet[8_000])  # full: drops fleet[:4_000]
    planned = p.planned
    for f in fleet[4_000:8_000]:
        p.decide(f)
    assert p.planned == planned
    p.decide(fleet[0])
    assert p.planned == planned + 1


def test_explain_agrees_and_traces(policy) -> None:  # type: ignore[no-untyped-def]
    f = facts(fields=(("verdict", "verdict"), ("operator_id", "operational")))
    decision, trace = policy.explain(f)
    assert decision == policy.decide(f)
    assert any("grant own" in line for line in trace)
    assert any("[hub] field 'operator_id' (operational) removed: policy.forbid (no-op-hub)" in line for line in trace)


def test_device_patterns_first_match_wins() -> None:
    p = compile_policy(BASE)
    assert p.device("xr-00009").device_type == "xray_baggage"  # type: ignore[union-attr]
    assert p.device("xr") is None


def test_render_acl() -> None:
    acl = load_policy(ROOT / "policies").render_acl()
    lines = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "user edgeward-gateway",
        "topic read site/AMS-T1/dev/#",
        "topic write edgeward/#",
        "pattern write site/AMS-T1/dev/%u/#",
        "pattern read site/AMS-T1/cmd/%u",
    ]


def test_shadow_divergences(policy) -> None:  # type: ignore[no-untyped-def]
    stricter = compile_policy(BASE + "  - {id: f-route, effect: forbid, destinations: [vault]}\n")
    f = facts(fields=(("v", "verdict"),))
    divs = shadow_divergences(policy.decide(f), stricter.decide(f))
    assert [(d.destination, d.kind) for d in divs] == [("vault", "allow")]
    assert divs[0].live.startswith("allow") and divs[0].candidate == "deny (policy.forbid)"
    assert shadow_divergences(policy.decide(f), policy.decide(f)) == []


def test_equal_decisions_for_different_devices_are_one_object(policy) -> None:  # type: ignore[no-untyped-def]
    a = policy.decide(facts(device="xr-00001", fields=(("v", "verdict"),)))
    b = policy.decide(facts(device="xr-00002", fields=(("v", "verdict"),)))
    assert a == b and a is b  # shared, so what callers derive from a decision is derived once
    other = policy.decide(facts(device="xr-00002", fields=(("v", "verdict"), ("t", "telemetry"))))
    assert other != a and other is not a


@pytest.mark.parametrize("when", ["{devices: [xr-00001]}", "{topics: ['site/{site}/dev/xr-00001/#']}"])
def test_routes_shared_between_devices_only_when_no_condition_names_a_device(when: str) -> None:
    p = compile_policy(BASE + f"  - {{id: not-1, effect: forbid, destinations: [hub], when: {when}}}\n")
    f = (("v", "verdict"),)
    assert not route(p.decide(facts(device="xr-00001", fields=f)), "hub").allow
    assert route(p.decide(facts(device="xr-00002", fields=f)), "hub").allow
    assert not route(p.decide(facts(device="xr-00001", fields=f, stream="status/health")), "hub").allow
    plain = compile_policy(BASE)
    a = plain.decide(facts(device="xr-00001", fields=f))
    assert plain.decide(facts(device="xr-00002", fields=f)).routes is a.routes  # planned once
