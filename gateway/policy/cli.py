"""``edgeward policy check|test|explain|diff``: the operator's tools for policy files.

``register(subparsers)`` adds the ``policy`` command to the top-level argparse parser (gateway/cli.py);
each leaf sets ``func(args) -> int`` (the exit code). Output goes to stdout; exit 0 means success,
1 a failed check or test, 2 unusable input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.catalog import ENVELOPE_FIELDS
from gateway.errors import ConfigError, PolicyError
from gateway.model import Decision, MessageFacts, Route
from gateway.policy.cases import facts_for, run_cases
from gateway.policy.diagnostics import Diagnostic
from gateway.policy.engine import Policy
from gateway.policy.load import check_policy, load_policy
from gateway.policy.shadow import shadow_divergences
from gateway.policy.traffic import facts_to_json, read_traffic

__all__ = ["register", "main", "rule_table", "decision_to_json"]

DEFAULT_POLICY = "policies"
MAX_MESSAGE_FILE = 8 * 1024 * 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("policy", help="check, test, explain and diff policy files")
    sub = p.add_subparsers(dest="policy_command", required=True, metavar="{check,test,explain,diff}")

    c = sub.add_parser("check", help="validate policy files; every error at once")
    c.add_argument("files", nargs="*", default=[DEFAULT_POLICY],
                   help="policy files or directories (a directory's *.yaml form one policy)")
    c.add_argument("--json", action="store_true", help="diagnostics as JSON")
    c.set_defaults(func=cmd_check)

    t = sub.add_parser("test", help="run the YAML decision cases")
    t.add_argument("dir", nargs="?", default=f"{DEFAULT_POLICY}/cases", help="a case file or directory")
    t.add_argument("--policy", help="policy file or directory (default: the parent of DIR)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_test)

    e = sub.add_parser("explain", help="decide one message and show the whole trace")
    e.add_argument("--device", required=True)
    e.add_argument("--topic", required=True)
    e.add_argument("--policy", default=DEFAULT_POLICY)
    e.add_argument("--type", dest="device_type", help="device type (default: from the registry)")
    e.add_argument("--vendor", help="vendor (default: from the registry)")
    e.add_argument("--json", action="store_true")
    e.add_argument("message", help="the payload: a MessagePack or JSON file")
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("diff", help="what changed between two policies, and which traffic it affects")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--traffic", help="a JSON Lines traffic sample (gateway.policy.traffic)")
    d.add_argument("--examples", type=int, default=5)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_diff)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m gateway.policy.cli policy check ...``)."""
    parser = argparse.ArgumentParser(prog="edgeward")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _diag_line(d: Diagnostic) -> str:
    s = str(d)
    return s.replace(f": {d.code}: ", f": {d.code}: warning: ", 1) if d.severity == "warning" else s


