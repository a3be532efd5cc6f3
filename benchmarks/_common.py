"""Shared helpers for Edgeward's benchmarks: a private broker, a tiny blocking MQTT 5 client (session
priming, pre-loading, draining, checking), the per-message pass-through work, table printing.

Benchmark code, not product code: compact, but correct (every count it prints is verified).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgpack
import mqtt5
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port  # noqa: E402

__all__ = [
    "BrokerConfig", "MosquittoBroker", "free_port", "start_broker", "proc_cpu_seconds", "MiniClient",
    "KEY", "OUT_TOPIC", "make_message", "make_work", "open_envelope", "percentile", "print_table", "log",
    "json_lines_reader",
]

KEY = bytes(range(32))  # one fixed AES-256 key: benchmark only
OUT_TOPIC = "edgeward/out/x"


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def json_lines_reader(lines: Iterable[str], on_text: Callable[[str], None] | None = None) -> queue.Queue:
    """A child process's stdout read on a thread: each JSON line goes into the returned queue as an
    object, ``None`` marks the end; other lines go to ``on_text`` (dropped without one)."""
    q: queue.Queue = queue.Queue()

    def read() -> None:
        for line in lines:
            try:
                q.put(json.loads(line))
            except ValueError:
                if on_text is not None:
                    on_text(line.rstrip())
        q.put(None)

    threading.Thread(target=read, daemon=True).start()
    return q


def start_broker(workdir: Path) -> MosquittoBroker:
    """A private Mosquitto on a free loopback port, with Edgeward's rendered config (retries on a port race)."""
    for _ in range(5):
        b = MosquittoBroker(BrokerConfig(port=free_port(), workdir=workdir))
        try:
            b.start()
            return b
        except Exception:
            b.stop()
    raise RuntimeError("could not start a private mosquitto")


def proc_cpu_seconds(pid: int) -> float:
    """user+system CPU of another process (from /proc; clock-tick granularity)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def make_message(seq: int, size: int = 300) -> bytes:
    """A realistic small scanner result map, padded to exactly ``size`` bytes of MessagePack."""
    m = {
        "seq": seq, "ts": 1_718_000_000_000 + seq, "verdict": "clear" if seq % 7 else "alarm",
        "device": f"scanner-{seq % 16:02d}", "lane": seq % 4, "scan_id": f"{seq:016x}-5f1c-4a2e",
        "operator": "op-4711", "score": 0.0125 * (seq % 80), "model": "xr-9000/fw-3.4.1", "notes": "",
    }
    for _ in range(3):  # the pad's own header grows with its length; converge
        n = len(msgpack.packb(m))
        m["notes"] = "x" * (len(m["notes"]) + size - n)
    data = msgpack.packb(m)
    assert len(data) == size, len(data)
    return data


def make_work() -> Callable[[bytes], tuple[int, bytes]]:
    """The per-message pass-through work every candidate does: unpack, AES-256-GCM encrypt the re-packed map
    (random 12-byte nonce), pack an envelope. Returns (seq, envelope bytes)."""
    aes, packb, unpackb, urandom = AESGCM(KEY), msgpack.packb, msgpack.unpackb, os.urandom

    def work(payload: bytes) -> tuple[int, bytes]:
        m = unpackb(payload)
        nonce = urandom(12)
        return m["seq"], packb({"v": 1, "kid": "k1", "n": nonce, "ct": aes.encrypt(nonce, packb(m), None)})

    return work


def open_envelope(env: bytes, aes: AESGCM) -> int:
    e = msgpack.unpackb(env)
    return int(msgpack.unpackb(aes.decrypt(e["n"], e["ct"], None))["seq"])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def print_table(headers: list[str], rows: list[list[object]], file=sys.stdout) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)), file=file)
        if j == 0:
            print("  ".join("-" * x for x in w), file=file)


class MiniClient:
    """A blocking MQTT 5 client on the mqtt5 codec, for the harness only (never measured)."""

    def __init__(self, port: int, client_id: str, *, clean_start: bool = False, expiry: int = 3600) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sock.sendall(mqtt5.ConnectPacket(client_id, clean_start=clean_start, keep_alive=60,
                                              session_expiry_interval=expiry).write())
        ack = next(self.packets(10.0))
        if not isinstance(ack, mqtt5.ConnAckPacket) or ack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise RuntimeError(f"CONNACK refused: {ack!r}")
        self.session_present = ack.session_present

    def packets(self, idle: float) -> Iterator[object]:
        """Yield packets until ``idle`` seconds pass with no data."""
        while True:
            while self.buf:
                try:
                    with memoryview(self.buf) as mv:
                        pkt, n = mqtt5.read(mv)
                except IndexError:
                    break
                del self.buf[:n]
                yield pkt
            self.sock.settimeout(idle)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return
            if not data:
                return
            self.buf += data

    def subscribe(self, topic: str) -> None:
        self.sock.sendall(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)]).write())
        for p in self.packets(10.0):
            if isinstance(p, mqtt5.SubAckPacket):
                assert p.reason_codes[0] == mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE, p.reason_codes
                return
        raise RuntimeError("no SUBACK")

    def publish_all(self, topic: str, payloads: list[bytes], window: int = 500) -> None:
        """QoS-1 publish every payload (pre-encoded, ``window`` in flight) and wait for every PUBACK."""
        for i in range(0, len(payloads), window):
            chunk = payloads[i:i + window]
            self.sock.sendall(b"".join(
                mqtt5.PublishPacket(topic, p, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=j + 1).write()
                for j, p in enumerate(chunk)))
            want = len(chunk)
            for p in self.packets(10.0):
                if isinstance(p, mqtt5.PubAckPacket):
                    want -= 1
                    if not want:
                        break
            if want:
                raise RuntimeError(f"pre-load: {want} PUBACKs missing")

    def drain(self, idle: float, on_payload: Callable[[bytes], None] | None = None, expect: int | None = None) -> int:
        """Receive queued QoS-1 messages, PUBACK them (batched), stop after ``idle`` s of silence or
        ``expect`` messages. Returns the count."""
        n = 0
        acks: list[bytes] = []
        for p in self.packets(idle):
            if isinstance(p, mqtt5.PublishPacket):
                n += 1
                if on_payload is not None:
                    on_payload(p.payload)
                acks.append(mqtt5.PubAckPacket(p.packet_id).write())
                if len(acks) >= 200 or not self.buf:
                    self.sock.sendall(b"".join(acks))
                    acks.clear()
                if expect is not None and n >= expect:
                    break
        if acks:
            self.sock.sendall(b"".join(acks))
        return n

    def close(self, expiry: int | None = None) -> None:
        """DISCONNECT; ``expiry=0`` ends the session (drops its subscription and queue)."""
        try:
            self.sock.sendall(mqtt5.DisconnectPacket(session_expiry_interval=expiry).write())
            time.sleep(0.02)
        finally:
            self.sock.close()
