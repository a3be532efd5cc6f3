"""``edgeward``: the one command operators use.

    edgeward demo [--devices N] [--seconds S] [--json]   broker + gateway + fleet, live view, report
    edgeward init SITE_DIR --devices N                    a site: CA, certificates, KEK, audit key, policy
    edgeward run SITE_DIR [--workers N]                   the site's broker and gateway(s), until Ctrl-C
    edgeward sim SITE_DIR --devices N --seconds S         a simulated fleet over mTLS against a running site
    edgeward devices list|revoke|isolate|release SITE_DIR [ID]   device identities (CRL: revoke or hold)
    edgeward policy check|test|explain|diff ...           the operator's policy tools
    edgeward audit verify DIR                             recompute the hash chain
    edgeward decrypt STATE_DIR                            read the vault back with the site's keys
    edgeward keys list|rotate|destroy STATE_DIR           the site's data keys

Exit codes: 0 success, 1 a check failed (policy errors, audit tampering), 2 usage or setup errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway.errors import EdgewardError

__all__ = ["main"]


def _core() -> str:
    """How the per-message core runs in this process: compiled, or pure Python and why."""
    from gateway import _native

    st = _native.status()
    return "compiled" if st["mode"] == "compiled" else f"pure Python: {st['why']}"


def _run(coro: Any) -> Any:
    """asyncio.run on uvloop when it is installed (measured 10-15 % more throughput on ingest)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _load_policy(path: Path) -> Any:
    from gateway.policy import load_policy

    return load_policy(path)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.runtime.demo import DemoOptions, format_summary, run_demo

    opts = DemoOptions(
        devices=args.devices,
        seconds=args.seconds,
        seed=args.seed,
        rate_scale=args.rate_scale,
        policy_path=Path(args.policy),
        state_dir=Path(args.state_dir) if args.state_dir else None,
        bad_inputs=not args.no_bad_inputs,
        progress=not args.json and sys.stderr.isatty() or args.progress,
        scenario=args.scenario,
        save_dir=Path(args.save) if args.save else None,
    )
    if args.save and not args.scenario:
        raise EdgewardError("--save keeps a scenario's run for edgeward report: give --scenario too")
    report = _run(run_demo(opts, load_policy=_load_policy))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(format_summary(report))
    ok = report["audit_ok"] and report["lost"] == 0 and report["duplicates"] == 0
    return 0 if ok else 1


def _passphrase(confirm: bool = False) -> str:
    from gateway.crypto.kek import passphrase_from_env_or_file

    return passphrase_from_env_or_file(confirm=confirm)


def _open_site(site_dir: str) -> Any:
    from gateway.site import load_site

    return load_site(Path(site_dir), _passphrase())


def _cmd_init(args: argparse.Namespace) -> int:
    from device_sim import make_fleet
    from gateway.site import init_site

    ids = list(args.device_id or [])
    if args.devices:
        policy = _load_policy(Path(args.policy))
        ids += [s.device_id for s in make_fleet(args.devices, site=policy.site)]
    if not ids:
        raise EdgewardError("no devices: give --devices N (the simulator's naming) or --device-id ID ...")
    root = init_site(Path(args.site_dir), policy_src=Path(args.policy), devices=ids,
                     passphrase=_passphrase(confirm=True), device_port=args.device_port,
                     gateway_port=args.gateway_port)
    from gateway.site import register_recipient

    for spec in args.recipient or []:
        dest, _, path = spec.partition("=")
        register_recipient(root, dest, Path(path))
    print(f"site created in {root}: CA, {len(ids)} device certificates, KEK (Argon2id), audit signing key, "
          f"policy copy, broker listeners devices:{args.device_port} (mTLS) gateway:{args.gateway_port} (loopback)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.runtime.reload import PolicyReloader
    from gateway.runtime.site_runner import SiteRuntime

    if args.workers < 1:
        raise EdgewardError("--workers must be at least 1")
    site = _open_site(args.site_dir)
    policy = _load_policy(site.policy_dir)
    shadow = _load_policy(Path(args.shadow)) if args.shadow else None

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    if args.workers > 1:
        return _run_workers(args, site, policy, log)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with SiteRuntime(site, policy, log=log) as rt:
            gw = rt.gateway
            assert gw is not None
            reloader = PolicyReloader(gw, site.policy_dir, _load_policy, log=log)
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload_now()))
            if shadow is not None:
                log(f"shadow: candidate {shadow.revision} decides beside the live policy; "
                    f"divergences -> {gw.start_shadow(shadow)}")
            if args.record_traffic:
                gw.record_traffic(Path(args.record_traffic))
                log(f"recording traffic facts to {args.record_traffic}")
            log(f"gateway running (core {_core()}); edit {site.policy_dir} (or SIGHUP) to reload; "
                "Ctrl-C stops")
            watcher = asyncio.create_task(reloader.watch(stop), name="policy-watch")
            broker_watch = asyncio.create_task(_watch_broker(rt.broker, stop), name="broker-watch")
            await gw.serve(stop)
            await watcher
            why = await broker_watch
            log(json.dumps(gw.stats.to_json()))
        if why is not None:
            raise EdgewardError(why)

    _run(main())
    return 0


