"""Gateway throughput with 1 and 2 workers, against this machine's own two-process ceiling.

    python benchmarks/workers.py [--messages N] [--ceiling-seconds S] [--repeat K] [--json]

Rows (each on a fresh private Mosquitto with Edgeward's rendered config):

- 1 worker: the product's single gateway (``edgeward run``): client id ``edgeward-gateway``, a plain
  subscription, per-process dedupe and rate baselines;
- 2 workers: ``edgeward run --workers 2`` as gateway/runtime/workers.py builds each worker: client id
  ``edgeward-gateway-w<i>``, shared subscription ``$share/edgeward/...``, the shared per-device state
  (gateway/runtime/shared_state.py), each worker its own state directory and process.

Method (as benchmarks/e2e.py, whose publisher role and message maker are reused): the workers start
and subscribe first; a publisher process sends every message (small mix, QoS 1, 8 connections) as
fast as the broker takes them; timed from the first publish until every message was received and
acknowledged by the workers and every uplink publish was acknowledged by the broker. The destinations
hold a persistent session and are drained afterwards. Lost = published (device, seq) with no
decision in any worker's audit chain, plus allowed deliveries missing at their destination;
duplicates = decisions beyond one per (device, seq) across workers, plus repeats at destinations.

Ceiling: the same pure-Python CPU-bound loop in 1 process, then in 2 processes at once, measured
before and after the rows (``--ceiling-seconds`` in all, half each time) and averaged; ceiling ratio = (2-process work per second) / (1-process work per second). On a
machine with two idle cores it approaches 2.0; on a shared one it says how much a second process can
get at all. Scaling = (2-worker msg/s) / (1-worker msg/s), shown against that ratio.

``--repeat K`` runs the C-client ceiling and both rows K times, interleaved (ceiling, 1 worker, 2
workers, ceiling, ...), and adds the medians. On this shared 2-CPU machine one C-client ceiling row
moved between 60,000 and 86,000 msg/s from one run to the next, so one run's ratio says little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, print_table, proc_cpu_seconds
from e2e import (DEST_ID, AuditTally, MessageMaker, add_machine_bound, key_of, prime, publisher_bound,
                 run_pub, start_broker, throughput_row)

from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.crypto.seqid import SeqIds
from gateway.policy import load_policy
from gateway.runtime.receiver import DestinationReceiver
from gateway.vault import read_vault

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ the workers
def worker_main(i: int, n_workers: int, port: int, state_dir: str, shared: Any, counters: Any) -> None:
    """One gateway worker, built as ``edgeward run`` builds it (1 worker) or as workers.py does (N)."""
    import uvloop
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.runtime.service import Gateway, GatewayConfig
    from gateway.runtime.workers import SHARE_GROUP, worker_client_id

    policy = load_policy(REPO / "policies")

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        # retime=False, as in benchmarks/e2e.py: the sample policy re-times uplinks into batches of 5 s
        # mean (issue 5), so with it on a row would time the batch boundary, not the workers.
        # A signing key, as a site's workers have: each chain is checkpointed every 10,000 records.
        key = Ed25519PrivateKey.generate()
        if n_workers == 1:
            gw = Gateway(GatewayConfig(state_dir=Path(state_dir), port=port, retime=False, audit_signing_key=key),
                         policy)
        else:
            view = shared.for_worker(i)
            gw = Gateway(GatewayConfig(state_dir=Path(state_dir), port=port, client_id=worker_client_id(i),
                                       share_group=SHARE_GROUP, retime=False, audit_signing_key=key),
                         policy, dedupe=view, rate=view)
        async with gw:
            serve = asyncio.create_task(gw.serve(stop))
            counters[4 * i + 3] = 1  # connected and subscribed
            s = gw.stats
            while not stop.is_set():
                counters[4 * i] = s.received
                counters[4 * i + 1] = s.acked
                counters[4 * i + 2] = gw.uplink.pending_out
                await asyncio.sleep(0.002)
            await gw.drain(5)
            await serve

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
    if shared is not None:
        shared.close()


class _Keys:
    """Every worker's data keys (each worker seals under its own), re-read on an unknown key id."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.rings: list[DataKeyring] = []
        self.seq_ids = self  # reveal() below: a destination header's hidden sequence, under any worker's key
        self._ids: list[SeqIds] = []

    def reveal(self, device: str, blob: bytes) -> int | None:
        # Here each worker has its own state directory and KEK (a site's workers share one, and one key).
        if not self._ids:
            self._ids = [SeqIds.from_kek(load_or_create_kek(d / "keys" / "kek.key")) for d in self.dirs]
        for ids in self._ids:
            seq = ids.reveal(device, blob)
            if seq is not None:
                return seq
        return None

    def get(self, kid: str) -> Any:
        for attempt in range(2):
            for r in self.rings:
                try:
                    return r.get(kid)
                except Exception:  # noqa: BLE001, S112 - another worker's key
                    continue
            if attempt == 0:
                self.rings = [DataKeyring(d / "keys" / "datakeys.jsonl", load_or_create_kek(d / "keys" / "kek.key"))
                              for d in self.dirs]
        raise KeyError(kid)


