"""Chaos run: a simulated fleet through the real gateway while faults are injected at random moments,
then every message is reconciled against the fleet's ground truth, the audit chain and what the
destinations received.

Faults (seeded schedule, one at a time): the ingest broker restarts (same port, persistence on), the
gateway is kill -9'd and restarted (its state dir persists), the destinations' broker is cut for
longer than ``uplink_down_after_s``, and (``--disk-fill``, root only) the gateway's state dir -- a
tmpfs mounted here (--tmpfs-mb, 256 MiB by default) -- is filled with a ballast file until ENOSPC, held, then freed.
With ``--overlap`` a fifth kind overlaps two faults: the ingest broker restarts and the gateway is
kill -9'd a few seconds later, while what it decided before the restart may still wait in a re-timing
batch (the broker's redeliveries of those messages are duplicates to the gateway). With
``--overlap --disk-fill`` a sixth: the disk fills, and while the gateway is paused for it the ingest
broker restarts; the disk stays full for longer than the gateway's SUBACK wait (10 s).

Nothing is taken from the gateway's own counters (they die with kill -9): decisions come from the
audit log (records with "routes"), drops from its ``undelivered`` records, deliveries from a
DestinationReceiver on the destinations' broker (it dedupes by (destination, device, stream, seq)
and counts wire duplicates).

    python benchmarks/chaos.py --minutes 5 --devices 20 --seed 1 [--disk-fill] [--json]

With ``--workers N`` the gateway is N workers on one shared subscription, as ``edgeward run --workers N``
builds them (client id ``edgeward-gateway-w<i>``, a state directory each, one KEK, the per-device dedupe
state in shared memory). A kill -9 then hits one worker, chosen at random, and restarts it with the same
client id; the other keeps serving. Decisions and drops are read from every worker's audit chain. The
ingest broker is not restarted under workers (``INGEST_RESTARTS`` says why).

tests/integration/test_chaos.py runs the same harness for 25 s with one fault of each kind, with one
gateway and with two workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import pickle
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from device_sim import Fleet, make_fleet
from gateway.audit.chain import iter_records, verify_chain
from gateway.crypto.keys import ReloadingKeyring, load_or_create_kek
from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.shared_state import SharedDeviceState

POLICY_DIR = REPO / "policies"
REMOTE = ("customs_nl", "eu_hub", "vendor_maintenance")
KINDS = ("ingest_restart", "gateway_kill", "dest_outage")
# Not run with workers: Mosquitto 2.0 restores a shared subscription dead, so what devices publish
# between a broker restart and a worker's re-SUBSCRIBE is acknowledged and dropped by the broker
# (tests/integration/test_workers.py pins it). A site never restarts its broker under running workers,
# and its broker lets devices in only once they have subscribed (site_runner.open_device_listener).
INGEST_RESTARTS = ("ingest_restart", "ingest_then_kill", "disk_then_ingest")
START_TIMEOUT_S = 60.0  # a gateway (or worker) not ready by then fails the run

GATEWAY = """
import asyncio, json, signal, sys
from pathlib import Path
from gateway.policy import load_policy
from gateway.runtime.service import Gateway, GatewayConfig

async def main():
    a = json.loads(sys.argv[1])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    extra, view = {}, None
    if a.get("shared"):  # a worker of N, as gateway/runtime/workers.py builds one
        import pickle
        from multiprocessing import resource_tracker
        from gateway.runtime.workers import SHARE_GROUP, worker_client_id
        shared = pickle.loads(bytes.fromhex(a["shared"]))  # attaches to the harness's block by name
        # Python 3.11 registers an attached block with this process's resource tracker, which would
        # unlink it when this worker is killed; the harness owns it.
        resource_tracker.unregister(shared._shm._name, "shared_memory")
        view = shared.for_worker(a["index"])
        extra = {"client_id": worker_client_id(a["index"]), "share_group": SHARE_GROUP,
                 "kek": bytes.fromhex(a["kek"])}
    cfg = GatewayConfig(state_dir=Path(a["state"]), port=a["port"], rate_headroom=None,
                        uplinks={d: ("127.0.0.1", a["dest_port"]) for d in a["remote"]},
                        uplink_down_after_s=a["down_after"], **extra)
    async with Gateway(cfg, load_policy(a["policy"]), dedupe=view) as gw:
        async def status():
            while True:
                try:
                    gw.write_status()
                except OSError:
                    pass
                await asyncio.sleep(0.5)
        t = asyncio.create_task(status())
        print("ready", flush=True)
        await gw.serve(stop)
        t.cancel()