async def _watch_broker(broker: Any, stop: asyncio.Event) -> str | None:
    """Until ``stop``: sets it, and says why, when the site's broker exits."""
    from gateway.runtime.site_runner import broker_exited

    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        why = broker_exited(broker)
        if why is not None and not stop.is_set():
            stop.set()
            return why
    return None


def _run_workers(args: argparse.Namespace, site: Any, policy: Any, log: Any) -> int:
    """``run --workers N``: one broker, N gateway processes on a shared subscription (docs/scaling.md)."""
    from gateway.runtime.workers import SiteWorkers

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        sw = SiteWorkers(site, policy, workers=args.workers, log=log, state_capacity=args.state_capacity,
                         shadow=args.shadow, record_traffic=args.record_traffic)
        async with sw:
            loop.add_signal_handler(signal.SIGHUP, lambda: sw.signal_workers(signal.SIGHUP))
            log(f"{args.workers} workers running (core {_core()}); edit {site.policy_dir} (or SIGHUP) to "
                "reload; Ctrl-C stops")
            await sw.supervise(stop)
        for i in sorted(sw.final):
            log(f"worker {i}: " + json.dumps(sw.final[i]))
        log(json.dumps(sw.total_stats()))

    _run(main())
    return 0


def _cmd_sim(args: argparse.Namespace) -> int:
    from device_sim import Fleet, make_fleet

    root = Path(args.site_dir)
    doc = json.loads((root / "site.json").read_text())
    port = args.port or int(doc["ports"]["devices"])
    if not port:  # chosen at start: the running broker says where
        from gateway.runtime.isolation import read_runtime_info

        info = read_runtime_info(root)
        if info is None:
            raise EdgewardError(f"the site's device port is chosen at start (0) and no broker runs for {root}; "
                                f"start edgeward run {root} or pass --port")
        port = int(info["device_port"])
    profiles: dict[str, Any] = {}
    if args.scenario:
        from device_sim.scenario import load_scenario

        scenario = load_scenario(args.scenario)
        specs = scenario.fleet()
        profiles = scenario.profiles_for(specs)
        print(f"scenario {scenario.name}: {len(specs)} devices, {len(profiles)} with hostile firmware",
              file=sys.stderr)
    else:
        specs = make_fleet(args.devices, site=doc["site"], seed=args.seed)
    missing = [s.device_id for s in specs if s.device_id not in doc["devices"]]
    if missing:
        raise EdgewardError(f"{len(missing)} simulated devices have no certificate at this site (e.g. {missing[0]}); "
                            f"register them with edgeward init --device-id")
    from gateway.crypto.pki import ssl_context_for_device

    fleet = Fleet(specs, port=port, seed=args.seed, rate_scale=args.rate_scale,
                  tls=lambda spec: ssl_context_for_device(root, spec.device_id), profiles=profiles,
                  on_progress=lambda n: print(f"\r  sent {n}", end="", file=sys.stderr, flush=True))
    measure = bool(args.scenario or args.save)
    truth, techniques, undecryptable = asyncio.run(_sim_run(root, fleet, args, measure))
    print("", file=sys.stderr)
    summary: dict[str, Any] = {"devices": len(specs), "sent": truth.sent, "failed": len(truth.failed),
                               "bytes": truth.bytes_sent, "by_type": dict(truth.by_type)}
    if techniques is not None:
        summary["techniques"] = techniques
        summary["undecryptable"] = undecryptable  # received, but no key of this site's opens it
        if args.save:
            summary["saved_run"] = args.save
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"sent {truth.sent} messages ({truth.bytes_sent / 1e6:.1f} MB) from {len(specs)} devices; "
              f"{len(truth.failed)} failed")
        if techniques is not None:
            from device_sim.report_cli import format_table

            print(format_table(techniques))
            if args.save:
                print(f"run saved to {args.save} (holds the planted secrets: 0600); edgeward report {args.save}")
    leaked = sum(r["leaked"] for r in (techniques or {}).values())
    if args.scenario:  # a hostile run fails on leaks; refused attempts are the point of the exercise
        return 0 if leaked == 0 else 1
    return 0 if not truth.failed else 1


