"""Properties of the policy loader: any text (or plain data) gives a ``Policy`` or one ``PolicyError``
carrying positioned diagnostics — never another exception and never a half-valid policy."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import PolicyError
from gateway.model import MessageFacts
from gateway.policy import Diagnostic, Policy, compile_data, compile_policy, load_policy
from tests.property.conftest import examples

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
SHIPPED_FILES = sorted(p for p in POLICY_DIR.glob("*.yaml"))
SHIPPED = "".join(p.read_text(encoding="utf-8") + "\n" for p in SHIPPED_FILES)

VOCAB = [
    "edgeward_policy", "site", "jurisdiction", "allowed_jurisdictions", "defaults", "data_classes", "vendors",
    "device_types", "devices", "denylist", "grants", "rules", "destinations", "description", "id", "type",
    "vendor", "maintenance", "effect", "permit", "forbid", "classes", "fields", "when", "streams", "topics",
    "transport", "vault", "mqtt", "topic", "trust", "reside", "vault_only", "max_size", "quantize", "remove",
    "obligations", "drop", "on_prem", "NL", "EU", "CN", "*", "xr-*", "pii", "biometric", "prohibited",
    "status/health", "result", "site/{site}/dev/{device}/#", "AMS-T1", "1", "0", "-1", "true", "null", "~",
]


def outcome(text: str) -> Policy | list[Any]:
    """The Policy, or the PolicyError's diagnostics. Any other exception fails the test."""
    try:
        policy = compile_policy(text, source="fuzz.yaml")
    except PolicyError as exc:
        diags = exc.diagnostics
        assert diags, "a PolicyError must say why"
        for d in diags:
            assert isinstance(d, Diagnostic)
            assert d.severity == "error" and d.code and "." in d.code
            assert d.file == "fuzz.yaml" and d.line >= 0 and d.col >= 0
        keys = [d.sort_key() for d in diags]  # type: ignore[attr-defined]
        assert keys == sorted(keys), "diagnostics come sorted by position"
        return diags
    assert isinstance(policy, Policy)
    assert policy.site and policy.revision
    return policy


# ---------------------------------------------------------------------------------- generators
yaml_scalars = st.one_of(
    st.sampled_from(VOCAB),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.none(),
)
yaml_data = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(VOCAB), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
policy_shaped = st.fixed_dictionaries(
    {"edgeward_policy": st.sampled_from([1, 2, "1", None]), "site": st.sampled_from(["AMS-T1", "", 5])},
    optional={k: yaml_data for k in VOCAB[2:14]},
)
fragments = st.one_of(
    st.sampled_from([*VOCAB, ":", ": ", "- ", "\n", "\n  ", "\t", "[", "]", "{", "}", ",", "#", "'", '"', "&a ", "*a", "? ", "|", ">", "---", "...", "!!int ", "!!bool ", "!!timestamp ", "!!binary ", "!x "]),
    st.text(max_size=6),
)
yamlish_text = st.lists(fragments, max_size=60).map("".join)


@settings(max_examples=examples(300))
@given(st.one_of(st.text(max_size=400), yamlish_text))
def test_any_text_compiles_or_raises_policy_error(text: str) -> None:
    outcome(text)


@settings(max_examples=examples(150))
@given(st.one_of(yaml_data, policy_shaped))
def test_any_yaml_document_compiles_or_raises_policy_error(data: Any) -> None:
    outcome(yaml.safe_dump(data, allow_unicode=True))
    try:
        compile_data(data, source="data")
    except PolicyError as exc:
        assert exc.diagnostics


@st.composite
def mutated_shipped(draw: st.DrawFn) -> str:
    """The shipped policy (all files as one text) with a few line-level and token-level edits."""
    lines = SHIPPED.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "token", "value", "truncate"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap" and i + 1 < len(lines):
            lines[i], lines[i + 1] = lines[i + 1], lines[i]
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        elif op == "token":
            line = lines[i]
            j = draw(st.integers(0, len(line)))
            lines[i] = line[:j] + draw(fragments) + line[j:]
        elif op == "value" and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {draw(st.sampled_from(VOCAB))}\n"
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        if not lines:
            break
    return "".join(lines)


