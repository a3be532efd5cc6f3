"""The processes of benchmarks/e2e.py other than the harness: each runs alone so its CPU is its own.

    python benchmarks/_e2e_roles.py gateway --port P --state DIR [--expect N --qos Q] [--uvloop]
    python benchmarks/_e2e_roles.py acksub  --port P --client-id ID [--expect N | --record FILE]
    python benchmarks/_e2e_roles.py pub     --port P --messages FILE --rate R --out FILE [--conns K --qos Q]

Every role prints JSON lines on stdout ({"event": ...}); the harness reads them. SIGTERM ends a role
that runs until told (the gateway, a recording subscriber). Benchmark code: compact, not product code.
Also imported by the harness for the bulk publisher (``publish``) and the message builder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import mqtt5

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.crypto.envelope import BUNDLE_PREFIX

INGEST_FILTER = "site/AMS-T1/dev/#"
EXPIRY = 3600


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def rss_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0])
    return out


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _runner(uv: bool) -> asyncio.Runner:
    if uv:
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


# ------------------------------------------------------------------------------------------ gateway
def _gc_pause_recorder() -> dict[int, list[float]]:
    """The duration of every garbage collection, per generation, in ms (a pause of the event loop)."""
    import gc

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(round((time.perf_counter() - started[0]) * 1e3, 3))

    gc.callbacks.append(cb)
    return pauses


def role_gateway(a: argparse.Namespace) -> None:
    """The real gateway, as ``edgeward run`` builds it; reports when ``expect`` messages are done."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gateway.policy import load_policy
    from gateway.runtime.service import Gateway, GatewayConfig

    policy = load_policy(REPO / "policies")
    if a.bundle:  # every MQTT destination's bundle size (1: one envelope per message, the wire before bundles)
        import dataclasses
        from types import MappingProxyType

        policy.destinations = MappingProxyType({  # type: ignore[misc]
            n: dataclasses.replace(d, bundle=a.bundle) if d.transport == "mqtt" else d
            for n, d in policy.destinations.items()})

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # retime=False unless --retime: the policy re-times uplinks into 5 s batches on purpose; the
        # benchmark measures the gateway's own cost and latency (BENCHMARKS.md §4 states it).
        # A signing key, as a site has: the audit log is checkpointed every 10,000 records (signed, fsynced).
        gw = Gateway(GatewayConfig(state_dir=Path(a.state), port=a.port, retime=a.retime,
                                   audit_signing_key=Ed25519PrivateKey.generate()), policy)
        socket_reads = _time_socket_reads() if a.cpu_split else None  # before the connections bind it
        t0, c0 = time.perf_counter(), cpu_s()
        async with gw:
            gc_pauses = _gc_pause_recorder()  # from here: start-up's own collection is not a pause in service
            split = _cpu_split(gw, socket_reads) if socket_reads is not None else None
            c_ready = cpu_s()
            emit(event="ready", pid=os.getpid())
            serve = asyncio.create_task(gw.serve(stop), name="bench-serve")
            if a.expect:
                s = gw.stats
                last_n, last_t = -1, time.perf_counter()
                while not stop.is_set():
                    if s.received != last_n:
                        last_n, last_t = s.received, time.perf_counter()
                    # QoS 0 is at-most-once: what the broker dropped never comes; stop after 3 s of silence.
                    quiet = a.qos == 0 and time.perf_counter() - last_t > 3 and not gw.uplink.pending_out
                    if quiet or (s.received >= a.expect and (a.qos == 0 or s.acked >= a.expect)
                                 and not gw.uplink.pending_out):
                        t1, c1 = time.perf_counter(), cpu_s()
                        emit(event="done", t=time.monotonic(), seconds=t1 - t0, cpu=c1 - c0, cpu_serving=c1 - c_ready,
                             cpu_split_us=split and {**{k: v / 1e3 for k, v in split.items() if k != "reads"},
                                                    "socket reads":
                                                    socket_reads["ns"] / 1e3},
                             reads=split and split["reads"], received=s.received,
                             **rss_kb())
                        break
                    await asyncio.sleep(0.005)
                    if time.perf_counter() - t0 > a.stall_report:
                        a.stall_report += 5
                        print(f"gateway stalled? received {s.received} acked {s.acked} pending_out "
                              f"{gw.uplink.pending_out} rejected {dict(s.rejected)}", file=sys.stderr, flush=True)
            await stop.wait()
            await gw.drain(5)
            stop.set()
            await serve
        lat = sorted(gw.stats.latency_s)
        pct = {f"p{p}": lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3 for p in (50, 99)} if lat else {}
        emit(event="final", stats=gw.stats.to_json(), cpu_total=cpu_s() - c0, latency_ms=pct,
             latency_n=len(lat), gc_pauses_ms=gc_pauses, **rss_kb())

    with _runner(a.uvloop) as r:
        r.run(main())