async def _sim_run(root: Path, fleet: Any, args: argparse.Namespace, measure: bool) -> tuple[Any, Any, int]:
    """Run the fleet; with ``measure``, watch what the destinations receive (as the site's operator,
    on the gateway's listener) and report each technique's leaks from it, the vault and the audit log."""
    if not measure:
        return await fleet.run(args.seconds), None, 0
    from gateway.crypto.recipient import RecipientOpener, load_private_key
    from gateway.runtime.demo import techniques_report
    from gateway.runtime.isolation import read_runtime_info
    from gateway.runtime.receiver import DestinationReceiver
    from gateway.runtime.site_runner import OPERATOR_USER
    from gateway.runtime.workers import read_workers_file, worker_dirs

    info = read_runtime_info(root)
    secret = root / "broker" / "operator.secret"
    if info is None or not secret.exists():
        raise EdgewardError(f"no running site at {root}: start it with edgeward run {root}")
    from gateway.crypto.keys import ReloadingKeyring, read_secret_file

    site = _open_site(str(root))
    # With workers (edgeward run --workers N) each worker seals under its own keyring, one KEK.
    parts = [root] + ([d for _, d in worker_dirs(root)] if read_workers_file(root) is not None else [])
    ring = ReloadingKeyring([site.keyring_path] + [d / "keys" / "datakeys.jsonl" for d in parts[1:]],
                            site.kek)
    openers = {}
    for item in args.open or []:
        dest, _, path = item.partition("=")
        openers[dest] = RecipientOpener(load_private_key(Path(path)))
    rx = DestinationReceiver("127.0.0.1", int(info["gateway_port"]), ring, client_id="edgeward-sim-observer",
                             username=OPERATOR_USER, password=read_secret_file(secret).strip(), keep=True,
                             openers=openers)
    await rx.start()
    try:
        truth = await fleet.run(args.seconds)
        # Re-timed uplinks release in batches of up to 1.5 x retime_ms, and a device's excess volume
        # is held (burst_hold_s): wait until the gateway holds nothing and awaits no destination,
        # and nothing new arrived for longer than the longest batch; at most --settle seconds.
        quiet, last, deadline = 0.0, -1, time.monotonic() + args.settle
        policy = _load_policy(site.policy_dir)
        longest = max((d.retime_ms for d in policy.destinations.values()), default=0) * 1.5 / 1000 + 1.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            quiet = quiet + 0.25 if rx.total == last else 0.0
            last = rx.total
            st = _read_status(root) or {}
            if quiet >= longest and not st.get("held") and not st.get("awaiting_uplink_ack"):
                break
    finally:
        await rx.stop()
    closed = sorted(d for d in _recipients(root) if d not in openers)
    if closed:
        print(f"note: {', '.join(closed)} receive(s) data sealed to their own key; without --open DEST=KEY "
              f"those envelopes cannot be searched and are counted undecryptable ({rx.undecryptable})",
              file=sys.stderr)
    techniques = techniques_report(truth, rx.messages, ring, parts,
                                   save_dir=Path(args.save) if args.save else None,
                                   meta={"scenario": args.scenario, "seconds": args.seconds, "site": str(root)})
    return truth, techniques, rx.undecryptable


