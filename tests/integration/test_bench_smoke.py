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
    t = out["meta"]["targets"]  # judged, not asserted: at this size the C-C row measures its publishers
    assert t["lost"] == 0 and t["p99_met"] is None and t["ceiling_publisher_bound"] is True
    assert t["ratio_met"] is None


def _row(kind: str, qos: int, **kw: object) -> dict[str, object]:
    return {"mix": "small", "kind": kind, "qos": qos, "lost": 0, "dups": 0, "vs_cc_qos1": 1.0,
            "seconds": 1.0, "pub_seconds": 0.8, **kw}


def test_the_targets_are_judged_on_the_runs_own_rows() -> None:
    sys.path.insert(0, str(E2E.parent))
    from e2e import targets

    met = targets([_row("cc", 1), _row("gw", 1, vs_cc_qos1=0.57)], {"added_p99_ms": 3.4})
    assert met["ratio_met"] is True and met["p99_met"] is True
    slow = targets([_row("cc", 1), _row("gw", 1, vs_cc_qos1=0.49)], {"added_p99_ms": 5.1})
    assert slow["ratio_met"] is False and slow["p99_met"] is False
    lossy = targets([_row("cc", 1), _row("gw", 1, vs_cc_qos1=0.9, lost=1)], None)
    assert lossy["ratio_met"] is False and lossy["p99_met"] is None  # a loss never meets the target
    # the C publishers were still sending at the end: that row is not the broker's ceiling
    bound = targets([_row("cc", 1, pub_seconds=1.0), _row("gw", 1, vs_cc_qos1=0.9)], None)
    assert bound["ceiling_publisher_bound"] is True and bound["ratio_met"] is None
