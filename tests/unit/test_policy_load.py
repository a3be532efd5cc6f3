"""Loading, validation and diagnostics of policy files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.errors import PolicyError
from gateway.policy import Diagnostic, Policy, compile_data, compile_policy, load_policy

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"

MINIMAL = """\
edgeward_policy: 1
site: AMS-T1
jurisdiction: NL
destinations:
  local_vault: {jurisdiction: on_prem, transport: vault}
"""


def errors_of(text: str, source: str = "p.yaml") -> list[Diagnostic]:
    with pytest.raises(PolicyError) as info:
        compile_policy(text, source=source)
    return info.value.diagnostics  # type: ignore[return-value]


def test_default_policy_loads_without_warnings() -> None:
    p = load_policy(POLICIES)
    assert isinstance(p, Policy)
    assert (p.site, p.jurisdiction) == ("AMS-T1", "NL")
    assert list(p.destinations) == ["local_vault", "customs_nl", "eu_hub", "vendor_maintenance"]
    assert len(p.revision) == 16 and int(p.revision, 16) >= 0
    assert p.warnings == ()
    vm = p.destinations["vendor_maintenance"]
    assert (vm.transport, vm.topic, vm.jurisdiction) == ("mqtt", "edgeward/out/vendor_maintenance", "CN")
    assert p.destinations["local_vault"].topic == "" and p.destinations["local_vault"].rest_at_edge


def test_default_policy_files_match_the_json_schema() -> None:
    schema = json.loads((POLICIES / "policy.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    merged: dict[str, object] = {}
    for f in sorted(POLICIES.glob("*.yaml")):
        data = yaml.safe_load(f.read_text())
        assert list(validator.iter_errors(data)) == [], f
        merged.update(data)
    assert list(validator.iter_errors(merged)) == []
    bad = {"edgeward_policy": 1, "site": "x", "jurisdiction": "NL", "rules": [{"effect": "allow"}]}
    assert list(validator.iter_errors(bad))


def test_registry_covers_every_catalogue_type_by_pattern() -> None:
    from gateway.catalog import DEVICE_TYPES

    p = load_policy(POLICIES)
    for t in DEVICE_TYPES.values():
        entry = p.device(f"{t.id_prefix}-00001")
        assert entry is not None and entry.device_type == t.name
        assert p.size_limits[t.name] == t.max_payload
    assert p.device("zz-00001") is None
    assert p.device("xr-00001").maintenance is True  # type: ignore[union-attr]
    assert p.device("cg-00001").maintenance is False  # type: ignore[union-attr]


def test_revision_ignores_comments_and_layout_but_not_meaning() -> None:
    a = compile_policy(MINIMAL)
    b = compile_policy("# a comment\n" + MINIMAL.replace("{jurisdiction: on_prem, transport: vault}",
                                                         "\n    jurisdiction: on_prem\n    transport: vault"))
    c = compile_policy(MINIMAL.replace("AMS-T1", "AMS-T2"))
    assert a.revision == b.revision != c.revision


def test_all_errors_at_once_sorted_with_positions_and_hints() -> None:
    text = """\
edgeward_policy: 1
site: AMS-T1
jurisdiction: NL
defaults: {on_disallowed_field: drop}
destinations:
  eu_hub: {jurisdiction: EU, transport: mqtt, trust: medum}
grants:
  - id: g1
    devices: "*"
    topics: ["site/{site}/dev/{device}/res#ult", "site/{site}/dev/{devce}/x"]
  - id: g1
    devices: "*"
    topics: [x]
rules:
  - id: r1
    effect: permit
    destinations: [eu_hub]
    classes: [verdict]
    wen: {streams: [result]}
"""
    diags = errors_of(text)
    assert all(d.severity == "error" for d in diags)
    got = [(d.line, d.col, d.code) for d in diags]
    assert got == sorted(got)
    assert got == [
        (4, 33, "schema.enum"),
        (6, 54, "schema.enum"),
        (10, 14, "value.topic_filter"),
        (10, 50, "value.placeholder"),
        (11, 9, "value.duplicate_id"),
        (19, 5, "schema.unknown_key"),
    ]
    trust = diags[1]
    assert trust.hint == "did you mean 'medium'?"
    assert str(trust).startswith("p.yaml:6:54: schema.enum: trust must be one of")
    assert "\n    hint: did you mean 'medium'?" in str(trust)
    assert "did you mean 'when'?" in diags[-1].hint


def test_yaml_syntax_error_and_duplicate_keys() -> None:
    [d] = errors_of("edgeward_policy: 1\nsite: [a\n")
    assert d.code == "syntax.yaml" and d.line >= 2
    diags = errors_of(MINIMAL + "site: AMS-T2\n")
    assert [(d.code, d.line) for d in diags] == [("syntax.duplicate_key", 6)]
    assert "line 2" in diags[0].hint


def test_flow_list_with_braces_gets_a_quoting_hint() -> None:
    [d] = errors_of(MINIMAL + "grants:\n  - {devices: '*', topics: [site/{site}/dev/{device}/x]}\n")
    assert "quote" in d.hint


def test_missing_required_keys() -> None:
    codes = {(d.code, d.message) for d in errors_of("destinations: {}\n")}
    assert ("schema.missing_key", "missing key 'site'") in codes
    assert ("schema.missing_key", "missing key 'jurisdiction'") in codes
    assert ("schema.missing_key", "missing key 'edgeward_policy'") in codes


def test_warnings_do_not_block_and_are_reported() -> None:
    text = MINIMAL + """\
