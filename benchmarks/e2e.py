"""Edgeward end to end against the broker's own ceiling, on one machine, in one run.

    python benchmarks/e2e.py [--messages N] [--mix small|images|both] [--quick] [--json] [--latency-rate R]

Rows (each on a fresh private Mosquitto with Edgeward's rendered config, plus ``queue_qos0_messages``):

- ceiling, C clients at both ends (small mix): 8 ``mosquitto_pub -l`` processes into ``mosquitto_sub``, the
  issue's definition of the ceiling;
- ceiling, C subscriber: ``mosquitto_sub`` draining the messages (PUBACK only, no work) from this benchmark's
  own publisher (below), which is faster than ``mosquitto_pub``. ``mosquitto_sub -C N`` exits at the Nth
  message with many of its PUBACKs not yet processed by the broker (the ``unacked`` column counts the
  messages redelivered afterwards: over half of 20,000 in some runs), so the C rows overstate an
  acknowledged QoS-1 rate by what that column says;
- ceiling, Python: the fastest Python receive path, an asyncio Protocol + mqtt5 reader that only PUBACKs;
- edgeward: the real gateway (``Gateway(GatewayConfig(...), load_policy('policies'))``) in its own
  process: receive, decode, guards, policy, projection, encryption, audit, vault, forward to every
  destination, ingest PUBACK only after every uplink PUBACK.

Method for msg/s: LIVE. The consumer is started first (in its own process, on a primed persistent
session); then a publisher process sends every message as fast as the broker accepts it (pre-encoded mqtt5
PUBLISH packets written in bulk over 8 connections, a QoS-1 window per connection). Timed from the first
publish until the consumer has everything (the gateway: every message received, every ingest PUBACK
issued, every uplink publish PUBACKed by the broker). Ceiling and gateway are measured the same way; each
row prints when the publisher finished, so it is visibly not the bottleneck. The destinations hold
persistent sessions and are offline while the gateway is timed (the broker queues their envelopes; they
are remote systems in production, so their CPU does not belong on this machine); afterwards
``DestinationReceiver`` drains and decrypts everything. (Pre-loading a backlog before the gateway connects
is not used: it trips a gateway bug, see the report: messages delivered with the CONNACK are never
PUBACKed.) Gateway CPU = /proc/<pid>/stat utime+stime over the timed window.

QoS-0 rows: the same messages published at QoS 0 (``queue_qos0_messages true`` lets the broker queue them
for a session briefly offline). Delivery to the consumer is then QoS 0: no ingest PUBACK, and
the gateway does not hold anything back for its uplinks (they stay QoS 1): at-most-once into the gateway.

Lost / duplicated (gateway rows): every published (device, seq) must have exactly one policy decision in
the audit log (``iter_records``); every delivery the audit says was allowed must have arrived, once, at its
destination (MQTT destinations: ``DestinationReceiver``; the vault: ``read_vault``); and no ingest message
may be left un-PUBACKed in the gateway's session (reconnected afterwards: redeliveries are counted).

Latency at half load: a separate publisher process paces the small mix at 50 % of the gateway's QoS-1 rate
from this run, first to a plain ack-only subscriber, then through the gateway to online destinations (a
recording ack-only subscriber process on edgeward/out/#; it reads envelope headers, does not decrypt).
Gateway-added latency = (publish -> destination receipt, per MQTT delivery) minus (publish -> plain
subscriber receipt), per percentile; the path through the gateway includes the second broker hop, which
the design imposes. The gateway's own figure (stats.latency_s: ingest receipt -> last uplink PUBACK) is
shown beside it. ``--latency-rate R`` paces at R msg/s instead, to compare two versions at the same load.

Stage profile: as many fresh messages as a throughput row through a stage-timed copy of
``Pipeline.process`` in-process (benchmarks/_e2e_profile.py), on a freshly loaded policy like the gateway
process's; the MQTT adapter's share = gateway CPU per message - the pipeline's.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import tempfile
import types
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiniClient, json_lines_reader, log, percentile, print_table, proc_cpu_seconds  # noqa: E402
from _e2e_roles import EXPIRY, INGEST_FILTER  # noqa: E402

from device_sim import PayloadFactory, make_fleet  # noqa: E402
from device_sim.devices import encode as dev_encode  # noqa: E402
from gateway.audit.chain import iter_records  # noqa: E402
from gateway.crypto.keys import DataKeyring, load_or_create_kek  # noqa: E402
from gateway.crypto.seqid import SeqIds  # noqa: E402
from gateway.policy import load_policy  # noqa: E402
from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port  # noqa: E402
from gateway.runtime.receiver import DestinationReceiver  # noqa: E402
from gateway.vault import read_vault  # noqa: E402

HERE = Path(__file__).resolve().parent
ROLES = str(HERE / "_e2e_roles.py")
REPO = HERE.parent
GW_ID, DEST_ID, SUB_ID = "edgeward-gateway", "edgeward-destinations", "plain-sub"
SMALL_RESULT_TYPES = ("body_scanner", "trace_detector", "face_egate")
PUB_CONNS = 8
MSGS_PER_DEVICE = 5  # in the latency phase's fleets: see main()
CPU_SPLIT = False  # --cpu-split: the paced gateway reports its CPU per part
# the nesting parts of the split (benchmarks/_e2e_roles.py names them)
SOCKET_READS, INGEST_READS, ACKS = "socket reads", "ingest reads", "done log + ingest PUBACKs"
GW_FLAGS: list[str] = []  # switches passed to the gateway process (--uvloop, --bundle, --retime)


# ------------------------------------------------------------------------------------------------ messages
class MessageMaker:
    """Realistic, guard-passing device payloads with fresh (device, seq) for every call."""

    def __init__(self, devices: int = 2000, seed: int = 7) -> None:
        # Enough devices that none exceeds its type's rate baseline (gateway.detect: a per-device bucket of
        # at least 60 messages): a row of 20k messages is ~10 per device, as a real site's fleet would send.
        self.fleet = make_fleet(devices, seed=seed)
        self.factories = {s.device_id: PayloadFactory(s, seed=seed) for s in self.fleet}
        self.seq = Counter({s.device_id: int(time.time()) % 100_000 * 1000 for s in self.fleet})

    def make(self, n: int, mix: str) -> list[tuple[str, bytes]]:
        """small: health from every device, and results of the small result types (body scanner, trace
        detector, face e-gate), 3 results per health for those. images: every family's results (X-ray,
        cargo, mobile: 50-500 KB images; ID reader portraits, temperature face crops) with one health
        message per 4."""
        out: list[tuple[str, bytes]] = []
        now = int(time.time() * 1000)
        i = 0
        while len(out) < n:
            spec = self.fleet[i % len(self.fleet)]
            turn = i // len(self.fleet)
            i += 1
            small_res = spec.device_type in SMALL_RESULT_TYPES
            if mix == "small":
                stream = "result" if small_res and turn % 4 else "status/health"
            else:
                stream = "status/health" if turn % 4 == 3 else "result"
            self.seq[spec.device_id] += 1
            seq = self.seq[spec.device_id]
            f = self.factories[spec.device_id]
            payload = f.make(stream, seq, now + len(out))
            out.append((spec.topic(stream), dev_encode(payload)))
        return out


def key_of(topic: str, payload: bytes) -> tuple[str, int]:
    return topic.split("/")[3], int(msgpack.unpackb(payload)["seq"])


# ------------------------------------------------------------------------------------------------ processes
class Child:
    """A role process (benchmarks/_e2e_roles.py) whose JSON lines arrive on a queue."""

    def __init__(self, *args: str, timeout: float = 120) -> None:
        self.p = subprocess.Popen([sys.executable, ROLES, *args], stdout=subprocess.PIPE, stderr=None,
                                  text=True, cwd=REPO)
        assert self.p.stdout is not None
        self.q: queue.Queue[dict[str, Any] | None] = json_lines_reader(self.p.stdout)
        self.timeout = timeout

    def wait(self, event: str, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                m = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"{self.p.args[2]}: no '{event}' in time") from None
            if m is None:
                raise RuntimeError(f"{self.p.args[2]} exited before '{event}' (its stderr is above)")
            if m.get("event") == event:
                return m

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()

    def close(self) -> None:
        self.kill()
        self.p.wait(10)


def start_broker(workdir: Path) -> MosquittoBroker:
    for _ in range(5):
        b = MosquittoBroker(BrokerConfig(port=free_port(), workdir=workdir, extra=("queue_qos0_messages true",)))
        try:
            b.start()
            return b
        except Exception:  # noqa: BLE001 - port race: try another
            b.stop()
    raise RuntimeError("could not start a private mosquitto")


def prime(port: int, client_id: str, topic: str) -> None:
    s = MiniClient(port, client_id, clean_start=True, expiry=EXPIRY)
    s.subscribe(topic)
    s.close()


# ------------------------------------------------------------------------------------------------ throughput rows
def run_pub(port: int, mfile: Path, qos: int) -> Child:
    c = Child("pub", "--port", str(port), "--messages", str(mfile), "--conns", str(PUB_CONNS), "--qos", str(qos))
    c.wait("ready")
    return c


def c_sub(port: int, n: int, out: Any) -> subprocess.Popen[bytes]:
    """mosquitto_sub on the primed session: prints each message's length, exits at the nth."""
    return subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", "1", "-c",
                            "-x", str(EXPIRY), "-i", SUB_ID, "-t", INGEST_FILTER, "-C", str(n), "-W", "120",
                            "-F", "%l"], stdout=out, stderr=subprocess.DEVNULL)


