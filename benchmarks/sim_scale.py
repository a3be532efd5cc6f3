"""10,000 simulated devices, each its own MQTT 5 connection, through Mosquitto into the Edgeward gateway.

    python benchmarks/sim_scale.py                                   # ladder 1,000 / 5,000 / 10,000
    python benchmarks/sim_scale.py --devices 10000 --seconds 40 --processes 2 --json
    python benchmarks/sim_scale.py --devices 10000 --tracemalloc     # where the gateway's memory goes

For each fleet size, on a fresh private Mosquitto (Edgeward's rendered config, persistence off):

- the gateway (``Gateway`` from gateway/runtime/service.py, the sample policy in ``policies/``, rate
  baselines on) in its own process on uvloop, consuming everything from ``site/<site>/dev/#``;
- the lean simulator (``device_sim.lean``: devices on the ``mqtt5`` codec) over ``--processes``
  processes, at the catalogue's real rates (``--rate-scale 1``), honest firmware, QoS 1.

One row per size: devices connected and the time until all were; offered vs achieved msg/s (PUBACKed by
the broker, steady phase: from "all connected" to the end of production) and the gateway's intake over
the same window; **lost** = messages in the ground truth (PUBACKed) with no decision in the gateway's
audit log after it drained (also checked against ``gw.stats``); CPU (one core = 100 %) and RSS per device
of the simulator (its processes summed), of Mosquitto and of the gateway. Memory per device is measured
once every device has sent a few messages (``--warm`` seconds after the last connect): RSS then minus RSS
before the first device connected, divided by the devices. The gateway also reports what its
per-device structures hold at that moment (dedupe window, rate buckets, device-lookup cache), and with
``--tracemalloc`` the allocation sites that grew most (tracemalloc slows it down: a diagnostic run).

When the gateway cannot keep up, the backlog waits in Mosquitto (the gateway's persistent session) and is
drained after the fleet stops (``drain_s``); RSS of Mosquitto and the gateway then includes that backlog.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _common import json_lines_reader, log  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
TCK = os.sysconf("SC_CLK_TCK")


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TCK


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


# =============================================================================================== gateway role


def _sizeof_structures(gw: Any) -> dict[str, dict[str, float]]:
    """Deep size (bytes) of the gateway's per-device structures; each key string counted once overall."""
    seen: set[int] = set()

    def sz(o: Any) -> int:
        if id(o) in seen:
            return 0
        seen.add(id(o))
        n = sys.getsizeof(o)
        if isinstance(o, dict):
            n += sum(sz(k) + sz(v) for k, v in o.items())
        elif isinstance(o, (set, frozenset, list, tuple)):
            n += sum(sz(x) for x in o)
        elif hasattr(o, "__slots__"):
            n += sum(sz(getattr(o, s)) for s in o.__slots__ if hasattr(o, s))
        return n

    p = gw.pipeline
    out: dict[str, dict[str, float]] = {}
    parts: list[tuple[str, Any]] = [
        ("dedupe._seen (seq sets)", getattr(p.dedupe, "_seen", None)),
        ("dedupe._high", getattr(p.dedupe, "_high", None)),
        ("rate._buckets", getattr(p.rate, "_buckets", None)),
        ("pipeline._device_cache", p._device_cache),
        ("stats.latency_s", gw.stats.latency_s),
    ]
    for name, obj in parts:
        if obj is None:
            continue
        # The cache holds the policy's registry entries: shared with the policy, not per device.
        if name == "pipeline._device_cache":
            n = sys.getsizeof(obj) + sum(sz(k) for k in obj)
        else:
            n = sz(obj)
        out[name] = {"entries": len(obj), "bytes": n}
    return out


