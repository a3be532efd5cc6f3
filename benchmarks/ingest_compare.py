"""Choose the gateway's MQTT ingest path by measurement.

    python benchmarks/ingest_compare.py [--messages N] [--json] [--only NAME,...]

Every candidate does the same pass-through per message: receive at QoS 1, msgpack unpack, AES-256-GCM
encrypt the re-packed map (random 12-byte nonce, one key), pack an envelope, republish at QoS 1 to
edgeward/out/x, wait for the republish's PUBACK, and only then PUBACK the ingest message (at-least-once:
a crash between the two never loses a message; the broker redelivers).

Method: PRE-LOAD, not concurrent publish. For each candidate a fresh private Mosquitto is started, the
candidate's client id gets a persistent session (clean_start=False, session expiry 3600 s, SUBSCRIBE QoS 1,
DISCONNECT), then N messages are published at QoS 1 by a pre-encoded mqtt5 publisher and PUBACKed by the
broker (so they are queued for the offline session). Only then is the consumer started, in its own process,
and timed from connect until it has every message and every republish PUBACK. With a concurrent publisher
the 2 cores would be shared by publisher, broker and consumer, and the consumer's rate would be capped by
the publisher's; pre-loading leaves just broker + consumer running, which isolates the consumer's cost
(its CPU is read by the consumer process itself, or via wait4 for the C client).

Correctness, per candidate: the consumer counts received / unique seq / duplicates; a checker session
(primed like the consumer) collects the republished messages while the candidate runs and is drained
afterwards: every envelope is decrypted and its seq counted; then the consumer's session is reconnected to
check that no ingest message is still un-PUBACKed (would be redelivered). Lost = N - unique received.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    KEY, OUT_TOPIC, MiniClient, log, make_message, make_work, open_envelope, print_table, proc_cpu_seconds,
    start_broker,
)

HOST = "127.0.0.1"
EXPIRY = 3600
IDLE_GIVE_UP = 5.0  # a consumer with no progress for this long stops and reports what it lost

# name -> (kind, description); "sub" rows have no work and no republish (ceilings)
CANDIDATES: dict[str, tuple[str, str]] = {
    "mosquitto_sub": ("c", "C client, PUBACK only (ceiling)"),
    "mqtt5-ackonly": ("sub", "asyncio Protocol + mqtt5, PUBACK only"),
    "mqtt5-ackonly-uvloop": ("sub", "same on uvloop"),
    "mqtt5-proto": ("work", "asyncio Protocol + mqtt5 codec"),
    "mqtt5-proto-uvloop": ("work", "same on uvloop"),
    "paho-callback": ("work", "paho 2 loop thread, work in on_message"),
    "paho-handoff": ("work", "paho 2 loop thread, batched hand-off to worker thread"),
    "gmqtt": ("work", "gmqtt, async on_message"),
    "aiomqtt": ("work", "aiomqtt 2.5, task per message"),
    "aiomqtt-uvloop": ("work", "same on uvloop"),
}


# ----------------------------------------------------------------------------------------------- consumer side
class Tally:
    """Counts inside the consumer. ``done(seq)`` after the ingest PUBACK was issued; fires ``on_finish`` once
    every seq 0..N-1 has been seen."""

    def __init__(self, n: int, on_finish) -> None:
        self.n, self.on_finish = n, on_finish
        self.seen = bytearray(n)
        self.received = self.unique = self.dups = 0

    def done(self, seq: int) -> None:
        if self.seen[seq]:
            self.dups += 1
            return
        self.seen[seq] = 1
        self.unique += 1
        if self.unique == self.n:
            self.on_finish()


async def _until_done(fut: asyncio.Future, tally: Tally) -> None:
    """Wait for ``fut``; give up when the tally makes no progress for IDLE_GIVE_UP seconds."""
    last, t_last = -1, time.monotonic()
    while not fut.done():
        await asyncio.wait([fut], timeout=0.25)
        progress = tally.received + tally.unique
        if progress != last:
            last, t_last = progress, time.monotonic()
        elif time.monotonic() - t_last > IDLE_GIVE_UP:
            return


def _loop_runner(uv: bool) -> asyncio.Runner:
    if uv:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


# --- 4/5: mqtt5 codec on a bare asyncio.Protocol ---------------------------------------------------------------
def consume_mqtt5(a, uv: bool, ack_only: bool) -> Tally:
    import mqtt5
    from mqtt5 import ConnAckPacket, PingReqPacket, PingRespPacket, PubAckPacket, PublishPacket, QoS, read

    work = make_work()
    qos1 = QoS.AT_LEAST_ONCE

    class Ingest(asyncio.Protocol):
        def __init__(self, fut: asyncio.Future) -> None:
            self.fut, self.buf = fut, bytearray()
            self.pending: dict[int, int] = {}  # outgoing packet id -> ingest packet id (its PUBACK waits)
            self.backlog: collections.deque[tuple[int, bytes]] = collections.deque()  # over the window
            self.next_pid, self.window, self.pinged = 1, 65535, False
            self.tally = Tally(a.messages, lambda: None)

        def connection_made(self, transport) -> None:
            self.t = transport
            transport.write(mqtt5.ConnectPacket(a.client_id, clean_start=False, keep_alive=60,
                                                session_expiry_interval=EXPIRY).write())

        def _republish(self, in_pid: int, env: bytes, out: list) -> None:
            if len(self.pending) >= self.window:  # honour the broker's receive_max
                self.backlog.append((in_pid, env))
                return
            pid = self.next_pid
            while pid in self.pending:
                pid = pid % 65535 + 1
            self.next_pid = pid % 65535 + 1
            self.pending[pid] = in_pid
            out.append(PublishPacket(OUT_TOPIC, env, qos=qos1, packet_id=pid).write())

        def data_received(self, data: bytes) -> None:
            buf, out, off, tally = self.buf, [], 0, self.tally
            buf += data
            end = len(buf)
            with memoryview(buf) as mv:
                while off < end:
                    try:
                        pkt, n = read(mv[off:])
                    except IndexError:  # 'Not enough bytes': the rest arrives in a later data_received
                        break
                    off += n
                    tp = type(pkt)
                    if tp is PublishPacket:
                        tally.received += 1
                        if ack_only:  # no work: read seq at its fixed offset (map header, 'seq' key, uint)
                            out.append(PubAckPacket(pkt.packet_id).write())
                            p = pkt.payload
                            b = p[5]
                            tally.done(b if b < 0x80 else int.from_bytes(p[6:6 + (1, 2, 4)[b - 0xcc]], "big"))
                            continue
                        seq, env = work(pkt.payload)
                        tally.done(seq)
                        self._republish(pkt.packet_id, env, out)
                    elif tp is PubAckPacket:  # our republish is safe: now PUBACK the ingest message
                        out.append(PubAckPacket(self.pending.pop(pkt.packet_id)).write())
                        if self.backlog:
                            self._republish(*self.backlog.popleft(), out)
                    elif tp is PingRespPacket and self.pinged and not self.fut.done():
                        self.fut.set_result(None)
                    elif tp is ConnAckPacket:
                        if pkt.reason_code != mqtt5.ConnAckReasonCode.SUCCESS or not pkt.session_present:
                            raise RuntimeError(f"bad CONNACK {pkt.reason_code!r} session={pkt.session_present}")
                        self.window = pkt.receive_max
            del buf[:off]
            if out:
                self.t.write(b"".join(out))  # ONE write per data_received: PUBACKs + republishes batched
            if tally.unique == a.messages and not self.pending and not self.backlog and not self.pinged:
                # Barrier: Mosquitto reads our PUBACKs well after it has sent the last message (measured: at
                # 50k msgs the last PUBLISH arrives at 0.29 s, the broker has processed all PUBACKs at 0.49 s;
                # a DISCONNECT in between leaves most messages un-acked and redelivered). It handles a
                # connection's packets in order, so the PINGRESP marks "every PUBACK processed": stop there.
                self.pinged = True
                self.t.write(PingReqPacket().write())

        def connection_lost(self, exc) -> None:
            if not self.fut.done():
                self.fut.set_result(None)

    async def main() -> Tally:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        proto = Ingest(fut)
        transport, _ = await loop.create_connection(lambda: proto, HOST, a.port)
        await _until_done(fut, proto.tally)
        a.t_end, a.cpu_end = time.perf_counter(), time.process_time()
        transport.write(mqtt5.DisconnectPacket().write())
        transport.close()
        await asyncio.sleep(0.05)
        return proto.tally

    with _loop_runner(uv) as r:
        a.t0, a.cpu0 = time.perf_counter(), time.process_time()
        return r.run(main())


# --- 2: paho-mqtt 2 directly -------------------------------------------------------------------------------
def consume_paho(a, handoff: bool) -> Tally:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    work = make_work()
    finished = threading.Event()
    tally = Tally(a.messages, finished.set)
    lock = threading.Lock()
    pending: dict[int, tuple[int, int]] = {}  # republish mid -> (ingest mid, seq)
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id, protocol=mqtt.MQTTv5,
                    manual_ack=True)  # ingest PUBACK only after the republish is PUBACKed
    c.max_inflight_messages_set(1000)  # default 20 would throttle the republish window

    def process(in_mid: int, payload: bytes) -> None:
        seq, env = work(payload)
        with lock:  # on_publish may run in the loop thread before publish() returns
            pending[c.publish(OUT_TOPIC, env, qos=1).mid] = (in_mid, seq)

    def on_publish(client, userdata, mid, rc, props) -> None:
        with lock:
            in_mid, seq = pending.pop(mid)
        c.ack(in_mid, 1)
        tally.done(seq)

    q: collections.deque = collections.deque()
    wake = threading.Event()

    def on_message(client, userdata, msg) -> None:
        tally.received += 1
        if handoff:
            q.append((msg.mid, msg.payload))
            wake.set()
        else:
            process(msg.mid, msg.payload)

    def worker() -> None:
        while not finished.is_set():
            wake.wait(0.1)
            wake.clear()
            while q:
                process(*q.popleft())

    c.on_message, c.on_publish = on_message, on_publish
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = EXPIRY
    a.t0, a.cpu0 = time.perf_counter(), time.process_time()
    if handoff:
        threading.Thread(target=worker, daemon=True).start()
    c.connect(HOST, a.port, keepalive=60, clean_start=False, properties=props)
    c.loop_start()
    last, t_last = -1, time.monotonic()
    while not finished.wait(0.25):
        if tally.received + tally.unique != last:
            last, t_last = tally.received + tally.unique, time.monotonic()
        elif time.monotonic() - t_last > IDLE_GIVE_UP:
            break
    a.t_end, a.cpu_end = time.perf_counter(), time.process_time()
    time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    return tally


# --- 3: gmqtt ------------------------------------------------------------------------------------------------
def consume_gmqtt(a) -> Tally:
    import gmqtt

    work = make_work()

    async def main() -> Tally:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        tally = Tally(a.messages, lambda: fut.done() or fut.set_result(None))
        # optimistic_acknowledgement=False: PUBACK is sent when the async on_message returns
        c = gmqtt.Client(a.client_id, clean_session=False, optimistic_acknowledgement=False,
                         session_expiry_interval=EXPIRY)
        # gmqtt has no outgoing queue: its packet-id pool is the broker's receive_max (1000) minus one and
        # publish() raises OverflowError when it is exhausted (that message is then never PUBACKed: measured
        # as lost when this semaphore is removed). Holding ingest PUBACKs puts up to 1000 republishes in
        # flight, so the application must bound them itself.
        window = asyncio.Semaphore(900)
        waiters: dict[int, asyncio.Future] = {}
        # gmqtt's publish() is fire-and-forget; hook its PUBACK handling to wait for the republish's PUBACK
        h = c._package_handler
        orig_remove = h._remove_message_callback

        def on_puback(mid: int) -> None:
            orig_remove(mid)
            w = waiters.pop(mid, None)
            if w is not None:
                w.set_result(None)

        h._remove_message_callback = on_puback

        async def on_message(client, topic, payload, qos, properties) -> int:
            tally.received += 1
            seq, env = work(payload)
            async with window:
                mid, package = c._connection.publish(gmqtt.Message(OUT_TOPIC, env, qos=1))  # c.publish + mid
                c._persistent_storage.push_message(mid, package)
                w = waiters[mid] = loop.create_future()
                await w
            tally.done(seq)  # PUBACK of the ingest message is sent right after this returns
            return 0

        c.on_message = on_message
        await c.connect(HOST, a.port, keepalive=60)
        await _until_done(fut, tally)
        a.t_end, a.cpu_end = time.perf_counter(), time.process_time()
        await asyncio.sleep(0.05)
        await c.disconnect()
        return tally

    with asyncio.Runner() as r:
        a.t0, a.cpu0 = time.perf_counter(), time.process_time()
        return r.run(main())


# --- 1: aiomqtt ----------------------------------------------------------------------------------------------
def consume_aiomqtt(a, uv: bool) -> Tally:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    work = make_work()

    async def main() -> Tally:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        tally = Tally(a.messages, lambda: fut.done() or fut.set_result(None))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = EXPIRY
        c = aiomqtt.Client(HOST, a.port, identifier=a.client_id, protocol=aiomqtt.ProtocolVersion.V5,
                           clean_start=False, properties=props, max_inflight_messages=1000)
        # aiomqtt 2.5 has no manual-ack API; its paho client does. Without this the ingest PUBACK would go out
        # on receipt, before the work and the republish (weaker than the other candidates' semantics).
        c._client.manual_ack_set(True)

        async def handle(m) -> None:
            seq, env = work(m.payload)
            await c.publish(OUT_TOPIC, env, qos=1)  # returns when the PUBACK arrived
            c._client.ack(m.mid, 1)
            tally.done(seq)

        async def reader() -> None:
            tasks = set()
            async for m in c.messages:
                tally.received += 1
                t = asyncio.create_task(handle(m))  # concurrent: don't serialise on the PUBACK round trip
                tasks.add(t)
                t.add_done_callback(tasks.discard)

        async with c:
            rt = asyncio.create_task(reader())
            await _until_done(fut, tally)
            a.t_end, a.cpu_end = time.perf_counter(), time.process_time()
            await asyncio.sleep(0.05)
            rt.cancel()
        return tally

    with _loop_runner(uv) as r:
        a.t0, a.cpu0 = time.perf_counter(), time.process_time()
        return r.run(main())


def run_worker(a) -> None:
    name = a.worker
    if name.startswith("mqtt5-"):
        t = consume_mqtt5(a, uv=name.endswith("uvloop"), ack_only="ackonly" in name)
    elif name.startswith("paho-"):
        t = consume_paho(a, handoff=name == "paho-handoff")
    elif name == "gmqtt":
        t = consume_gmqtt(a)
    elif name.startswith("aiomqtt"):
        t = consume_aiomqtt(a, uv=name.endswith("uvloop"))
    else:
        raise SystemExit(f"unknown worker {name}")
    print(json.dumps({"received": t.received, "unique": t.unique, "dups": t.dups,
                      "seconds": a.t_end - a.t0, "cpu": a.cpu_end - a.cpu0}), flush=True)


# ------------------------------------------------------------------------------------------------ harness side
def run_c_client(port: int, client_id: str, topic: str, n: int, workdir: Path) -> dict:
    """mosquitto_sub -q 1 -C N draining the queue; CPU from its own rusage (wait4)."""
    out = open(workdir / "sub.out", "wb")
    t0 = time.perf_counter()
    p = subprocess.Popen(["mosquitto_sub", "-h", HOST, "-p", str(port), "-V", "5", "-q", "1", "-c",
                          "-x", str(EXPIRY), "-i", client_id, "-t", topic, "-C", str(n), "-W", "120",
                          "-F", "%m"], stdout=out, stderr=subprocess.DEVNULL)
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.001)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out.close()
    got = len((workdir / "sub.out").read_bytes().split())
    return {"received": got, "unique": got, "dups": None, "seconds": dt, "cpu": ru.ru_utime + ru.ru_stime}


def work_only(n: int) -> float:
    """µs per message for the work alone (unpack + encrypt + pack), in this process."""
    work, msgs = make_work(), [make_message(i) for i in range(min(n, 20000))]
    t0 = time.process_time()
    for m in msgs:
        work(m)
    return (time.process_time() - t0) / len(msgs) * 1e6


def run_candidate(name: str, n: int, payloads: list[bytes]) -> dict:
    kind, desc = CANDIDATES[name]
    cid, chk_id, topic = f"gw-{name}", f"chk-{name}", f"edgeward/in/{name}"
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    with tempfile.TemporaryDirectory(prefix="ingest-") as td:
        broker = start_broker(Path(td))
        try:
            # persistent sessions: the consumer's (ingest topic) and the checker's (republish topic)
            for client_id, t in ((cid, topic), (chk_id, OUT_TOPIC)):
                s = MiniClient(broker.port, client_id, clean_start=True, expiry=EXPIRY)
                s.subscribe(t)
                s.close()
            pub = MiniClient(broker.port, f"pre-{name}", clean_start=True, expiry=0)
            t0 = time.perf_counter()
            pub.publish_all(topic, payloads)
            pub.close()
            log(f"[{name}] pre-loaded {n} msgs in {time.perf_counter() - t0:.1f}s; draining ...")
            b_cpu0 = proc_cpu_seconds(broker.proc.pid)
            if kind == "c":
                r = run_c_client(broker.port, cid, topic, n, Path(td))
            else:
                cmd = [sys.executable, __file__, "--worker", name, "--port", str(broker.port),
                       "--client-id", cid, "--messages", str(n)]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"{name} worker failed:\n{p.stderr[-3000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
            b_cpu = proc_cpu_seconds(broker.proc.pid) - b_cpu0
            # residual: ingest messages the consumer never PUBACKed are redelivered to its session now
            s = MiniClient(broker.port, cid, clean_start=False, expiry=EXPIRY)
            r["unacked"] = s.drain(0.5)
            s.close(expiry=0)
            # checker: every republished envelope decrypts, and carries each seq exactly once
            r["republished"] = r["out_unique"] = None
            if kind == "work":
                aes, seen = AESGCM(KEY), bytearray(n)
                s = MiniClient(broker.port, chk_id, clean_start=False, expiry=EXPIRY)
                r["republished"] = s.drain(1.0, lambda env: seen.__setitem__(open_envelope(env, aes), 1))
                r["out_unique"] = sum(seen)
                s.close(expiry=0)
        finally:
            broker.stop()
    r.update(name=name, desc=desc, kind=kind, broker_cpu=b_cpu, expected=n)
    r["lost"] = n - r["unique"]
    r["msgs_per_s"] = r["received"] / r["seconds"] if r["seconds"] else 0.0
    r["cpu_us_per_msg"] = r["cpu"] / max(r["received"], 1) * 1e6
    r["broker_us_per_msg"] = b_cpu / max(r["received"], 1) * 1e6
    log(f"[{name}] {r['msgs_per_s']:,.0f} msg/s, {r['cpu_us_per_msg']:.0f} µs CPU/msg, lost {r['lost']}, "
        f"dups {r['dups']}, unacked {r['unacked']}, republished {r['republished']}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50000, help="messages per candidate (default 50000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--only", help="comma-separated candidate names (default: all)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--client-id", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run_worker(a)

    n = a.messages
    names = a.only.split(",") if a.only else list(CANDIDATES)
    log(f"building {n} x 300-byte MessagePack messages ...")
    payloads = [make_message(i) for i in range(n)]
    t_all = time.perf_counter()
    results = [run_candidate(name, n, payloads) for name in names]
    w_us = work_only(n)
    ceiling = next((r["msgs_per_s"] for r in results if r["name"] == "mosquitto_sub"), None)
    for r in results:
        r["vs_c_ceiling"] = r["msgs_per_s"] / ceiling if ceiling else None
    meta = {"messages": n, "payload_bytes": 300, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "work_only_us_per_msg": w_us, "total_seconds": time.perf_counter() - t_all}
    if a.json:
        print(json.dumps({"meta": meta, "results": results}, indent=1))
        return
    rows = [[r["name"], f"{r['msgs_per_s']:,.0f}", f"{r['cpu_us_per_msg']:.0f}", f"{r['broker_us_per_msg']:.0f}",
             r["lost"], "-" if r["dups"] is None else r["dups"], r["unacked"],
             "-" if r["republished"] is None else f"{r['republished']}/{r['out_unique']}",
             f"{r['vs_c_ceiling']:.2f}" if r["vs_c_ceiling"] else "-", r["desc"]] for r in results]
    rows.append(["work only", f"{1e6 / w_us:,.0f}", f"{w_us:.1f}", "-", "-", "-", "-", "-", "-",
                 "unpack+AES-GCM+pack in-process, no MQTT"])
    print(f"\nIngest pass-through, {n} x 300 B QoS-1 messages pre-loaded per candidate, "
          f"{os.cpu_count()} CPUs, Python {meta['python']}")
    print_table(["candidate", "msg/s", "CPU µs/msg", "broker µs/msg", "lost", "dups", "unacked",
                 "out recv/uniq", "vs C", "what"], rows)


if __name__ == "__main__":
    main()