asyncio.run(main())
"""


def start_broker(workdir: Path) -> MosquittoBroker:
    last: Exception | None = None
    for _ in range(5):
        b = MosquittoBroker(BrokerConfig(port=free_port(), workdir=workdir))
        try:
            b.start()
            return b
        except Exception as exc:  # noqa: BLE001 - a port taken between choosing and binding: retry
            last = exc
    assert last is not None
    raise last


@dataclass
class ChaosConfig:
    seconds: float = 25.0
    devices: int = 20
    seed: int = 1
    rate_scale: float = 4.0
    once: bool = True  # one fault of each kind (the test); else a fault every few seconds
    disk_fill: bool = False
    tmpfs_mb: int = 256  # the state dir's volume with disk_fill: the vault alone takes ~25 KB a message
    down_after_s: float = 1.0
    settle_timeout_s: float = 60.0
    keep_state: bool = False  # copy the state dir out of the tmpfs before it is unmounted
    overlap: bool = False  # also "ingest_then_kill": an ingest restart, then kill -9 within one batch,
    # and with disk_fill "disk_then_ingest": an ingest restart while the gateway is paused for a full disk
    workers: int = 1  # > 1: N workers on a shared subscription (edgeward run --workers N)
    progress: Callable[[str], None] | None = None
    progress_every_s: float = 5.0


@dataclass
class _Run:
    cfg: ChaosConfig
    workdir: Path
    state: Path
    ingest: MosquittoBroker
    dest: MosquittoBroker
    gws: list[subprocess.Popen[str] | None] = field(default_factory=list)  # one per worker (one gateway: 1)
    lives: int = 0
    rx: DestinationReceiver | None = None
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, float]] = field(default_factory=list)
    ballast: Path | None = None
    t0: float = 0.0
    disk_fill_note: str = ""
    shared: Any = None  # the workers' SharedDeviceState (owned here)
    kek: bytes = b""

    def state_dirs(self) -> list[Path]:
        """Where each gateway keeps its audit chain, keys and status (one gateway: ``state``)."""
        if self.cfg.workers <= 1:
            return [self.state]
        return [self.state / f"worker-{i}" for i in range(self.cfg.workers)]


def _say(cfg: ChaosConfig, msg: str) -> None:
    if cfg.progress is not None:
        cfg.progress(msg)


def _start_gateway_sync(r: _Run, index: int) -> subprocess.Popen[str]:
    args = {"state": str(r.state_dirs()[index]), "port": r.ingest.port, "dest_port": r.dest.port,
            "remote": list(REMOTE), "down_after": r.cfg.down_after_s, "policy": str(POLICY_DIR)}
    if r.shared is not None:
        args.update(index=index, shared=pickle.dumps(r.shared).hex(), kek=r.kek.hex())
    with open(r.workdir / f"gateway-{r.lives + 1}.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-c", GATEWAY, json.dumps(args)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=log, text=True)
    assert p.stdout is not None
    # A gateway that hangs in start-up must fail the run, not hang it: killing it ends the readline.
    timer = threading.Timer(START_TIMEOUT_S, p.kill)
    timer.start()
    try:
        line = p.stdout.readline().strip()
    finally:
        timer.cancel()
    if line != "ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"gateway did not start: {(r.workdir / f'gateway-{r.lives + 1}.log').read_text()[-2000:]}")
    r.lives += 1
    return p


async def _start_gateway(r: _Run, index: int = 0) -> None:
    p = await asyncio.to_thread(_start_gateway_sync, r, index)
    while len(r.gws) <= index:
        r.gws.append(None)
    r.gws[index] = p


async def _kill_gateway(r: _Run, rng: random.Random) -> None:
    """kill -9 one gateway (a worker chosen at random) and restart it with the same state and client id."""
    i = rng.randrange(len(r.gws)) if len(r.gws) > 1 else 0  # one gateway: the same schedule as before
    p = r.gws[i]
    assert p is not None
    os.kill(p.pid, signal.SIGKILL)
    await asyncio.to_thread(p.wait)
    await asyncio.sleep(rng.uniform(0.3, 1.0))
    await _start_gateway(r, i)


def _statuses(r: _Run) -> list[dict[str, Any]]:
    """Each gateway's status.json ({} where there is none yet, or it is being replaced)."""
    out = []
    for d in r.state_dirs():
        try:
            out.append(json.loads((d / "status.json").read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def _fill(path: Path) -> None:
    """Write a ballast file until the volume is full (ENOSPC). Unbuffered: a buffered file kept the
    part of a chunk that did not fit and raised ENOSPC again when closed, which ended the faults."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


async def _fault(r: _Run, kind: str, rng: random.Random) -> None:
    t = time.monotonic() - r.t0
    start = time.monotonic()
    if kind == "ingest_restart":
        r.ingest.stop()
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        await asyncio.to_thread(r.ingest.start)
    elif kind == "gateway_kill":
        await _kill_gateway(r, rng)
    elif kind == "ingest_then_kill":
        r.ingest.stop()
        await asyncio.sleep(rng.uniform(0.5, 1.5))
        await asyncio.to_thread(r.ingest.start)
        await asyncio.sleep(rng.uniform(1.0, 4.0))  # the gateway is back, its batches not all released
        await _kill_gateway(r, rng)
    elif kind == "dest_outage":
        r.dest.stop()
        await asyncio.sleep(rng.uniform(r.cfg.down_after_s + 1.5, r.cfg.down_after_s + 3.0))
        await asyncio.to_thread(r.dest.start)
        assert r.rx is not None
        await r.rx.start()  # its persistent session resumes
    elif kind in ("disk_fill", "disk_then_ingest"):
        assert r.ballast is not None
        await asyncio.to_thread(_fill, r.ballast)
        if kind == "disk_fill":
            await asyncio.sleep(rng.uniform(2.0, 4.0))
        else:  # paused for the disk when the ingest comes back: it must reconnect and stay paused
            await asyncio.sleep(rng.uniform(1.0, 2.0))
            r.ingest.stop()
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            await asyncio.to_thread(r.ingest.start)
            await asyncio.sleep(rng.uniform(11.0, 13.0))
        with contextlib.suppress(OSError):
            r.ballast.unlink()
    r.faults[kind] += 1
    r.fault_log.append((round(t, 1), kind, round(time.monotonic() - start, 1)))
    _say(r.cfg, f"[{t:6.1f}s] fault {kind} done in {time.monotonic() - start:.1f}s")


async def _chaos(r: _Run, stop: asyncio.Event) -> None:
    cfg = r.cfg
    rng = random.Random(cfg.seed * 7919 + 1)
    kinds = list(KINDS) + (["disk_fill"] if r.ballast is not None else []) + (["ingest_then_kill"] if cfg.overlap else [])
    kinds += ["disk_then_ingest"] if r.ballast is not None and cfg.overlap else []
    if cfg.workers > 1:
        kinds = [k for k in kinds if k not in INGEST_RESTARTS]
    first = kinds[:]
    rng.shuffle(first)
    if cfg.once:
        # the fleet takes several seconds to resume after the ingest restart (its publishes in flight
        # time out first): last, so the other faults happen under traffic
        first.sort(key=lambda k: k == "ingest_restart")
        slot = max(1.0, (cfg.seconds - 6.0) / len(first))
        times = [2.0 + i * slot + rng.uniform(0, slot * 0.4) for i in range(len(first))]
        plan = list(zip(times, first, strict=True))
    else:
        plan, t = [], 2.0
        while t < cfg.seconds - 5.0:
            kind = first.pop(0) if first else rng.choice(kinds)
            plan.append((t, kind))
            t += rng.uniform(6.0, 15.0)
    for at, kind in plan:
        wait = at - (time.monotonic() - r.t0)
        if wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return
        await _fault(r, kind, rng)


def _read_audit(r: _Run) -> list[dict[str, Any]] | None:
    """Every gateway's audit records (the workers' chains one after the other)."""
    try:
        return [rec for d in r.state_dirs() for rec in iter_records(d / "audit")]
    except (OSError, ValueError):
        return None  # a line being written


def reconcile(records: list[dict[str, Any]], truth: Any, rx: DestinationReceiver, lives: int,
              wall0: float = 0.0) -> dict[str, Any]:
    """Ground truth against the audit log and what the destinations received. ``wall0``: the wall
    clock at the run's start, so a missing message's send time lines up with the fault log."""
    sent = [(t.device_id, t.seq) for t in truth.sent_records]
    sent_at = {(t.device_id, t.seq): round(t.t_sent - wall0, 1) for t in truth.sent_records} if wall0 else {}
    decisions: Counter[tuple[str, int]] = Counter()
    redeliveries: Counter[tuple[str, int]] = Counter()
    reasons: dict[tuple[str, int], str] = {}
    expected: dict[str, set[tuple[str, str, int]]] = defaultdict(set)
    dropped: dict[str, set[tuple[str, int]]] = defaultdict(set)
    other_drops: dict[str, Counter[str]] = defaultdict(Counter)
    alerts: Counter[str] = Counter()
    for rec in records:
        ev = rec.get("event")
        if ev == "undelivered":
            if rec.get("reason") == "uplink.unreachable":
                dropped[rec["dst"]].add((rec["dev"], rec["seq"]))
            else:
                other_drops[rec["dst"]][rec.get("reason", "?")] += 1
            continue
        if ev == "alert":
            alerts[rec.get("kind", "?")] += 1
        if ev is not None or "dev" not in rec:
            continue
        key = (rec["dev"], rec["seq"])
        if "routes" in rec:
            decisions[key] += 1
            if "redelivery_skipped" in rec:
                redeliveries[key] += 1
            for route in rec["routes"]:
                if route["allow"] and route["dst"] in REMOTE:
                    expected[route["dst"]].add((rec["dev"], rec["stream"], rec["seq"]))
        elif rec.get("reason"):
            reasons.setdefault(key, rec["reason"])
    sent_set = set(sent)
    missing = [k for k in sent if not decisions[k] and k not in reasons]
    multi = {k: n for k, n in decisions.items() if n > 1}
    received: dict[str, set[tuple[str, str, int]]] = defaultdict(set)
    for m in rx.messages:
        received[m.header.destination].add((m.header.device, m.header.stream, m.header.seq))
    dests = {}
    for d in REMOTE:
        exp, got, drop = expected[d], received[d], dropped[d]
        lost = [k for k in exp if k not in got and (k[0], k[2]) not in drop]
        dests[d] = {
            "expected": len(exp),
            "received": len(got),
            "dropped_unreachable": len(drop),
            "dropped_other": dict(other_drops[d]),
            "lost": len(lost),
            "lost_sample": [list(k) for k in sorted(lost)[:5]],
            "unexpected": len(got - exp),
            "dropped_but_delivered": sum(1 for k in got if (k[0], k[2]) in drop),
            "dup_after_dedupe": rx.counts[d] - len({(k[0], k[2]) for k in got}),
        }
    return {
        "sent": len(sent),
        "sent_unique": len(sent_set),
        "failed_publishes": len(truth.failed),
        "decided": sum(1 for k in sent_set if decisions[k]),
        "rejected_with_reason": dict(Counter(reasons[k] for k in sent_set if not decisions[k] and k in reasons)),
        "missing": len(missing),
        "missing_sample": [[*k, sent_at[k]] if k in sent_at else list(k) for k in missing[:5]],
        "decided_more_than_once": len(multi),
        "decided_more_than_once_marked_redelivery": sum(1 for k in multi if redeliveries[k]),
        "max_decisions_per_message": max(decisions.values(), default=0),
        "decided_more_than_once_sample": [[k[0], k[1], n] for k, n in sorted(multi.items(), key=lambda x: -x[1])[:5]],
        "decided_not_acked_to_fleet": sum(1 for k in decisions if k not in sent_set),
        "wire_duplicates": rx.duplicates,
        "undecryptable": rx.undecryptable,
        "destinations": dests,
        "alerts": dict(alerts),
        "gateway_lives": lives,
    }


def _all_decided(truth: Any, records: list[dict[str, Any]] | None) -> bool:
    if records is None:
        return False
    decided = {(x["dev"], x["seq"]) for x in records if "event" not in x and "dev" in x}
    return all((t.device_id, t.seq) in decided for t in truth.sent_records)


def _settled(r: _Run, truth: Any, records: list[dict[str, Any]] | None,
             sts: list[dict[str, Any]] | None = None) -> bool:
    if not _all_decided(truth, records):
        return False
    for st in _statuses(r) if sts is None else sts:
        if not st or st.get("awaiting_uplink_ack") or st.get("uplink_backlog"):
            return False
        for d in REMOTE:
            row = st.get("destinations", {}).get(d, {})
            if row.get("state") != "up" or row.get("backlog") or row.get("batch") or row.get("in_flight"):
                return False
    return True


RX_QUIET_S = 8.0


async def _statuses_after(r: _Run, t: float, timeout: float = 3.0) -> list[dict[str, Any]]:
    """Every gateway's first status.json written after wall time ``t`` ([{}] if not all within ``timeout``)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sts = _statuses(r)
        if all(st.get("t", 0.0) > t for st in sts):
            return sts
        await asyncio.sleep(0.1)
    return [{}]


async def _quiet(rx: DestinationReceiver, quiet_s: float, step: float = 0.5) -> None:
    """Wait until the receiver has taken nothing new for ``quiet_s``."""
    before, since = rx.total, time.monotonic()
    while time.monotonic() - since < quiet_s:
        await asyncio.sleep(step)
        if rx.total != before:
            before, since = rx.total, time.monotonic()


async def run_chaos(cfg: ChaosConfig, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    state_root = workdir
    mounted: Path | None = None
    note = ""
    if cfg.disk_fill:
        mnt = workdir / "tmpfs"
        mnt.mkdir(exist_ok=True)
        p = await asyncio.to_thread(subprocess.run, ["mount", "-t", "tmpfs", "-o", f"size={cfg.tmpfs_mb}m", "tmpfs", str(mnt)],
                                    capture_output=True, text=True, check=False)
        if p.returncode == 0:
            mounted, state_root = mnt, mnt
        else:
            note = f"disk-fill skipped: mount not permitted ({p.stderr.strip() or p.returncode})"
            _say(cfg, note)
    ingest = start_broker(workdir / "ingest-broker")
    dest = None
    r: _Run | None = None
    try:
        dest = start_broker(workdir / "dest-broker")
        r = _Run(cfg, workdir, state_root / "gw", ingest, dest, disk_fill_note=note)
        if mounted is not None:
            r.ballast = mounted / "ballast"
        r.t0, wall0 = time.monotonic(), time.time()
        if cfg.workers > 1:  # as SiteWorkers builds them: one KEK, the dedupe window shared
            r.kek = secrets.token_bytes(32)
            r.shared = SharedDeviceState(workers=cfg.workers)
        for i in range(cfg.workers):
            await _start_gateway(r, i)
        kek = r.kek if r.shared is not None else load_or_create_kek(r.state / "keys" / "kek.key")
        ring = ReloadingKeyring([d / "keys" / "datakeys.jsonl" for d in r.state_dirs()], kek)
        r.rx = rx = DestinationReceiver("127.0.0.1", dest.port, ring, keep=True)
        await rx.start()
        fleet = Fleet(make_fleet(cfg.devices, seed=cfg.seed), port=ingest.port, seed=cfg.seed,
                      rate_scale=cfg.rate_scale, drop_every_s=None,
                      publish_timeout_s=2.0, connect_timeout_s=3.0)
        stop = asyncio.Event()
        run = asyncio.create_task(fleet.run(cfg.seconds))
        chaos = asyncio.create_task(_chaos(r, stop))

        async def progress() -> None:
            while True:
                await asyncio.sleep(cfg.progress_every_s)
                sts = _statuses(r)
                st = sts[0]
                states = {d: st.get("destinations", {}).get(d, {}).get("state", "?")[:4] for d in REMOTE}
                decided = "+".join(str(x.get("stats", {}).get("decided", "?")) for x in sts)
                _say(cfg, f"[{time.monotonic() - r.t0:6.1f}s] sent {fleet.truth.sent} failed "
                          f"{len(fleet.truth.failed)} | gw life {r.lives} decided {decided}"
                          f" paused {[x.get('paused') for x in sts]} | rx {rx.total} wire-dups {rx.duplicates}"
                          f" | {states} | faults {dict(r.faults)}")

        prog = asyncio.create_task(progress()) if cfg.progress else None
        # a fault that fails ends the run now, not after the fleet's minutes without faults
        await asyncio.wait({run, chaos}, return_when=asyncio.FIRST_EXCEPTION)
        if chaos.done() and chaos.exception() is not None:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
            await chaos  # raises it
        truth = await run
        stop.set()
        await chaos
        _say(cfg, f"[{time.monotonic() - r.t0:6.1f}s] fleet done: {truth.sent} sent; settling")
        deadline = time.monotonic() + cfg.settle_timeout_s
        settled = False
        while time.monotonic() < deadline:
            # status.json is written every 0.5 s: judge the queues by one written after the audit was
            # read, or a message decided (and queued for its re-timing batch) in between looks settled
            t_read = time.time()
            records = _read_audit(r)
            if _all_decided(truth, records) and _settled(r, truth, records, await _statuses_after(r, t_read)):
                settled = True
                break
            await asyncio.sleep(0.5)
        # the last batches reaching the receiver: quiet for longer than one re-timing batch (<= 1.5 x 5 s)
        await _quiet(rx, RX_QUIET_S)
        if prog is not None:
            prog.cancel()
        for p in r.gws:
            assert p is not None
            p.send_signal(signal.SIGTERM)
        for p in r.gws:
            assert p is not None
            await asyncio.to_thread(p.wait, 30)
        await _quiet(rx, 2.0)  # a graceful stop releases what is left in the batches
        await rx.stop()
        records = _read_audit(r) or []
        out = reconcile(records, truth, rx, r.lives, wall0)
        out.update({
            "seconds": cfg.seconds, "devices": cfg.devices, "seed": cfg.seed, "rate_scale": cfg.rate_scale,
            "settled": settled, "faults": dict(r.faults), "fault_log": r.fault_log, "workers": cfg.workers,
            "audit_ok": all(verify_chain(d / "audit").ok for d in r.state_dirs()),
            "runtime_s": round(time.monotonic() - r.t0, 1),
            "disk_fill": mounted is not None,
            "notes": ([note] if note else []) + ([f"not run with workers: {', '.join(INGEST_RESTARTS)} "
                                                  "(see INGEST_RESTARTS)"] if cfg.workers > 1 else []),
            "gateway_exit": [p.returncode for p in r.gws if p is not None],
            "decided_per_worker": [sum(1 for rec in iter_records(d / "audit") if "routes" in rec)
                                   for d in r.state_dirs()],
        })
        out["ok"] = ok(out)
        return out
    finally:
        for p in r.gws if r is not None else []:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if r is not None and r.shared is not None:
            r.shared.close()
        if dest is not None:
            dest.stop()
        ingest.stop()
        if mounted is not None:
            if cfg.keep_state:
                shutil.copytree(mounted / "gw", workdir / "state-copy", dirs_exist_ok=True)
            subprocess.run(["umount", str(mounted)], check=False)  # noqa: ASYNC221 - teardown, once


def ok(out: dict[str, Any]) -> bool:
    d = out["destinations"]
    return (out["missing"] == 0 and out["audit_ok"] and out["undecryptable"] == 0
            and out["max_decisions_per_message"] <= out["gateway_lives"]
            and all(v["lost"] == 0 and v["unexpected"] == 0 and v["dup_after_dedupe"] == 0 for v in d.values())
            and d["customs_nl"]["dropped_unreachable"] == 0 and not d["customs_nl"]["dropped_other"])


def table(out: dict[str, Any]) -> str:
    lines = [
        (f"chaos: {out['seconds']:.0f}s, {out['devices']} devices, seed {out['seed']}, rate x{out['rate_scale']}, "
         f"runtime {out['runtime_s']}s, gateway lives {out['gateway_lives']}, settled {out['settled']}"
         + (f", {out['workers']} workers (decided {'/'.join(map(str, out['decided_per_worker']))})"
            if out["workers"] > 1 else "")),
        f"faults injected: {out['faults']}" + ("" if out["disk_fill"] else "  (no disk fill)"),
        (f"sent (PUBACKed) {out['sent']}  failed publishes {out['failed_publishes']}  decided {out['decided']}  "
         f"rejected {out['rejected_with_reason'] or 0}  missing {out['missing']}"),
        (f"decided more than once {out['decided_more_than_once']} "
         f"(marked redelivery {out['decided_more_than_once_marked_redelivery']}, max "
         f"{out['max_decisions_per_message']}/message)  decided but not PUBACKed to fleet "
         f"{out['decided_not_acked_to_fleet']}"),
        (f"wire duplicates (receiver) {out['wire_duplicates']}  undecryptable {out['undecryptable']}  "
         f"audit chain ok {out['audit_ok']}"),
        "",
        (f"{'destination':<20}{'expected':>9}{'received':>9}{'dropped':>9}{'lost':>6}{'dup-after':>10}"
         f"{'unexpected':>11}{'drop+deliv':>11}  other drops"),
    ]
    for name, v in out["destinations"].items():
        lines.append(f"{name:<20}{v['expected']:>9}{v['received']:>9}{v['dropped_unreachable']:>9}{v['lost']:>6}"
                     f"{v['dup_after_dedupe']:>10}{v['unexpected']:>11}{v['dropped_but_delivered']:>11}  "
                     f"{v['dropped_other'] or '-'}")
    lines.append("")
    lines.append(f"dropped = undelivered with uplink.unreachable; result: {'OK' if out['ok'] else 'FAILED'}")
    lines += out["notes"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rate-scale", type=float, default=4.0)
    ap.add_argument("--disk-fill", action="store_true")
    ap.add_argument("--tmpfs-mb", type=int, default=256,
                    help="size of the state dir's tmpfs with --disk-fill (the vault grows ~0.75 MB/s with the "
                         "default fleet: 64 fills up within 2 min, a 30-minute run needs ~2048)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON (progress goes to stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--workers", type=int, default=1, metavar="N",
                    help="N gateway workers on a shared subscription (edgeward run --workers N); a kill -9 "
                         "hits one of them")
    ap.add_argument("--overlap", action="store_true",
                    help="add the overlapping faults: ingest restart, then kill -9 within one re-timing "
                         "batch; with --disk-fill also an ingest restart while the disk is full")
    a = ap.parse_args()
    if a.disk_fill and os.geteuid() != 0:
        print("disk-fill skipped: not root (mount needs it)", file=sys.stderr)
        a.disk_fill = False
    cfg = ChaosConfig(seconds=a.minutes * 60, devices=a.devices, seed=a.seed, rate_scale=a.rate_scale, once=False,
                      disk_fill=a.disk_fill, tmpfs_mb=a.tmpfs_mb, keep_state=a.keep, settle_timeout_s=120,
                      overlap=a.overlap, workers=max(1, a.workers),
                      progress=lambda s: print(s, file=sys.stderr if a.json else sys.stdout, flush=True),
                      progress_every_s=10.0)
    work = Path(tempfile.mkdtemp(prefix="edgeward-chaos-"))
    try:
        out = asyncio.run(run_chaos(cfg, work))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1) if a.json else table(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
