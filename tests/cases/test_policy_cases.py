"""The operator's decision cases (policies/cases/*.yaml) against the default policy, one test each."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy import load_policy
from gateway.policy.cases import load_cases, run_case

ROOT = Path(__file__).resolve().parents[2]
CASES = load_cases(ROOT / "policies" / "cases")
POLICY = load_policy(ROOT / "policies")


def test_there_are_cases_for_every_family_and_destination() -> None:
    from gateway.catalog import DEVICE_TYPES

    prefixes = {c["message"]["device"].split("-")[0] for _, c in CASES}
    assert {t.id_prefix for t in DEVICE_TYPES.values()} <= prefixes
    named = {d for _, c in CASES for d in (c.get("expect", {}).get("routes") or {})}
    assert set(POLICY.destinations) <= named


@pytest.mark.parametrize(("name", "case"), CASES, ids=[n for n, _ in CASES])
def test_case(name: str, case: dict[str, object]) -> None:
    decision, problems = run_case(POLICY, case)
    assert decision is not None
    assert problems == [], "\n".join(problems)
    assert POLICY.explain(_facts(case))[0] == decision  # the reference evaluator agrees


def _facts(case: dict[str, object]):  # type: ignore[no-untyped-def]
    from gateway.policy.cases import facts_for

    msg = dict(case["message"])  # type: ignore[call-overload]
    return facts_for(POLICY, device=msg.pop("device"), topic=msg.pop("topic", ""), stream=msg.pop("stream", ""),
                     size=msg.pop("size", 100), fields=msg.pop("fields", ()), **msg)