# -- check ------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    all_diags: list[Diagnostic] = []
    summaries = []
    for target in args.files:
        policy, diags = check_policy(target)
        all_diags.extend(diags)
        summaries.append({"policy": target, "ok": policy is not None,
                          "revision": policy.revision if policy else None})
    errors = sum(d.severity == "error" for d in all_diags)
    warnings = len(all_diags) - errors
    if args.json:
        _out(json.dumps({"policies": summaries, "errors": errors, "warnings": warnings,
                         "diagnostics": [d.to_json() for d in all_diags]}, indent=2))
    else:
        for d in all_diags:
            _out(_diag_line(d))
        for s in summaries:
            _out(f"{s['policy']}: " + (f"ok, revision {s['revision']}" if s["ok"] else "INVALID"))
        _out(f"{errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


# -- test -------------------------------------------------------------------------------------------
def cmd_test(args: argparse.Namespace) -> int:
    policy_path = args.policy or str(Path(args.dir).parent if Path(args.dir).is_dir() else Path(args.dir).parent.parent)
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        for d in exc.diagnostics:
            _out(str(d))
        return 2
    if not Path(args.dir).exists():
        _out(f"{args.dir}: no such case file or directory")
        return 2
    results = run_cases(policy, args.dir)
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    if args.json:
        _out(json.dumps({"revision": policy.revision, "passed": passed, "failed": failed,
                         "cases": [{"file": r.file, "name": r.name, "passed": r.passed, "problems": list(r.problems)}
                                   for r in results]}, indent=2))
    else:
        for r in results:
            _out(f"{'PASS' if r.passed else 'FAIL'} {r.file}: {r.name}")
            for p in r.problems:
                _out(f"    {p}")
        _out(f"{passed} passed, {failed} failed")
    return 1 if failed or not results else 0


# -- explain ----------------------------------------------------------------------------------------
def read_message(path: str) -> tuple[dict[str, Any], int]:
    """A payload file as a map and its size; MessagePack unless it parses as a JSON object."""
    data = Path(path).read_bytes()
    if len(data) > MAX_MESSAGE_FILE:
        raise ConfigError(f"{path}: over {MAX_MESSAGE_FILE} bytes")
    payload: Any = None
    if data.lstrip()[:1] == b"{":
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
    if payload is None:
        import msgpack

        try:
            payload = msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=MAX_MESSAGE_FILE)
        except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
            raise ConfigError(f"{path}: neither a JSON object nor MessagePack: {exc}") from exc
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: the payload must be a map")
    return payload, len(data)


def route_to_json(r: Route) -> dict[str, Any]:
    return {"destination": r.destination, "allow": r.allow, "reason": r.reason, "fields": list(r.fields),
            "removed": [list(x) for x in r.removed], "quantize": [list(x) for x in r.quantize],
            "rules": list(r.rules)}


def decision_to_json(d: Decision) -> dict[str, Any]:
    return {"revision": d.revision, "routes": [route_to_json(r) for r in d.routes], "errors": list(d.errors)}


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
        payload, size = read_message(args.message)
    except PolicyError as exc:
        for d in exc.diagnostics:
            _out(str(d))
        return 2
    except (ConfigError, OSError) as exc:
        _out(str(exc))
        return 2
    names = [str(k) for k in payload if str(k) not in ENVELOPE_FIELDS]
    facts = facts_for(policy, device=args.device, topic=args.topic, size=size, fields=names,
                      device_type=args.device_type, vendor=args.vendor)
    decision, trace = policy.explain(facts)
    fast = policy.decide(facts)
    if args.json:
        _out(json.dumps({"facts": facts_to_json(facts), "decision": decision_to_json(decision), "trace": trace,
                         "engines_agree": fast == decision}, indent=2))
        return 0
    _out(f"policy revision {decision.revision}; device {facts.device_id} ({facts.device_type or '?'}, "
         f"vendor {facts.vendor or '?'}), topic {facts.topic}, {size} bytes")
    _out("fields: " + (", ".join(f"{n} ({c})" for n, c in facts.fields) or "none"))
    _out("")
    _out("trace:")
    for line in trace:
        _out(f"  {line}")
    _out("")
    _out("decision:")
    for r in decision.routes:
        if r.allow:
            q = "".join(f", {n} quantised to {s}" for n, s in r.quantize)
            _out(f"  {r.destination}: ALLOW [{', '.join(r.fields)}]{q}")
        else:
            _out(f"  {r.destination}: DENY {r.reason}")
        for n, why in r.removed:
            _out(f"      removed {n}: {why}")
        _out(f"      rules: {', '.join(r.rules)}")
    for e in decision.errors:
        _out(f"  rule error: {e}")
    if fast != decision:  # never expected: the property test holds the engines together
        _out("WARNING: the compiled engine decided differently from the reference evaluator")
        return 1
    return 0


