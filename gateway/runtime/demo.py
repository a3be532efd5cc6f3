"""``edgeward demo``: a private broker, the gateway, a simulated fleet, the destinations, a report.

Everything is real: Mosquitto with Edgeward's rendered config, the gateway's mqtt5 ingest, the
policy, AES-GCM envelopes, the hash-chained audit log, aiomqtt devices. The report is reconciled
from the outside: the simulator's ground truth against the audit log (every message sent must have
a record), what the gateway forwarded against what each destination received and could decrypt,
and the broker's own drop counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from gateway.audit.chain import iter_records, verify_chain
from gateway.codec import encode
from gateway.pipeline import PolicyLike
from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port, mosquitto_binary
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig
from gateway.vault import read_vault

__all__ = ["DemoOptions", "run_demo", "format_summary"]


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 200
    seconds: float = 30.0
    seed: int = 0
    rate_scale: float = 1.0
    policy_path: Path = Path("policies")
    state_dir: Path | None = None
    bad_inputs: bool = True
    progress: bool = True


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _bad_inputs(site: str, now_ms: int) -> list[tuple[str, str, bytes]]:
    """(what, topic, payload): one of each kind of bad input a device can send."""
    good = {"seq": 1, "ts": now_ms, "sample_id": "S1000001", "substances": [], "alarm": False}
    return [
        ("malformed MessagePack", f"site/{site}/dev/et-00004/result", b"\x85\xa3seq\xc1\xc1"),
        ("payload over its size limit", f"site/{site}/dev/et-00004/result", encode({**good, "substances": ["x" * 60] * 200})),
        ("unknown device", f"site/{site}/dev/zz-99999/result", encode(good)),
        ("field not in the schema", f"site/{site}/dev/et-00004/result", encode({**good, "exfil": "c2VjcmV0"})),
        ("topic outside the namespace", f"site/{site}/dev/et-00004/result/x", encode(good)),
    ]


async def run_demo(opts: DemoOptions, *, load_policy: Callable[[Path], PolicyLike],
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    from device_sim import Fleet, make_fleet  # the simulator is a client of the broker, not of the gateway

    policy = load_policy(opts.policy_path)
    tmp = None
    if opts.state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgeward-demo-")
        root = Path(tmp.name)
    else:
        root = opts.state_dir
        root.mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(BrokerConfig(port=free_port(), workdir=root / "broker"))
    broker.start()
    version = _broker_version()
    log(f"edgeward demo: {version} on 127.0.0.1:{broker.port} (private, rendered config {broker.conf_path})")
    try:
        gw = Gateway(GatewayConfig(state_dir=root / "gateway", port=broker.port), policy)
        rx = DestinationReceiver("127.0.0.1", broker.port, gw.keyring)
        await rx.start()
        stop = asyncio.Event()
        async with gw:
            serve = asyncio.create_task(gw.serve(stop), name="gateway-serve")
            log(f"gateway up: policy revision {policy.revision}, site {policy.site}, "
                f"{len(policy.destinations)} destinations; fleet of {opts.devices} devices for {opts.seconds:g}s")
            sent_box = [0]
            fleet = Fleet(
                make_fleet(opts.devices, site=policy.site, seed=opts.seed),
                port=broker.port,
                seed=opts.seed,
                rate_scale=opts.rate_scale,
                on_progress=lambda n: sent_box.__setitem__(0, n),
            )
            t0 = time.monotonic()
            progress = asyncio.create_task(_progress(gw, rx, sent_box, t0, opts, log), name="demo-progress")
            bad = []
            if opts.bad_inputs:
                bad = await _send_bad_inputs(broker.port, policy.site)
            truth = await fleet.run(opts.seconds)
            elapsed_fleet = time.monotonic() - t0
            drained = await gw.drain(timeout=60)
            # let the destinations take the last acknowledged publishes
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and rx.total < sum(
                n for d, n in gw.stats.forwarded.items() if policy.destinations[d].transport == "mqtt"
            ):
                await asyncio.sleep(0.05)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            if opts.progress:
                log("")
            stop.set()
            await serve
        await rx.stop()
        return _report(opts, broker, version, gw, rx, truth, bad, elapsed_fleet, drained, root)
    finally:
        broker.stop()
        if tmp is not None:
            tmp.cleanup()


async def _send_bad_inputs(port: int, site: str) -> list[str]:
    client = MqttClient(host="127.0.0.1", port=port, client_id="demo-bad-input", clean_start=True, session_expiry=0)
    await client.connect()
    sent = []
    for what, topic, payload in _bad_inputs(site, int(time.time() * 1000)):
        client.publish(topic, payload)
        sent.append(what)
    client.flush()
    deadline = time.monotonic() + 5
    while client.pending_out and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await client.disconnect()
    return sent


async def _progress(gw: Gateway, rx: DestinationReceiver, sent: list[int], t0: float, opts: DemoOptions,
                    log: Callable[[str], None]) -> None:
    if not opts.progress:
        return
    while True:
        await asyncio.sleep(0.5)
        el = time.monotonic() - t0
        s = gw.stats
        blocked = sum(s.rejected.values())
        line = (f"\r  {min(el, opts.seconds):5.1f}/{opts.seconds:g}s  sent {sent[0]:>7}  gateway {s.received:>7}"
                f"  ({s.received / el if el else 0:6.0f} msg/s)  forwarded {sum(s.forwarded.values()):>7}"
                f"  at destinations {rx.total:>7}  blocked {blocked:>4}")
        print(line, end="", file=sys.stderr, flush=True)


def _broker_version() -> str:
    try:
        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5)
        first = (out.stdout or out.stderr).splitlines()[0]
        return first.strip()
    except Exception:  # noqa: BLE001 - only cosmetic
        return "mosquitto"


def _report(opts: DemoOptions, broker: MosquittoBroker, version: str, gw: Gateway, rx: DestinationReceiver,
            truth: Any, bad: list[str], elapsed: float, drained: bool, root: Path) -> dict[str, Any]:
    audit_dir = root / "gateway" / "audit"
    verified = verify_chain(audit_dir)
    seen: set[tuple[str, int]] = set()
    for rec in iter_records(audit_dir):
        if "dev" in rec and rec.get("reason", "dedupe.duplicate") == "dedupe.duplicate":
            seen.add((rec["dev"], rec["seq"]))
    sent_keys = [(r.device_id, r.seq) for r in truth.sent_records]
    unaccounted = sum(1 for k in sent_keys if k not in seen)
    # Every envelope the gateway forwarded must have arrived; the vault is read back from disk.
    vault_keys: Counter[tuple[str, str, int]] = Counter()
    for env in read_vault(root / "gateway" / "vault"):
        h = msgpack.unpackb(msgpack.unpackb(env)["h"])
        vault_keys[(h[0], h[1], h[2])] += 1
    vault_dups = sum(n - 1 for n in vault_keys.values() if n > 1)
    s = gw.stats
    pol = gw.policy
    mqtt_forwarded = {d: n for d, n in s.forwarded.items() if pol.destinations[d].transport == "mqtt"}
    undelivered = sum(max(0, n - rx.counts.get(d, 0)) for d, n in mqtt_forwarded.items())
    vault_name = next((d for d, v in pol.destinations.items() if v.transport == "vault"), None)
    vault_missing = max(0, s.forwarded.get(vault_name, 0) - len(vault_keys)) if vault_name else 0
    blocked: Counter[str] = Counter(s.rejected)
    for key, n in s.denied.items():
        blocked[key.split(":", 1)[1]] += n
    lat = rx.latencies_ms
    return {
        "broker": {"version": version, "host": "127.0.0.1", "port": broker.port, "config": "rendered by edgeward",
                   "tls": False, "dropped": s.broker_dropped},
        "policy_revision": pol.revision,
        "devices": opts.devices,
        "seconds": opts.seconds,
        "sent": truth.sent,
        "send_failures": len(truth.failed),
        "received": s.received,
        "decided": s.decided,
        "forwarded": dict(sorted(s.forwarded.items())),
        "at_destinations": dict(sorted(rx.counts.items())),
        "blocked": dict(sorted(blocked.items())),
        "fields_removed": dict(sorted(s.removed.items())),
        "bad_inputs_sent": len(bad),
        "lost": unaccounted + undelivered + vault_missing + s.broker_dropped,
        "duplicates": rx.duplicates + vault_dups,
        "undecryptable": rx.undecryptable,
        "drained": drained,
        "msgs_per_s": round(s.received / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": round(_percentile(lat, 50), 2), "p99": round(_percentile(lat, 99), 2),
                       "basis": "device timestamp to destination receipt"},
        "audit_ok": verified.ok,
        "audit_records": verified.records,
    }


def format_summary(r: dict[str, Any]) -> str:
    ok = "yes" if r["audit_ok"] else "NO"
    lines = [
        "",
        "Edgeward demo — summary",
        f"  broker            {r['broker']['version']} on {r['broker']['host']}:{r['broker']['port']} "
        f"(private; dropped {r['broker']['dropped']})",
        f"  policy            revision {r['policy_revision']}",
        f"  fleet             {r['devices']} devices for {r['seconds']:g}s, sent {r['sent']} messages",
        f"  gateway           received {r['received']}, decided {r['decided']}, {r['msgs_per_s']} msg/s",
        "  forwarded         " + ", ".join(f"{d} {n}" for d, n in r["forwarded"].items()),
        "  at destinations   " + (", ".join(f"{d} {n}" for d, n in r["at_destinations"].items()) or "none"),
        "  blocked           " + (", ".join(f"{c} {n}" for c, n in r["blocked"].items()) or "none"),
        "  fields removed    " + (", ".join(f"{c} {n}" for c, n in r["fields_removed"].items()) or "none"),
        f"  lost              {r['lost']}",
        f"  duplicates        {r['duplicates']}",
        f"  latency           p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms "
        f"({r['latency_ms']['basis']})",
        f"  audit chain       {r['audit_records']} records, verified: {ok}",
    ]
    return "\n".join(lines)
