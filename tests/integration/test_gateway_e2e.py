"""The whole gateway against a real Mosquitto, the real default policy and a simulated fleet.

Checked from the outside: every message the fleet sent has exactly one audit decision; what each
destination receives decrypts to exactly the fields the policy allows it (values included, after
quantisation); the vendor only ever gets health telemetry without the serial number; bad input is
rejected with a reason while other devices carry on; a gateway restart loses nothing; the audit
chain verifies and a single flipped byte breaks it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from device_sim import Fleet, make_fleet
from gateway.audit.chain import iter_records, verify_chain
from gateway.catalog import schema_for
from gateway.codec import decode, encode
from gateway.crypto.envelope import open_envelope
from gateway.detect import strip_image_trailers
from gateway.guards import check_payload
from gateway.model import MessageFacts
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig
from gateway.vault import read_vault

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _expected(policy: Any, topic: str, payload: bytes, now_ms: int) -> dict[str, dict[str, Any]]:
    """What the policy says each destination gets, computed independently from the original bytes."""
    device = topic.split("/")[3]
    stream = "/".join(topic.split("/")[4:])
    entry = policy.device(device)
    schema = schema_for(entry.device_type, stream)
    fields, _, _ = check_payload(schema, decode(payload), now_ms=now_ms)
    fields, _ = strip_image_trailers(schema, fields)  # images leave cut at their end, length rounded up
    facts = MessageFacts(device, entry.device_type, entry.vendor, policy.site, topic, stream, len(payload),
                         tuple((n, schema.by_name[n].cls) for n in fields))
    out = {}
    for r in policy.decide(facts).routes:
        if r.allow:
            projected = {n: fields[n] for n in r.fields}
            for n, step in r.quantize:
                projected[n] = round(round(projected[n] / step) * step, 12)
            out[r.destination] = projected
    return out


async def _send_bad(port: int, items: list[tuple[str, bytes]]) -> None:
    c = MqttClient(host="127.0.0.1", port=port, client_id="test-bad", clean_start=True, session_expiry=0)
    await c.connect()
    for topic, payload in items:
        c.publish(topic, payload)
    c.flush()
    for _ in range(200):
        if not c.pending_out:
            break
        await asyncio.sleep(0.01)
    await c.disconnect()


@pytest.mark.broker
async def test_fleet_end_to_end_accounted_projected_encrypted_audited(broker: MosquittoBroker, tmp_path: Path) -> None:
    policy = load_policy(POLICY_DIR)
    state = tmp_path / "gw"
    # Data keys rotate every 40 envelopes: rotation under load, and every record must still open.
    gw = Gateway(GatewayConfig(state_dir=state, port=broker.port, key_max_messages=40), policy)
    rx = DestinationReceiver("127.0.0.1", broker.port, gw.keyring, keep=True)
    await rx.start()
    stop = asyncio.Event()
    import time

    now_ms = int(time.time() * 1000)
    bad = [
        ("site/AMS-T1/dev/et-00004/result", b"\x85\xa3seq\xc1"),
        ("site/AMS-T1/dev/zz-00001/result", encode({"seq": 1, "ts": now_ms})),
        ("site/AMS-T1/dev/et-00004/result",
         encode({"seq": 10**6, "ts": now_ms, "sample_id": "S1000001", "substances": [], "alarm": False, "x": 1})),
        ("site/AMS-T1/dev/et-00004/result/extra", encode({"seq": 10**6 + 1, "ts": now_ms})),
        ("site/AMS-T1/dev/xr-00001/result", b"\x80" + b"\x00" * 800_000),
    ]
    async with gw:
        serve = asyncio.create_task(gw.serve(stop))
        fleet = Fleet(make_fleet(24, seed=3), port=broker.port, seed=3, rate_scale=6.0, health_interval_s=1.0,
                      keep_payloads=True, drop_every_s=(1.0, 2.0), drop_for_s=(0.3, 0.6))
        bad_task = asyncio.create_task(_send_bad(broker.port, bad))
        truth = await fleet.run(4.0)
        await bad_task
        assert await gw.drain(20)
        for _ in range(200):
            if rx.total >= sum(n for d, n in gw.stats.forwarded.items() if d != "local_vault"):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await serve
    await rx.stop()

    assert truth.sent > 150 and not truth.failed
    assert {r.device_type for r in truth.sent_records} >= {"xray_baggage", "face_egate", "mobile_border"}

    # every message sent has exactly one audit decision; the bad ones are rejected with their reasons
    records = list(iter_records(state / "audit"))
    decided = Counter((r["dev"], r["seq"]) for r in records if "routes" in r)
    assert all(decided[(t.device_id, t.seq)] == 1 for t in truth.sent_records)
    assert len(decided) == truth.sent
    reasons = Counter(r["reason"] for r in records if "reason" in r)
    assert reasons == Counter({"decode.malformed": 1, "guard.unknown_device": 1, "guard.unknown_field": 1,
                               "guard.topic_stream": 1, "guard.too_large": 1})
    # the four invariant violations are alerted on and their bytes kept, sealed, in the quarantine
    alerts = [r for r in records if r.get("event") == "alert"]
    assert sorted(a["code"] for a in alerts) == ["guard.too_large", "guard.topic_stream", "guard.unknown_device",
                                                   "guard.unknown_field"]
    quarantined = sorted(open_envelope(gw.keyring, env)[1] for env in read_vault(state / "quarantine"))
    assert quarantined == sorted(p for _, p in bad[1:])  # all but the merely malformed one

    # what each destination received is exactly what the policy allows, field by field
    got: dict[tuple[str, str, int], dict[str, Any]] = {}
    for m in rx.messages:
        key = (m.header.destination, m.header.device, m.header.seq)
        assert key not in got
        got[key] = m.fields
    assert rx.duplicates == 0 and rx.undecryptable == 0
    # envelopes travel in bundles (the policy's default): fewer MQTT messages than envelopes
    assert rx.bundled == rx.total and gw.stats.bundled == rx.total and gw.stats.bundles < rx.total
    assert all(m.topic.startswith(f"edgeward/out/{m.header.destination}/{m.header.device}/") for m in rx.messages)
    assert len(gw.keyring.list()) > 5, "keys should have rotated many times during the run"
    vault = {}
    for env in read_vault(state / "vault"):
        h, pt = open_envelope(gw.keyring, env)
        assert (h.device, h.seq) not in vault
        vault[(h.device, h.seq)] = decode(pt)
    for t in truth.sent_records:
        assert t.payload is not None
        expected = _expected(policy, t.topic, t.payload, int(t.t_sent * 1000))
        assert "local_vault" in expected
        assert vault[(t.device_id, t.seq)] == expected["local_vault"]
        for dest in ("customs_nl", "eu_hub", "vendor_maintenance"):
            if dest in expected:
                assert got[(dest, t.device_id, t.seq)] == expected[dest], (dest, t.device_id, t.seq)
            else:
                assert (dest, t.device_id, t.seq) not in got
    assert len(got) == sum(n for d, n in gw.stats.forwarded.items() if d != "local_vault")

    # re-timed uplinks: a header carries the boundary its batch left at, drawn by the gateway, never
    # the device's millisecond clock; so whole batches share one timestamp, at most 1.5 batches (7.5 s)
    # after the send. (A message that arrives after a boundary passed but before the deliverer's next
    # tick leaves with that batch, stamped a few ms before its arrival; hence the lower bound.)
    sent_ms = {(t.device_id, t.seq): t.t_sent * 1000 for t in truth.sent_records}
    for m in rx.messages:
        lag = m.header.ts - sent_ms[(m.header.device, m.header.seq)]
        assert -1000 < lag < 7500 + 2000, (m.header, lag)
    for dest in ("customs_nl", "eu_hub", "vendor_maintenance"):
        stamps = Counter(m.header.ts for m in rx.messages if m.header.destination == dest)
        assert stamps and len(stamps) <= 8 and max(stamps.values()) >= 5, (dest, stamps)

    # the vendor only ever sees health telemetry, never the serial number
    vendor = [m for m in rx.messages if m.header.destination == "vendor_maintenance"]
    assert vendor, "the vendor with a contract should receive health telemetry"
    for m in vendor:
        assert m.header.stream == "status/health"
        assert "serial_number" not in m.fields
        assert set(m.fields) <= {"firmware_version", "uptime_s", "internal_temp_c", "error_codes"}
    # nothing travels in plaintext: an uplink envelope holds only the header and the ciphertext
    sample = next(t for t in truth.sent_records if t.device_type == "id_reader" and t.stream == "result")
    mrz = decode(sample.payload or b"")["mrz"].encode()
    assert mrz not in b"".join(read_vault(state / "vault"))

    # the audit chain verifies, and one flipped byte breaks it
    assert verify_chain(state / "audit").ok
    f = sorted((state / "audit").glob("audit-*.jsonl"))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert not verify_chain(state / "audit").ok


@pytest.mark.broker
async def test_gateway_restart_loses_nothing(broker: MosquittoBroker, tmp_path: Path) -> None:
    """Stop the gateway while the fleet keeps sending; its persistent session holds the messages."""
    policy = load_policy(POLICY_DIR)
    state = tmp_path / "gw"
    fleet = Fleet(make_fleet(16, seed=5), port=broker.port, seed=5, rate_scale=8.0, health_interval_s=0.5,
                  drop_every_s=None)

    subscribed = asyncio.Event()

    done_before = [0]

    async def gateway_for(seconds: float, *, until_all: bool = False) -> None:
        stop = asyncio.Event()
        async with Gateway(GatewayConfig(state_dir=state, port=broker.port), policy) as gw:
            subscribed.set()
            serve = asyncio.create_task(gw.serve(stop))
            await asyncio.sleep(seconds)
            # the second life runs until the backlog is through (uplinks are re-timed into 1 s
            # batches, so its pace depends on the broker's in-flight window)
            for _ in range(400 if until_all else 0):
                if done_before[0] + gw.stats.decided + sum(gw.stats.rejected.values()) >= fleet.truth.sent:
                    break
                await asyncio.sleep(0.05)
            await gw.drain(10)
            done_before[0] += gw.stats.decided + sum(gw.stats.rejected.values())
            stop.set()
            await serve

    first = asyncio.create_task(gateway_for(1.5))  # first life: its session exists before devices send
    await subscribed.wait()
    fleet_task = asyncio.create_task(fleet.run(4.0))
    await first
    await asyncio.sleep(1.0)        # gateway down: the broker queues for its session
    await fleet_task
    await gateway_for(1.0, until_all=True)  # second life: drains the backlog
    truth = fleet.truth
    decided = Counter((r["dev"], r["seq"]) for r in iter_records(state / "audit") if "routes" in r)
    missing = [(t.device_id, t.seq) for t in truth.sent_records if (t.device_id, t.seq) not in decided]
    assert truth.sent > 100
    assert missing == []
    assert max(decided.values()) == 1
    assert verify_chain(state / "audit").ok


def _small_fleet(broker: MosquittoBroker) -> Fleet:
    return Fleet(make_fleet(8, seed=9), port=broker.port, seed=9, rate_scale=8.0, health_interval_s=0.5,
                 drop_every_s=None)


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """From now on every os.fsync is recorded as (path, made on this thread, i.e. the event loop?)."""
    import os
    import threading

    seen: list[tuple[str, bool]] = []
    real_fsync = os.fsync
    loop_thread = threading.get_ident()

    def fsync(fd: int) -> None:
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), threading.get_ident() == loop_thread))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


async def test_checkpoints_are_fsynced_off_the_event_loop_and_published_after(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint every 25 records: its fsync (~4 ms for 10,000 records on the development machine)
    runs in the syncer's thread, never on the loop, and a checkpoint is published only after it."""
    import os
    import threading

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.audit.checkpoint import verify_with_checkpoints

    key = Ed25519PrivateKey.generate()
    state = tmp_path / "gw"
    gw = Gateway(GatewayConfig(state_dir=state, port=broker.port, audit_signing_key=key,
                               checkpoint_every_records=25), load_policy(POLICY_DIR))
    assert gw.checkpointer is not None
    events: list[tuple[str, Any]] = []
    real_fsync = os.fsync
    loop_thread = threading.get_ident()

    def fsync(fd: int) -> None:
        # the audit log's (a new data key is fsynced where it is made, before anything is sealed with it)
        if "/audit/" in os.readlink(f"/proc/self/fd/{fd}"):
            events.append(("fsync", threading.get_ident() == loop_thread))
        real_fsync(fd)

    publish = gw.checkpointer._publish
    assert publish is not None
    gw.checkpointer._publish = lambda ck: (events.append(("publish", ck)), publish(ck))[1]  # type: ignore[func-returns-value]
    fleet = _small_fleet(broker)
    stop = asyncio.Event()
    async with gw:
        monkeypatch.setattr(os, "fsync", fsync)
        serve = asyncio.create_task(gw.serve(stop))
        await fleet.run(3.0)
        for _ in range(100):
            if gw.stats.decided + sum(gw.stats.rejected.values()) >= fleet.truth.sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # one more round of the syncer: what is waiting is published
        serving = list(events)
        monkeypatch.undo()
        stop.set()
        await serve
    published = [e[1] for e in serving if e[0] == "publish"]
    assert fleet.truth.sent > 60 and len(published) >= 2
    assert [on_loop for kind, on_loop in serving if kind == "fsync"].count(True) == 0
    # each publication follows an fsync begun after its checkpoint was written
    first_publish = next(i for i, e in enumerate(serving) if e[0] == "publish")
    assert any(e[0] == "fsync" for e in serving[:first_publish])
    r = verify_with_checkpoints(state / "audit", key.public_key(), published=published)
    assert r.ok, r.errors


