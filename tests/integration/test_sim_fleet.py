"""A small fleet on a real Mosquitto: everything the ground truth calls sent arrives exactly once,
byte for byte, in order, and the mobile unit's store-and-forward loses nothing across its outages."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace

import aiomqtt
import msgpack
import pytest

from device_sim import DeviceSpec, Fleet, GroundTruth, Outgoing, make_fleet
from gateway.catalog import DEVICE_TYPES
from gateway.runtime.broker import MosquittoBroker, free_port
from tests.unit.test_sim_devices import payload_errors

pytestmark = pytest.mark.broker


class Collector:
    """A separate QoS-1 subscriber on ``site/+/dev/#`` that keeps every message it is given."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[aiomqtt.Message] = []
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="test-collector",
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe("site/+/dev/#", qos=1)
            self.ready.set()
            async for msg in client.messages:
                self.messages.append(msg)

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # anything beyond n (a duplicate) would show up now


async def run_with_collector(port: int, fleet: Fleet, seconds: float) -> tuple[GroundTruth, Collector]:
    col = Collector(port)
    task = asyncio.create_task(col.run(), name="collector")
    await asyncio.wait_for(col.ready.wait(), 5)
    truth = await fleet.run(seconds)
    await col.wait_for(truth.sent)
    task.cancel()
    return truth, col


async def test_every_sent_message_arrives_once_and_mobile_buffer_survives_outages(
    broker: MosquittoBroker,
) -> None:
    specs = make_fleet(16, site="AMS-T1", seed=0)
    assert {s.device_type for s in specs} == set(DEVICE_TYPES)
    progress: list[int] = []
    fleet = Fleet(specs, port=broker.port, seed=1, rate_scale=40, health_interval_s=1.0, keep_payloads=True,
                  # offline longer than the 1 s health period: at least one message is always buffered
                  on_progress=progress.append, drop_every_s=(0.4, 0.7), drop_for_s=(1.2, 1.4))
    t0 = time.time()
    truth, col = await run_with_collector(broker.port, fleet, 3.0)

    assert truth.failed == [], [(f.device_id, f.error) for f in truth.failed][:5]
    assert truth.sent >= 300, truth.sent
    assert set(truth.by_type) == set(DEVICE_TYPES)
    assert progress and progress[-1] == truth.sent and progress == sorted(progress)

    # Exactly once, identical bytes: the multiset of (topic, sha256) on both sides is the same.
    got = Counter((m.topic.value, hashlib.sha256(m.payload).hexdigest()) for m in col.messages)  # type: ignore[arg-type]
    want = Counter((r.topic, r.sha256) for r in truth.sent_records)
    assert got == want
    assert all(r.payload is not None and hashlib.sha256(r.payload).hexdigest() == r.sha256
               for r in truth.sent_records)

    # Per device: seq is 1..N without a gap, strictly increasing in arrival order across both streams,
    # payloads are valid, and ts is the wall clock at send.
    kinds = {s.device_id: s.device_type for s in specs}
    seqs: dict[str, list[int]] = defaultdict(list)
    for m in col.messages:
        topic = m.topic.value
        _, site, _, device_id, stream = topic.split("/", 4)
        assert site == "AMS-T1" and stream in ("result", "status/health")
        p = msgpack.unpackb(m.payload, raw=False)  # type: ignore[arg-type]
        assert payload_errors(kinds[device_id], stream, p) == [], topic
        assert t0 * 1000 - 1 <= p["ts"] <= time.time() * 1000
        seqs[device_id].append(p["seq"])
    for device_id, s in seqs.items():
        assert s == list(range(1, len(s) + 1)), device_id

    # The mobile unit dropped its connection and came back, and what it buffered was sent afterwards.
    mobile = next(s.device_id for s in specs if s.device_type == "mobile_border")
    assert truth.reconnects(mobile) >= 1
    outages = [o for o in truth.outages if o.device_id == mobile]
    assert outages and sum(o.buffered for o in outages) >= 1
    late = [r for r in truth.sent_records if r.device_id == mobile and r.t_sent - r.t_made > 0.5]
    assert late, "nothing was held back while offline"
    assert all(any(o.t_down <= r.t_made <= o.t_up <= r.t_sent for o in outages) for r in late)
    # Everyone else kept one session.
    assert all(truth.connects[s.device_id] == 1 for s in specs if s.device_id != mobile)


