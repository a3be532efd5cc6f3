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
import json
import secrets
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

from gateway import _native
from gateway.audit.chain import iter_records, verify_chain
from gateway.codec import encode
from gateway.pipeline import PolicyLike
from gateway.runtime.broker import MosquittoBroker, mosquitto_binary
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway
from gateway.vault import read_vault

__all__ = ["DemoOptions", "format_summary", "run_demo", "techniques_report"]


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
    scenario: str | None = None  # a device_sim scenario (name or YAML file): hostile firmware in the fleet
    save_dir: Path | None = None  # with a scenario: save the run here for `edgeward report` (holds the secrets)


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def _bad_inputs(site: str, device: str, now_ms: int) -> list[tuple[str, str, bytes]]:
    """(what, topic, payload): one of each kind of bad input a trace detector can send."""
    good = {"seq": 10**9, "ts": now_ms, "sample_id": "S1000001", "substances": [], "alarm": False}
    own = f"site/{site}/dev/{device}/result"
    return [
        ("malformed MessagePack", own, b"\x85\xa3seq\xc1\xc1"),
        ("payload over its size limit", own, encode({**good, "substances": ["x" * 60] * 200})),
        ("into another (unknown) device's namespace", f"site/{site}/dev/zz-99999/result", encode(good)),
        ("field not in the schema", own, encode({**good, "exfil": "c2VjcmV0"})),
        ("topic outside the stream layout", own + "/x", encode(good)),
    ]


async def run_demo(opts: DemoOptions, *, load_policy: Callable[[Path], PolicyLike],
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict[str, Any]:
    """A throw-away site (CA, certificates, passphrase-wrapped KEK, signed audit) in a temporary
    directory, run exactly as ``edgeward run`` runs a site: devices over mutual TLS."""
    from device_sim import Fleet, make_fleet  # the simulator is a client of the broker, not of the gateway
    from gateway.crypto.recipient import RecipientOpener, generate_recipient_key, load_private_key
    from gateway.runtime.site_runner import SiteRuntime
    from gateway.site import init_site, load_site, register_recipient

    tmp = None
    if opts.state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="edgeward-demo-")
        root = Path(tmp.name)
    else:
        root = opts.state_dir
        root.mkdir(parents=True, exist_ok=True)
    try:
        policy = load_policy(opts.policy_path)
        profiles: dict[str, Any] = {}
        if opts.scenario:
            from device_sim.scenario import load_scenario

            scenario = load_scenario(opts.scenario)
            specs = scenario.fleet()
            profiles = scenario.profiles_for(specs)
            log(f"scenario {scenario.name}: {len(specs)} devices, {len(profiles)} with hostile firmware")
        else:
            specs = make_fleet(opts.devices, site=policy.site, seed=opts.seed)
        passphrase = secrets.token_urlsafe(24)  # in memory only: this site lives as long as the demo
        t_init = time.monotonic()
        site_dir = init_site(root / "site", policy_src=opts.policy_path, devices=[s.device_id for s in specs],
                             passphrase=passphrase, device_port=0, gateway_port=0)
        # The customs system hands the site its public key: its data is sealed so only it can read it.
        priv, pub = generate_recipient_key(root / "customs-system", "customs_nl")
        register_recipient(site_dir, "customs_nl", pub)
        site = load_site(site_dir, passphrase)
        policy = load_policy(site.policy_dir)
        log(f"edgeward demo: site {site.name} created in {time.monotonic() - t_init:.1f}s "
            f"(CA, {len(specs)} device certificates, Argon2id-wrapped KEK, audit signing key)")
        # Checkpoints every 10 s here (60 s by default) so a short demo shows several being published.
        async with SiteRuntime(site, policy, log=log, config_overrides={"checkpoint_every_s": 10.0}) as rt:
            assert rt.broker is not None and rt.gateway is not None
            gw = rt.gateway
            version = _broker_version()
            rx = DestinationReceiver("127.0.0.1", rt.gateway_port, gw.keyring, client_id="edgeward-destinations",
                                     username="edgeward-operator", password=rt.operator_password,
                                     keep=bool(opts.scenario),
                                     openers={"customs_nl": RecipientOpener(load_private_key(priv))})
            await rx.start()
            stop = asyncio.Event()
            serve = asyncio.create_task(gw.serve(stop), name="gateway-serve")
            log(f"gateway up: {version}, policy revision {policy.revision}, {len(policy.destinations)} destinations "
                f"(customs_nl sealed to its own key), core {_native.status()['mode']}; "
                f"fleet of {len(specs)} devices over mTLS for {opts.seconds:g}s")
            sent_box = [0]
            fleet = Fleet(
                specs,
                port=rt.device_port,
                seed=opts.seed,
                rate_scale=opts.rate_scale,
                tls=lambda spec: site.device_ssl_context(spec.device_id),
                on_progress=lambda n: sent_box.__setitem__(0, n),
                profiles=profiles,
            )
            t0 = time.monotonic()
            progress = asyncio.create_task(_progress(gw, rx, sent_box, t0, opts, log), name="demo-progress")
            bad: dict[str, int] = {}
            if opts.bad_inputs:
                tracer = next(s.device_id for s in specs if s.device_type == "trace_detector")
                bad = await _send_bad_inputs(rt.device_port, site.device_ssl_context(tracer), policy.site, tracer)
            truth = await fleet.run(opts.seconds)
            elapsed_fleet = time.monotonic() - t0
            drained = await gw.drain(timeout=60)
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
            report = _report(opts, rt.broker, version, gw, rx, truth, bad, elapsed_fleet, drained, site.root)
            report["devices"] = len(specs)
            if opts.scenario:
                report["techniques"] = techniques_report(truth, rx.messages, gw.keyring, site.root,
                                                         save_dir=opts.save_dir,
                                                         meta={"scenario": opts.scenario, "seconds": opts.seconds})
                if opts.save_dir is not None:
                    report["saved_run"] = str(opts.save_dir)
        report["audit_checkpoints"] = _verify_signed(site)
        report["audit_ok"] = report["audit_ok"] and report["audit_checkpoints"]["ok"]
        return report
    finally:
        if tmp is not None:
            tmp.cleanup()


