"""A gateway restarted after downtime gives every device a one-off credit for the backlog the broker
held meanwhile (the gateway caused that burst, not the device); a fresh gateway gives none."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gateway.policy import load_policy
from gateway.runtime.service import Gateway, GatewayConfig

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _accepted_at_once(state: Path, n: int = 400) -> int:
    gw = Gateway(GatewayConfig(state_dir=state, port=1), load_policy(POLICY_DIR))
    now = time.time()
    rate = gw.pipeline.rate
    assert rate is not None
    ok = sum(rate.observe("et-00001", 300, now, device_type="trace_detector") is None for _ in range(n))
    gw.audit.close()
    return ok


def test_restart_after_downtime_credits_the_backlog(tmp_path: Path) -> None:
    fresh = _accepted_at_once(tmp_path / "fresh")
    assert 0 < fresh < 400, "a burst of 400 at once must trip a fresh trace detector's baseline"

    stale = tmp_path / "restarted"
    (stale / "audit").mkdir(parents=True)
    last = stale / "audit" / "audit-000001.jsonl"
    last.write_text("")
    past = time.time() - 600  # the previous life stopped ten minutes ago
    os.utime(last, (past, past))
    assert _accepted_at_once(stale) > fresh