# What the live gateway spends its CPU on, per part (thread CPU time around each call; about 0.3 µs of
# timer per call, so the parts are slightly high). The in-process stage profile cannot show this: per
# ingest read the gateway commits its files and writes its uplinks and acknowledgements, which at a
# paced load is a few messages a read.
_SPLIT = (("pipeline", "pipeline", "process"), ("audit append", "", "_record"),
          ("group commit (audit, vault, done, spool files)", "", "_commit"),
          ("uplink publish + write", "", "_flush_out"), ("done log + ingest PUBACKs", "", "_flush_acks"))


def _time_socket_reads() -> dict[str, int]:
    """Thread CPU in every MQTT socket read (ingest and uplinks: parsing, handling, the writes they
    cause); patched into the protocol class before any connection exists (the loop binds the method)."""
    from gateway.runtime import mqtt

    acc = {"ns": 0}
    tt = time.thread_time_ns
    inner = mqtt._Protocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        t = tt()
        try:
            inner(self, data)
        finally:
            acc["ns"] += tt() - t

    mqtt._Protocol.data_received = data_received  # type: ignore[method-assign]
    return acc


class _Timed:
    """Stands in for an object whose method ``attr`` is timed (mypyc's classes have read-only methods):
    that one method is the timed wrapper, every other attribute is the object's own, read and written."""

    def __init__(self, inner: Any, attr: str, wrapper: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, attr, wrapper)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