async def _gateway_main(args: argparse.Namespace) -> None:
    import asyncio
    import gc
    import tracemalloc

    from gateway.policy import load_policy
    from gateway.runtime.service import Gateway, GatewayConfig

    def emit(event: str, **kw: Any) -> None:
        print(json.dumps({"event": event, "t": time.time(), **kw}), flush=True)

    if args.tracemalloc:
        tracemalloc.start(1)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "stop")

    threading.Thread(target=read_stdin, daemon=True).start()
    policy = load_policy(Path(args.policy))
    cfg = GatewayConfig(state_dir=Path(args.state), port=args.port,
                        rate_headroom=None if args.no_rate_headroom else 2.5, max_held_mb=args.max_held_mb)
    snap: Any = None
    async with Gateway(cfg, policy) as gw:
        serve = asyncio.create_task(gw.serve(stop))

        held_peak = [0]

        def sample() -> dict[str, Any]:
            s = gw.stats
            held = gw._held_bytes()
            held_peak[0] = max(held_peak[0], held)
            return {"held_mb": held / 2**20, "memory_paused": "memory" in gw._pause_reasons,
                    "rss": proc_rss(os.getpid()), "cpu": sum(os.times()[:2]), "received": s.received,
                    "decided": s.decided, "rejected": sum(s.rejected.values()), "duplicates": s.duplicates,
                    "acked": s.acked, "awaiting": len(gw._pending), "uplink_backlog": gw.uplink.pending_out,
                    "broker_dropped": s.broker_dropped}

        emit("ready", **sample())

        async def sampler() -> None:
            while True:
                emit("sample", **sample())
                await asyncio.sleep(0.5)

        st = asyncio.create_task(sampler())
        while not stop.is_set():
            getter = asyncio.create_task(commands.get())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                break
            cmd = getter.result()
            if cmd == "stop":
                break
            if cmd in ("base", "mark"):
                gc.collect()
                extra: dict[str, Any] = {"structures": _sizeof_structures(gw), "devices_seen": len(gw.pipeline.dedupe)}
                if args.tracemalloc:
                    now = tracemalloc.take_snapshot().filter_traces(
                        [tracemalloc.Filter(False, tracemalloc.__file__)])
                    if cmd == "mark" and snap is not None:
                        top = now.compare_to(snap, "lineno")[:args.top]
                        extra["tracemalloc_top"] = [
                            {"where": f"{os.path.relpath(d.traceback[0].filename, REPO)}:{d.traceback[0].lineno}",
                             "size_diff": d.size_diff, "count_diff": d.count_diff} for d in top]
                        extra["tracemalloc_total_diff"] = sum(d.size_diff for d in now.compare_to(snap, "filename"))
                    snap = now
                emit(cmd, **sample(), **extra)
        stop.set()
        st.cancel()
        await serve
        final = gw.stats.to_json()
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    emit("final", stats=final, rss=proc_rss(os.getpid()), cpu=sum(os.times()[:2]), peak_rss_mb=peak_kb / 1024,
         held_peak_mb=held_peak[0] / 2**20)


# =============================================================================================== coordinator