def run_c(port: int, n: int, workdir: Path, mfile: Path, qos: int) -> dict[str, Any]:
    out = open(workdir / "sub.out", "wb")
    p = c_sub(port, n, out)
    time.sleep(0.5)  # connected to its (primed) session
    pub = run_pub(port, mfile, qos)
    c0 = proc_cpu_seconds(p.pid)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.0005)
    t_end = time.monotonic()
    fin = pub.wait("final")
    pub.close()
    out.close()
    lines = (workdir / "sub.out").read_bytes().split()
    return {"received": len(lines), "unique": len(lines), "dups": None, "t_start": fin["t_start"], "t_end": t_end,
            "pub_seconds": fin["seconds"], "pub_cpu": fin["cpu"], "cpu": ru.ru_utime + ru.ru_stime - c0}


def run_cc(port: int, n: int, workdir: Path, msgs: list[tuple[str, bytes]], qos: int) -> dict[str, Any]:
    """The C clients at both ends, as the issue defines the ceiling: PUB_CONNS ``mosquitto_pub -l``
    processes (one connection and one topic each, in-flight window -M 100) into ``mosquitto_sub``. ``-l``
    sends a line a message, so each payload's newline and NUL bytes are replaced by 0x01 (same length:
    the broker carries the same bytes per message, it never reads them)."""
    out = open(workdir / "sub.out", "wb")
    p = c_sub(port, n, out)
    inputs = []
    for k in range(PUB_CONNS):
        f = workdir / f"pub{k}.lines"
        f.write_bytes(b"".join(pl.replace(b"\n", b"\x01").replace(b"\x00", b"\x01") + b"\n"
                               for _, pl in msgs[k::PUB_CONNS]))
        inputs.append(open(f, "rb"))
    time.sleep(0.5)  # connected to its (primed) session
    c0 = proc_cpu_seconds(p.pid)
    t_start = time.monotonic()
    pubs = [subprocess.Popen(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "5", "-q", str(qos),
                              "-M", "100", "-i", f"c-pub-{k}", "-t", msgs[k][0], "-l"], stdin=inputs[k],
                             stderr=subprocess.DEVNULL) for k in range(PUB_CONNS)]
    pub_cpu = 0.0
    t_pub = t_start
    for q in pubs:
        _, _, qru = os.wait4(q.pid, 0)
        pub_cpu += qru.ru_utime + qru.ru_stime
        t_pub = time.monotonic()
    _, _, ru = os.wait4(p.pid, 0)
    t_end = time.monotonic()
    for f in inputs:
        f.close()
    out.close()
    lines = (workdir / "sub.out").read_bytes().split(b"\n")
    got = sum(1 for ln in lines if ln)
    return {"received": got, "unique": got, "dups": None, "t_start": t_start, "t_end": t_end,
            "pub_seconds": t_pub - t_start, "pub_cpu": pub_cpu, "cpu": ru.ru_utime + ru.ru_stime - c0}


