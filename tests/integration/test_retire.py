"""Changing the number of gateway processes on a site that already ran: the sessions of processes
that will not run again are retired (what they hold is decided and delivered, then they are
deleted), so nothing waits for a worker that never comes back. Against the site's real Mosquitto."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from device_sim import PayloadFactory, make_fleet
from device_sim.devices import encode as dev_encode
from gateway.audit.chain import iter_records, verify_chain
from gateway.policy import load_policy
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.retire import retire_stale_sessions, stale_sessions
from gateway.runtime.site_runner import open_device_listener, start_broker_process
from gateway.runtime.workers import SHARE_GROUP, worker_client_id, worker_state_dir
from gateway.site import init_site, load_site

pytestmark = pytest.mark.broker
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
PASS = "retire test passphrase"


async def _session_present(port: int, client_id: str, creds: tuple[str, bytes]) -> bool:
    c = MqttClient(host="127.0.0.1", port=port, client_id=client_id, username=creds[0], password=creds[1],
                   clean_start=False, session_expiry=0)
    present = await c.connect()
    await c.disconnect()
    return present


async def test_workers_sessions_are_retired_nothing_they_held_is_lost(tmp_path: Path) -> None:
    policy0 = load_policy(POLICY_DIR)
    specs = make_fleet(6, site=policy0.site, seed=4)
    root = init_site(tmp_path / "site", policy_src=POLICY_DIR, devices=[s.device_id for s in specs],
                     passphrase=PASS, kdf_memory_kib=8192, device_port=0, gateway_port=0)
    site = load_site(root, PASS)
    policy = load_policy(site.policy_dir)
    broker = start_broker_process(site, policy, b"operator-password-for-the-test")
    try:
        port, dport = broker.port, broker.config.tls.port
        creds = site.gateway_credentials()
        # The site ran with --workers 2: two persistent members of the shared subscription, now gone.
        for i in (0, 1):
            worker_state_dir(root, i).mkdir()
            w = MqttClient(host="127.0.0.1", port=port, client_id=worker_client_id(i), username=creds[0],
                           password=creds[1])
            await w.connect()
            await w.subscribe((f"$share/{SHARE_GROUP}/site/{policy.site}/dev/#", 1))
            await w.disconnect()
        # Devices keep sending while no gateway runs: the broker queues each message to one member.
        # (A site's runtime lets devices in only once its ingest has subscribed; this is the state an
        # earlier run with workers left behind.)
        await open_device_listener(site, broker)
        sent = set()
        for s in specs:
            c = MqttClient(host="127.0.0.1", port=dport, client_id=s.device_id, clean_start=True, session_expiry=0,
                           ssl=site.device_ssl_context(s.device_id))
            await c.connect()
            f = PayloadFactory(s, seed=1)
            for k in range(1, 9):
                c.publish(s.topic("result"), dev_encode(f.make("result", k, int(time.time() * 1000))))
                sent.add((s.device_id, k))
            c.flush()
            for _ in range(300):
                if not c.pending_out:
                    break
                await asyncio.sleep(0.01)
            await c.disconnect()

        # Now the site runs as one gateway: both worker sessions are stale.
        assert [label for label, _ in stale_sessions(site, workers=0)] == ["worker-0", "worker-1"]
        logs: list[str] = []
        done = await retire_stale_sessions(site, policy, port, workers=0, log=logs.append,
                                           overrides={"rate_headroom": None, "retime": False}, idle_s=1.0)
        assert [d["present"] for d in done] == [True, True] and len(logs) == 2
        assert sum(d["messages"] for d in done) == len(sent)

        # every message was decided exactly once, under the retired worker's own chain
        decided: Counter[tuple[str, int]] = Counter()
        for i in (0, 1):
            chain = worker_state_dir(root, i) / "audit"
            assert verify_chain(chain).ok
            decided.update((r["dev"], r["seq"]) for r in iter_records(chain) if "routes" in r)
        assert set(decided) == sent and max(decided.values()) == 1
        # the sessions are gone: nothing is queued for them any more
        for i in (0, 1):
            assert not await _session_present(port, worker_client_id(i), creds)
        # a second start finds nothing to do (one connect each, no messages)
        again = await retire_stale_sessions(site, policy, port, workers=0, overrides={"retime": False})
        assert [d["present"] for d in again] == [False, False]
    finally:
        broker.stop()