class Tagging:
    """A test firmware: adds an MQTT 5 user property and says so in the ground truth."""

    name = "tagging"

    def client_id(self, spec: DeviceSpec) -> str:
        return spec.device_id

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        return (replace(msg, properties={"user_property": [("fw", "x")]}, tags=("user_property",)),)


async def test_firmware_profile_shapes_what_goes_on_the_wire(broker: MosquittoBroker) -> None:
    specs = make_fleet(2, types=["body_scanner"])
    fleet = Fleet(specs, port=broker.port, rate_scale=20, profiles={specs[0].device_id: Tagging()})
    truth, col = await run_with_collector(broker.port, fleet, 1.0)
    assert truth.sent >= 4
    for r in truth.sent_records:
        tagged = r.device_id == specs[0].device_id
        assert (r.profile, r.tags) == (("tagging", ("user_property",)) if tagged else ("honest", ()))
    for m in col.messages:
        props = getattr(m.properties, "UserProperty", None)
        assert (props == [("fw", "x")]) == (specs[0].device_id in m.topic.value)


async def test_unreachable_broker_sends_and_counts_nothing() -> None:
    fleet = Fleet(make_fleet(3), port=free_port(), rate_scale=50)
    truth = await fleet.run(0.6)
    assert truth.sent == 0 and truth.failed == []  # never connected, so nothing was produced
    assert fleet.connect_failures >= 3


class _Cutoff:
    """A TCP relay in front of the broker that, once ``cut()``, drops every connection and then
    accepts new ones without ever answering: each reconnect waits out its whole connect timeout, as
    a device whose certificate was put on hold does against the site's mTLS listener."""

    def __init__(self, target: int) -> None:
        self.target, self.cutoff, self.port = target, False, free_port()
        self._open: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._open.append(w)
        if self.cutoff:
            await r.read()  # silent until the device gives up
            w.close()
            return
        br, bw = await asyncio.open_connection("127.0.0.1", self.target)
        self._open.append(bw)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
            dst.close()

        await asyncio.gather(pipe(r, bw), pipe(br, w))

    def cut(self) -> None:
        self.cutoff = True
        for w in self._open:
            w.close()

    async def stop(self) -> None:
        self._server.close()
        for w in self._open:
            w.close()


async def test_a_device_that_cannot_reconnect_ends_with_the_run(broker: MosquittoBroker) -> None:
    """Its reconnects each take the whole connect timeout; it must still stop at the run's end rather
    than work through every message its schedule still owed, one timeout each (minutes, before)."""
    relay = _Cutoff(broker.port)
    await relay.start()
    fleet = Fleet(make_fleet(1, seed=3), port=relay.port, rate_scale=40.0, health_interval_s=0.05,
                  drop_every_s=None, connect_timeout_s=0.5, drain_timeout_s=0.5)
    run = asyncio.create_task(fleet.run(3.0))
    await asyncio.sleep(1.0)
    relay.cut()
    t0 = time.monotonic()
    truth = await asyncio.wait_for(run, 60)
    took = time.monotonic() - t0
    await relay.stop()
    assert truth.sent > 0 and truth.failed  # it sent, then could not: what it still had is accounted
    assert took < 8.0, took  # ~4 s: the run's end, a drain and a few 0.5 s timeouts (was ~40 messages x 0.5 s)


async def test_a_device_the_broker_drops_leaves_no_unretrieved_error_behind(broker: MosquittoBroker) -> None:
    """The broker drops a device (isolation, a session takeover): aiomqtt records why on a future the
    simulator never awaits. Left unretrieved, asyncio printed 'Future exception was never retrieved'
    into every hostile demo's output when the client was collected."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        fleet = Fleet(make_fleet(1, seed=3), port=broker.port)
        fleet._connect_sem = asyncio.Semaphore(1)  # noqa: SLF001 - what run() sets up
        d = fleet._devices[0]  # noqa: SLF001
        assert await fleet._connect(d, deadline=loop.time() + 10)  # noqa: SLF001
        dropped = d.client
        assert dropped is not None
        # the same client id again: the broker disconnects the first connection (session taken over)
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier=d.spec.device_id,
                                  protocol=aiomqtt.ProtocolVersion.V5):
            for _ in range(100):
                if dropped._disconnected.done():  # noqa: SLF001
                    break
                await asyncio.sleep(0.02)
            assert dropped._disconnected.done(), "the broker should have dropped the first connection"  # noqa: SLF001
        d.client = dropped = None
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    assert not [e for e in errors if "never retrieved" in str(e.get("message", ""))], errors
