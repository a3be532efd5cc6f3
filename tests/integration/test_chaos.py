"""Chaos: a fleet through the real gateway (in a subprocess) while a seeded schedule restarts the
ingest broker, kill -9s and restarts the gateway, and cuts the destinations' broker for longer than
``uplink_down_after_s``. Then every PUBACKed message is reconciled against the audit log (decisions
and drops across every gateway life) and against what the destinations received.

With two workers (``edgeward run --workers 2``) the kill hits one of them, and the ingest broker is
not restarted (``chaos.INGEST_RESTARTS`` says why).

The harness is benchmarks/chaos.py (its long-run form); nothing here trusts the gateway's counters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.parametrize("workers", [1, 2])
async def test_chaos_every_acked_message_is_decided_and_delivered_or_dropped_with_reason(
    tmp_path: Path, workers: int
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from chaos import REMOTE, ChaosConfig, run_chaos, table
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    lines: list[str] = []
    out = await run_chaos(ChaosConfig(seconds=25.0 if workers == 1 else 15.0, devices=20, seed=4, rate_scale=4.0,
                                      once=True, down_after_s=1.0, settle_timeout_s=20.0, progress=lines.append,
                                      workers=workers), tmp_path)
    report = table(out) + "\n" + "\n".join(lines)
    print(report)
    if workers == 1:
        assert out["faults"] == {"ingest_restart": 1, "gateway_kill": 1, "dest_outage": 1}, report
    else:
        assert out["faults"] == {"gateway_kill": 1, "dest_outage": 1}, report
        assert all(n > 50 for n in out["decided_per_worker"]), report  # both took a share
    assert out["gateway_lives"] == workers + 1
    assert out["sent"] > 300, report
    # a publish cut by the ingest restart has an unknown outcome: the fleet records it as failed (never
    # as sent); persistence keeps the sessions, so the fleet carries on
    assert out["failed_publishes"] < out["sent"] // 10, report
    assert out["settled"], report
    # every PUBACKed message has a decision in the audit chain (or a rejection reason), in some life;
    # more than one decision only for messages the broker redelivered to the restarted gateway
    assert out["missing"] == 0, report
    assert out["max_decisions_per_message"] <= out["gateway_lives"], report
    d = out["destinations"]
    for name in REMOTE:
        # unique deliveries == what the policy routed there, minus what was dropped with a reason
        assert d[name]["lost"] == 0, report
        assert d[name]["unexpected"] == 0, report
        assert d[name]["dup_after_dedupe"] == 0, report  # exactly once after (device, seq) dedupe
        assert d[name]["expected"] > 0, report
    # customs_nl may rest at the edge: it loses nothing, the outage went to its spool
    assert d["customs_nl"]["dropped_unreachable"] == 0 and not d["customs_nl"]["dropped_other"], report
    assert out["alerts"].get("destination_down", 0) >= 1, report  # the cut outlasted uplink_down_after_s
    # eu_hub and vendor_maintenance may not rest at the edge: what came during the cut was dropped
    assert d["eu_hub"]["dropped_unreachable"] > 0, report
    assert out["undecryptable"] == 0, report
    assert out["audit_ok"], report
    assert out["ok"], report