def _cpu_split(gw: Any, socket_reads: dict[str, int]) -> dict[str, int]:
    acc: dict[str, int] = dict.fromkeys([name for name, _, _ in _SPLIT] + ["ingest reads"], 0)
    acc["reads"] = 0
    tt = time.thread_time_ns

    def timed(name: str, f: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t = tt()
            try:
                return f(*args, **kw)
            finally:
                acc[name] += tt() - t
        return wrapper

    for name, owner, attr in _SPLIT:
        if owner:  # a compiled object's methods cannot be replaced: time it through a stand-in
            inner = getattr(gw, owner)
            setattr(gw, owner, _Timed(inner, attr, timed(name, getattr(inner, attr))))
        else:
            setattr(gw, attr, timed(name, getattr(gw, attr)))
    on_messages = timed("ingest reads", gw.ingest._on_messages)

    def counted(batch: Any) -> None:
        acc["reads"] += 1
        on_messages(batch)

    gw.ingest._on_messages = counted
    return acc


# ------------------------------------------------------------------------------------------ ack-only subscriber
def _seq_of(payload: bytes) -> int | str:
    # device_sim encodes {"seq": ..., ...} first: map header, fixstr "seq", then the uint
    if payload[1:5] == b"\xa3seq":
        b = payload[5]
        if b < 0x80:
            return b
        return int.from_bytes(payload[6:6 + (1, 2, 4, 8)[b - 0xCC]], "big")
    import msgpack

    m = msgpack.unpackb(payload)
    if "h" in m:  # an envelope: the header's third item is the sequence, hidden (bytes) for MQTT destinations
        q = msgpack.unpackb(m["h"])[2]
        return q.hex() if isinstance(q, bytes) else int(q)
    return int(m["seq"])


def _items_of(topic: str, payload: bytes) -> list[tuple[str, int | str]]:
    """(topic, sequence) of each message a PUBLISH carries: one, or each envelope of a gateway bundle,
    under the topic it would have had alone."""
    if not payload.startswith(BUNDLE_PREFIX):
        return [(topic, _seq_of(payload))]
    import msgpack

    out: list[tuple[str, int | str]] = []
    for env in msgpack.unpackb(payload)["bundle"]:
        dev, stream, q = msgpack.unpackb(msgpack.unpackb(env)["h"])[:3]
        out.append((f"{topic}/{dev}/{stream}", q.hex() if isinstance(q, bytes) else int(q)))
    return out


def role_acksub(a: argparse.Namespace) -> None:
    """The fastest Python receive path: asyncio Protocol + mqtt5 reader that only PUBACKs.

    ``--expect N``: drain a pre-loaded session, stop after N messages + a PINGREQ barrier (the broker has
    then processed every PUBACK). ``--record FILE``: subscribe, note each message's receipt time, and
    write [[device, seq, t_monotonic], ...] on SIGTERM."""
    from mqtt5 import ConnAckPacket, PingReqPacket, PingRespPacket, PubAckPacket, PublishPacket, read

    record = a.record is not None
    times: list[tuple[str, int, float]] = []
    seen: set[tuple[str, int]] = set()

    class Sub(asyncio.Protocol):
        def __init__(self, fut: asyncio.Future[None], connack: asyncio.Future[None]) -> None:
            self.fut, self.connack, self.buf = fut, connack, bytearray()
            self.received = self.dups = 0
            self.pinged = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            transport.write(mqtt5.ConnectPacket(a.client_id, clean_start=record, keep_alive=60,  # type: ignore[attr-defined]
                                                session_expiry_interval=EXPIRY).write())

        def data_received(self, data: bytes) -> None:
            now = time.monotonic()
            buf, out, off = self.buf, [], 0
            buf += data
            end = len(buf)
            with memoryview(buf) as mv:
                while off < end:
                    try:
                        pkt, n = read(mv[off:])
                    except IndexError:
                        break
                    off += n
                    tp = type(pkt)
                    if tp is PublishPacket:
                        if pkt.packet_id is not None:
                            out.append(PubAckPacket(pkt.packet_id).write())
                        for topic, seq in _items_of(pkt.topic, pkt.payload):
                            self.received += 1
                            key = (topic if record else topic.split("/", 4)[3], seq)
                            if key in seen:
                                self.dups += 1
                            else:
                                seen.add(key)
                            if record:
                                times.append((key[0], key[1], now))
                    elif tp is PingRespPacket and self.pinged and not self.fut.done():
                        self.fut.set_result(None)
                    elif tp is ConnAckPacket:
                        if pkt.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                            raise RuntimeError(f"CONNACK {pkt.reason_code!r}")
                        if not self.connack.done():
                            self.connack.set_result(None)
                    elif type(pkt) is mqtt5.SubAckPacket and not self.connack.done():
                        pass
            del buf[:off]
            if a.expect and len(seen) >= a.expect and not self.pinged:
                self.pinged = True
                out.append(PingReqPacket().write())
            if out:
                self.t.write(b"".join(out))  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.fut.done():
                self.fut.set_result(None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        connack: asyncio.Future[None] = loop.create_future()
        t0, c0 = time.perf_counter(), cpu_s()
        transport, proto = await loop.create_connection(lambda: Sub(fut, connack), "127.0.0.1", a.port)
        await connack
        if not record:
            emit(event="ready")
        else:
            transport.write(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(a.filter, max_qos=mqtt5.QoS(1))]).write())
            loop.add_signal_handler(signal.SIGTERM, lambda: fut.done() or fut.set_result(None))
            await asyncio.sleep(0.2)  # SUBACK
            emit(event="ready")
        await fut
        t1, c1 = time.perf_counter(), cpu_s()
        t_end = time.monotonic()
        transport.write(mqtt5.DisconnectPacket().write())
        transport.close()
        await asyncio.sleep(0.02)
        if record:
            Path(a.record).write_text(json.dumps(times))
        emit(event="final", received=proto.received, unique=len(seen), dups=proto.dups, seconds=t1 - t0,
             cpu=c1 - c0, t=t_end)

    with _runner(a.uvloop) as r:
        r.run(main())


