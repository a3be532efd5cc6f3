"""Lean simulated devices for scale: 10,000 MQTT 5 connections from one or a few processes.

The normal fleet (``device_sim.fleet``) drives each device through aiomqtt/paho: about 0.5 ms of CPU
per message and ~20 KB per device, so one process tops out near 4,000 devices. Here each device is a
small ``asyncio.Protocol`` on the same sans-I/O ``mqtt5`` codec the gateway uses (packets are built
and parsed by the codec, never by hand), driven by loop timers rather than one coroutine per device:

- the same devices, topics and payloads as the normal fleet (``DeviceSpec``, ``PayloadFactory``),
  QoS 1, one message in flight per device, sequence numbers shared by the device's two streams;
- the same ground truth (``GroundTruth`` / ``SentRecord``): a message is *sent* only once its PUBACK
  arrived with a success code; a publish whose connection died before the PUBACK, or that was still
  waiting when the run ended, is a ``FailedRecord`` and is never re-sent;
- honest firmware only (no profiles, no simulated outages of the mobile units): this is the load
  generator, ``Fleet`` remains the place for hostile behaviour and store-and-forward;
- optional TLS (one ``ssl.SSLContext`` for all, or a function giving each device its own);
- ``run_processes`` spreads a fleet over P processes (each its own event loop, uvloop when
  installed), starts them at the same wall-clock instant and merges their ground truth.

Like the rest of ``device_sim`` this never imports the gateway's runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import multiprocessing
import os
import random
import resource
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mqtt5

from device_sim.devices import DeviceSpec, PayloadFactory, encode
from device_sim.fleet import check_fleet_args
from device_sim.truth import FailedRecord, GroundTruth, SentRecord
from gateway.catalog import HEALTH_STREAM, RESULT_STREAM
from gateway.errors import ConfigError

__all__ = ["LeanFleet", "LeanStats", "merge_truths", "raise_nofile", "run_processes"]

TlsOption = ssl.SSLContext | Callable[[DeviceSpec], ssl.SSLContext] | None

_QOS1 = mqtt5.QoS.AT_LEAST_ONCE
_SUCCESS = mqtt5.ConnAckReasonCode.SUCCESS


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's open-file limit (one socket per device) and return the new soft limit.

    The soft limit goes up to ``want`` (default: the hard limit); past the hard limit only when the
    process may raise it (root / CAP_SYS_RESOURCE), otherwise it stops at the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else want
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if soft == resource.RLIM_INFINITY or (target != resource.RLIM_INFINITY and soft >= target):
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _ConnectRefused(Exception):
    pass


class _Conn(asyncio.Protocol):
    """One TCP/TLS connection of a device (a device may reconnect; a late callback of an old
    connection must not touch the new one)."""

    __slots__ = ("buf", "dev", "transport")

    def __init__(self, dev: _Device) -> None:
        self.dev = dev
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream protocol's

    def data_received(self, data: bytes) -> None:
        dev = self.dev
        if dev.conn is not self:
            return
        buf = self.buf
        buf += data
        pos = 0
        n_total = len(buf)
        with memoryview(buf) as mv:
            while pos < n_total:
                try:
                    pkt, n = mqtt5.read(mv[pos:])
                except IndexError:  # incomplete: wait for more bytes
                    break
                except ValueError:  # malformed from the broker: drop the connection
                    pos = n_total
                    self.abort()
                    break
                pos += n
                # `type(pkt) is X` in each test (mypy narrows pkt by it): a PUBACK, nearly every packet,
                # still costs one type() call
                if type(pkt) is mqtt5.PubAckPacket:
                    dev.fleet._acked(dev, pkt.packet_id, int(pkt.reason_code))
                elif type(pkt) is mqtt5.ConnAckPacket:
                    fut = dev.connack
                    if fut is not None and not fut.done():
                        fut.set_result(int(pkt.reason_code))
                elif type(pkt) is mqtt5.DisconnectPacket:
                    self.abort()
                # PINGRESP and anything else: nothing to do (no subscriptions, QoS 1 only)
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.dev.conn is self:
            self.dev.fleet._lost(self.dev, exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Device:
    """One device: a few slots of run state (10,000 of these per process)."""

    __slots__ = ("conn", "connack", "factory", "fleet", "inflight", "next_health", "next_result", "outbox",
                 "pid", "ready", "seq", "spec", "started", "timer")

    def __init__(self, fleet: LeanFleet, spec: DeviceSpec, factory: PayloadFactory) -> None:
        self.fleet = fleet
        self.spec = spec
        self.factory = factory
        self.conn: _Conn | None = None
        self.seq = 0
        self.pid = 0
        # (stream, seq, t_made): produced, not yet published (more than one only while a PUBACK is awaited)
        self.outbox: deque[tuple[str, int, float]] = deque()
        # (stream, seq, topic, data, t_sent, t_made) of the one publish awaiting its PUBACK
        self.inflight: tuple[str, int, str, bytes, float, float] | None = None
        self.connack: asyncio.Future[int] | None = None
        self.ready = False  # CONNACK received on the current connection
        self.next_result = math.inf
        self.next_health = math.inf
        self.timer: asyncio.TimerHandle | None = None
        self.started = False  # schedule started (first CONNACK)


@dataclass(slots=True)
class LeanStats:
    """A live sample of one fleet (one process)."""

    t: float  # wall clock
    devices: int
    connected: int  # devices with a live, acknowledged connection
    ever_connected: int
    sent: int  # PUBACKed publishes
    failed: int
    cpu_s: float  # this process's user+system CPU so far
    rss: int  # this process's RSS, bytes
    pid: int = field(default_factory=os.getpid)
    rss0: int = 0  # RSS before the fleet was built (set by ``run_processes``' children)


class LeanFleet:
    """Honest devices on the ``mqtt5`` codec; the same knobs as ``Fleet`` where they apply.

    ``on_sample`` is called every ``sample_every_s`` with a ``LeanStats`` (for benchmarks' live views).
    """

    def __init__(
        self,
        specs: Sequence[DeviceSpec],
        *,
        host: str = "127.0.0.1",
        port: int,
        seed: int = 0,
        rate_scale: float = 1.0,
        health_interval_s: float = 5.0,
        tls: TlsOption = None,
        keep_payloads: bool = False,
        usernames: bool = False,
        connect_concurrency: int = 200,
        connect_spread_s: float | None = None,
        connect_timeout_s: float = 10.0,
        drain_timeout_s: float = 30.0,
        keepalive_s: int = 60,
        on_sample: Callable[[LeanStats], None] | None = None,
        sample_every_s: float = 0.5,
        connect_first_s: float = 0.0,
    ) -> None:
        check_fleet_args(specs, rate_scale, health_interval_s)
        self._devices = [_Device(self, s, PayloadFactory(s, seed)) for s in specs]
        self.host, self.port = host, port
        self.rate_scale = rate_scale
        self.health_interval_s = health_interval_s
        self._tls = tls
        self.keep_payloads = keep_payloads
        self.usernames = usernames
        self.connect_concurrency = connect_concurrency
        # About 2,000 connects per second, at most 5 s (as Fleet).
        self.connect_spread_s = min(5.0, len(specs) / 2_000) if connect_spread_s is None else connect_spread_s
        self.connect_timeout_s = connect_timeout_s
        self.drain_timeout_s = drain_timeout_s
        # MQTT keepalive: every device publishes health at least every health_interval_s, which the
        # broker counts as activity, so no PINGREQ timers are needed when the interval is shorter.
        self.keepalive_s = max(keepalive_s, math.ceil(health_interval_s * 2))
        self.on_sample = on_sample
        self.sample_every_s = sample_every_s
        # > 0: connect the whole fleet first (at most this long), then produce for ``seconds``: a
        # steady-state measurement not disturbed by the connect storm. 0: produce as each connects.
        self.connect_first_s = connect_first_s
        self._producing = False
        self._rng = random.Random(seed)  # schedules and backoff: one generator, not one per device
        self._truth = GroundTruth()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._stop_at = math.inf
        self._closing = False
        self._reconnects: set[asyncio.Task[None]] = set()
        self.connected = 0
        self.connect_failures = 0  # refused or timed-out attempts (retried)

    @property
    def specs(self) -> list[DeviceSpec]:
        return [d.spec for d in self._devices]

    @property
    def truth(self) -> GroundTruth:
        return self._truth

    @property
    def offered_rate(self) -> float:
        """Messages per second the fleet means to send (results and health)."""
        return sum(self.rate_scale / d.spec.kind.result_interval_s + 1.0 / self.health_interval_s
                   for d in self._devices)

    def sample(self) -> LeanStats:
        t = os.times()
        return LeanStats(time.time(), len(self._devices), self.connected, len(self._truth.connects),
                         self._truth.sent, len(self._truth.failed), t.user + t.system, rss_bytes())

    # ------------------------------------------------------------------------------------- the run
    async def run(self, seconds: float, *, start_at: float | None = None) -> GroundTruth:
        """Produce for ``seconds`` (from ``start_at``, a wall-clock time, if given), then send what is
        queued, DISCONNECT, and return the ground truth."""
        loop = self._loop = asyncio.get_running_loop()
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        self._truth = truth = GroundTruth(started_at=time.time())
        self._sem = asyncio.Semaphore(self.connect_concurrency)
        self._closing = False
        self._producing = not self.connect_first_s
        self._stop_at = math.inf if self.connect_first_s else loop.time() + seconds
        sampler = asyncio.create_task(self._sampler(), name="lean:sample") if self.on_sample else None
        starts = [asyncio.create_task(self._start(d, self._rng.uniform(0.0, self.connect_spread_s)))
                  for d in self._devices]
        try:
            if self.connect_first_s:
                await asyncio.wait(starts, timeout=self.connect_first_s)
                self._stop_at = loop.time() + seconds
                self._producing = True
                for d in self._devices:
                    if d.ready:
                        self._begin(d)
            await asyncio.sleep(max(0.0, self._stop_at - loop.time()))
            for t in starts:  # a device not connected by now never produced anything
                t.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            deadline = loop.time() + self.drain_timeout_s
            while loop.time() < deadline and any(d.outbox or d.inflight for d in self._devices):
                await asyncio.sleep(0.05)
        finally:
            self._closing = True
            for t in [*starts, *self._reconnects]:
                t.cancel()
            for d in self._devices:
                self._close(d)
            await asyncio.sleep(0.05)  # let the DISCONNECTs leave
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
                assert self.on_sample is not None  # the sampler runs only with one
                self.on_sample(self.sample())
        truth.ended_at = time.time()
        return truth

    async def _sampler(self) -> None:
        assert self.on_sample is not None
        while True:
            self.on_sample(self.sample())
            await asyncio.sleep(self.sample_every_s)

    async def _start(self, d: _Device, delay: float) -> None:
        """Connect with jittered exponential backoff until the end of the production phase."""
        assert self._loop is not None and self._sem is not None
        if delay > 0:
            await asyncio.sleep(delay)
        attempt = 0
        while not self._closing:
            try:
                async with self._sem:
                    await self._connect(d)
                return
            except (OSError, TimeoutError, _ConnectRefused, ssl.SSLError):
                self.connect_failures += 1
                attempt += 1
                if d.conn is not None:
                    d.conn.abort()
                    d.conn = None
                if self._loop.time() >= self._stop_at:
                    return
                await asyncio.sleep(self._rng.uniform(0.0, min(5.0, 0.1 * 2**attempt)))

    async def _connect(self, d: _Device) -> None:
        loop = self._loop
        assert loop is not None
        tls = self._tls(d.spec) if callable(self._tls) else self._tls
        d.ready = False
        d.connack = loop.create_future()
        conn = d.conn = _Conn(d)
        async with asyncio.timeout(self.connect_timeout_s):
            await loop.create_connection(lambda: conn, self.host, self.port, ssl=tls)
            conn.write(mqtt5.ConnectPacket(
                d.spec.device_id, clean_start=True, keep_alive=self.keepalive_s,
                username=d.spec.device_id if self.usernames else None,
            ).write())
            code = await d.connack
        if code != _SUCCESS:
            raise _ConnectRefused(f"CONNACK {code}")
        d.ready = True
        self.connected += 1
        self._truth.connects[d.spec.device_id] += 1
        if self._producing:
            self._begin(d)
        self._pump(d)

    def _begin(self, d: _Device) -> None:
        """Start a device's schedule (once)."""
        if d.started:
            return
        d.started = True
        assert self._loop is not None  # set by run(), before any device starts
        now = self._loop.time()
        # Random phases: a fleet that starts together must not report in lock-step.
        d.next_result = now + self._rng.uniform(0.0, self._interval(d))
        d.next_health = now + self._rng.uniform(0.0, self.health_interval_s)
        self._schedule(d)

    def _interval(self, d: _Device) -> float:
        return d.spec.kind.result_interval_s / self.rate_scale

    def _schedule(self, d: _Device) -> None:
        nxt = min(d.next_result, d.next_health)
        assert self._loop is not None
        d.timer = self._loop.call_at(nxt, self._tick, d) if nxt < self._stop_at else None

    def _tick(self, d: _Device) -> None:
        """Timer: produce every message that is due (in time order), re-arm, publish."""
        assert self._loop is not None
        now = self._loop.time()
        wall = time.time()
        stop_at = self._stop_at
        while True:
            t = min(d.next_result, d.next_health)
            if t > now or t >= stop_at:
                break
            d.seq += 1
            if t == d.next_result:
                d.outbox.append((RESULT_STREAM, d.seq, wall))
                d.next_result += self._interval(d) * self._rng.uniform(0.5, 1.5)
            else:
                d.outbox.append((HEALTH_STREAM, d.seq, wall))
                d.next_health += self.health_interval_s
        self._schedule(d)
        self._pump(d)

    def _pump(self, d: _Device) -> None:
        """Publish the next queued message if nothing is in flight (one at a time, like Fleet)."""
        conn = d.conn
        if d.inflight is not None or not d.outbox or not d.ready or conn is None:
            return
        stream, seq, t_made = d.outbox.popleft()
        t_sent = time.time()
        topic = d.spec.topic(stream)
        data = encode(d.factory.make(stream, seq, int(t_sent * 1000)))
        d.pid = d.pid % 65535 + 1
        d.inflight = (stream, seq, topic, data, t_sent, t_made)
        conn.write(mqtt5.PublishPacket(topic, data, qos=_QOS1, packet_id=d.pid).write())

    def _acked(self, d: _Device, pid: int, code: int) -> None:
        inflight = d.inflight
        if inflight is None or pid != d.pid:
            return
        d.inflight = None
        stream, seq, topic, data, t_sent, t_made = inflight
        spec = d.spec
        if code >= 0x80:  # refused (e.g. not authorised): never counted as sent
            self._fail(d, stream, seq, topic, data, f"PUBACK {code}")
        else:
            self._truth.sent_records.append(SentRecord(
                spec.device_id, spec.device_type, stream, seq, topic, len(data), hashlib.sha256(data).hexdigest(),
                t_sent, data if self.keep_payloads else None, t_made,
            ))
        if not self._closing:
            self._pump(d)

    def _fail(self, d: _Device, stream: str, seq: int, topic: str, data: bytes, error: str) -> None:
        self._truth.failed.append(FailedRecord(
            d.spec.device_id, d.spec.device_type, stream, seq, topic, len(data), hashlib.sha256(data).hexdigest(),
            time.time(), error,
        ))

    def _lost(self, d: _Device, exc: Exception | None) -> None:
        was_ready, d.ready, d.conn = d.ready, False, None
        if was_ready:
            self.connected -= 1
        fut = d.connack
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError("connection lost during CONNECT"))
        if d.inflight is not None:
            # Whether the broker kept it is unknown: recorded as failed, never re-sent.
            stream, seq, topic, data, _, _ = d.inflight
            d.inflight = None
            self._fail(d, stream, seq, topic, data, f"connection lost before PUBACK: {exc or 'closed'}")
        if was_ready and not self._closing:
            task = asyncio.ensure_future(self._start(d, self._rng.uniform(0.0, 0.5)))
            self._reconnects.add(task)
            task.add_done_callback(self._reconnects.discard)

    def _close(self, d: _Device) -> None:
        """End of run: whatever was not acknowledged is a failure; then a clean DISCONNECT."""
        if d.timer is not None:
            d.timer.cancel()
            d.timer = None
        if d.inflight is not None:
            stream, seq, topic, data, _, _ = d.inflight
            d.inflight = None
            self._fail(d, stream, seq, topic, data, "no PUBACK before the run ended")
        while d.outbox:
            stream, seq, _ = d.outbox.popleft()
            self._fail(d, stream, seq, d.spec.topic(stream), b"", "undelivered: still queued when the run ended")
        conn, d.conn = d.conn, None
        if conn is not None and conn.transport is not None:
            if d.ready:
                conn.write(mqtt5.DisconnectPacket().write())
                d.ready = False
                self.connected -= 1
            conn.transport.close()


