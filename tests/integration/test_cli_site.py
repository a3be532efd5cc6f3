"""The operator's commands, run as an operator runs them: init a site, run it, drive a fleet at it
over mTLS, revoke a device, stop, verify the signed audit, decrypt the vault, list keys."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_site(run: subprocess.Popen[str], site: Path, timeout: float = 60) -> str:
    """SIGINT to `edgeward run` and its stderr. If it does not stop in time, kill its process group
    and the site's broker (its own session) so that no Mosquitto outlives the test; then fail."""
    os.killpg(run.pid, signal.SIGINT)
    try:
        _, err = run.communicate(timeout=timeout)
        return err
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        info = site / "broker" / "runtime.json"
        if info.exists():
            with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
                os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGKILL)
        raise


def _edgeward(*args: str, env: dict[str, str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"edgeward {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@pytest.mark.broker
def test_operator_flow(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "EDGEWARD_PASSPHRASE": "a passphrase for the test site"}
    dport, gport = _free_port(), _free_port()
    _edgeward("init", str(site), "--devices", "12", "--device-port", str(dport), "--gateway-port", str(gport), env=env)
    assert (site / "keys" / "kek.enc").stat().st_mode & 0o777 == 0o600
    listed = _edgeward("devices", "list", str(site), env=env).stdout
    assert "xr-00001" in listed and "edgeward-gateway" in listed

    run = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site)], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # running: the gateway has subscribed and the broker lets devices in (it refuses them before)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _edgeward("status", str(site), env=env, check=False).returncode:
            time.sleep(0.3)
        sim = json.loads(_edgeward("sim", str(site), "--devices", "12", "--seconds", "3", "--rate-scale", "5",
                                   "--json", env=env).stdout)
        assert sim["sent"] > 20 and sim["failed"] == 0
        revoked = _edgeward("devices", "revoke", str(site), "xr-00001", env=env).stdout
        assert "revoked xr-00001" in revoked
        time.sleep(1.5)  # the gateway writes its status once a second
        status = json.loads(_edgeward("status", str(site), "--json", env=env).stdout)
        assert status["running"] and status["ingest"] == "connected"
        assert status["stats"]["decided"] == sim["sent"] and status["destinations"]["local_vault"]["forwarded"] == sim["sent"]
    finally:
        err = _stop_site(run, site)
    assert run.returncode == 0, err
    assert _edgeward("status", str(site), env=env, check=False).returncode == 1  # stopped
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["decided"] == sim["sent"] and stats["rejected"] == {}

    verify = _edgeward("audit", "verify", str(site), "--json", env=env)
    assert json.loads(verify.stdout)["ok"] is True
    records = _edgeward("decrypt", str(site), env=env).stdout.splitlines()
    assert len(records) == sim["sent"]  # the vault keeps every message
    assert all(json.loads(r)["destination"] == "local_vault" for r in records)
    keys = _edgeward("keys", "list", str(site), env=env).stdout
    assert "(current)" in keys

    # a wrong passphrase opens nothing, and says nothing about the secret
    bad = _edgeward("decrypt", str(site), env={**env, "EDGEWARD_PASSPHRASE": "zebra-77-guess"}, check=False)
    assert bad.returncode == 2 and "zebra-77-guess" not in bad.stderr + bad.stdout
    assert "a passphrase for the test site" not in _edgeward("keys", "list", str(site), env=env).stdout

    # tampering is caught by the same command
    f = sorted((site / "audit").glob("audit-*.jsonl"))[0]
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:3] + lines[4:]))
    assert _edgeward("audit", "verify", str(site), env=env, check=False).returncode == 1


@pytest.mark.broker
@pytest.mark.parametrize("workers", [1, 2])
def test_run_stops_when_its_broker_dies(tmp_path: Path, workers: int) -> None:
    """``edgeward run`` does not start a dead broker again under its running gateway (devices would get
    in before the ingest had subscribed): it stops, says why, and exits non-zero. Starting it again is
    the safe restart."""
    site = tmp_path / "site"
    env = {**os.environ, "EDGEWARD_PASSPHRASE": "a passphrase for the test site"}
    _edgeward("init", str(site), "--devices", "2", "--device-port", str(_free_port()), "--gateway-port",
              str(_free_port()), env=env)
    run = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", str(site), "--workers", str(workers)],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _edgeward("status", str(site), env=env, check=False).returncode:
            time.sleep(0.3)
        info = json.loads((site / "broker" / "runtime.json").read_text())
        os.kill(int(info["pid"]), signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            _stop_site(run, site)
    assert run.returncode == 2, err
    assert "the site's broker exited" in err and "start it again with edgeward run" in err
