"""``edgeward run --workers 2`` on a real Mosquitto: a fleet over mTLS, each message decided exactly
once across the two workers, each destination gets it once, a device's resend that lands on the
other worker is refused as a duplicate, a worker killed with SIGKILL is restarted and loses nothing,
and ``audit verify``/``decrypt``/``status`` work over both workers.

Also pins what Mosquitto does with a shared subscription whose member is offline with a persistent
session (docs/scaling.md relies on it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import mqtt5
import pytest

from device_sim import PayloadFactory, make_fleet
from device_sim.devices import encode as dev_encode
from gateway.audit.chain import iter_records
from gateway.crypto.keys import DataKeyring
from gateway.crypto.seqid import SeqIds
from gateway.policy import load_policy
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.site_runner import OPERATOR_USER
from gateway.runtime.workers import SiteWorkers, worker_state_dir
from gateway.site import init_site, load_site
from gateway.vault import read_vault

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "policies"
PASS = "workers test passphrase"


class _Rings:
    """Opens envelopes sealed by any worker (each has its own data keys under the site KEK)."""

    def __init__(self, root: Path, kek: bytes, n: int) -> None:
        self.rings = [DataKeyring(worker_state_dir(root, i) / "keys" / "datakeys.jsonl", kek) for i in range(n)]
        self.seq_ids = SeqIds.from_kek(kek)  # one site KEK: every worker hides sequences under one key

    def get(self, kid: str) -> Any:
        for r in self.rings:
            try:
                return r.get(kid)
            except Exception:  # noqa: BLE001, S112 - not this worker's key
                continue
        raise KeyError(kid)


def _edgeward(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEWARD_PASSPHRASE": PASS}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _audited(root: Path, n: int) -> int:
    """Records (decisions and refusals) in the workers' chains so far (the gateway writes a batch's
    records before acknowledging it)."""
    return sum(1 for i in range(n) for rec in iter_records(worker_state_dir(root, i) / "audit")
               if "routes" in rec or "reason" in rec)


async def test_two_workers_share_the_ingest_exactly_once(tmp_path: Path) -> None:
    policy0 = load_policy(POLICY_DIR)
    specs = make_fleet(12, site=policy0.site, seed=3)
    root = init_site(tmp_path / "site", policy_src=POLICY_DIR, devices=[s.device_id for s in specs],
                     passphrase=PASS, kdf_memory_kib=8192, device_port=0, gateway_port=0)
    site = load_site(root, PASS)
    policy = load_policy(site.policy_dir)
    # rate baselines off: this fleet sends 20 messages per device in a second (tests/unit covers observe)
    sw = SiteWorkers(site, policy, workers=2, state_capacity=1024, log=lambda s: None,
                     config_overrides={"rate_headroom": None})
    async with sw:
        assert "topic read $share/edgeward/site/AMS-T1/dev/#" in (site.broker_dir / "acl").read_text()
        stop = asyncio.Event()
        sup = asyncio.create_task(sw.supervise(stop))
        # The destinations' persistent session exists before anything is forwarded.
        rx_kw = {"username": OPERATOR_USER, "password": sw.operator_password}
        prime = DestinationReceiver("127.0.0.1", sw.gateway_port, _Rings(root, site.kek, 2), **rx_kw)
        await prime.start()
        await prime.stop()

        devices = {}
        for s in specs:
            c = MqttClient(host="127.0.0.1", port=sw.device_port, client_id=s.device_id, clean_start=True,
                           session_expiry=0, ssl=site.device_ssl_context(s.device_id))
            await c.connect()
            devices[s.device_id] = c
        factories = {s.device_id: PayloadFactory(s, seed=1) for s in specs}
        sent: dict[tuple[str, int], tuple[str, bytes]] = {}

        async def send(rounds: range) -> None:
            for k in rounds:
                for s in specs:
                    stream = "status/health" if k % 3 == 0 else "result"
                    payload = dev_encode(factories[s.device_id].make(stream, k, int(time.time() * 1000)))
                    topic = s.topic(stream)
                    devices[s.device_id].publish(topic, payload)
                    sent[(s.device_id, k)] = (topic, payload)
                for c in devices.values():
                    c.flush()
                await asyncio.sleep(0.01)

        await send(range(1, 11))
        # SIGKILL worker 1 mid-stream: its unacknowledged and queued share comes back to it on restart.
        sw.kill_worker(1)
        await send(range(11, 21))
        # A device resending messages it already sent (as after a lost PUBACK): three copies each, so the
        # round-robin hands at least one to the worker that did not decide the original.
        resent = [(specs[j].device_id, 5 + j) for j in range(4)]
        for key in resent:
            topic, payload = sent[key]
            for _ in range(3):
                devices[key[0]].publish(topic, payload)
            devices[key[0]].flush()
        total = len(sent) + 3 * len(resent)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _audited(root, 2) < total:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.2)  # status.json is written once a second
        status = _edgeward("status", str(root), "--json")
        assert status.returncode == 0, status.stderr
        st_json = json.loads(status.stdout)
        assert st_json["workers"] == 2 and set(st_json["per_worker"]) == {"0", "1"}
        for c in devices.values():
            await c.disconnect()
        stop.set()
        await sup
    assert set(sw.final) == {0, 1}  # both stopped gracefully (worker 1 in its second life)

    # One decision per (device, seq) across both chains. The only exception is the killed worker's
    # own redeliveries: decided before the kill, not yet acknowledged, so the broker gave them back to
    # it and it decided them again (its done log then skips the destinations that already had them,
    # as for a single gateway after a crash). Nothing is decided by both workers.
    decided: dict[tuple[str, int], list[int]] = {}
    dup_by: dict[tuple[str, int], set[int]] = {}
    for i in range(2):
        for rec in iter_records(worker_state_dir(root, i) / "audit"):
            if "routes" in rec:
                decided.setdefault((rec["dev"], rec["seq"]), []).append(i)
            elif rec.get("reason") == "dedupe.duplicate":
                dup_by.setdefault((rec["dev"], rec["seq"]), set()).add(i)
            elif "reason" in rec:
                pytest.fail(f"unexpected rejection {rec['reason']}")
    assert set(decided) == set(sent)
    assert all(len(w) == 1 or w == [1] * len(w) for w in decided.values()), decided
    assert {w[0] for w in decided.values()} == {0, 1}  # both workers did work
    # every resend was refused as a duplicate, and at least one by the worker that did not decide it
    assert set(resent) <= set(dup_by)
    assert any(w - {decided[k][0]} for k, w in dup_by.items() if k in resent)

    # Every destination has each allowed message once: the vault (both workers' segments) ...
    vault: Counter[tuple[str, int]] = Counter()
    ring = _Rings(root, site.kek, 2)
    from gateway.crypto.envelope import open_envelope

    for i in range(2):
        for env in read_vault(worker_state_dir(root, i) / "vault"):
            header, _ = open_envelope(ring, env)
            vault[(header.device, header.seq)] += 1
    assert set(vault) == set(sent) and set(vault.values()) == {1}
    # ... and the MQTT destinations (the broker kept their envelopes for the primed session).
    expected = set()
    for i in range(2):
        for rec in iter_records(worker_state_dir(root, i) / "audit"):
            for r in rec.get("routes", ()):
                if r["allow"] and policy.destinations[r["dst"]].transport == "mqtt":
                    expected.add((r["dst"], rec["dev"], rec["seq"]))
    assert expected

    async def drain() -> DestinationReceiver:
        from gateway.runtime.broker import MosquittoBroker

        broker = MosquittoBroker(site.broker_config(acl_file=site.broker_dir / "acl"))
        # the operator password lived in memory only: this check reconnects as the destinations'
        # session owner through a fresh broker run on the same persistence
        from gateway.site import mosquitto_password_line

        pw = site.broker_dir / "passwords"
        pw.write_text(pw.read_text() + mosquitto_password_line(OPERATOR_USER, sw.operator_password.decode()))
        broker.start()
        try:
            rx = DestinationReceiver("127.0.0.1", broker.port, ring, **rx_kw)
            await rx.start()
            last, t_last = -1, time.monotonic()
            while time.monotonic() - t_last < 1.5:
                n = rx.total + rx.duplicates + rx.undecryptable
                if n != last:
                    last, t_last = n, time.monotonic()
                await asyncio.sleep(0.05)
            await rx.stop()
            return rx
        finally:
            broker.stop()

    rx = await drain()
    got = {(d, dev, seq) for d, dev, _stream, seq in rx._seen}  # the test reads the tally
    assert got == expected and rx.duplicates == 0 and rx.undecryptable == 0

    # The operator's commands over both workers.
    verify = _edgeward("audit", "verify", str(root), "--json")
    doc = json.loads(verify.stdout)
    assert verify.returncode == 0 and doc["ok"], verify.stdout
    assert set(doc["chains"]) == {"worker-0", "worker-1"}
    assert all(c["checkpoints"] >= 1 and c["published"] >= 1 for c in doc["chains"].values())
    assert doc["total"]["records"] == sum(c["chain"]["records"] for c in doc["chains"].values())
    text = _edgeward("audit", "verify", str(root)).stdout
    assert "worker-0: audit chain OK" in text and "worker-1: audit chain OK" in text and "total: 2 chains" in text
    records = _edgeward("decrypt", str(root)).stdout.splitlines()
    assert len(records) == len(sent)
    # keys: every worker's keyring is listed, and destroying a key crypto-shreds what it sealed
    listed = _edgeward("keys", "list", str(root)).stdout
    assert "worker-0  " in listed and "worker-1  " in listed
    # A key that sealed something in worker-1's vault: worker 1 was killed and restarted, so it may also
    # hold a key from its first life that sealed nothing that reached the disk.
    kid = msgpack.unpackb(next(iter(read_vault(worker_state_dir(root, 1) / "vault"))))["kid"]
    assert any(line.startswith(f"worker-1  {kid}") for line in listed.splitlines()), listed
    destroyed = _edgeward("keys", "destroy", str(root), kid)
    assert destroyed.returncode == 0 and f"worker-1: data key {kid} destroyed" in destroyed.stdout
    assert kid not in destroyed.stdout.split("destroyed;", 1)[1]  # gone from the listing that follows
    assert _edgeward("decrypt", str(root)).returncode != 0  # worker-1's vault sealed under it is unreadable
    assert _edgeward("keys", "destroy", str(root), "0" * 16).returncode != 0  # unknown key: an error
    # tampering with one worker's chain fails the site
    f = min((worker_state_dir(root, 1) / "audit").glob("audit-*.jsonl"))
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:2] + lines[3:]))
    bad = _edgeward("audit", "verify", str(root))
    assert bad.returncode == 1 and "worker-1: audit chain BROKEN" in bad.stdout


async def test_devices_waiting_for_a_starting_site_lose_nothing(tmp_path: Path) -> None:
    """Devices already trying when ``edgeward run --workers 2`` starts (as after a restart of the site):
    every message the broker acknowledged to them is decided. The broker starts with every device
    certificate on hold and lets them in once both workers have subscribed. Before, a device got in
    as soon as the broker listened, ahead of the workers' (shared) subscriptions, and what it sent
    then was acknowledged and dropped."""
    from gateway.runtime.broker import free_port

    policy0 = load_policy(POLICY_DIR)
    specs = make_fleet(4, site=policy0.site, seed=5)
    root = init_site(tmp_path / "site", policy_src=POLICY_DIR, devices=[s.device_id for s in specs],
                     passphrase=PASS, kdf_memory_kib=8192, device_port=free_port(), gateway_port=free_port())
    site = load_site(root, PASS)
    acked: set[tuple[str, int]] = set()
    refused_while_starting = 0
    stop = asyncio.Event()

    async def device(spec: Any) -> None:
        nonlocal refused_while_starting
        factory, seq = PayloadFactory(spec, seed=2), 0
        while not stop.is_set():
            pids: dict[int, int] = {}
            c = MqttClient(host="127.0.0.1", port=site.device_port, client_id=spec.device_id, clean_start=True,
                           session_expiry=0, ssl=site.device_ssl_context(spec.device_id),
                           on_ack=lambda pid, pids=pids: acked.add((spec.device_id, pids.pop(pid))))
            try:
                await c.connect(timeout=2.0)
            except Exception:  # noqa: BLE001 - not listening yet, or refused: try again, as a device does
                if (site.broker_dir / "runtime.json").exists():
                    refused_while_starting += 1
                await asyncio.sleep(0.05)
                continue
            while c.connected and not stop.is_set():
                seq += 1
                payload = dev_encode(factory.make("result", seq, int(time.time() * 1000)))
                pids[c.publish(spec.topic("result"), payload) or 0] = seq
                c.flush()
                await asyncio.sleep(0.02)
            with contextlib.suppress(Exception):
                await c.disconnect()

    fleet = [asyncio.create_task(device(s)) for s in specs]
    await asyncio.sleep(0.3)  # the devices are trying before the site starts
    sw = SiteWorkers(site, load_policy(site.policy_dir), workers=2, state_capacity=1024, log=lambda s: None,
                     config_overrides={"rate_headroom": None})
    async with sw:
        sup_stop = asyncio.Event()
        sup = asyncio.create_task(sw.supervise(sup_stop))
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*fleet)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not acked <= _decided(root, 2):
            await asyncio.sleep(0.2)
        sup_stop.set()
        await sup
    assert len(acked) > 20
    assert acked <= _decided(root, 2), sorted(acked - _decided(root, 2))[:5]
    assert refused_while_starting > 0  # the devices did try while the site was starting


def _decided(root: Path, n: int) -> set[tuple[str, int]]:
    return {(rec["dev"], rec["seq"]) for i in range(n)
            for rec in iter_records(worker_state_dir(root, i) / "audit") if "routes" in rec}


def test_mosquitto_shared_subscription_keeps_an_offline_members_share(tmp_path: Path) -> None:
    """Mosquitto 2.0: a member that is offline with a persistent session keeps receiving its round-robin
    share (queued), and its unacknowledged messages are redelivered to it, not to the other member."""
    from tests.conftest import start_broker

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import MiniClient

    b = start_broker(tmp_path / "b")
    try:
        f = "$share/g/t/#"
        a = MiniClient(b.port, "A", clean_start=True)
        a.subscribe(f)
        bb = MiniClient(b.port, "B", clean_start=True)
        bb.subscribe(f)
        p = MiniClient(b.port, "P", clean_start=True)
        p.publish_all("t/x", [b"%d" % i for i in range(10)])
        a_unacked = [x.payload for x in a.packets(0.5) if isinstance(x, mqtt5.PublishPacket)]
        b_got: list[bytes] = []
        bb.drain(0.5, b_got.append)
        assert len(a_unacked) == 5 and len(b_got) == 5  # round robin
        a.sock.close()  # A crashes without acknowledging
        time.sleep(0.3)
        p.publish_all("t/x", [b"o%d" % i for i in range(10)])
        b2: list[bytes] = []
        bb.drain(0.5, b2.append)
        assert len(b2) == 5  # B still gets only its half: A's share is queued for A
        a2 = MiniClient(b.port, "A", clean_start=False)
        assert a2.session_present
        back = [(x.payload, x.duplicate) for x in a2.packets(0.7) if isinstance(x, mqtt5.PublishPacket)]
        assert [pl for pl, dup in back if dup] == a_unacked  # redelivered to A, flagged DUP
        assert len([pl for pl, dup in back if not dup]) == 5  # and A's queued share
    finally:
        b.stop()


def test_mosquitto_restored_shared_subscription_receives_nothing_until_resubscribed(tmp_path: Path) -> None:
    """Mosquitto 2.0 with persistence, restarted while both members are offline. The persistent plain
    subscription receives at once: what is published next is queued for it. The shared one receives
    nothing until its member subscribes again. What devices publish in between is acknowledged to them
    and dropped. Hence a worker always subscribes again (``Gateway._connect``), and a site holds its
    devices off until the ingest has subscribed (``site_runner.open_device_listener``)."""
    from tests.conftest import start_broker

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import MiniClient

    b = start_broker(tmp_path / "b")
    try:
        # clean_start False, as the gateway connects: Mosquitto 2.0.11 does not write a session begun
        # with clean_start True to its persistence file, whatever its expiry interval
        shared = MiniClient(b.port, "W", clean_start=False)
        shared.subscribe("$share/g/t/#")
        plain = MiniClient(b.port, "S", clean_start=False)
        plain.subscribe("t/#")
        shared.sock.close()
        plain.sock.close()
        time.sleep(0.3)
        b.stop()
        b.start()
        MiniClient(b.port, "P", clean_start=True).publish_all("t/x", [b"%d" % i for i in range(5)])
        plain2 = MiniClient(b.port, "S", clean_start=False)
        assert plain2.session_present
        assert len([x for x in plain2.packets(0.7) if isinstance(x, mqtt5.PublishPacket)]) == 5
        shared2 = MiniClient(b.port, "W", clean_start=False)
        assert shared2.session_present  # the session, and its shared subscription, came back ...
        assert [x for x in shared2.packets(0.7) if isinstance(x, mqtt5.PublishPacket)] == []  # ... dead
        shared2.subscribe("$share/g/t/#")
        MiniClient(b.port, "P2", clean_start=True).publish_all("t/x", [b"n%d" % i for i in range(5)])
        assert len([x for x in shared2.packets(0.7) if isinstance(x, mqtt5.PublishPacket)]) == 5  # live again
    finally:
        b.stop()
