"""``edgeward``: the one command operators use.

    edgeward demo [--devices N] [--seconds S] [--json]   broker + gateway + fleet, live view, report
    edgeward run [--policy DIR] [--state-dir DIR]         a private broker and the gateway, until Ctrl-C
    edgeward policy check|test|explain|diff ...           the operator's policy tools
    edgeward audit verify DIR                             recompute the hash chain
    edgeward decrypt STATE_DIR                            read the vault back with the site's keys
    edgeward keys list|rotate|destroy STATE_DIR           the site's data keys

Exit codes: 0 success, 1 a check failed (policy errors, audit tampering), 2 usage or setup errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.errors import EdgewardError

__all__ = ["main"]


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
    )
    report = asyncio.run(run_demo(opts, load_policy=_load_policy))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print(format_summary(report))
    ok = report["audit_ok"] and report["lost"] == 0 and report["duplicates"] == 0
    return 0 if ok else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port
    from gateway.runtime.reload import PolicyReloader
    from gateway.runtime.service import Gateway, GatewayConfig

    state = Path(args.state_dir)
    policy_path = Path(args.policy)
    policy = _load_policy(policy_path)
    shadow = _load_policy(Path(args.shadow)) if args.shadow else None

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    async def main() -> None:
        broker = MosquittoBroker(BrokerConfig(port=args.port or free_port(), workdir=state / "broker"))
        broker.start()
        log(f"broker: 127.0.0.1:{broker.port} (config {broker.conf_path})")
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            async with Gateway(GatewayConfig(state_dir=state / "gateway", port=broker.port), policy) as gw:
                reloader = PolicyReloader(gw, policy_path, _load_policy, log=log)
                loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload_now()))
                if shadow is not None:
                    log(f"shadow: candidate {shadow.revision} decides beside the live policy; "
                        f"divergences -> {gw.start_shadow(shadow)}")
                if args.record_traffic:
                    gw.record_traffic(Path(args.record_traffic))
                    log(f"recording traffic facts to {args.record_traffic}")
                log(f"gateway: policy {policy.revision}, state {state}; edits to {policy_path} reload; Ctrl-C stops")
                watcher = asyncio.create_task(reloader.watch(stop), name="policy-watch")
                await gw.serve(stop)
                await watcher
                log(json.dumps(gw.stats.to_json()))
        finally:
            broker.stop()

    asyncio.run(main())
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit.chain import verify_chain

    path = Path(args.path)
    if (path / "gateway" / "audit").is_dir():
        path = path / "gateway" / "audit"
    elif (path / "audit").is_dir():
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

    keys = state / "keys" if (state / "keys").is_dir() else state / "gateway" / "keys"
    if not (keys / "kek.key").exists():
        raise EdgewardError(f"no site keys under {state} (expected {keys}/kek.key)")
    return DataKeyring(keys / "datakeys.jsonl", load_or_create_kek(keys / "kek.key"))


def _cmd_decrypt(args: argparse.Namespace) -> int:
    from gateway.codec import decode
    from gateway.crypto.envelope import open_envelope
    from gateway.vault import read_vault

    state = Path(args.state_dir)
    ring = _keyring(state)
    vault = state / "vault" if (state / "vault").is_dir() else state / "gateway" / "vault"
    n = 0
    for env in read_vault(vault):
        header, pt = open_envelope(ring, env)
        if args.device and header.device != args.device:
            continue
        fields = decode(pt)
        print(json.dumps({"device": header.device, "stream": header.stream, "seq": header.seq, "ts": header.ts,
                          "destination": header.destination, "revision": header.revision,
                          "fields": {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in fields.items()}}))
        n += 1
        if args.limit and n >= args.limit:
            break
    print(f"{n} record(s) decrypted", file=sys.stderr)
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    ring = _keyring(Path(args.state_dir))
    if args.keys_cmd == "rotate":
        k = ring.rotate()
        print(f"new data key {k.kid}")
    elif args.keys_cmd == "destroy":
        ring.destroy(args.kid)
        print(f"data key {args.kid} destroyed; everything sealed under it is unreadable")
    for kid, created, current in ring.list():
        print(f"{kid}  created {created:.0f}{'  (current)' if current else ''}")
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
    d.add_argument("--progress", action="store_true", help="show the live line even when not on a terminal")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("run", help="a private broker and the gateway, until Ctrl-C (SIGHUP reloads the policy)")
    r.add_argument("--policy", default="policies")
    r.add_argument("--state-dir", default=".edgeward")
    r.add_argument("--port", type=int, default=0, help="loopback port for the broker (default: a free one)")
    r.add_argument("--shadow", help="a candidate policy to run in shadow (never enforced; divergences reported)")
    r.add_argument("--record-traffic", help="append the facts of every decided message here (JSON lines)")
    r.set_defaults(func=_cmd_run)

    a = sub.add_parser("audit", help="audit log tools")
    asub = a.add_subparsers(dest="audit_cmd", required=True)
    av = asub.add_parser("verify", help="recompute the hash chain; exit 1 on any modification")
    av.add_argument("path", help="an audit directory or a state directory")
    av.add_argument("--json", action="store_true")
    av.set_defaults(func=_cmd_audit_verify)

    dc = sub.add_parser("decrypt", help="read the vault back with the site's keys (JSON lines)")
    dc.add_argument("state_dir")
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