@settings(max_examples=examples(200))
@given(mutated_shipped())
def test_mutated_shipped_policy_compiles_or_raises_policy_error(text: str) -> None:
    got = outcome(text)
    if isinstance(got, Policy):
        # whatever compiled must decide without raising, one route per destination, prohibited never sent
        for dev in ("et-00004", "zz-99999"):
            facts = MessageFacts(dev, "trace_detector", "smiths-detection", got.site, f"site/{got.site}/dev/{dev}/result",
                                 "result", 10, (("sample_id", "operational"), ("alarm", "verdict"), ("religion", "prohibited")))
            decision = got.decide(facts)
            assert {r.destination for r in decision.routes} == set(got.destinations)
            assert all("religion" not in r.fields for r in decision.routes)


def test_the_shipped_policy_itself_loads() -> None:
    assert isinstance(load_policy(POLICY_DIR), Policy)
    assert isinstance(outcome(SHIPPED), Policy)


@pytest.mark.parametrize("size", [10, 1000, 10_000])
def test_big_flat_lists_compile_in_bounded_time(size: int) -> None:
    """A registry of ``size`` devices: linear work, no surprise (the operator's own file)."""
    devices = "".join(f"  - {{id: et-{i:05d}, type: trace_detector, vendor: smiths-detection}}\n" for i in range(size))
    text = SHIPPED.replace("devices:\n", "devices:\n" + devices, 1)
    t0 = time.perf_counter()
    outcome(text)
    assert time.perf_counter() - t0 < 30


def test_a_permit_rule_naming_an_undeclared_destination_is_reported_not_a_crash() -> None:
    """Regression: lint() used to index ``dests[n]`` for every destination a permit rule names, so one
    typo (or one deleted line under destinations:) raised KeyError instead of a diagnostic."""
    text = SHIPPED.replace("destinations: [vendor_maintenance]", "destinations: [vendor_maintenace]")
    got = outcome(text)
    if isinstance(got, Policy):
        assert any(d.code == "ref.unknown_destination" for d in got.warnings)


def _policy_error_or_crash(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:  # anything else (KeyError, AttributeError...) fails here
        compile_policy(text, source="bug.yaml")
    return info.value


# ---------------------------------------------------------------------------------- regressions (found here; fixed in d96cd0e)
@pytest.mark.parametrize(
    "text",
    [
        "a: !!timestamp foo",  # AttributeError: 'NoneType' object has no attribute 'groupdict'
        "a: !!bool maybe",  # KeyError: 'maybe'
        "a: !!int ''",  # IndexError: string index out of range
        "a: !!float ''",  # IndexError
    ],
)
def test_policy_explicit_yaml_tags_give_a_policy_error(text: str) -> None:
    """Regression: SafeConstructor raised AttributeError/KeyError/IndexError for tagged scalars it could
    not read, past ``_Walker.scalar``'s except clause."""
    err = _policy_error_or_crash(text)
    assert err.diagnostics


@settings(max_examples=examples(200))
@given(
    st.sampled_from(["!!int", "!!float", "!!bool", "!!timestamp", "!!null", "!!binary", "!!str", "!!merge", "!!omap"]),
    st.text(max_size=12),
)
def test_policy_any_tagged_scalar_gives_a_policy_or_a_policy_error(tag: str, value: str) -> None:
    """The general property: ``key: <tag> <value>`` compiles or raises PolicyError."""
    text = f"a: {tag} {value!r}"
    try:
        compile_policy(text, source="bug.yaml")
    except PolicyError:
        pass


def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_policy_alias_expansion_is_bounded() -> None:
    """Regression: aliases were expanded without bound ("billion laughs"): 279 bytes took 3.4 s, 329 bytes
    ~40 s. Now the walker stops at a node budget with a ``syntax.*`` diagnostic."""
    t0 = time.perf_counter()
    err = _policy_error_or_crash(_alias_bomb(6))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{len(_alias_bomb(6))}-byte policy took {elapsed:.2f}s to refuse"
    assert any(getattr(d, "code", "").startswith("syntax.") for d in err.diagnostics)