def run_row(n_workers: int, msgs: list[tuple[str, bytes]], policy: Any) -> dict[str, Any]:
    from gateway.detect import RateBaseline
    from gateway.runtime.shared_state import SharedDeviceState

    n = len(msgs)
    keys = [key_of(t, p) for t, p in msgs]
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as td:
        root = Path(td)
        mfile = root / "msgs.pickle"
        mfile.write_bytes(pickle.dumps(msgs))
        broker = start_broker(root / "broker")
        shared = SharedDeviceState(workers=n_workers, rate=RateBaseline()) if n_workers > 1 else None
        procs = []
        try:
            port = broker.port
            prime(port, DEST_ID, "edgeward/out/#")
            counters = ctx.Array("q", 4 * n_workers, lock=False)
            dirs = [root / f"worker-{i}" for i in range(n_workers)]
            for i in range(n_workers):
                p = ctx.Process(target=worker_main, args=(i, n_workers, port, str(dirs[i]), shared, counters))
                p.start()
                procs.append(p)
            deadline = time.monotonic() + 60
            while not all(counters[4 * i + 3] for i in range(n_workers)):
                if time.monotonic() > deadline or any(p.exitcode is not None for p in procs):
                    raise RuntimeError("workers did not start")
                time.sleep(0.02)
            time.sleep(0.3)  # subscribed
            c0 = sum(proc_cpu_seconds(p.pid) for p in procs)
            b0 = proc_cpu_seconds(broker.proc.pid)  # type: ignore[union-attr]
            pub = run_pub(port, mfile, 1)
            deadline = time.monotonic() + 300
            while True:
                rec = sum(counters[4 * i] for i in range(n_workers))
                ack = sum(counters[4 * i + 1] for i in range(n_workers))
                pend = sum(counters[4 * i + 2] for i in range(n_workers))
                if rec >= n and ack >= n and pend == 0:
                    t_end = time.monotonic()
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stalled: received {rec} acked {ack} pending {pend}")
                time.sleep(0.002)
            cpu = sum(proc_cpu_seconds(p.pid) for p in procs) - c0
            b_cpu = proc_cpu_seconds(broker.proc.pid) - b0  # type: ignore[union-attr]
            fin = pub.wait("final")
            pub.close()
            per_worker = [counters[4 * i] for i in range(n_workers)]
            for p in procs:
                os.kill(p.pid, signal.SIGTERM)
            for p in procs:
                p.join(30)
            rec = reconcile(policy, keys, dirs, port)
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
            broker.stop()
            if shared is not None:
                shared.close()
    seconds = t_end - fin["t_start"]
    r = {"workers": n_workers, "messages": n, "seconds": seconds, "msgs_per_s": n / seconds,
         "pub_seconds": fin["seconds"], "cpu_us_per_msg": cpu / n * 1e6, "broker_us_per_msg": b_cpu / n * 1e6,
         "received_per_worker": per_worker, **rec}
    add_machine_bound(r, fin["cpu"], n)  # near it, a second worker has nothing left to scale into
    log(f"  [{n_workers} worker(s)] {r['msgs_per_s']:,.0f} msg/s (publisher done at {r['pub_seconds']:.2f}s of "
        f"{seconds:.2f}s), {r['cpu_us_per_msg']:.0f} µs CPU/msg, per worker {per_worker}, lost {r['lost']} "
        f"(not decided {r['not_decided']}, deliveries missing {r['missing_deliveries']} of {r['deliveries']}), "
        f"dups {r['dups']}, rejected {r['rejected']}")
    return r