class GatewayProc:
    """The gateway role in a child process; its JSON lines arrive on a queue."""

    def __init__(self, port: int, state: Path, policy: str, tracemalloc: bool, top: int,
                 no_rate_headroom: bool, max_held_mb: float) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "gateway", "--port", str(port),
               "--state", str(state), "--policy", policy, "--top", str(top), "--max-held-mb", str(max_held_mb)]
        if tracemalloc:
            cmd.append("--tracemalloc")
        if no_rate_headroom:
            cmd.append("--no-rate-headroom")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.p.stdout is not None
        self.q: queue.Queue[dict[str, Any] | None] = json_lines_reader(self.p.stdout, on_text=log)
        self.last: dict[str, Any] = {}

    def poll(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                m = self.q.get_nowait()
            except queue.Empty:
                return out
            if m is None:
                raise RuntimeError(f"gateway process exited ({self.p.poll()}); its stderr is above")
            if m.get("event") in ("sample", "ready", "base", "mark"):
                self.last = m
            out.append(m)

    def wait(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if m is None:
                raise RuntimeError(f"gateway process exited before '{event}' (its stderr is above)")
            if m.get("event") in ("sample", "ready", "base", "mark"):
                self.last = m
            if m.get("event") == event:
                return m
        raise RuntimeError(f"gateway: no '{event}' within {timeout}s")

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)


def _start_broker(workdir: Path) -> Any:
    from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port

    for _ in range(5):
        b = MosquittoBroker(BrokerConfig(port=free_port(), workdir=workdir, persistence=False))
        try:
            b.start()
            return b
        except Exception:  # noqa: BLE001 - port race: try another
            b.stop()
    raise RuntimeError("could not start a private mosquitto")


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing

    from device_sim import make_fleet
    from device_sim.lean import LeanStats, run_processes
    from gateway.audit.chain import iter_records

    specs = make_fleet(n, seed=args.seed)
    offered = sum(args.rate_scale / s.kind.result_interval_s + 1.0 / args.health_interval for s in specs)
    with tempfile.TemporaryDirectory(prefix="edgeward-simscale-") as tmp:
        root = Path(tmp)
        broker = _start_broker(root / "broker")
        bpid = broker.proc.pid
        gw: GatewayProc | None = None
        try:
            gw = GatewayProc(broker.port, root / "gw", args.policy, args.tracemalloc, args.top, args.no_rate_headroom,
                            args.max_held_mb)
            gw.wait("ready", timeout=60)
            time.sleep(1.0)
            gw.send("base")
            base = gw.wait("base")
            broker_rss0 = proc_rss(bpid)
            gw_pid = gw.p.pid

            samples_q = multiprocessing.get_context("spawn").Queue()
            result: dict[str, Any] = {}

            def sim() -> None:
                try:
                    result["truth"], result["refused"] = run_processes(
                        specs, args.seconds, processes=args.processes, samples=samples_q, port=broker.port,
                        seed=args.seed, rate_scale=args.rate_scale, health_interval_s=args.health_interval,
                        drain_timeout_s=30.0, connect_first_s=args.connect_first,
                        connect_timeout_s=args.connect_timeout)
                except Exception as exc:  # noqa: BLE001 - reported by the coordinator
                    result["error"] = exc

            th = threading.Thread(target=sim, daemon=True)
            th.start()
            latest: dict[int, LeanStats] = {}
            t_start: float | None = None
            full_at: dict[str, Any] | None = None  # the moment every device was connected
            mark: dict[str, Any] | None = None
            last_prod: dict[str, Any] | None = None
            end_prod_wall: float | None = None
            while th.is_alive():
                try:
                    s: LeanStats = samples_q.get(timeout=0.2)
                except queue.Empty:
                    gw.poll()
                    continue
                gw.poll()
                latest[s.pid] = s
                if len(latest) < args.processes:
                    continue
                t = max(x.t for x in latest.values())
                if t_start is None:
                    t_start = min(x.t for x in latest.values())
                snapshot = {
                    "t": t,
                    "connected": sum(x.connected for x in latest.values()),
                    "sent": sum(x.sent for x in latest.values()),
                    "cpu": sum(x.cpu_s for x in latest.values()),
                    "rss": sum(x.rss - x.rss0 for x in latest.values()),
                    "broker_cpu": proc_cpu(bpid), "broker_rss": proc_rss(bpid),
                    "gw_cpu": proc_cpu(gw_pid), "gw_received": gw.last.get("received", 0),
                }
                if full_at is None and snapshot["connected"] >= n:
                    full_at = snapshot
                    log(f"  {n}: all connected after {t - t_start:.1f}s")
                if full_at is not None and mark is None and t >= full_at["t"] + args.warm:
                    gw.send("mark")
                    m = gw.wait("mark")
                    mark = {**snapshot, "gw": m, "broker_rss": proc_rss(bpid)}
                    log(f"  {n}: memory mark: gateway {(m['rss'] - base['rss']) / n / 1024:.1f} KB/device")
                if full_at is not None and end_prod_wall is None:
                    end_prod_wall = t + args.seconds if args.connect_first else t_start + args.seconds
                if end_prod_wall is not None and t <= end_prod_wall:
                    last_prod = snapshot
            th.join()
            if "error" in result:
                raise result["error"]
            truth = result["truth"]
            sim_done = time.time()
            # Drain: the gateway works through whatever waits in its session.
            want = truth.sent
            deadline = time.monotonic() + args.drain_timeout
            progress_at, last_seen = time.monotonic(), -1
            while time.monotonic() < deadline:
                gw.poll()
                g = gw.last
                got = g.get("received", 0)
                if got >= want and g.get("awaiting", 1) == 0 and g.get("uplink_backlog", 1) == 0:
                    break
                if got != last_seen:
                    last_seen, progress_at = got, time.monotonic()
                elif time.monotonic() - progress_at > 20:
                    break
                time.sleep(0.2)
            drain_s = time.time() - sim_done
            broker_rss_end = proc_rss(bpid)
            gw_rss_end = gw.last.get("rss", 0)
            gw.send("stop")
            final = gw.wait("final", timeout=60)
            gw.p.wait(30)
        finally:
            if gw is not None:
                gw.close()
            broker_limit = open_files_limit(bpid) if broker.running else "?"
            broker.stop()

        # Reconcile: every PUBACKed message must have a decision in the audit log.
        decided: set[tuple[str, int]] = set()
        rejected: Counter[str] = Counter()
        for rec in iter_records(root / "gw" / "audit"):
            if "dev" not in rec or "seq" not in rec:
                continue
            reason = rec.get("reason", "")
            if reason == "dedupe.duplicate":
                continue
            if reason:
                rejected[reason] += 1
            decided.add((rec["dev"], int(rec["seq"])))
        sent_keys = {(r.device_id, r.seq) for r in truth.sent_records}
        lost = len(sent_keys - decided)
        stats = final["stats"]

    row: dict[str, Any] = {
        "devices": n, "processes": args.processes, "connected": len(truth.connects),
        "connect_s": (full_at["t"] - t_start) if full_at and t_start else None,
        "offered_msgs_s": offered, "sent": truth.sent, "failed": len(truth.failed),
        "refused_connects": result["refused"], "lost": lost, "rejected": dict(rejected),
        "gw_received": stats["received"], "gw_decided": stats["decided"], "gw_acked": stats["acked"],
        "gw_duplicates": stats["duplicates"], "broker_dropped": stats["broker_dropped"],
        "drain_s": drain_s, "broker_nofile": broker_limit,
        "sim_nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if full_at and last_prod and last_prod["t"] - full_at["t"] >= 1.0:
        dt = last_prod["t"] - full_at["t"]
        row.update({
            "steady_s": dt,
            "achieved_msgs_s": (last_prod["sent"] - full_at["sent"]) / dt,
            "gw_msgs_s": (last_prod["gw_received"] - full_at["gw_received"]) / dt,
            "sim_cpu_pct": 100 * (last_prod["cpu"] - full_at["cpu"]) / dt,
            "broker_cpu_pct": 100 * (last_prod["broker_cpu"] - full_at["broker_cpu"]) / dt,
            "gw_cpu_pct": 100 * (last_prod["gw_cpu"] - full_at["gw_cpu"]) / dt,
        })
    if mark:
        g = mark["gw"]
        row.update({
            "sim_rss_kb_per_dev": mark["rss"] / n / 1024,
            "broker_rss_kb_per_dev": (mark["broker_rss"] - broker_rss0) / n / 1024,
            "gw_rss_kb_per_dev": (g["rss"] - base["rss"]) / n / 1024,
            "gw_rss_base_mb": base["rss"] / 2**20, "gw_rss_mark_mb": g["rss"] / 2**20,
            "gw_backlog_at_mark": {"uplink": g["uplink_backlog"], "awaiting": g["awaiting"]},
            "gw_structures_at_mark": g["structures"], "gw_devices_seen_at_mark": g["devices_seen"],
            "gw_structures_bytes_per_dev": sum(v["bytes"] for k, v in g["structures"].items()
                                               if k != "stats.latency_s") / n,
        })
        if "tracemalloc_top" in g:
            row["tracemalloc_top"] = g["tracemalloc_top"]
            row["tracemalloc_total_diff"] = g["tracemalloc_total_diff"]
    row["broker_rss_end_mb"] = broker_rss_end / 2**20
    row["gw_rss_end_mb"] = gw_rss_end / 2**20
    row["gw_peak_rss_mb"] = final.get("peak_rss_mb")
    row["gw_held_peak_mb"] = final.get("held_peak_mb")
    row["gw_max_held_mb"] = args.max_held_mb
    return row


def _f(v: Any, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def print_rows(rows: list[dict[str, Any]]) -> None:
    headers = ["devices", "connected", "connect s", "offered/s", "achieved/s", "gateway in/s", "lost",
               "sim CPU %", "sim KB/dev", "mosq KB/dev", "gw KB/dev", "gw CPU %", "mosq CPU %", "drain s"]
    cells = [headers]
    for r in rows:
        cells.append([
            f"{r['devices']:,}", f"{r['connected']:,}", _f(r.get("connect_s"), ".1f"),
            _f(r.get("offered_msgs_s"), ",.0f"), _f(r.get("achieved_msgs_s"), ",.0f"), _f(r.get("gw_msgs_s"), ",.0f"),
            str(r["lost"]), _f(r.get("sim_cpu_pct"), ".0f"), _f(r.get("sim_rss_kb_per_dev"), ".1f"),
            _f(r.get("broker_rss_kb_per_dev"), ".1f"), _f(r.get("gw_rss_kb_per_dev"), ".2f"),
            _f(r.get("gw_cpu_pct"), ".0f"), _f(r.get("broker_cpu_pct"), ".0f"), _f(r.get("drain_s"), ".1f"),
        ])
    w = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    for j, c in enumerate(cells):
        print("  ".join(x.rjust(w[i]) for i, x in enumerate(c)))
        if j == 0:
            print("  ".join("-" * x for x in w))
    for r in rows:
        extra = (f"{r['devices']:,}: sent {r['sent']:,}, failed {r['failed']}, rejected {r['rejected'] or 0}, "
                 f"gateway received {r['gw_received']:,} decided {r['gw_decided']:,} acked {r['gw_acked']:,} "
                 f"dup {r['gw_duplicates']}, broker dropped {r['broker_dropped']}, refused connects "
                 f"{r['refused_connects']}, nofile broker {r['broker_nofile']} sim {r['sim_nofile']}")
        print(extra)
        if "gw_structures_at_mark" in r:
            parts = ", ".join(f"{k} {v['entries']:,} entries {v['bytes'] / r['devices']:.0f} B/dev"
                              for k, v in r["gw_structures_at_mark"].items())
            print(f"   gateway memory: peak RSS {_f(r.get('gw_peak_rss_mb'), ',.0f')} MB; sealed envelopes held at "
                  f"most {_f(r.get('gw_held_peak_mb'), ',.0f')} MB (bound {r['gw_max_held_mb']:,.0f} MB)")
            print(f"   gateway at the memory mark: RSS {r['gw_rss_base_mb']:.0f} -> {r['gw_rss_mark_mb']:.0f} MB, "
                  f"backlog {r['gw_backlog_at_mark']}; {parts}")
        for t in r.get("tracemalloc_top", []):
            print(f"   tracemalloc {t['where']}: {t['size_diff'] / 1024:+,.0f} KB ({t['count_diff']:+,} blocks)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1_000, 5_000, 10_000])
    ap.add_argument("--seconds", type=float, default=35.0, help="production time per run")
    ap.add_argument("--warm", type=float, default=15.0,
                    help="seconds after the last connect at which memory per device is measured")
    ap.add_argument("--processes", type=int, default=2, help="simulator processes")
    ap.add_argument("--connect-first", type=float, default=60.0,
                    help="connect the whole fleet first (at most this many seconds), then produce; 0: produce "
                         "as each device connects")
    ap.add_argument("--connect-timeout", type=float, default=20.0)
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--health-interval", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default=str(REPO / "policies"))
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--no-rate-headroom", action="store_true", help="turn the gateway's rate baselines off")
    ap.add_argument("--tracemalloc", action="store_true", help="trace the gateway's allocations (slow)")
    ap.add_argument("--max-held-mb", type=float, default=1024.0,
                    help="the gateway's bound on sealed envelopes held in memory (GatewayConfig.max_held_mb)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", action="store_true")
    # internal: the gateway process
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from device_sim.lean import raise_nofile

    raise_nofile()
    if args.role == "gateway":
        try:
            import uvloop

            uvloop.run(_gateway_main(args))
        except ImportError:
            import asyncio

            asyncio.run(_gateway_main(args))
        return

    rows = []
    for n in args.devices:
        log(f"sim_scale: {n} devices, {args.processes} simulator process(es), {args.seconds:.0f}s ...")
        rows.append(run_one(n, args))
        if not args.json:
            print_rows(rows[-1:])
            print(flush=True)
    if args.json:
        meta = {"seconds": args.seconds, "warm": args.warm, "processes": args.processes,
                "rate_scale": args.rate_scale, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print_rows(rows)
    if any(r["lost"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