async def test_a_violation_alert_never_fsyncs_on_the_event_loop(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that breaks an invariant gets an alert, written to the audit log at once. The alert used
    to fsync the log on the loop too (5-8 ms here, at most once a second: every second under a hostile
    device), stalling every message behind it. The syncer's thread fsyncs it within a second instead."""
    import time

    import msgpack

    state = tmp_path / "gw"
    gw = Gateway(GatewayConfig(state_dir=state, port=broker.port), load_policy(POLICY_DIR))
    topic = "site/AMS-T1/dev/et-00001/result"
    now_ms = int(time.time() * 1000)

    def bad(seq: int) -> bytes:  # a field the trace detector's schema does not have: guard.unknown_field
        return msgpack.packb({"seq": seq, "ts": now_ms, "sample_id": "S1234567", "substances": ["RDX"],
                              "alarm": True, "exfil": "x"})

    stop = asyncio.Event()
    async with gw:
        fsyncs = _record_fsyncs(monkeypatch)
        serve = asyncio.create_task(gw.serve(stop))
        dev = MqttClient(host="127.0.0.1", port=broker.port, client_id="et-00001", clean_start=True,
                         keepalive=0)
        await dev.connect()
        for seq in (1, 2):  # two alerts over a second apart (at most one per device and reason a second)
            dev.publish(topic, bad(seq))
            dev.flush()
            for _ in range(100):
                if gw.stats.violations["guard.unknown_field"] >= seq:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.2)
        await dev.disconnect()
        monkeypatch.undo()
        stop.set()
        await serve
    assert gw.stats.violations["guard.unknown_field"] == 2
    alerts = [r for r in iter_records(state / "audit")
              if r.get("event") == "alert" and r.get("kind") == "violation"]
    assert len(alerts) == 2
    assert not [p for p, on_loop in fsyncs if on_loop and "/audit/" in p], fsyncs
    assert [p for p, on_loop in fsyncs if not on_loop and "/audit/" in p]  # the syncer's