def _recipients(root: Path) -> set[str]:
    doc = json.loads((root / "site.json").read_text())
    return set(doc.get("recipients", {}))


def _read_status(root: Path) -> dict[str, Any] | None:
    """The running gateway's status.json, or with workers their status files added up (per worker
    under ``workers``)."""
    from gateway.runtime.workers import merge_stats, read_workers_file, worker_state_dir

    info = read_workers_file(root)
    if info is None:
        path = root / "status.json"
        return json.loads(path.read_text()) if path.exists() else None
    parts: dict[str, Any] = {}
    for i in range(int(info["workers"])):
        path = worker_state_dir(root, i) / "status.json"
        if path.exists():
            parts[str(i)] = json.loads(path.read_text())
    if not parts:
        return None
    sts = list(parts.values())

    def joined(key: str) -> str:
        vals = sorted({str(p[key]) for p in sts})
        return vals[0] if len(vals) == 1 else "/".join(str(p[key]) for p in sts)

    dests: dict[str, Any] = {}
    for p in sts:
        for name, d in p["destinations"].items():
            agg = dests.setdefault(name, {**d, "forwarded": 0, "state": "up"})
            agg["forwarded"] += d["forwarded"]
            if d["state"] != "up":
                agg["state"] = "down"
    missing = int(info["workers"]) - len(parts)
    return {
        "t": min(p["t"] for p in sts),
        "workers": int(info["workers"]),
        "policy_revision": joined("policy_revision"),
        "ingest": "connected" if not missing and all(p["ingest"] == "connected" for p in sts) else "degraded",
        "uplink": "connected" if not missing and all(p["uplink"] == "connected" for p in sts) else "degraded",
        "uplink_backlog": sum(p["uplink_backlog"] for p in sts),
        "awaiting_uplink_ack": sum(p["awaiting_uplink_ack"] for p in sts),
        "paused": any(p["paused"] for p in sts),
        "isolated": sorted({d for p in sts for d in p["isolated"]}),
        "destinations": dests,
        "stats": merge_stats([p["stats"] for p in sts]),
        "per_worker": {i: {k: p[k] for k in ("t", "policy_revision", "ingest", "uplink", "uplink_backlog", "paused")}
                       | {"received": p["stats"]["received"], "decided": p["stats"]["decided"]}
                       for i, p in parts.items()},
    }