# ------------------------------------------------------------------------------------------ publisher
class _PubConn(asyncio.Protocol):
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.buf = bytearray()
        self.inflight = 0
        self.max_inflight = 0
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future[None] = loop.create_future()
        self.pong: asyncio.Future[None] | None = None
        self.room = asyncio.Event()
        self.room.set()
        self.writable = asyncio.Event()
        self.writable.set()
        self.window = 500

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.t.write(mqtt5.ConnectPacket(self.client_id, clean_start=True, keep_alive=60).write())

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        off, end = 0, len(buf)
        with memoryview(buf) as mv:
            while off < end:
                try:
                    pkt, n = mqtt5.read(mv[off:])
                except IndexError:
                    break
                off += n
                tp = type(pkt)
                if tp is mqtt5.PubAckPacket:
                    self.inflight -= 1
                    if self.inflight <= self.window // 2:
                        self.room.set()
                elif tp is mqtt5.PingRespPacket and self.pong is not None and not self.pong.done():
                    self.pong.set_result(None)
                elif tp is mqtt5.ConnAckPacket and not self.connack.done():
                    if pkt.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
                        self.connack.set_exception(RuntimeError(f"publisher refused: {pkt.reason_code!r}"))
                    else:
                        self.window = min(500, max(1, pkt.receive_max // 2))
                        self.connack.set_result(None)
        del buf[:off]

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def finish(self) -> None:
        """Wait until the broker has processed everything sent (PUBACKs in; PINGRESP as a barrier)."""
        self.pong = asyncio.get_running_loop().create_future()
        self.t.write(mqtt5.PingReqPacket().write())
        await asyncio.wait_for(self.pong, 120)
        while self.inflight > 0:
            self.room.clear()
            await asyncio.wait_for(self.room.wait(), 120)

    def close(self) -> None:
        self.t.write(mqtt5.DisconnectPacket().write())
        self.t.close()


def encode_for_conns(msgs: list[tuple[str, bytes]], conns: int, qos: int) -> list[tuple[int, bytes]]:
    """(connection, PUBLISH packet) per message. A device always uses the same connection (its order is
    kept); packet ids run per connection and never collide in flight (window << 65535, in-order acks)."""
    counters = [0] * conns
    out = []
    for topic, payload in msgs:
        c = hash(topic.split("/")[3]) % conns
        if qos:
            counters[c] += 1
            pkt = mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE,
                                      packet_id=(counters[c] - 1) % 65535 + 1).write()
        else:
            pkt = mqtt5.PublishPacket(topic, payload).write()
        out.append((c, pkt))
    return out


async def publish(port: int, packets: list[tuple[int, bytes]], *, conns: int, qos: int, rate: float | None = None,
                  prefix: str = "pub") -> dict[str, object]:
    """Send pre-encoded packets over ``conns`` connections: in bulk (rate None; QoS-1 window per
    connection) or paced at ``rate`` msg/s (each due batch in one write per connection). Returns the
    send time (time.monotonic) of every packet, in order, and when all were processed by the broker."""
    loop = asyncio.get_running_loop()
    protos = []
    for k in range(conns):
        _, p = await loop.create_connection(lambda k=k: _PubConn(f"{prefix}-{k}"), "127.0.0.1", port)
        protos.append(p)
    await asyncio.gather(*(p.connack for p in protos))
    sent = [0.0] * len(packets)
    t_start = time.monotonic()
    if rate is None:
        by_conn: list[list[bytes]] = [[] for _ in range(conns)]
        for c, pkt in packets:
            by_conn[c].append(pkt)

        async def pump(p: _PubConn, pkts: list[bytes]) -> None:
            i = 0
            while i < len(pkts):
                await p.writable.wait()
                if qos:
                    while p.inflight >= p.window:
                        p.room.clear()
                        await p.room.wait()
                    k = min(len(pkts) - i, p.window - p.inflight)
                    p.inflight += k
                else:
                    k = min(len(pkts) - i, 500)
                p.t.write(b"".join(pkts[i:i + k]))
                i += k
            await p.finish()

        await asyncio.gather(*(pump(p, b) for p, b in zip(protos, by_conn)))
    else:
        t0 = time.monotonic() + 0.05
        i, n = 0, len(packets)
        while i < n:
            now = time.monotonic()
            j = min(n, max(i + 1, int((now - t0) * rate) + 1))
            groups: dict[int, list[bytes]] = {}
            for c, pkt in packets[i:j]:
                groups.setdefault(c, []).append(pkt)
            now = time.monotonic()
            for c, g in groups.items():
                p = protos[c]
                if qos:
                    p.inflight += len(g)
                    p.max_inflight = max(p.max_inflight, p.inflight)
                p.t.write(b"".join(g))
            for k in range(i, j):
                sent[k] = now
            i = j
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        for p in protos:
            await p.finish()
    t_end = time.monotonic()
    for p in protos:
        p.close()
    await asyncio.sleep(0.02)
    return {"sent": sent, "seconds": t_end - t_start, "t_start": t_start, "t_end": t_end,
            "max_inflight": max(p.max_inflight for p in protos)}


def role_pub(a: argparse.Namespace) -> None:
    msgs = pickle.loads(Path(a.messages).read_bytes())
    packets = encode_for_conns(msgs, a.conns, a.qos)
    emit(event="ready")
    c0 = cpu_s()
    r = asyncio.run(publish(a.port, packets, conns=a.conns, qos=a.qos, rate=a.rate or None, prefix="pacer"))
    if a.out:
        Path(a.out).write_text(json.dumps(r["sent"]))
    emit(event="final", seconds=r["seconds"], t_start=r["t_start"], t_end=r["t_end"], max_inflight=r["max_inflight"],
         cpu=cpu_s() - c0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["gateway", "acksub", "pub"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state")
    ap.add_argument("--expect", type=int, default=0)
    ap.add_argument("--qos", type=int, default=1)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--client-id", default="plain-sub")
    ap.add_argument("--record")
    ap.add_argument("--filter", default=INGEST_FILTER)
    ap.add_argument("--messages")
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--cpu-split", action="store_true", help="gateway: report its CPU per part (benchmarks/e2e.py)")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--out")
    ap.add_argument("--stall-report", type=float, default=10.0)
    ap.add_argument("--bundle", type=int, default=0)
    ap.add_argument("--retime", action="store_true")
    a = ap.parse_args()
    if a.role != "gateway":
        # The publisher and the recording subscriber are instruments: their own garbage collections
        # (a gen-2 pass ~2.5 s into every paced run, once their lists had grown) showed up as a 4-7 ms
        # p99 spike in the gateway's latency windows. Short-lived processes, freed by reference counting.
        # The gateway keeps the product's GC settings.
        import gc

        gc.disable()
    {"gateway": role_gateway, "acksub": role_acksub, "pub": role_pub}[a.role](a)


if __name__ == "__main__":
    main()