# ---------------------------------------------------------------------------------------- processes


def merge_truths(truths: Sequence[GroundTruth]) -> GroundTruth:
    """One ground truth from several processes' (each device lives in exactly one of them, so per-device
    publish order is kept)."""
    out = GroundTruth()
    for t in truths:
        out.sent_records.extend(t.sent_records)
        out.failed.extend(t.failed)
        out.outages.extend(t.outages)
        out.actions.extend(t.actions)
        out.connects.update(t.connects)
    out.started_at = min((t.started_at for t in truths if t.started_at), default=0.0)
    out.ended_at = max((t.ended_at for t in truths), default=0.0)
    return out


def _child(specs: list[DeviceSpec], seconds: float, start_at: float, options: dict[str, Any],
           samples: Any, result: Any) -> None:
    """One simulator process: its own event loop (uvloop when installed), its share of the fleet."""
    raise_nofile(len(specs) + 256)
    rss0 = rss_bytes()

    def on_sample(s: LeanStats) -> None:
        s.rss0 = rss0
        samples.put(s)

    fleet = LeanFleet(specs, on_sample=on_sample if samples is not None else None, **options)
    try:
        import uvloop

        truth = uvloop.run(fleet.run(seconds, start_at=start_at))
    except ImportError:
        truth = asyncio.run(fleet.run(seconds, start_at=start_at))
    result.send((truth, fleet.connect_failures))
    result.close()