def _cmd_status(args: argparse.Namespace) -> int:
    import time as _time

    from gateway.runtime.isolation import read_runtime_info

    root = Path(args.site_dir)
    info = read_runtime_info(root)
    st = _read_status(root) if info is not None else None
    if info is None or st is None:
        print(json.dumps({"running": False}) if args.json else f"no gateway is running for {root}")
        return 1
    st["running"] = True
    st["age_s"] = round(_time.time() - st["t"], 1)
    st["broker"] = info
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    s = st["stats"]
    workers = f"{st['workers']} workers, " if "workers" in st else ""
    print(f"gateway: {workers}ingest {st['ingest']}, uplink {st['uplink']}, policy {st['policy_revision']} "
          f"(status {st['age_s']}s old); broker pid {info['pid']}, devices :{info['device_port']}")
    print(f"  received {s['received']}, decided {s['decided']}, duplicates {s['duplicates']}, "
          f"rejected {sum(s['rejected'].values())}, uplink backlog {st['uplink_backlog']}"
          f"{' (ingest paused)' if st['paused'] else ''}")
    for i, w in st.get("per_worker", {}).items():
        print(f"  worker {i}: ingest {w['ingest']}, uplink {w['uplink']}, received {w['received']}, "
              f"decided {w['decided']}, backlog {w['uplink_backlog']}")
    for name, d in st["destinations"].items():
        print(f"  {name:20} {d['transport']:5} {d['jurisdiction']:8} {d['state']:5} forwarded {d['forwarded']}")
    if st["isolated"]:
        print(f"  isolated devices: {', '.join(st['isolated'])}")
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from gateway.crypto.pki import SiteCA

    root = Path(args.site_dir)
    ca = SiteCA.load(root / "ca")
    from gateway.runtime import isolation

    if args.devices_cmd == "revoke":
        serials = ca.revoke(args.device_id)
        note = "; the running broker reloaded its CRL" if isolation.reload_broker(root) else ""
        print(f"revoked {args.device_id} (serial {', '.join(map(str, serials))}){note}")
        return 0
    if args.devices_cmd == "isolate":
        from gateway.crypto.keys import read_secret_file
        from gateway.crypto.pki import GATEWAY_CN

        creds = (GATEWAY_CN, read_secret_file(root / "keys" / "broker-gateway.secret").strip())
        _run(isolation.isolate(root, args.device_id, creds))
        print(f"isolated {args.device_id}: certificate on hold, disconnected, refused until released")
        return 0
    if args.devices_cmd == "release":
        _run(isolation.release(root, args.device_id))
        print(f"released {args.device_id}: it may connect again")
        return 0
    held = ca.held()
    for serial, cn, kind, revoked in ca.issued():
        state = "  REVOKED" if revoked else ("  ISOLATED" if cn in held else "")
        print(f"{cn:24} {kind:8} serial {serial}{state}")
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.chain import verify_chain

    path = Path(args.path)
    if (path / "site.json").exists():
        from gateway.audit.checkpoint import load_verify_key
        from gateway.audit.site_verify import verify_site

        pub = load_verify_key(path / "keys" / "audit-signing.key.pub")
        v = verify_site(path, pub)
        if list(v.chains) == ["site"]:  # a single gateway: one chain, reported as before
            c = v.chains["site"]
            if args.json:
                print(json.dumps(c.to_json()))
            elif c.ok:
                print(f"audit chain OK with {c.checkpoints} signed checkpoints ({c.published} published)")
            else:
                print("audit chain BROKEN: " + "; ".join(c.errors))
            return 0 if c.ok else 1
        if args.json:
            print(json.dumps(v.to_json()))
            return 0 if v.ok else 1
        for name, c in v.chains.items():
            if c.ok:
                print(f"{name}: audit chain OK, {c.chain.records} records, {c.checkpoints} signed checkpoints "
                      f"({c.published} published)")
            else:
                print(f"{name}: audit chain BROKEN: " + "; ".join(c.errors))
        bad = [n for n, c in v.chains.items() if not c.ok]
        print(f"total: {len(v.chains)} chains, {v.records} records, {v.checkpoints} signed checkpoints "
              f"({v.published} published): " + ("OK" if not bad else f"BROKEN ({', '.join(bad)})"))
        return 0 if v.ok else 1
    if (path / "audit").is_dir():
        path = path / "audit"
    r = verify_chain(path)
    if args.json:
        print(json.dumps(r.to_json()))
    elif r.ok:
        print(f"audit chain OK: {r.records} records in {r.files} file(s), head {r.head[:16]}")
    else:
        print(f"audit chain BROKEN at {r.where}: {r.error} ({r.records} records verified before it)")
    return 0 if r.ok else 1


def _keyring(state: Path) -> Any:
    from gateway.crypto.keys import DataKeyring, load_or_create_kek

    if (state / "site.json").exists():
        site = _open_site(str(state))
        return DataKeyring(site.keyring_path, site.kek)
    keys = state / "keys"
    if not (keys / "kek.key").exists():
        raise EdgewardError(f"no site keys under {state} (expected site.json or {keys}/kek.key)")
    return DataKeyring(keys / "datakeys.jsonl", load_or_create_kek(keys / "kek.key"))


def _cmd_decrypt(args: argparse.Namespace) -> int:
    from gateway.codec import decode
    from gateway.crypto.envelope import open_envelope
    from gateway.vault import read_vault

    state = Path(args.state_dir)
    n = 0
    for ring, vault in _vaults(state):
        for env in read_vault(vault):
            header, pt = open_envelope(ring, env)
            if args.device and header.device != args.device:
                continue
            fields = decode(pt)
            print(json.dumps({"device": header.device, "stream": header.stream, "seq": header.seq, "ts": header.ts,
                              "destination": header.destination, "revision": header.revision,
                              "fields": {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v)
                                         for k, v in fields.items()}}))
            n += 1
            if args.limit and n >= args.limit:
                print(f"{n} record(s) decrypted", file=sys.stderr)
                return 0
    print(f"{n} record(s) decrypted", file=sys.stderr)
    return 0