def reconcile(policy: Any, published: list[tuple[str, int]], dirs: list[Path], port: int) -> dict[str, Any]:
    tally = AuditTally(policy)
    vault: Counter[tuple[str, int]] = Counter()
    keys = _Keys(dirs)
    from gateway.crypto.envelope import open_envelope

    for d in dirs:
        tally.add(d / "audit")
        for env in read_vault(d / "vault"):
            header, _ = open_envelope(keys, env)
            vault[(header.device, header.seq)] += 1

    async def drain() -> DestinationReceiver:
        rx = DestinationReceiver("127.0.0.1", port, keys, client_id=DEST_ID)
        await rx.start()
        last, t_last = -1, time.monotonic()
        # the broker replays the destinations' queue from its session: wait while it keeps coming
        while time.monotonic() - t_last < 5.0 and rx.total + rx.undecryptable < len(expected_mqtt):
            got = rx.total + rx.duplicates + rx.undecryptable
            if got != last:
                last, t_last = got, time.monotonic()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        await rx.stop()
        return rx

    decided, rejected = tally.decided, tally.rejected
    expected_mqtt, expected_vault = tally.expected_mqtt, tally.expected_vault
    rx = asyncio.run(drain())
    got_mqtt = {(d, dev, seq) for d, dev, _stream, seq in rx._seen}  # the harness reads the tally
    refused = sum(rejected.values()) - rejected.get("dedupe.duplicate", 0)
    not_decided = len(set(published) - set(decided)) - refused
    missing = len(expected_mqtt - got_mqtt) + len(expected_vault - set(vault))
    dups = (sum(k - 1 for k in decided.values() if k > 1) + rx.duplicates
            + sum(k - 1 for k in vault.values() if k > 1))
    return {"lost": max(0, not_decided) + missing, "dups": dups, "not_decided": max(0, not_decided),
            "missing_deliveries": missing, "forwarded_mqtt": rx.total,
            "deliveries": len(expected_mqtt) + len(expected_vault), "undecryptable": rx.undecryptable,
            "rejected": dict(rejected)}


# ------------------------------------------------------------------------------------------ the ceiling
def _spin(seconds: float, out: Any, idx: int) -> None:
    """Pure-Python CPU-bound work (integer arithmetic in the interpreter loop), counted in units."""
    deadline = time.perf_counter() + seconds
    units = 0
    while time.perf_counter() < deadline:
        x = 0
        for k in range(10_000):
            x += k * k % 7
        units += 1
    out[idx] = units