async def test_rolled_vault_and_done_files_are_fsynced_by_the_syncer_before_they_are_closed(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full vault segment or done-log file used to be closed where it rolled over, unsynced: its
    last second of frames (acknowledged already) was never fsynced by the gateway. Now it stays open
    until the syncer's thread has fsynced it, and only then is closed; nothing is fsynced on the loop."""
    import os

    state = tmp_path / "gw"
    gw = Gateway(GatewayConfig(state_dir=state, port=broker.port), load_policy(POLICY_DIR))
    gw.vault.segment_bytes = 2048  # a roll every few batches
    gw.done.max_file_bytes = 512
    gw.done.keep_files = 1000  # keep them all, to check each
    fleet = _small_fleet(broker)
    stop = asyncio.Event()
    async with gw:
        fsyncs = _record_fsyncs(monkeypatch)
        serve = asyncio.create_task(gw.serve(stop))
        await fleet.run(3.0)
        await asyncio.sleep(1.3)  # one more round of the syncer
        live = {os.readlink(f"/proc/self/fd/{w._fh.fileno()}") for w in (gw.vault, gw.done)}
        still_open = sum(len(getattr(w, "retired", ())) for w in (gw.vault, gw.done))
        rolled = [str(p) for d in ("vault", "done") for p in sorted((state / d).iterdir())
                  if str(p) not in live]
        serving = list(fsyncs)
        monkeypatch.undo()
        stop.set()
        await serve
    assert len([p for p in rolled if "/vault/" in p]) >= 2 and len([p for p in rolled if "/done/" in p]) >= 2
    assert still_open <= 2  # at most those rolled over since the last round
    unsynced = [p for p in rolled if p not in {path for path, _ in serving}]
    assert len(unsynced) <= still_open, unsynced
    assert not [p for p, on_loop in serving if on_loop and ("/vault/" in p or "/done/" in p)]
    vaults = [name for name, d in gw.policy.destinations.items() if d.transport == "vault"]
    vaulted = sum(gw.stats.forwarded[n] for n in vaults)
    assert len(list(read_vault(state / "vault", strict=True))) == vaulted > 0


async def test_data_keys_are_made_by_the_syncer_and_rotation_on_the_loop_is_a_swap(
        broker: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a data key writes and fsyncs its record (0.5-6 ms). The syncer's thread makes the next one
    ahead, so the rotation that falls under a message (every key_max_messages seals) does no I/O."""
    import time

    import msgpack

    state = tmp_path / "gw"
    config = GatewayConfig(state_dir=state, port=broker.port, key_max_messages=12)
    gw = Gateway(config, load_policy(POLICY_DIR))
    topic = "site/AMS-T1/dev/et-00001/result"
    stop = asyncio.Event()
    async with gw:
        first = gw.keyring.current().kid
        fsyncs = _record_fsyncs(monkeypatch)
        serve = asyncio.create_task(gw.serve(stop))
        dev = MqttClient(host="127.0.0.1", port=broker.port, client_id="et-00001", clean_start=True,
                         keepalive=0)
        await dev.connect()
        seq = 0
        for _ in range(3):  # a few messages at a time, each burst less than one key's worth of seals
            await asyncio.sleep(1.3)  # a round of the syncer: the next key is ready
            for _ in range(3):
                seq += 1
                result = {"seq": seq, "ts": int(time.time() * 1000), "sample_id": "S1234567",
                          "substances": ["RDX"], "alarm": True}
                dev.publish(topic, msgpack.packb(result))
            dev.flush()
            for _ in range(100):
                if gw.stats.decided >= seq:
                    break
                await asyncio.sleep(0.02)
        await dev.disconnect()
        sealed_with = {gw.keyring.current().kid}
        serving = list(fsyncs)
        monkeypatch.undo()
        stop.set()
        await serve
    assert gw.stats.decided == 9 and first not in sealed_with  # rotated at least once
    keys = [p for p, _ in serving if p.endswith("datakeys.jsonl")]
    assert keys and not [p for p, on_loop in serving if on_loop and p.endswith("datakeys.jsonl")], serving