def _vaults(state: Path) -> list[tuple[Any, Path]]:
    """(keyring, vault directory) for the site's own vault and every worker's (``--workers N``): each
    worker seals under its own data keys, wrapped under the one site KEK."""
    from gateway.runtime.workers import worker_dirs

    workers = [p for _, p in worker_dirs(state) if (p / "vault").is_dir()]
    if not workers or not (state / "site.json").exists():
        return [(_keyring(state), state / "vault")]
    from gateway.crypto.keys import DataKeyring

    site = _open_site(str(state))
    out = [(DataKeyring(site.keyring_path, site.kek), state / "vault")] if (state / "vault").is_dir() else []
    return out + [(DataKeyring(p / "keys" / "datakeys.jsonl", site.kek), p / "vault") for p in workers]


def _cmd_keys(args: argparse.Namespace) -> int:
    """The site's data keys: with workers (``edgeward run --workers N``) each worker seals under its
    own keyring (wrapped under the one KEK), so list, rotate and destroy cover every one of them."""
    import datetime as _dt

    rings = [(vault.parent.name if vault.parent != Path(args.state_dir) else "site", ring)
             for ring, vault in _vaults(Path(args.state_dir))]
    if args.keys_cmd == "rotate":
        for label, ring in rings:
            print(f"{label}: new data key {ring.rotate().kid}")
    elif args.keys_cmd == "destroy":
        holders = [(label, ring) for label, ring in rings if args.kid in {k for k, _, _ in ring.list()}]
        if not holders:
            raise EdgewardError(f"no data key {args.kid} in this site's keyrings (edgeward keys list shows them)")
        for label, ring in holders:
            ring.destroy(args.kid)
            print(f"{label}: data key {args.kid} destroyed; everything sealed under it is unreadable")
    for label, ring in rings:
        for kid, created, current in ring.list():
            when = _dt.datetime.fromtimestamp(created, _dt.timezone.utc).isoformat(timespec="seconds")
            prefix = f"{label}  " if len(rings) > 1 else ""
            print(f"{prefix}{kid}  created {when}{'  (current)' if current else ''}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeward", description="Edge gateway for security-screening sites.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="broker + gateway + simulated fleet, live view, report")
    d.add_argument("--devices", type=int, default=200)
    d.add_argument("--seconds", type=float, default=30.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--rate-scale", type=float, default=1.0, help="multiply every device's result rate")
    d.add_argument("--policy", default="policies", help="policy file or directory (default: policies)")
    d.add_argument("--state-dir", help="keep the gateway's state here (default: a temporary directory)")
    d.add_argument("--no-bad-inputs", action="store_true", help="do not inject the five kinds of bad input")
    d.add_argument("--scenario", help="run a device_sim scenario (name or YAML file), e.g. all-techniques; "
                                      "the report then measures each hostile technique's leaks")
    d.add_argument("--save", metavar="DIR", help="with --scenario: save the run for edgeward report DIR "
                                                 "(ground truth with the planted secrets: 0600)")
    d.add_argument("--progress", action="store_true", help="show the live line even when not on a terminal")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    d.set_defaults(func=_cmd_demo)

    i = sub.add_parser("init", help="create a site: CA, certificates, passphrase-protected KEK, audit key, policy")
    i.add_argument("site_dir")
    i.add_argument("--policy", default="policies")
    i.add_argument("--devices", type=int, default=0, help="register N devices named as the simulator names them")
    i.add_argument("--device-id", action="append", help="register this device id (repeatable)")
    i.add_argument("--device-port", type=int, default=18883, help="the devices' mTLS listener")
    i.add_argument("--gateway-port", type=int, default=11883, help="the gateway's loopback listener")
    i.add_argument("--recipient", action="append", metavar="DEST=PUBKEY",
                   help="seal DEST's data to this X25519 public key (PEM) so only it can read it")
    i.set_defaults(func=_cmd_init)

    r = sub.add_parser("run", help="the site's broker and gateway, until Ctrl-C (policy edits and SIGHUP reload)")
    r.add_argument("site_dir")
    r.add_argument("--shadow", help="a candidate policy to run in shadow (never enforced; divergences reported)")
    r.add_argument("--record-traffic", help="append the facts of every decided message here (JSON lines; "
                                            "with workers, one file per worker: FILE.w<i>)")
    r.add_argument("--workers", type=int, default=1,
                   help="gateway processes sharing the ingest through an MQTT shared subscription (default 1)")
    r.add_argument("--state-capacity", type=int, default=65_536,
                   help="with --workers: devices the shared dedupe/rate state holds (new devices beyond it "
                        "are refused with state.full)")
    r.set_defaults(func=_cmd_run)

    sm = sub.add_parser("sim", help="run a simulated fleet against a running site (devices over mTLS)")
    sm.add_argument("site_dir")
    sm.add_argument("--devices", type=int, default=50)
    sm.add_argument("--seconds", type=float, default=30.0)
    sm.add_argument("--rate-scale", type=float, default=1.0)
    sm.add_argument("--seed", type=int, default=0)
    sm.add_argument("--port", type=int, default=0, help="the devices' listener (default: from site.json)")
    sm.add_argument("--scenario", help="a device_sim scenario (name or YAML file) with hostile firmware; the run "
                                       "ends with each technique's leak report (exit 1 if anything leaked)")
    sm.add_argument("--save", metavar="DIR", help="save the run (ground truth with its secrets, what the "
                                                  "destinations received) for edgeward report DIR")
    sm.add_argument("--open", action="append", metavar="DEST=KEYFILE",
                    help="a destination's X25519 private key (PEM), to search what was sealed to it (repeatable)")
    sm.add_argument("--settle", type=float, default=60.0,
                    help="after the fleet, wait at most this long for re-timed batches to arrive (default 60)")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=_cmd_sim)

    from device_sim.report_cli import add_parsers as add_report_parsers

    add_report_parsers(sub)

    stp = sub.add_parser("status", help="a running site's gateway: connections, destinations, backlog")
    stp.add_argument("site_dir")
    stp.add_argument("--json", action="store_true")
    stp.set_defaults(func=_cmd_status)

    dv = sub.add_parser("devices", help="the site's device identities")
    dvsub = dv.add_subparsers(dest="devices_cmd", required=True)
    dl = dvsub.add_parser("list", help="every issued certificate")
    dl.add_argument("site_dir")
    dl.set_defaults(func=_cmd_devices)
    dr = dvsub.add_parser("revoke", help="revoke a device's certificate (CRL); the running broker reloads it")
    dr.add_argument("site_dir")
    dr.add_argument("device_id")
    dr.set_defaults(func=_cmd_devices)
    for name, helptext in (("isolate", "hold a device's certificate and disconnect it until released"),
                           ("release", "let an isolated device connect again")):
        di = dvsub.add_parser(name, help=helptext)
        di.add_argument("site_dir")
        di.add_argument("device_id")
        di.set_defaults(func=_cmd_devices)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser("verify", help="recompute the hash chain; exit 1 on any modification")
    av.add_argument("path", help="a site directory (checks signed checkpoints too) or an audit directory")
    av.add_argument("--json", action="store_true")
    av.set_defaults(func=_cmd_audit_verify)

    dc = sub.add_parser("decrypt", help="read the vault back with the site's keys (JSON lines)")
    dc.add_argument("state_dir", help="a site directory (asks for the passphrase) or a test state directory")
    dc.add_argument("--device")
    dc.add_argument("--limit", type=int, default=0)
    dc.set_defaults(func=_cmd_decrypt)

    k = sub.add_parser("keys", help="the site's data keys")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    for name, helptext in (("list", "list retained data keys"), ("rotate", "start a new data key now"),
                           ("destroy", "crypto-shred one data key")):
        kp = ksub.add_parser(name, help=helptext)
        kp.add_argument("state_dir")
        if name == "destroy":
            kp.add_argument("kid")
        kp.set_defaults(func=_cmd_keys)

    try:
        from gateway.policy.cli import register
    except ImportError:  # pragma: no cover - the policy tools ship with the package
        pass
    else:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgewardError as exc:
        print(f"edgeward: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