# -- diff -------------------------------------------------------------------------------------------
def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "order"}
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return {k: _plain(v) for k, v in x._asdict().items() if k != "order"}
    if isinstance(x, (frozenset, set)):
        return sorted(x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def rule_table(policy: Policy) -> dict[str, Any]:
    """Every rule (and setting) of a policy by a stable key, as plain comparable data."""
    s = policy.spec
    table: dict[str, Any] = {
        "setting:site": s.site,
        "setting:jurisdiction": s.jurisdiction,
        "setting:allowed_jurisdictions": sorted(s.allowed_jurisdictions),
        "setting:require_registered": s.require_registered,
    }
    for c in s.data_classes.values():
        table[f"data_class:{c.name}"] = _plain(c)
    for v in s.vendors.values():
        table[f"vendor:{v.name}"] = _plain(v)
    for group in (s.denylist, tuple(s.device_types.values()), s.devices, s.grants, s.rules):
        for r in group:
            table[r.rule_id] = _plain(r)
    for d in s.destinations:
        body = _plain(d)
        body.pop("obligations")
        table[f"destination:{d.name}"] = body
        for o in d.obligations:
            table[o.rule_id] = _plain(o)
    return table


def cmd_diff(args: argparse.Namespace) -> int:
    try:
        old = load_policy(args.old)
        new = load_policy(args.new)
    except PolicyError as exc:
        for d in exc.diagnostics:
            _out(str(d))
        return 2
    a, b = rule_table(old), rule_table(new)
    added = [k for k in b if k not in a]
    removed = [k for k in a if k not in b]
    changed = [k for k in a if k in b and a[k] != b[k]]
    report: dict[str, Any] = {"old": old.revision, "new": new.revision, "added": added, "removed": removed,
                              "changed": [{"rule": k, "old": a[k], "new": b[k]} for k in changed]}
    if args.traffic:
        try:
            report["traffic"] = _diff_traffic(old, new, read_traffic(args.traffic), args.examples)
        except ConfigError as exc:
            _out(str(exc))
            return 2
    if args.json:
        _out(json.dumps(report, indent=2))
        return 0
    _out(f"policy {old.revision} -> {new.revision}: {len(added)} added, {len(removed)} removed, "
         f"{len(changed)} changed")
    for k in added:
        _out(f"  + {k}")
    for k in removed:
        _out(f"  - {k}")
    for k in changed:
        keys = sorted(set(a[k]) | set(b[k])) if isinstance(a[k], dict) and isinstance(b[k], dict) else []
        what = ", ".join(f"{x}: {a[k].get(x)!r} -> {b[k].get(x)!r}" for x in keys if a[k].get(x) != b[k].get(x))
        _out(f"  ~ {k}: {what or repr(a[k]) + ' -> ' + repr(b[k])}")
    t = report.get("traffic")
    if t:
        _out(f"traffic: {t['messages']} messages, {t['changed_messages']} decided differently "
             f"({t['changed_routes']} routes)")
        for key, n in t["by_kind"].items():
            _out(f"  {key}: {n}")
        for ex in t["examples"]:
            _out(f"  e.g. {ex['device_id']} {ex['topic']}:")
            for dv in ex["divergences"]:
                _out(f"      {dv['destination']} ({dv['kind']}): {dv['live']} -> {dv['candidate']}")
    return 0


def _diff_traffic(old: Policy, new: Policy, facts: Any, n_examples: int) -> dict[str, Any]:
    total = changed = routes = 0
    kinds: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for f in facts:
        assert isinstance(f, MessageFacts)
        total += 1
        divs = shadow_divergences(old.decide(f), new.decide(f))
        if not divs:
            continue
        changed += 1
        routes += len(divs)
        for d in divs:
            kinds[f"{d.destination} {d.kind}"] += 1
        if len(examples) < n_examples:
            examples.append({"device_id": f.device_id, "topic": f.topic,
                             "divergences": [dataclasses.asdict(d) for d in divs]})
    return {"messages": total, "changed_messages": changed, "changed_routes": routes,
            "by_kind": dict(sorted(kinds.items())), "examples": examples}


if __name__ == "__main__":
    sys.exit(main())
