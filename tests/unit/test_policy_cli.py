"""``edgeward policy ...`` subcommands, the traffic format and the bench translation."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import msgpack
import pytest

from gateway.model import MessageFacts
from gateway.policy import load_policy
from gateway.policy.cli import main, register
from gateway.policy.traffic import facts_from_json, facts_to_json, read_traffic, write_traffic

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["policy", *argv])
    return code, capsys.readouterr().out


def test_register_adds_policy_with_funcs() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["policy", "check", "x.yaml"])
    assert callable(args.func) and args.files == ["x.yaml"]


def test_check_ok_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "check", str(POLICIES))
    assert code == 0 and "0 error(s), 0 warning(s)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("edgeward_policy: 1\nsite: S\njurisdiction: NL\nrules:\n  - {id: r, effect: allow, destinations: [x]}\n"
                   "grants:\n  - {devices: '*', topics: ['site/{site}/dev/+/x']}\n")
    code, out = run(capsys, "check", str(bad))
    assert code == 1
    assert f"{bad}:5:21: schema.enum: effect must be one of permit, forbid; got 'allow'" in out
    assert "1 error(s)" in out
    code, out = run(capsys, "check", "--json", str(bad))
    report = json.loads(out)
    assert code == 1 and report["errors"] == 1
    assert {d["code"] for d in report["diagnostics"]} >= {"schema.enum", "ref.unknown_destination"}


def test_test_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "test", str(POLICIES / "cases"))
    assert code == 0 and out.strip().endswith("0 failed")
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "x.yaml").write_text("cases:\n  - name: wrong on purpose\n    message: {device: xr-00001, fields: [verdict]}\n"
                                  "    expect: {routes: {eu_hub: deny}}\n")
    code, out = run(capsys, "test", str(cases), "--policy", str(POLICIES))
    assert code == 1
    assert "FAIL x.yaml: wrong on purpose" in out and "eu_hub: allow: expected False, got True" in out
    assert out.strip().endswith("0 passed, 1 failed")


def test_explain_msgpack_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    msg = tmp_path / "m.msgpack"
    msg.write_bytes(msgpack.packb({"seq": 1, "ts": 2, "face_template": b"\x00" * 10, "match_score": 0.87,
                                   "document_number": "X123456", "nationality": "NLD", "liveness": True}))
    code, out = run(capsys, "explain", "--policy", str(POLICIES), "--device", "fg-00001",
                    "--topic", "site/AMS-T1/dev/fg-00001/result", str(msg))
    assert code == 0
    assert "eu_hub: ALLOW [match_score, liveness], match_score quantised to 0.05" in out
    assert "removed face_template: policy.vault_only" in out
    assert "grant own-streams" in out
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"seq": 1, "ts": 2, "uptime_s": 5, "serial_number": "AB12"}))
    code, out = run(capsys, "explain", "--policy", str(POLICIES), "--device", "xr-00001", "--json",
                    "--topic", "site/AMS-T1/dev/xr-00001/status/health", str(j))
    report = json.loads(out)
    vm = report["decision"]["routes"][3]
    assert vm["destination"] == "vendor_maintenance" and vm["allow"] and vm["removed"] == [["serial_number", "policy.redact"]]
    assert report["engines_agree"] and report["trace"]


def test_diff_rules_and_traffic(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(POLICIES, new, ignore=shutil.ignore_patterns("cases"))
    rules = (new / "rules.yaml").read_text()
    rules = rules.replace("classes: [verdict, operational]", "classes: [verdict]")
    rules += "\n  - id: no-images-to-customs\n    effect: forbid\n    destinations: [customs_nl]\n    classes: [image]\n"
    (new / "rules.yaml").write_text(rules)
    policy = load_policy(POLICIES)
    traffic = tmp_path / "t.jsonl"
    samples = [
        MessageFacts("xr-00001", "xray_baggage", "smiths-detection", "AMS-T1", "site/AMS-T1/dev/xr-00001/result",
                     "result", 100, (("image", "image"), ("verdict", "verdict"), ("operator_id", "operational"))),
        MessageFacts("et-00001", "trace_detector", "smiths-detection", "AMS-T1", "site/AMS-T1/dev/et-00001/result",
                     "result", 100, (("sample_id", "operational"), ("alarm", "verdict"))),
        MessageFacts("bs-00001", "body_scanner", "rapiscan", "AMS-T1", "site/AMS-T1/dev/bs-00001/result",
                     "result", 100, (("anomaly_zones", "verdict"),)),
    ]
    assert write_traffic(traffic, samples) == 3
    assert list(read_traffic(traffic)) == samples
    code, out = run(capsys, "diff", str(POLICIES), str(new), "--traffic", str(traffic))
    assert code == 0
    assert "1 added, 0 removed, 1 changed" in out
    assert "  + no-images-to-customs" in out and "  ~ eu-hub-aggregates: classes:" in out
    assert "traffic: 3 messages, 2 decided differently" in out
    code, out = run(capsys, "diff", "--json", str(POLICIES), str(new), "--traffic", str(traffic))
    report = json.loads(out)
    assert report["traffic"]["by_kind"] == {"customs_nl fields": 1, "eu_hub fields": 1}
    assert policy.revision == report["old"]


def test_traffic_records_round_trip_and_reject_garbage() -> None:
    f = MessageFacts("a", "t", "v", "S", "site/S/dev/a/result", "result", 3, (("x", "pii"),))
    assert facts_from_json(json.loads(json.dumps(facts_to_json(f)))) == f
    for bad in ({"size": -1}, {"fields": [["x"]]}, {"v": 2}, {"device_id": 5}):
        with pytest.raises(ValueError):
            facts_from_json({**facts_to_json(f), **bad})


def test_bench_translation_agrees_with_expected() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import policy_reference as bench
    finally:
        sys.path.pop(0)
    data = ROOT / "benchmarks" / "data" / "policy-bench"
    for size in ("base", "10k"):
        rs = json.load(gzip.open(data / f"ruleset_{size}.json.gz"))
        requests = json.load(gzip.open(data / f"requests_{size}.json.gz"))
        expected = json.load(gzip.open(data / f"expected_{size}.json.gz"))
        decide = bench.build(rs)
        got = [decide(r) for r in requests]
        assert [{"allow": a, "redact": r} for a, r in got] == expected
