"""Policy test cases: YAML files of message + expected decision, run against a policy.

Operators add cases without Python (like OPA's test/cases and cedar-testing). A case file::

    cases:
      - name: x-ray result goes to customs without the operator id
        message:
          device: xr-00001              # required
          stream: result                # default: result (or taken from topic)
          topic: site/AMS-T1/dev/xr-00001/result   # default: the device's own topic for stream
          size: 1200                    # default 100
          fields: [bag_tag, verdict]    # names (classes from the catalogue) or {name: class}
          # device_type, vendor, site: default from the registry and the policy
        expect:
          errors: []                    # optional: rule errors
          routes:
            local_vault: allow          # allow | deny | a mapping of what to check:
            customs_nl: {allow: true, fields: [bag_tag, verdict], removed: {}, quantize: {}}
            vendor_maintenance: {allow: false, reason: policy.drop}

Only what ``expect`` names is checked. Messages are turned into ``MessageFacts`` the way the pipeline
does: classes from ``gateway.catalog``, device type and vendor from the policy's registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.catalog import ENVELOPE_FIELDS, RESULT_STREAM, schema_for
from gateway.model import Decision, MessageFacts, Route
from gateway.policy.engine import Policy

__all__ = ["CaseResult", "facts_for", "run_cases", "load_cases", "check_expectation"]

UNKNOWN_CLASS = "unknown"


@dataclass(frozen=True, slots=True)
class CaseResult:
    file: str
    name: str
    passed: bool
    problems: tuple[str, ...]
    decision: Decision | None


def facts_for(policy: Policy, *, device: str, topic: str = "", stream: str = "", size: int = 100,
              fields: Any = (), device_type: str | None = None, vendor: str | None = None,
              site: str | None = None) -> MessageFacts:
    """MessageFacts as the pipeline would build them. ``fields``: names (class from the catalogue,
    ``unknown`` when it has none) or a mapping name -> class."""
    site = policy.site if site is None else site
    entry = policy.device(device)
    dtype = device_type if device_type is not None else (entry.device_type if entry else "")
    vend = vendor if vendor is not None else (entry.vendor if entry else "")
    prefix = f"site/{site}/dev/{device}/"
    if not stream:
        stream = topic[len(prefix):] if topic.startswith(prefix) else RESULT_STREAM
    if not topic:
        topic = prefix + stream
    schema = schema_for(dtype, stream)
    pairs: list[tuple[str, str]] = []
    if isinstance(fields, dict):
        pairs = [(str(k), str(v)) for k, v in fields.items()]
    else:
        for name in fields:
            spec = schema.by_name.get(name) if schema is not None else None
            pairs.append((str(name), spec.cls if spec is not None else UNKNOWN_CLASS))
    pairs = [p for p in pairs if p[0] not in ENVELOPE_FIELDS]
    return MessageFacts(device, dtype, vend, site, topic, stream, int(size), tuple(pairs))


def check_expectation(decision: Decision, expect: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    routes = {r.destination: r for r in decision.routes}
    if "errors" in expect and list(decision.errors) != list(expect["errors"] or []):
        problems.append(f"errors: expected {expect['errors']!r}, got {list(decision.errors)!r}")
    for dest, want in (expect.get("routes") or {}).items():
        r = routes.get(dest)
        if r is None:
            problems.append(f"{dest}: no such destination in the policy")
            continue
        if isinstance(want, str):
            want = {"allow": want == "allow"}
        problems.extend(f"{dest}: {p}" for p in _check_route(r, want))
    return problems


def _check_route(r: Route, want: dict[str, Any]) -> list[str]:
    out = []
    got: dict[str, Any] = {
        "allow": r.allow,
        "reason": r.reason,
        "fields": list(r.fields),
        "removed": dict(r.removed),
        "quantize": dict(r.quantize),
        "rules": list(r.rules),
    }
    for key, value in want.items():
        if key not in got:
            out.append(f"unknown expectation {key!r} (allow, reason, fields, removed, quantize, rules)")
            continue
        expected = value
        if key in ("removed", "quantize"):
            expected = dict(value or {})
        elif key in ("fields", "rules"):
            expected = list(value or [])
        if got[key] != expected:
            out.append(f"{key}: expected {expected!r}, got {got[key]!r}")
    return out


def load_cases(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    p = Path(path)
    files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    out = []
    for f in files:
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for i, case in enumerate(data.get("cases") or []):
            out.append((f"{f.name}#{case.get('name', i)}", case))
    return out


def run_case(policy: Policy, case: dict[str, Any]) -> tuple[Decision | None, list[str]]:
    msg = dict(case.get("message") or {})
    try:
        facts = facts_for(
            policy, device=msg.pop("device"), topic=msg.pop("topic", ""), stream=msg.pop("stream", ""),
            size=msg.pop("size", 100), fields=msg.pop("fields", ()), device_type=msg.pop("device_type", None),
            vendor=msg.pop("vendor", None), site=msg.pop("site", None),
        )
    except KeyError:
        return None, ["message: 'device' is required"]
    if msg:
        return None, [f"message: unknown keys {sorted(msg)}"]
    decision = policy.decide(facts)
    return decision, check_expectation(decision, case.get("expect") or {})


def run_cases(policy: Policy, path: str | os.PathLike[str]) -> list[CaseResult]:
    results = []
    for name, case in load_cases(path):
        file, _, cname = name.partition("#")
        decision, problems = run_case(policy, case)
        results.append(CaseResult(file, cname, not problems, tuple(problems), decision))
    return results
