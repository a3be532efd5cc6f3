"""`edgeward sim SITE --scenario FILE` as an operator runs it: hostile firmware over mTLS against a
running site, the leak report measured from what the destinations actually received (timing decoded
from their arrival times and header timestamps), the run saved, and `edgeward report DIR` giving the
same figures from the saved files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_sim.scenario import load_scenario
from tests.integration.test_cli_site import REPO, _edgeward, _free_port, _stop_site

SCENARIO = """\
name: cli-mixed
description: timing, covert fields and free text on a small fleet, the rest honest
seed: 5
fleet: {size: 9, site: AMS-T1, types: [body_scanner, trace_detector, face_egate]}
profiles:
  - {profile: timing, devices: [bs-00001], options: {unit_s: 0.25}}
  - {profile: covert_field, devices: [et-00001]}
  - {profile: free_text, devices: [et-00002]}
"""


@pytest.mark.broker
@pytest.mark.parametrize("workers", [1, 2])
def test_sim_scenario_measures_leaks_and_saves_the_run(tmp_path: Path, workers: int) -> None:
    """With ``workers`` 2 the site runs ``edgeward run --workers 2``: the destinations' envelopes come
    sealed under either worker's keys, and the vault and audit are the workers' own."""
    scenario_file = tmp_path / "cli-mixed.yaml"
    scenario_file.write_text(SCENARIO)
    ids = [s.device_id for s in load_scenario(str(scenario_file)).fleet()]
    site, saved = tmp_path / "site", tmp_path / "run"
    env = {**os.environ, "EDGEWARD_PASSPHRASE": "a passphrase for the scenario site"}
    dport, gport = _free_port(), _free_port()
    _edgeward("init", str(site), *[a for i in ids for a in ("--device-id", i)], "--device-port", str(dport),
              "--gateway-port", str(gport), env=env)
    out = _edgeward("sim", str(site), "--scenario", str(scenario_file), "--seconds", "1", env=env, check=False)
    assert out.returncode != 0 and "no running site" in out.stderr, out.stderr

    run = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site), "--workers", str(workers)],
                           cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not (site / "broker" / "operator.secret").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the gateway subscribes right after the broker listens
        assert (site / "broker" / "operator.secret").stat().st_mode & 0o777 == 0o600
        sim = _edgeward("sim", str(site), "--scenario", str(scenario_file), "--seconds", "12", "--rate-scale", "3",
                        "--save", str(saved), "--json", env=env, timeout=120)
    finally:
        _stop_site(run, site)
    assert not (site / "broker" / "operator.secret").exists(), "the operator's secret outlives the broker"
    result = json.loads(sim.stdout)
    tech = result["techniques"]
    assert result["undecryptable"] == 0  # every worker's keyring was read
    if workers > 1:  # both workers decided messages: the report read both vaults and audit chains
        parts = [sum(1 for _ in (site / f"worker-{i}" / "vault").glob("vault-*.seg")) for i in range(workers)]
        assert all(parts), parts
    assert set(tech) == {"timing", "covert_field", "free_text"}
    assert tech["covert_field"]["attempts"] > 0 and tech["covert_field"]["detected"] == tech["covert_field"]["attempts"]
    assert tech["free_text"]["attempts"] > 0
    assert all(row["leaked"] == 0 for row in tech.values()), tech
    timing = tech["timing"]["measure"]
    assert timing["measured"] is True and timing["bits_sent"] >= 6  # decoded from what arrived, not assumed

    # the saved run reproduces the report from its files alone; it holds secrets, so it is private
    assert saved.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in saved.iterdir())
    rep = json.loads(_edgeward("report", str(saved), "--json", env=env).stdout)
    assert rep["sent"] == result["sent"]
    for name, row in tech.items():
        assert {k: rep["techniques"][name][k] for k in ("attempts", "detected", "leaked")} == \
            {k: row[k] for k in ("attempts", "detected", "leaked")}
    # re-timed uplinks: every off-site envelope's header timestamp is a batch boundary the gateway drew
    received = [json.loads(line) for line in (saved / "received.jsonl").read_text().splitlines()]
    off_site = [r for r in received if r["destination"] != "local_vault"]
    assert off_site and len({r["ts"] for r in off_site}) * 4 <= len(off_site)