def techniques_report(truth: Any, received: list[Any], keyring: Any, root: Path | list[Path], *,
                      save_dir: Path | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per hostile technique: attempts, detected, refused, neutralised and leaked (device_sim.report),
    from what the destinations received and the vault and audit log under ``root`` (or under each of
    several state directories: a site's and its workers', with a keyring that opens all their vaults)."""
    from device_sim.report import measure_run

    from gateway.codec import decode
    from gateway.crypto.envelope import open_envelope

    roots = [root] if isinstance(root, Path) else root
    vault = []
    records: list[dict[str, Any]] = []
    for r in roots:
        for env in read_vault(r / "vault"):
            h, pt = open_envelope(keyring, env)
            vault.append((h, decode(pt)))
        records.extend(iter_records(r / "audit"))
    rows = measure_run(truth, received, vault, records, save_dir=save_dir, meta=meta)
    return {r.technique: r.to_json() for r in rows}


def _verify_signed(site: Any) -> dict[str, Any]:
    from gateway.audit.checkpoint import verify_with_checkpoints

    published = []
    if site.checkpoints_path.exists():
        published = [json.loads(line) for line in site.checkpoints_path.read_text().splitlines() if line.strip()]
    r = verify_with_checkpoints(site.audit_dir, site.audit_verify_key(), published=published)
    return {"ok": r.ok, "checkpoints": r.checkpoints, "published": r.published, "error": r.error}


async def _send_bad_inputs(port: int, tls: Any, site: str, device: str) -> dict[str, int]:
    """Bad input from a real device identity (its own certificate): what the broker refuses by ACL
    and what reaches the gateway's guards."""
    client = MqttClient(host="127.0.0.1", port=port, client_id=f"{device}-diagnostics", clean_start=True,
                        session_expiry=0, ssl=tls)
    await client.connect()
    items = _bad_inputs(site, device, int(time.time() * 1000))
    for _, topic, payload in items:
        client.publish(topic, payload)
    client.flush()
    deadline = time.monotonic() + 5
    while client.pending_out and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await client.disconnect()
    return {"sent": len(items), "refused_by_broker": client.refused_out}


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
            truth: Any, bad: dict[str, int], elapsed: float, drained: bool, root: Path) -> dict[str, Any]:
    audit_dir = root / "audit"
    verified = verify_chain(audit_dir)
    # Accounted for = the audit log holds a decision or a rejection for those exact bytes (by digest:
    # a hostile message may not even carry its own device id in a form the gateway recognises).
    seen = {rec["digest"] for rec in iter_records(audit_dir) if "digest" in rec and "event" not in rec}
    unaccounted = sum(1 for r in truth.sent_records if r.sha256 not in seen)
    # Every envelope the gateway forwarded must have arrived; the vault is read back from disk.
    vault_keys: Counter[tuple[str, str, int]] = Counter()
    for env in read_vault(root / "vault"):
        h = msgpack.unpackb(msgpack.unpackb(env)["h"])
        vault_keys[(h[0], h[1], h[2])] += 1
    vault_dups = sum(n - 1 for n in vault_keys.values() if n > 1)
    s = gw.stats
    pol = gw.policy
    mqtt_forwarded = {d: n for d, n in s.forwarded.items() if pol.destinations[d].transport == "mqtt"}
    # Dropped with a reason in the audit log (withheld bursts, an unreachable destination) is accounted
    # for, not lost.
    dropped: Counter[str] = Counter()
    for key, n in s.undelivered.items():
        dropped[key.split(":", 1)[0]] += n
    undelivered = sum(max(0, n - dropped[d] - rx.counts.get(d, 0)) for d, n in mqtt_forwarded.items())
    vault_name = next((d for d, v in pol.destinations.items() if v.transport == "vault"), None)
    vault_missing = max(0, s.forwarded.get(vault_name, 0) - len(vault_keys)) if vault_name else 0
    blocked: Counter[str] = Counter(s.rejected)
    for key, n in s.denied.items():
        blocked[key.split(":", 1)[1]] += n
    # Receipt at the gateway -> every destination's acknowledgement: the re-timing wait included (the
    # header's ts is the release boundary of a re-timed destination, so it cannot time the device).
    lat = [x * 1000 for x in s.latency_s]
    return {
        "broker": {"version": version, "host": "127.0.0.1", "gateway_port": broker.port,
                   "device_port": broker.config.tls.port if broker.config.tls else None,
                   "config": "rendered by edgeward", "tls": broker.config.tls is not None,
                   "acl": "rendered from the policy", "dropped": s.broker_dropped},
        "policy_revision": pol.revision,
        "core": _native.status(),  # the per-message core compiled (mypyc) or pure Python, and why
        "devices": opts.devices,
        "seconds": opts.seconds,
        "sent": truth.sent,
        "send_failures": len(truth.failed),
        "received": s.received,
        "decided": s.decided,
        "forwarded": dict(sorted(s.forwarded.items())),
        "at_destinations": dict(sorted(rx.counts.items())),
        "bundles": {"mqtt_messages": gw.stats.bundles, "envelopes": gw.stats.bundled},
        "blocked": dict(sorted(blocked.items())),
        "dropped_with_reason": dict(sorted(s.undelivered.items())),
        "fields_removed": dict(sorted(s.removed.items())),
        "violations_quarantined": dict(sorted(s.violations.items())),
        "bad_inputs": bad,
        "lost": unaccounted + undelivered + vault_missing + s.broker_dropped,
        "duplicates": rx.duplicates + vault_dups,
        "undecryptable": rx.undecryptable,
        "drained": drained,
        "msgs_per_s": round(s.received / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {"p50": round(_percentile(lat, 50), 2), "p99": round(_percentile(lat, 99), 2),
                       "basis": "gateway receipt to every destination's acknowledgement, re-timing wait included"},
        "audit_ok": verified.ok,
        "audit_records": verified.records,
    }


def _technique_table(t: dict[str, Any]) -> str:
    lines = ["  hostile firmware  technique               attempts  detected  refused  neutralised  leaked"]
    for name, row in t.items():
        lines.append(f"                    {name:22} {row['attempts']:>9} {row['detected']:>9} "
                     f"{row['refused_by_broker']:>8} {row['neutralised']:>12} {row['leaked']:>7}")
    return "\n".join(lines)


def _ms(v: float) -> str:
    return f"{v / 1000:.1f} s" if v >= 1000 else f"{v:.1f} ms"


def format_summary(r: dict[str, Any]) -> str:
    ok = "yes" if r["audit_ok"] else "NO"
    lines = [
        "",
        "Edgeward demo — summary",
        f"  broker            {r['broker']['version']}, private: devices mTLS 127.0.0.1:{r['broker']['device_port']}, "
        f"gateway 127.0.0.1:{r['broker']['gateway_port']}; ACL from the policy; dropped {r['broker']['dropped']}",
        f"  policy            revision {r['policy_revision']}",
        f"  fleet             {r['devices']} devices for {r['seconds']:g}s, sent {r['sent']} messages",
        f"  gateway           received {r['received']}, decided {r['decided']}, {r['msgs_per_s']} msg/s",
        "  forwarded         " + ", ".join(f"{d} {n}" for d, n in r["forwarded"].items()),
        "  at destinations   " + (", ".join(f"{d} {n}" for d, n in r["at_destinations"].items()) or "none")
        + (f" ({r['bundles']['envelopes']} envelopes in {r['bundles']['mqtt_messages']} bundles)"
           if r.get("bundles", {}).get("mqtt_messages") else ""),
        "  blocked           " + (", ".join(f"{c} {n}" for c, n in r["blocked"].items()) or "none"),
        "  fields removed    " + (", ".join(f"{c} {n}" for c, n in r["fields_removed"].items()) or "none"),
        "  quarantined       " + (", ".join(f"{c} {n}" for c, n in r["violations_quarantined"].items()) or "none")
        + " (sealed locally, alerted on edgeward/alerts/)",
        *(["  not delivered     " + ", ".join(f"{k} {n}" for k, n in r["dropped_with_reason"].items())
           + " (each audited with its reason)"] if r.get("dropped_with_reason") else []),
        *([_technique_table(r["techniques"])] if "techniques" in r else []),
        f"  lost              {r['lost']}",
        f"  duplicates        {r['duplicates']}",
        f"  latency           p50 {_ms(r['latency_ms']['p50'])}, p99 {_ms(r['latency_ms']['p99'])} "
        f"({r['latency_ms']['basis']})",
        f"  bad input         {r['bad_inputs'].get('sent', 0)} sent as a real device, "
        f"{r['bad_inputs'].get('refused_by_broker', 0)} refused by the broker's ACL, the rest blocked above",
        f"  audit chain       {r['audit_records']} records, {r['audit_checkpoints']['checkpoints']} signed checkpoints "
        f"({r['audit_checkpoints']['published']} published), verified: {ok}",
    ]
    return "\n".join(lines)
