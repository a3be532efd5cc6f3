"""Smoke run of benchmarks/e2e.py: it runs end to end on a tiny load and accounts for every message.

Not a timed assertion (figures on a shared machine are noise at this size): only that the benchmark
works and that nothing is lost or duplicated at QoS 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[2] / "benchmarks" / "e2e.py"


@pytest.mark.broker
def test_e2e_quick_runs_and_loses_nothing_at_qos1() -> None:
    p = subprocess.run([sys.executable, str(E2E), "--quick", "--mix", "small", "--no-latency", "--json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    rows = {(r["kind"], r["qos"]): r for r in out["results"]}
    assert set(rows) == {(k, q) for k in ("cc", "c", "py", "gw") for q in (0, 1)}
    assert rows[("cc", 1)]["received"] == rows[("cc", 1)]["messages"]  # the C clients carried every message
    gw = rows[("gw", 1)]
    assert gw["lost"] == 0 and gw["dups"] == 0 and gw["unacked"] == 0
    assert gw["deliveries"] > gw["messages"]  # vault + uplinks: the full pipeline ran
    assert gw["msgs_per_s"] > 0 and all(v > 0 for v in out["meta"]["headline_ratio"]["small"])
    assert out["profile"]["small"]["pipeline_us"] > 0