def run_py(port: int, n: int, mfile: Path, qos: int) -> dict[str, Any]:
    c = Child("acksub", "--port", str(port), "--client-id", SUB_ID, "--expect", str(n))
    try:
        c.wait("ready")
        pub = run_pub(port, mfile, qos)
        c0 = proc_cpu_seconds(c.p.pid)
        r = c.wait("final")
        r["cpu"] = proc_cpu_seconds(c.p.pid) - c0 if c.p.poll() is None else r["cpu"]
        fin = pub.wait("final")
        pub.close()
    finally:
        c.close()
    r.update(t_start=fin["t_start"], t_end=r["t"], pub_seconds=fin["seconds"], pub_cpu=fin["cpu"])
    return r


class SiteKeys:
    """The gateway's keyring, read from its state directory; re-read when an envelope names a key this copy
    has not seen yet (the gateway creates its first data key on its first message)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ring: DataKeyring | None = None

    @functools.cached_property
    def seq_ids(self) -> SeqIds:
        return SeqIds.from_kek(load_or_create_kek(self.state / "keys" / "kek.key"))

    def get(self, kid: str) -> Any:
        try:
            assert self.ring is not None
            return self.ring.get(kid)
        except Exception:  # noqa: BLE001 - unknown key or not loaded yet: reload once
            keys = self.state / "keys"
            self.ring = DataKeyring(keys / "datakeys.jsonl", load_or_create_kek(keys / "kek.key"))
            return self.ring.get(kid)


def drain_destinations(port: int, state: Path, expected: int, idle: float = 2.0) -> DestinationReceiver:
    ring: Any = SiteKeys(state)

    async def go() -> DestinationReceiver:
        rx = DestinationReceiver("127.0.0.1", port, ring, client_id=DEST_ID)
        await rx.start()
        last, t_last = -1, time.monotonic()
        while True:
            got = rx.total + rx.duplicates + rx.undecryptable
            if got >= expected:
                await asyncio.sleep(0.2)  # anything beyond the expected (duplicates) arrives now
                break
            if got != last:
                last, t_last = got, time.monotonic()
            elif time.monotonic() - t_last > idle:
                break
            await asyncio.sleep(0.02)
        await rx.stop()
        return rx

    return asyncio.run(go())


class AuditTally:
    """What audit logs say: each (device, seq) decided, rejection reasons, and the deliveries the
    policy allowed (MQTT: (destination, device, seq); vault: (device, seq)). Several logs (workers)
    add up."""

    def __init__(self, policy: Any) -> None:
        self.transport = {name: d.transport for name, d in policy.destinations.items()}
        self.decided: Counter[tuple[str, int]] = Counter()
        self.rejected: Counter[str] = Counter()
        self.expected_mqtt: set[tuple[str, str, int]] = set()
        self.expected_vault: set[tuple[str, int]] = set()

    def add(self, audit_dir: Path) -> AuditTally:
        for rec in iter_records(audit_dir):
            if "routes" in rec:
                key = (rec["dev"], rec["seq"])
                self.decided[key] += 1
                for r in rec["routes"]:
                    if r["allow"]:
                        if self.transport[r["dst"]] == "vault":
                            self.expected_vault.add(key)
                        else:
                            self.expected_mqtt.add((r["dst"], *key))
            elif "reason" in rec:
                self.rejected[rec["reason"]] += 1
        return self


def reconcile(policy: Any, published: list[tuple[str, int]], state: Path, rx: DestinationReceiver) -> dict[str, Any]:
    """Published vs the audit log vs what each destination received (see the module docstring)."""
    t = AuditTally(policy).add(state / "audit")
    decided, rejected, expected_mqtt, expected_vault = t.decided, t.rejected, t.expected_mqtt, t.expected_vault
    pub = set(published)
    vault: Counter[tuple[str, int]] = Counter()
    for env in read_vault(state / "vault"):
        h = msgpack.unpackb(msgpack.unpackb(env)["h"])
        vault[(h[0], h[2])] += 1
    got_mqtt = {(d, dev, seq) for d, dev, _stream, seq in rx._seen}  # noqa: SLF001 - benchmark reads the tally
    not_decided = len(pub - set(decided))
    missing = len(expected_mqtt - got_mqtt) + len(expected_vault - set(vault))
    dups = (sum(n - 1 for n in decided.values() if n > 1) + rx.duplicates
            + sum(n - 1 for n in vault.values() if n > 1))
    return {"lost": not_decided + missing, "dups": dups, "not_decided": not_decided, "missing_deliveries": missing,
            "unexpected_deliveries": len(got_mqtt - expected_mqtt) + len(set(vault) - expected_vault),
            "undecryptable": rx.undecryptable, "deliveries": len(expected_mqtt) + len(expected_vault),
            "redelivered_deduped": rejected.pop("dedupe.duplicate", 0), "rejected": dict(rejected)}


def run_gateway(port: int, n: int, qos: int, state: Path, uv: bool, mfile: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    args = ["gateway", "--port", str(port), "--state", str(state), "--expect", str(n), "--qos", str(qos)]
    c = Child(*args, *GW_FLAGS)
    try:
        c.wait("ready")
        pub = run_pub(port, mfile, qos)
        c0 = proc_cpu_seconds(c.p.pid)
        done = c.wait("done")
        done["cpu"] = proc_cpu_seconds(c.p.pid) - c0
        fin = pub.wait("final")
        pub.close()
        c.stop()
        final = c.wait("final", 30)
    finally:
        c.close()
    done.update(t_start=fin["t_start"], t_end=done["t"], pub_seconds=fin["seconds"], pub_cpu=fin["cpu"])
    return done, final


def add_machine_bound(r: dict[str, Any], pub_cpu_s: float, n: int) -> None:
    """Every process of the row on this machine (consumer + broker + publisher): how many messages a
    second its CPUs could carry of this row at most, however fast the consumer. The gateway's uplinks go
    back through the same broker (~2 deliveries a message), so its row costs the broker ~3 publishes a
    message. ``r`` has ``cpu_us_per_msg`` and ``broker_us_per_msg``; this adds the publisher's and the
    bound."""
    r["pub_us_per_msg"] = pub_cpu_s / n * 1e6
    all_us = r["all_us_per_msg"] = r["cpu_us_per_msg"] + r["broker_us_per_msg"] + r["pub_us_per_msg"]
    r["machine_bound_msgs_per_s"] = (os.cpu_count() or 1) * 1e6 / all_us if all_us else 0.0


PUBLISHER_BOUND = 0.95  # the C publishers still sending at this share of the row's time: not a ceiling


def publisher_bound(row: dict[str, Any]) -> bool:
    """The C publishers were still sending as the row ended: it measured them, not the broker. With many
    messages a row, each `mosquitto_pub -l` costs more a message (BENCHMARKS.md §4, session 18); at a
    tiny load their start-up dominates."""
    return bool(row["seconds"] > 0 and row["pub_seconds"] >= PUBLISHER_BOUND * row["seconds"])


def throughput_row(kind: str, qos: int, msgs: list[tuple[str, bytes]], keys: list[tuple[str, int]], policy: Any,
                   uv: bool = False) -> dict[str, Any]:
    n = len(msgs)
    name = {"cc": "ceiling: mosquitto_pub -> mosquitto_sub", "c": "ceiling: our publisher -> mosquitto_sub",
            "py": "ceiling: Python ack-only", "gw": "edgeward gateway"}[kind]
    with tempfile.TemporaryDirectory(prefix="e2e-") as td:
        root = Path(td)
        mfile = root / "msgs.pickle"
        mfile.write_bytes(pickle.dumps(msgs))
        broker = start_broker(root / "broker")
        try:
            port = broker.port
            cid = GW_ID if kind == "gw" else SUB_ID
            prime(port, cid, INGEST_FILTER)
            if kind == "gw":
                prime(port, DEST_ID, "edgeward/out/#")
            b0 = proc_cpu_seconds(broker.proc.pid)  # type: ignore[union-attr]
            extra: dict[str, Any] = {}
            if kind == "c":
                r = run_c(port, n, root, mfile, qos)
            elif kind == "cc":
                r = run_cc(port, n, root, msgs, qos)
            elif kind == "py":
                r = run_py(port, n, mfile, qos)
            else:
                state = root / "gw"
                done, final = run_gateway(port, n, qos, state, uv, mfile)
                r = {k: done[k] for k in ("received", "cpu", "t_start", "t_end", "pub_seconds", "pub_cpu")}
            b_cpu = proc_cpu_seconds(broker.proc.pid) - b0  # type: ignore[union-attr]
            if kind == "gw":
                s = final["stats"]
                fwd_mqtt = sum(v for d, v in s["forwarded"].items() if policy.destinations[d].transport == "mqtt")
                rx = drain_destinations(port, state, fwd_mqtt)
                rec = reconcile(policy, keys, state, rx)
                extra = {**rec, "rss_mb": final["VmRSS"] / 1024, "peak_rss_mb": final["VmHWM"] / 1024,
                         "broker_dropped": s["broker_dropped"], "reconnects": s["reconnects"], "forwarded": s["forwarded"],
                         "gw_latency_ms": final["latency_ms"]}
                r["unique"] = n - rec["not_decided"]
            # residual: ingest messages the consumer never PUBACKed are redelivered to its session now
            s_ = MiniClient(port, cid, clean_start=False, expiry=EXPIRY)
            unacked = sum(1 for p in s_.packets(0.3) if type(p).__name__ == "PublishPacket"
                          and not p.topic.startswith("$SYS")) if qos else 0  # type: ignore[attr-defined]
            s_.close(expiry=0)
        finally:
            broker.stop()
    r.update(extra)
    r["seconds"] = r["t_end"] - r["t_start"]
    r.update(name=name, kind=kind, qos=qos, messages=n, unacked=unacked, broker_cpu=b_cpu)
    if "lost" not in r:
        r["lost"] = n - r["unique"]
        r["dups"] = r.get("dups")
    r["msgs_per_s"] = n / r["seconds"] if r["seconds"] else 0.0
    mb = sum(len(p) for _, p in msgs) / 1e6
    r["mb_per_s"] = mb / r["seconds"] if r["seconds"] else 0.0
    r["cpu_us_per_msg"] = r["cpu"] / n * 1e6
    r["broker_us_per_msg"] = b_cpu / n * 1e6
    add_machine_bound(r, r.get("pub_cpu", 0.0), n)
    log(f"  [{name} QoS {qos}] {r['msgs_per_s']:,.0f} msg/s ({r['mb_per_s']:.1f} MB/s; publisher done at "
        f"{r['pub_seconds']:.2f}s of {r['seconds']:.2f}s), {r['cpu_us_per_msg']:.0f} µs CPU/msg, lost {r['lost']}, "
        f"dups {r['dups']}, unacked {unacked}" + (f", gateway reconnects {r['reconnects']}" if "reconnects" in r else ""))
    return r


# ------------------------------------------------------------------------------------------------ latency
def _timeline(pairs: list[tuple[float, float]], window_s: float = 0.5) -> list[dict[str, float]]:
    """Per window of send time: messages, publish -> destination p50/p99/max in ms. Shows whether a p99
    comes from a few stalls (the gateway or the machine pausing) or from a queue that built up."""
    if not pairs:
        return []
    t0 = min(s for s, _ in pairs)
    win: dict[int, list[float]] = {}
    for s, r in pairs:
        win.setdefault(int((s - t0) / window_s), []).append((r - s) * 1e3)
    return [{"t": k * window_s, "n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": max(v)}
            for k, v in sorted(win.items())]


def latency_phase(msgs: list[tuple[str, bytes]], rate: float | None, policy: Any) -> dict[str, Any]:
    """Paced publisher at ``rate`` (own process): plain subscriber first, then through the gateway.
    ``rate=None``: unpaced, through the gateway only, for the most the gateway carries with its
    destination consumer live (``through_msgs_per_s``): what "half load" is half of."""
    keys = [key_of(t, p) for t, p in msgs]
    out: dict[str, Any] = {"rate": rate, "messages": len(msgs)}
    with tempfile.TemporaryDirectory(prefix="e2e-lat-") as td:
        root = Path(td)
        mfile = root / "msgs.pickle"
        mfile.write_bytes(pickle.dumps(msgs))

        def pace(port: int) -> tuple[list[float], dict[str, Any]]:
            c = Child("pub", "--port", str(port), "--messages", str(mfile), "--rate", f"{rate or 0:.1f}",
                      "--out", str(root / "sent.json"), "--conns", str(PUB_CONNS), "--qos", "1")
            try:
                c.wait("ready")
                fin = c.wait("final")
            finally:
                c.close()
            return json.loads((root / "sent.json").read_text()), fin

        # 1. plain subscriber
        plain: list[float] = []
        if rate is not None:
            broker = start_broker(root / "b1")
            try:
                sub = Child("acksub", "--port", str(broker.port), "--record", str(root / "recv.json"))
                try:
                    sub.wait("ready")
                    sent, fin = pace(broker.port)
                    time.sleep(0.3)
                    sub.stop()
                    sub.wait("final", 30)
                finally:
                    sub.close()
            finally:
                broker.stop()
            t_sent = {k: t for k, t in zip(keys, sent)}
            plain = [t - t_sent[(topic.split("/")[3], s)]
                     for topic, s, t in json.loads((root / "recv.json").read_text())]
            out["publisher_seconds"] = fin["seconds"]
            out["max_inflight_per_conn"] = fin["max_inflight"]

        # 2. through the gateway; the destinations online: a recording ack-only subscriber on edgeward/out/#
        # (own process; it reads the envelope header, it does not decrypt: the throughput rows do that)
        broker = start_broker(root / "b2")
        state = root / "gw"
        try:
            # --expect: the gateway reports "done" once every message is decided and acknowledged; it is
            # stopped only then (a fixed sleep stopped it early at full speed and counted the rest lost).
            gw = Child("gateway", "--port", str(broker.port), "--state", str(state), "--expect", str(len(msgs)),
                       "--qos", "1", *GW_FLAGS, *(["--cpu-split"] if CPU_SPLIT and rate is not None else []))
            dst = Child("acksub", "--port", str(broker.port), "--record", str(root / "dst.json"),
                        "--filter", "edgeward/out/#", "--client-id", DEST_ID)
            try:
                gw.wait("ready")
                dst.wait("ready")
                sent2, fin2 = pace(broker.port)
                done = gw.wait("done", 120)
                time.sleep(0.3)
                gw.stop()
                final = gw.wait("final", 60)
                time.sleep(0.3)
                dst.stop()
                dst.wait("final", 30)
            finally:
                gw.close()
                dst.close()
        finally:
            broker.stop()
        t_sent2 = {k: t for k, t in zip(keys, sent2)}
        # The recorder read each header's sequence as the destination does (hidden, hex); the site's key
        # reads the device's sequence back, to match each delivery with its publish.
        ids = SeqIds.from_kek(load_or_create_kek(state / "keys" / "kek.key"))
        recv = [(topic, ids.reveal(topic.split("/")[3], bytes.fromhex(s)) if isinstance(s, str) else s, t)
                for topic, s, t in json.loads((root / "dst.json").read_text())]
        if recv:  # from the first publish to the last delivery (an unpaced publisher notes no send times)
            out["through_msgs_per_s"] = len(msgs) / (max(t for _, _, t in recv) - fin2["t_start"])
        through = [t - t_sent2[(topic.split("/")[3], s)] for topic, s, t in recv] if rate is not None else []
        if rate is not None:
            out["timeline"] = _timeline([(t_sent2[(topic.split("/")[3], s)], t) for topic, s, t in recv])
        seen: set[tuple[str, str, str, int]] = set()
        dup = 0
        for topic, s_, _t in recv:
            lv = topic.split("/")
            k = (lv[2], lv[3], "/".join(lv[4:]), s_)
            dup += k in seen
            seen.add(k)
        rx = types.SimpleNamespace(_seen=seen, duplicates=dup, undecryptable=0)
        rec = reconcile(policy, keys, state, rx)  # type: ignore[arg-type]
    out.update(plain_n=len(plain), through_n=len(through), lost=rec["lost"], dups=rec["dups"], reconcile=rec,
               gw_cpu_us_per_msg=done["cpu_serving"] / max(1, len(msgs)) * 1e6,  # ready -> all acknowledged
               gw_cpu_split_us=done.get("cpu_split_us"), gw_reads=done.get("reads"),
               rss_mb=final["VmRSS"] / 1024, peak_rss_mb=final["VmHWM"] / 1024,
               gc_pauses={g: {"n": len(v), "max_ms": max(v, default=0.0), "total_ms": sum(v)}
                          for g, v in final.get("gc_pauses_ms", {}).items()})
    if rate is None:
        log(f"  [live destination, unpaced] {out.get('through_msgs_per_s', 0):,.0f} msg/s through the gateway; "
            f"lost {rec['lost']}")
        return out
    for p in (50, 99):
        a, b = percentile(plain, p) * 1e3, percentile(through, p) * 1e3
        out[f"plain_p{p}_ms"], out[f"through_p{p}_ms"], out[f"added_p{p}_ms"] = a, b, b - a
        out[f"gw_internal_p{p}_ms"] = final["latency_ms"].get(f"p{p}")
    log(f"  [latency @ {rate:,.0f} msg/s] plain p50 {out['plain_p50_ms']:.2f} p99 {out['plain_p99_ms']:.2f} ms; "
        f"through gateway p50 {out['through_p50_ms']:.2f} p99 {out['through_p99_ms']:.2f} ms; "
        f"gateway-added p50 {out['added_p50_ms']:.2f} p99 {out['added_p99_ms']:.2f} ms; lost {rec['lost']}; "
        f"gateway CPU {out['gw_cpu_us_per_msg']:.0f} µs/msg")
    if out["gw_cpu_split_us"]:
        log(f"  [latency] gateway CPU split ({len(msgs) / (out['gw_reads'] or 1):.1f} messages an ingest read), µs/msg: "
            + "; ".join(f"{k} {v / len(msgs):.0f}" for k, v in out["gw_cpu_split_us"].items()))
    log("  [latency] gateway GC pauses: " + ", ".join(
        f"gen{g} {v['n']}x max {v['max_ms']:.1f} ms" for g, v in out["gc_pauses"].items()))
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, help="small-mix messages per row (default 20000; --quick 300)")
    ap.add_argument("--image-messages", type=int, help="image-mix messages per row (default 600; --quick 40)")
    ap.add_argument("--mix", choices=["small", "images", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="tiny numbers, for a CI smoke run")
    ap.add_argument("--no-latency", action="store_true", help="skip the half-load latency phase")
    ap.add_argument("--latency-seconds", type=float, help="duration of each paced run (default 6; --quick 1)")
    ap.add_argument("--latency-rate", type=float,
                    help="pace the latency phase at this many msg/s instead of half the gateway's QoS-1 rate "
                         "(to compare two versions at the same load)")
    ap.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="run the gateway on the default asyncio loop (the product uses uvloop)")
    ap.add_argument("--bundle", type=int,
                    help="envelopes per uplink MQTT message for every destination instead of the policy's "
                         "(1: one each, the wire before bundles; to compare the two in the same conditions)")
    ap.add_argument("--retime", action="store_true",
                    help="run the gateway with the policy's uplink re-timing (5 s batches), as a site does: the "
                         "throughput rows then show what holding acknowledgements for a batch costs the broker "
                         "(latency rows include the batch wait)")
    ap.add_argument("--cpu-split", action="store_true",
                    help="the paced gateway also reports what its CPU went to (pipeline, audit, group commit, uplink "
                         "writes, acknowledgements; thread CPU time around each, ~0.3 µs a call)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args()
    global CPU_SPLIT
    CPU_SPLIT = a.cpu_split
    n_small = a.messages or (300 if a.quick else 20_000)
    n_img = a.image_messages or (40 if a.quick else 600)
    lat_s = a.latency_seconds or (1.0 if a.quick else 6.0)
    GW_FLAGS.extend([f for f, on in (("--uvloop", a.uvloop),) if on])
    if a.bundle:
        GW_FLAGS.extend(["--bundle", str(a.bundle)])
    if a.retime:
        GW_FLAGS.append("--retime")
    policy = load_policy(REPO / "policies")
    maker = MessageMaker(devices=max(2000, max(n_small, n_img) // 10))  # ~10 messages a device per row
    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []
    mixes = ["small", "images"] if a.mix == "both" else [a.mix]
    profiles: dict[str, Any] = {}
    latency: dict[str, Any] | None = None
    sizes: dict[str, float] = {}
    for mix in mixes:
        n = n_small if mix == "small" else n_img
        log(f"[{mix}] {n} messages per row")
        for qos in (1, 0):
            # mosquitto_pub -l reads its messages as text lines: fine for small results, but it spends
            # ~0.2 ms reading each 50-500 KB image line, so for images it would measure itself, not the broker
            for kind in ("cc", "c", "py", "gw") if mix == "small" else ("c", "py", "gw"):
                msgs = maker.make(n, mix)  # fresh seqs for every row
                sizes[mix] = sum(len(p) for _, p in msgs) / n
                keys = [key_of(t, p) for t, p in msgs]
                r = throughput_row(kind, qos, msgs, keys, policy, uv=a.uvloop)
                r["mix"] = mix
                results.append(r)
        log(f"[{mix}] stage profile (in-process) ...")
        profiles[mix] = profile_stages_for(maker.make(n, mix))
        gw1 = next(r for r in results if r["mix"] == mix and r["kind"] == "gw" and r["qos"] == 1)
        profiles[mix]["gateway_cpu_us"] = gw1["cpu_us_per_msg"]
        profiles[mix]["mqtt_adapter_us"] = gw1["cpu_us_per_msg"] - profiles[mix]["pipeline_us"]
        if mix == "small" and not a.no_latency:
            # About five messages a device in each run, as a site's fleet sends: enough devices that none
            # outruns its type's rate baseline (2,000 devices for ~50,000 messages in 6 s is ~27 a device,
            # and the baseline rightly rejects some as detect.burst), few enough that a device's first
            # message (registry lookup, policy plan: the cold path) is not most of the run. Sized from
            # each run's own message count: sized from the throughput row's rate, the paced run had ~1.7
            # messages a device (session 7), and 58 % of what it timed was the cold path.
            def fleet(n_msgs: int, seed: int) -> MessageMaker:
                return MessageMaker(devices=max(2000, n_msgs // MSGS_PER_DEVICE), seed=seed)

            live_rate = None
            if a.latency_rate:
                rate = a.latency_rate
            else:
                # Half load is half of what the gateway carries with its destination consumer live, as
                # in the paced run (the throughput row drains its destinations afterwards, so on two
                # CPUs half of that row's rate can already be more than the machine sustains).
                log(f"[latency] the most the gateway carries with a live destination ({n} messages, unpaced) ...")
                live_rate = latency_phase(fleet(n, 11).make(n, "small"), None, policy).get("through_msgs_per_s", 0.0)
                rate = max(50.0, live_rate / 2)
            log(f"[latency] paced at {rate:,.0f} msg/s ({rate / gw1['msgs_per_s']:.0%} of the gateway's QoS-1 row)"
                f" for {lat_s:g}s ...")
            n_paced = max(50, int(rate * lat_s))
            paced_fleet = fleet(n_paced, 12)
            latency = latency_phase(paced_fleet.make(n_paced, "small"), rate, policy)
            latency["devices"] = len(paced_fleet.fleet)
            latency["of_gateway_rate"] = rate / gw1["msgs_per_s"]
            latency["live_max_msgs_per_s"] = live_rate
    for mix in mixes:
        c1 = next(r for r in results if r["mix"] == mix and r["kind"] == "c" and r["qos"] == 1)["msgs_per_s"]
        cc1 = next((r["msgs_per_s"] for r in results
                    if r["mix"] == mix and r["kind"] == "cc" and r["qos"] == 1), None)
        for r in results:
            if r["mix"] == mix:
                r["vs_c_qos1"] = r["msgs_per_s"] / c1
                r["vs_cc_qos1"] = r["msgs_per_s"] / cc1 if cc1 else None
    meta = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "seconds": time.perf_counter() - t_all,
            "mean_payload_bytes": sizes, "uvloop": a.uvloop, "gateway_flags": GW_FLAGS,
            # the gateway's QoS-1 rate over each C ceiling: [C clients at both ends, our publisher -> C sub]
            "headline_ratio": {mix: [next(r[k] for r in results
                                          if r["mix"] == mix and r["kind"] == "gw" and r["qos"] == 1)
                                     for k in ("vs_cc_qos1", "vs_c_qos1")] for mix in mixes}}
    if "small" in mixes:
        meta["targets"] = targets(results, latency)
    if a.json:
        print(json.dumps({"meta": meta, "results": results, "latency": latency, "profile": profiles}, indent=1,
                         default=str))
        return
    report(meta, results, latency, profiles)


def profile_stages_for(msgs: list[tuple[str, bytes]]) -> dict[str, Any]:
    """The same number of messages as a throughput row, each pass on a freshly loaded policy (a cold
    decision memo, like the gateway process's)."""
    from _e2e_profile import profile_stages

    return profile_stages(lambda: load_policy(REPO / "policies"), msgs)


TARGET_RATIO = 0.5  # issue 6: the gateway's QoS-1 rate over the C clients' QoS-1 ceiling, same run
TARGET_P99_MS = 5.0  # issue 6: gateway-added latency p99 at half load


def targets(results: list[dict[str, Any]], latency: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 6's targets for the small mix, judged on this run's own rows (None: not measured)."""
    row = {(r["kind"], r["qos"]): r for r in results if r["mix"] == "small"}
    gw, cc = row[("gw", 1)], row.get(("cc", 1))
    ratio = gw["vs_cc_qos1"]
    bound = cc is not None and publisher_bound(cc)  # then a ratio against the C-C row means nothing
    p99 = latency.get("added_p99_ms") if latency else None
    return {"ratio": ratio, "lost": gw["lost"], "dups": gw["dups"], "ceiling_publisher_bound": bound,
            "ratio_met": None if ratio is None or bound else
            bool(ratio >= TARGET_RATIO and gw["lost"] == 0 and not gw["dups"]),
            "p99_ms": p99, "p99_met": None if p99 is None else bool(p99 <= TARGET_P99_MS)}


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


def report(meta: dict[str, Any], results: list[dict[str, Any]], latency: dict[str, Any] | None,
           profiles: dict[str, Any]) -> None:
    print(f"\nEdgeward end to end vs the broker ceiling — {meta['cpus']} CPUs, Python {meta['python']}, "
          f"{meta['seconds']:.0f}s" + (f" (gateway flags: {' '.join(meta['gateway_flags'])})" if meta["gateway_flags"] else ""))
    for mix, size in meta["mean_payload_bytes"].items():
        rows = []
        for r in (r for r in results if r["mix"] == mix):
            rows.append([r["name"], r["qos"], r["messages"], f"{r['msgs_per_s']:,.0f}", f"{r['mb_per_s']:.1f}",
                         "-" if r["vs_cc_qos1"] is None else f"{r['vs_cc_qos1']:.2f}", f"{r['vs_c_qos1']:.2f}",
                         r["lost"], "-" if r["dups"] is None else r["dups"], r["unacked"],
                         f"{r['cpu_us_per_msg']:.0f}", f"{r['broker_us_per_msg']:.0f}", f"{r['pub_us_per_msg']:.0f}",
                         f"{r['machine_bound_msgs_per_s']:,.0f}",
                         f"{r['rss_mb']:.0f}/{r['peak_rss_mb']:.0f}" if "rss_mb" in r else "-"])
        print(f"\n{mix} mix, mean payload {size:,.0f} B (live: timed from the first publish to all done)")
        print_table(["consumer", "QoS", "msgs", "msg/s", "MB/s", "vs C-C q1", "vs C q1", "lost", "dups",
                     "unacked", "CPU µs/msg", "broker µs/msg", "pub µs/msg", "machine bound", "RSS/peak MB"],
                    rows)
        print(f"(machine bound = {meta['cpus']} CPUs / (consumer + broker + publisher CPU per message): the most "
              "this machine could carry of that row however fast the consumer)")
    for mix, p in profiles.items():
        print(f"\nstage profile, {mix} mix ({p['messages']} msgs in-process, "
              f"{p['deliveries_per_msg']:.2f} deliveries/msg), µs per message:")
        rows = [[k, f"{v:.1f}"] for k, v in p["stages_us"].items()]
        rows += [["= pipeline (untimed, real Pipeline.process + audit + vault)", f"{p['pipeline_us']:.1f}"],
                 ["gateway process CPU per message (QoS-1 row)", f"{p['gateway_cpu_us']:.1f}"],
                 ["=> MQTT adapter + service share", f"{p['mqtt_adapter_us']:.1f}"]]
        print_table(["stage", "µs/msg"], rows)
    if latency:
        L = latency
        load = (f"half load (half of {L['live_max_msgs_per_s']:,.0f} msg/s, the most the gateway carried with its "
                "destination live)" if L.get("live_max_msgs_per_s") else f"{L['of_gateway_rate']:.0%} of the gateway's "
                "QoS-1 row")
        print(f"\nlatency at {load}: {L['rate']:,.0f} msg/s paced, small mix, QoS 1, {L['messages']} msgs "
              f"from {L.get('devices', 0):,} devices; gateway CPU {L['gw_cpu_us_per_msg']:.0f} µs/msg (lost {L['lost']}, dups {L['dups']}, gateway RSS {L['rss_mb']:.0f} MB)")
        print_table(["path", "p50 ms", "p99 ms"], [
            ["publisher -> plain subscriber", f"{L['plain_p50_ms']:.2f}", f"{L['plain_p99_ms']:.2f}"],
            ["publisher -> gateway -> destination", f"{L['through_p50_ms']:.2f}", f"{L['through_p99_ms']:.2f}"],
            ["gateway-added (difference)", f"{L['added_p50_ms']:.2f}", f"{L['added_p99_ms']:.2f}"],
            ["gateway internal (receipt -> last uplink PUBACK)", f"{L['gw_internal_p50_ms']:.2f}",
             f"{L['gw_internal_p99_ms']:.2f}"]])
        tl = L.get("timeline") or []
        if tl:
            over = sum(1 for w in tl if w["p99"] > 5.0)
            print(f"through the gateway, p99 ms per 0.5 s of sending ({over} of {len(tl)} windows above 5 ms): "
                  + " ".join(f"{w['p99']:.0f}" for w in tl))
        if L.get("gc_pauses"):
            print("gateway garbage collections during the paced run (each one pauses the event loop): " + ", ".join(
                f"gen{g} {v['n']}x, longest {v['max_ms']:.1f} ms" for g, v in L["gc_pauses"].items()))
        if L.get("gw_cpu_split_us"):
            n = L["messages"]
            print(f"\nthe paced gateway's CPU, {L['gw_cpu_us_per_msg']:.0f} µs/msg from ready to the last PUBACK "
                  f"({n / (L['gw_reads'] or 1):.1f} messages an ingest read):")
            sp = {k: v / n for k, v in L["gw_cpu_split_us"].items()}
            sock, ingest = sp.pop(SOCKET_READS), sp.pop(INGEST_READS)
            acks = sp.pop(ACKS)
            rows = [[SOCKET_READS, f"{sock:.0f}"], ["  " + INGEST_READS, f"{ingest:.0f}"]]
            rows += [["    " + k, f"{v:.0f}"] for k, v in sp.items()]
            rows += [["    the rest of the read (stats, outboxes, pending acknowledgements)", f"{ingest - sum(sp.values()):.0f}"],
                     ["  packet parsing, uplink PUBACKs", f"{sock - ingest:.0f}"],
                     [ACKS + " (scheduled after the reads)", f"{acks:.0f}"],
                     ["event loop, timers, the benchmark's own polling (the rest)",
                      f"{L['gw_cpu_us_per_msg'] - sock - acks:.0f}"]]
            print_table(["part", "µs/msg"], rows)
    print("\nheadline: Edgeward / C-client QoS-1 ceiling = "
          + ", ".join(f"{m} " + (f"{cc:.2f} (mosquitto_pub -> mosquitto_sub), " if cc is not None else "")
                      + f"{c:.2f} (our publisher -> mosquitto_sub)"
                      for m, (cc, c) in meta["headline_ratio"].items()))
    t = meta.get("targets")
    if t is not None:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        p99 = "-" if t["p99_ms"] is None else f"{t['p99_ms']:.2f} ms"
        print(f"issue 6 targets, small mix: gateway >= {TARGET_RATIO:.2f} of the C-C QoS-1 ceiling with 0 "
              f"lost: {ratio}, lost {t['lost']}, dups {t['dups']}: {_verdict(t['ratio_met'])}; "
              f"gateway-added p99 <= {TARGET_P99_MS:.0f} ms at half load: {p99}: {_verdict(t['p99_met'])}")
        if t["ceiling_publisher_bound"]:
            print("  the C-C row is publisher-bound (mosquitto_pub still sending when the subscriber "
                  "finished), so it is not the broker's ceiling: at --quick the publishers' start-up "
                  "dominates, and with far more than the default 20000 --messages each one's cost a "
                  "message grows")


if __name__ == "__main__":
    main()