grants:
  - {id: broad, devices: "*", topics: ["site/{site}/dev/+/heartbeat", "elsewhere/#"]}
rules:
  - {id: p1, effect: permit, destinations: [local_vaultt], classes: [verdikt]}
  - {id: p2, effect: permit, destinations: [local_vault], classes: [verdict]}
  - {id: f1, effect: forbid, destinations: [local_vault], classes: [verdict]}
"""
    p = compile_policy(text, source="w.yaml")
    codes = sorted(d.code for d in p.warnings)
    assert codes == sorted([
        "lint.foreign_namespace", "lint.unreachable_grant", "ref.unknown_destination", "ref.unknown_class",
        "lint.unreachable_rule", "lint.shadowed_rule",
    ])
    assert all(d.severity == "warning" and d.file == "w.yaml" and d.line > 0 for d in p.warnings)


def test_directory_merge_keeps_file_positions(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MINIMAL)
    (tmp_path / "b.yaml").write_text("grants:\n  - {devices: '*', topics: ['site/{site}/dev/{device}/r']}\n"
                                     "destinations:\n  local_vault: {jurisdiction: NL, transport: vault}\n")
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "c.yaml").write_text("not: [a policy\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [d] = info.value.diagnostics
    assert (Path(d.file).name, d.line, d.code) == ("b.yaml", 4, "merge.duplicate")  # type: ignore[attr-defined]
    (tmp_path / "b.yaml").write_text("grants:\n  - {devices: '*', topics: ['site/{site}/dev/{device}/r#']}\n")
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)
    [d] = info.value.diagnostics
    assert (Path(d.file).name, d.line, d.col, d.code) == ("b.yaml", 2, 29, "value.topic_filter")  # type: ignore[attr-defined]
    (tmp_path / "b.yaml").write_text("grants:\n  - {devices: '*', topics: ['site/{site}/dev/{device}/r']}\n")
    p = load_policy(tmp_path)
    assert "b.grants[0]" in p.rule_ids


def test_compile_data_is_the_same_path_without_positions() -> None:
    data = yaml.safe_load(MINIMAL)
    assert compile_data(data).revision == compile_policy(MINIMAL).revision
    with pytest.raises(PolicyError) as info:
        compile_data({**data, "site": 7})
    assert info.value.diagnostics[0].code == "schema.type"  # type: ignore[attr-defined]


def test_rule_ids_explicit_or_derived() -> None:
    p = compile_policy(MINIMAL + "grants:\n  - {devices: '*', topics: [a]}\n  - {id: named, devices: '*', topics: [b]}\n")
    assert {"grants[0]", "named", "device_types.xray_baggage"} - set(p.rule_ids) == {"device_types.xray_baggage"}
    diags = errors_of(MINIMAL + "rules:\n  - {id: builtin.x, effect: forbid, destinations: '*'}\n")
    assert diags[0].code == "value.rule_id"


def test_delivery_settings_defaults_and_values() -> None:
    text = MINIMAL + """\
  hub: {jurisdiction: NL, transport: mqtt}
  fast: {jurisdiction: NL, transport: mqtt, retime_ms: 0, rest_at_edge: true,
         spool: {max_mb: 8, when_full: drop_oldest}, bundle: 1}
"""
    p = compile_policy(text, source="p.yaml")
    assert (p.destinations["local_vault"].retime_ms, p.destinations["hub"].retime_ms) == (0, 5000)
    hub, fast = p.destinations["hub"], p.destinations["fast"]
    assert (hub.spool_max_mb, hub.spool_when_full) == (256.0, "refuse_new")
    assert (fast.retime_ms, fast.spool_max_mb, fast.spool_when_full) == (0, 8.0, "drop_oldest")
    assert (p.destinations["local_vault"].bundle, hub.bundle, fast.bundle) == (1, 64, 1)


def test_bad_delivery_settings_are_reported_with_positions() -> None:
    text = MINIMAL + """\
  a: {jurisdiction: NL, transport: mqtt, retime_ms: -5}
  b: {jurisdiction: NL, transport: mqtt, spool: {max_mb: 8}}
  c: {jurisdiction: NL, transport: mqtt, rest_at_edge: true, spool: {when_full: drop_newest, size: 1}}
  d: {jurisdiction: NL, transport: mqtt, bundle: 0}
  e: {jurisdiction: on_prem, transport: vault, bundle: 8}
"""
    errs = errors_of(text)
    codes = sorted(e.code for e in errs)
    assert codes == ["schema.enum", "schema.unknown_key", "value.bundle", "value.bundle_transport", "value.retime",
                     "value.spool_without_rest"]
    assert all(e.line > 5 and e.col > 0 and e.hint for e in errs)