def ceiling(seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    res = ctx.Array("q", 3, lock=False)
    p = ctx.Process(target=_spin, args=(seconds, res, 0))
    p.start()
    p.join()
    ps = [ctx.Process(target=_spin, args=(seconds, res, 1 + k)) for k in range(2)]
    for q in ps:
        q.start()
    for q in ps:
        q.join()
    one, two = res[0] / seconds, (res[1] + res[2]) / seconds
    log(f"  [ceiling] 1 process {one:,.0f} units/s, 2 processes {two:,.0f} units/s: ratio {two / one:.2f}")
    return {"one_process_units_per_s": one, "two_process_units_per_s": two, "ratio": two / one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=30_000, help="small-mix messages per row (default 30000)")
    ap.add_argument("--ceiling-seconds", type=float, default=5.0, help="each ceiling run (default 5)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="the C-client ceiling and both rows this many times, interleaved; adds the medians")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error("--repeat must be at least 1")
    t0 = time.perf_counter()
    policy = load_policy(REPO / "policies")
    maker = MessageMaker(devices=max(2000, a.messages // 10))  # ~10 messages a device per row
    # The ceiling is measured before and after the rows (half the time each) and averaged: on a shared
    # machine the load moves during the run, and the rows sit between the two measurements.
    log("[ceiling] the same CPU-bound loop in 1 process, then 2 ...")
    before = ceiling(a.ceiling_seconds / 2)
    # The broker's own ceiling on the same kind of messages in the same run (the C clients at both ends,
    # mosquitto_pub -> mosquitto_sub, QoS 1, as benchmarks/e2e.py measures it): the target is the
    # gateway at >= 0.5 of it.
    repeats: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for k in range(a.repeat):
        tag = f" (repeat {k + 1} of {a.repeat})" if a.repeat > 1 else ""
        log(f"[ceiling] mosquitto_pub -> mosquitto_sub (C), QoS 1{tag} ...")
        c_msgs = maker.make(a.messages, "small")
        c_row = throughput_row("cc", 1, c_msgs, [key_of(t, p) for t, p in c_msgs], policy)
        rows = []
        for n in (1, 2):
            log(f"[{n} worker(s)] {a.messages} messages{tag} ...")
            rows.append(run_row(n, maker.make(a.messages, "small"), policy))  # fresh seqs for every row
        for r in rows:
            r["vs_c_qos1"] = r["msgs_per_s"] / c_row["msgs_per_s"]
        repeats.append((c_row, rows))
    log("[ceiling] again ...")
    after = ceiling(a.ceiling_seconds / 2)
    ceil = {"before": before, "after": after, "ratio": (before["ratio"] + after["ratio"]) / 2}
    scaling = statistics.median(rows[1]["msgs_per_s"] / rows[0]["msgs_per_s"] for _, rows in repeats)
    median = {"c_c_msgs_per_s": statistics.median(c["msgs_per_s"] for c, _ in repeats),
              **{f"workers_{n}": {"msgs_per_s": statistics.median(rows[i]["msgs_per_s"] for _, rows in repeats),
                                  "vs_c_qos1": statistics.median(rows[i]["vs_c_qos1"] for _, rows in repeats)}
                 for i, n in enumerate((1, 2))}}
    meta = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "seconds": time.perf_counter() - t0,
            "messages": a.messages, "repeat": a.repeat, "scaling": scaling, "ceiling_ratio": ceil["ratio"],
            "scaling_vs_ceiling": scaling / ceil["ratio"]}
    if a.json:
        c_row, rows = repeats[-1]
        print(json.dumps({"meta": meta, "ceiling": ceil, "c_ceiling": c_row, "rows": rows, "median": median,
                          "repeats": [{"c_ceiling": c, "rows": rs} for c, rs in repeats]}, indent=1, default=str))
        return
    print(f"\nEdgeward workers — {meta['cpus']} CPUs, Python {meta['python']}, small mix, QoS 1, "
          f"{a.messages} messages per row, {meta['seconds']:.0f}s")
    table = []
    for k, (c_row, rows) in enumerate(repeats):
        tag = f" [{k + 1}]" if a.repeat > 1 else ""
        table += [[f"ceiling: mosquitto_pub -> mosquitto_sub{tag}", f"{c_row['msgs_per_s']:,.0f}", "1.00",
                   c_row["lost"], "-", f"{c_row['cpu_us_per_msg']:.0f}", f"{c_row['broker_us_per_msg']:.0f}",
                   f"{c_row['pub_us_per_msg']:.0f}", f"{c_row['machine_bound_msgs_per_s']:,.0f}", "-", "-"]]
        table += [[f"edgeward, {r['workers']} worker{'s' if r['workers'] > 1 else ''}{tag}", f"{r['msgs_per_s']:,.0f}",
                   f"{r['vs_c_qos1']:.2f}", r["lost"], r["dups"], f"{r['cpu_us_per_msg']:.0f}",
                   f"{r['broker_us_per_msg']:.0f}", f"{r['pub_us_per_msg']:.0f}",
                   f"{r['machine_bound_msgs_per_s']:,.0f}",
                   f"{r['msgs_per_s'] / max(r['machine_bound_msgs_per_s'], 1e-9):.2f}",
                   "/".join(map(str, r["received_per_worker"]))] for r in rows]
    if a.repeat > 1:
        table += [[f"median of {a.repeat}: C-C ceiling", f"{median['c_c_msgs_per_s']:,.0f}", "1.00",
                   "", "", "", "", "", "", "", ""]]
        table += [[f"median of {a.repeat}: edgeward, {n} worker{'s' if n > 1 else ''}",
                   f"{median[f'workers_{n}']['msgs_per_s']:,.0f}", f"{median[f'workers_{n}']['vs_c_qos1']:.2f}",
                   "", "", "", "", "", "", "", ""] for n in (1, 2)]
    print_table(["consumer", "msg/s", "vs C-C q1", "lost", "duplicates", "CPU µs/msg", "broker µs/msg",
                 "pub µs/msg", "machine bound", "of bound", "received per worker"], table)
    bound = [k + 1 for k, (c, _) in enumerate(repeats) if publisher_bound(c)]
    if bound:
        rows_said = f"rows {', '.join(map(str, bound))} were" if len(bound) > 1 else f"row {bound[0]} was"
        print(f"the C-C {rows_said} publisher-bound (mosquitto_pub still sending when the subscriber "
              "finished): not the broker's ceiling, so the ratios against it overstate; far fewer or far "
              "more --messages than 30000 do that")
    print(f"(machine bound = {meta['cpus']} CPUs / (consumer + broker + publisher CPU a message): the most "
          "this machine could carry of that row however fast the consumer; 'of bound': the share taken)")
    print(f"\nscaling (2-worker / 1-worker msg/s{', median' if a.repeat > 1 else ''}): {scaling:.2f}   "
          f"two-process ceiling (same CPU-bound loop, 2 procs / 1 proc): {ceil['ratio']:.2f} "
          f"(before {before['ratio']:.2f}, after {after['ratio']:.2f})   "
          f"scaling / ceiling: {meta['scaling_vs_ceiling']:.2f}")


if __name__ == "__main__":
    main()