def run_processes(
    specs: Sequence[DeviceSpec],
    seconds: float,
    *,
    processes: int = 1,
    start_delay_s: float = 3.0,
    samples: Any = None,
    **options: Any,
) -> tuple[GroundTruth, int]:
    """Run ``specs`` (round-robin) over ``processes`` simulator processes and merge their truth.

    Blocking; call it from a thread or a plain script. Every process starts producing at the same
    wall-clock instant, ``start_delay_s`` from now (time to start the interpreters). ``samples`` is
    an optional ``multiprocessing`` queue that receives each process's ``LeanStats``. ``options`` go to
    ``LeanFleet`` (a ``tls`` function must be picklable). Returns (truth, refused connect attempts).
    """
    if processes < 1:
        raise ConfigError("processes must be >= 1")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no inherited event loop or threads
    start_at = time.time() + start_delay_s
    chunks = [list(specs[i::processes]) for i in range(processes)]
    procs, pipes = [], []
    for chunk in chunks:
        rx, tx = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(chunk, seconds, start_at, options, samples, tx), daemon=True)
        p.start()
        tx.close()
        procs.append(p)
        pipes.append(rx)
    truths, refused = [], 0
    try:
        for p, rx in zip(procs, pipes, strict=True):
            try:
                truth, r = rx.recv()
            except EOFError:
                raise RuntimeError(f"simulator process {p.pid} died (exit code {p.exitcode})") from None
            truths.append(truth)
            refused += r
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    return merge_truths(truths), refused
