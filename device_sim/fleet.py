"""The simulated fleet on the wire: every device its own MQTT 5 client publishing QoS-1 messages.

``Fleet.run(seconds)`` connects the devices (staggered, bounded concurrency, jittered backoff),
lets each produce results and health reports on its family's schedule, and returns the
``GroundTruth`` of what the broker acknowledged. Mobile border units lose their uplink now and then;
they keep producing into a store-and-forward buffer and send it in order after reconnecting, so the
gateway sees late but complete data.

Each device is one coroutine with a few slots of state (no generator state, no per-message tasks):
10,000 devices in one process must fit. What a device sends is decided by its firmware profile
(``device_sim.firmware``); this module only drives the connection and records the truth. It must
never count a message as sent before its PUBACK, and never re-send a message whose publish failed
(whether the broker kept it is unknown; that is recorded as a failure, not guessed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from device_sim.devices import DeviceSpec, PayloadFactory, encode
from device_sim.firmware import HONEST, FirmwareProfile, Outgoing, Will
from device_sim.truth import FailedRecord, GroundTruth, HostileAction, Outage, SentRecord
from gateway.catalog import HEALTH_STREAM, RESULT_STREAM
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from paho.mqtt.client import CallbackOnPublish_v2
    from paho.mqtt.client import Client as PahoClient

# The MQTT library logs every refused or cut connection of every simulated device (an isolated device
# retrying prints a TLS alert each time). The fleet records those outcomes in its ground truth
# instead; the library's own log goes nowhere unless a caller attaches a handler.
_MQTT_LOG = logging.getLogger("device_sim.mqtt")
_MQTT_LOG.addHandler(logging.NullHandler())
_MQTT_LOG.propagate = False

__all__ = ["Fleet", "MOBILE_TYPE"]

MOBILE_TYPE = "mobile_border"  # the family with an intermittent uplink

TlsOption = ssl.SSLContext | Callable[[DeviceSpec], ssl.SSLContext] | None


class _Device:
    """Per-device run state; kept to a handful of slots on purpose (10k devices per process)."""

    __slots__ = ("spec", "factory", "profile", "client", "seq", "outbox", "puback")

    def __init__(self, spec: DeviceSpec, factory: PayloadFactory, profile: FirmwareProfile) -> None:
        self.spec = spec
        self.factory = factory
        self.profile = profile
        self.client: aiomqtt.Client | None = None
        self.seq = 0
        # The reason code of the last PUBACK: aiomqtt does not report it, and a device publishes one
        # message at a time, so the last one is the one just awaited.
        self.puback = [0]
        # (stream, seq, t_made): produced, not yet sent. One entry while online; the buffer when offline.
        self.outbox: deque[tuple[str, int, float]] = deque()


def check_fleet_args(specs: Sequence[DeviceSpec], rate_scale: float, health_interval_s: float) -> None:
    """What every fleet (this one and device_sim.lean's) refuses up front."""
    if rate_scale <= 0 or health_interval_s <= 0:
        raise ConfigError("rate_scale and health_interval_s must be positive")
    ids = [s.device_id for s in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError("device ids must be unique (each is an MQTT client id)")


class Fleet:
    """A fleet of simulated devices publishing to one broker.

    ``rate_scale`` multiplies every family's result rate (health stays at ``health_interval_s``).
    ``drop_every_s`` / ``drop_for_s`` are (min, max) ranges for the mobile units' outages; ``None``
    keeps them online. ``profiles`` maps device ids to firmware profiles (default: honest).
    ``tls`` is one context for all, or a function giving each device its own (client certificates).
    ``usernames`` connects each device with its id as MQTT username (what the certificate's CN gives
    on the mTLS listener), so a broker ACL with ``%u`` patterns can be tested on a plain listener.
    ``probe_dead_drops`` checks after the run whether another client can read a hostile device's
    retained messages and wills.
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
        on_progress: Callable[[int], None] | None = None,
        profiles: Mapping[str, FirmwareProfile] | None = None,
        drop_every_s: tuple[float, float] | None = (10.0, 20.0),
        drop_for_s: tuple[float, float] = (1.0, 3.0),
        connect_concurrency: int = 200,
        connect_spread_s: float | None = None,
        connect_timeout_s: float = 10.0,
        publish_timeout_s: float = 10.0,
        drain_timeout_s: float = 30.0,
        usernames: bool = False,
        probe_dead_drops: bool = True,
    ) -> None:
        check_fleet_args(specs, rate_scale, health_interval_s)
        profiles = profiles or {}
        self._devices = [
            _Device(s, PayloadFactory(s, seed), profiles.get(s.device_id, HONEST)) for s in specs
        ]
        self.host, self.port = host, port
        self.rate_scale = rate_scale
        self.health_interval_s = health_interval_s
        self.keep_payloads = keep_payloads
        self.drop_every_s = drop_every_s
        self.drop_for_s = drop_for_s
        self.connect_concurrency = connect_concurrency
        # Spread the first connects so a large fleet does not hit the broker in one millisecond:
        # about 2,000 connects per second, at most 5 s.
        self.connect_spread_s = min(5.0, len(specs) / 2_000) if connect_spread_s is None else connect_spread_s
        self.connect_timeout_s = connect_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._tls = tls
        self.usernames = usernames
        self.probe_dead_drops = probe_dead_drops
        self._probe_tasks: dict[str, asyncio.Task[None]] = {}
        self._probe_received: dict[str, int] = {}
        self._on_progress = on_progress
        # One generator for schedules, backoff and profiles: timing is not reproducible anyway, and
        # per-device generators would cost 2.5 KB each.
        self._rng = random.Random(seed)
        self._truth = GroundTruth()
        self._connect_sem: asyncio.Semaphore | None = None
        self.connect_failures = 0  # refused or timed-out connection attempts (retried)

    @property
    def specs(self) -> list[DeviceSpec]:
        return [d.spec for d in self._devices]

    @property
    def truth(self) -> GroundTruth:
        """The ground truth of the current (or last) run, filled in as it goes; for live views."""
        return self._truth

    @property
    def offered_rate(self) -> float:
        """Messages per second the fleet means to send (results and health), before any backlog."""
        return sum(
            self.rate_scale / d.spec.kind.result_interval_s + 1.0 / self.health_interval_s for d in self._devices
        )

    async def run(self, seconds: float) -> GroundTruth:
        """Produce for ``seconds``, then send what is buffered, disconnect, and return the truth."""
        loop = asyncio.get_running_loop()
        self._truth = truth = GroundTruth(started_at=time.time())
        self._connect_sem = asyncio.Semaphore(self.connect_concurrency)
        stop_at = loop.time() + seconds
        finished = asyncio.Event()
        async with asyncio.TaskGroup() as outer:
            if self._on_progress is not None:
                outer.create_task(self._report_progress(finished), name="fleet:progress")
            try:
                async with asyncio.TaskGroup() as tg:
                    for d in self._devices:
                        tg.create_task(self._run_device(d, stop_at), name=f"device:{d.spec.device_id}")
            finally:
                finished.set()
        if self.probe_dead_drops:
            await self._probe_dead_drops()
        truth.ended_at = time.time()
        return truth

    # ------------------------------------------------------------------------------------- one device

    async def _run_device(self, d: _Device, stop_at: float) -> None:
        loop = asyncio.get_running_loop()
        rng = self._rng
        await asyncio.sleep(rng.uniform(0.0, self.connect_spread_s))
        try:
            if not await self._connect(d, deadline=stop_at):
                return  # never reached the broker before the end: it produced nothing
            interval = d.spec.kind.result_interval_s / self.rate_scale
            now = loop.time()
            # Random phases: a fleet that starts together must not report in lock-step.
            next_result = now + rng.uniform(0.0, interval)
            next_health = now + rng.uniform(0.0, self.health_interval_s)
            drops = d.spec.device_type == MOBILE_TYPE and self.drop_every_s is not None
            next_drop = now + rng.uniform(*self.drop_every_s) if drops and self.drop_every_s else math.inf
            back_at = math.inf
            down_wall = 0.0
            while True:
                t = min(next_result, next_health, next_drop, back_at)
                if t >= stop_at or loop.time() >= stop_at:
                    # The wall clock too: a device that cannot reconnect (isolated, its certificate on
                    # hold) spends a connect timeout on every scheduled message and falls behind its own
                    # schedule; without this it kept 'catching up' long after the run's end (a 120 s
                    # timing-burst demo ran for over ten minutes).
                    break
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if t == back_at:
                    back_at = math.inf
                    buffered = len(d.outbox)
                    if await self._connect(d, deadline=stop_at):
                        self._truth.outages.append(Outage(d.spec.device_id, down_wall, time.time(), buffered))
                        assert self.drop_every_s is not None
                        next_drop = loop.time() + rng.uniform(*self.drop_every_s)
                    else:
                        break  # the run ended while it retried; the end-of-run drain tries again
                elif t == next_drop:
                    next_drop = math.inf
                    await self._disconnect(d)  # between publishes: nothing is in flight
                    down_wall = time.time()
                    back_at = loop.time() + rng.uniform(*self.drop_for_s)
                elif t == next_result:
                    d.seq += 1
                    d.outbox.append((RESULT_STREAM, d.seq, time.time()))
                    next_result += interval * rng.uniform(0.5, 1.5)
                else:
                    d.seq += 1
                    d.outbox.append((HEALTH_STREAM, d.seq, time.time()))
                    next_health += self.health_interval_s
                if d.outbox and (d.client is not None or back_at == math.inf):
                    # Connected, or the connection was lost under a publish (not a scheduled drop):
                    # _flush reconnects with backoff, as _send promises. Otherwise a broker restart
                    # silenced the device until the end-of-run drain.
                    await self._flush(d, deadline=stop_at + self.drain_timeout_s)
            await self._finish(d, loop.time() + self.drain_timeout_s, down_wall)
        finally:
            if d.client is not None:  # cancelled: let paho close the socket, do not wait for it
                d.client._client.disconnect()  # noqa: SLF001 - aiomqtt has no non-blocking close
                d.client = None

    async def _finish(self, d: _Device, deadline: float, down_wall: float) -> None:
        """End of run: an offline device comes back to send its buffer; then a clean DISCONNECT."""
        if d.client is None and d.outbox:
            buffered = len(d.outbox)
            if await self._connect(d, deadline=deadline):
                self._truth.outages.append(Outage(d.spec.device_id, down_wall, time.time(), buffered))
        if d.client is not None:
            await self._flush(d, deadline=deadline)
        while d.outbox:  # could not reconnect in time: produced, never attempted
            stream, seq, _ = d.outbox.popleft()
            self._fail(d, stream, seq, d.spec.topic(stream), b"", "undelivered: offline when the run ended")
        if getattr(d.profile, "drops_connection", False) and d.client is not None:
            await self._disconnect_with_will(d)
        await self._disconnect(d)

    async def _flush(self, d: _Device, *, deadline: float) -> None:
        """Send the outbox in order, each publish awaited until its PUBACK."""
        loop = asyncio.get_running_loop()
        while d.outbox:
            if d.client is None and not await self._connect(d, deadline=deadline):
                return
            stream, seq, t_made = d.outbox.popleft()
            await self._send(d, stream, seq, t_made)
            if loop.time() >= deadline:
                return

    async def _send(self, d: _Device, stream: str, seq: int, t_made: float) -> None:
        spec = d.spec
        delay_before = getattr(d.profile, "delay_before", None)
        if delay_before is not None:
            delay = float(delay_before(seq))
            self._act(d, "timing", seq=seq, topic=spec.topic(stream), secret=getattr(d.profile, "secret", None),
                      outcome=f"delay_s:{delay:.3f}")
            if delay > 0:
                await asyncio.sleep(delay)
        t_sent = time.time()
        honest = Outgoing(stream, seq, spec.topic(stream), d.factory.make(stream, seq, int(t_sent * 1000)))
        for out in d.profile.shape(honest, self._rng):
            data = out.raw if out.raw is not None else encode(out.payload)
            client = d.client
            if client is None:  # an earlier message of this batch lost the connection
                self._fail(d, out.stream, out.seq, out.topic, data, "not connected", d.profile.name, out.tags,
                           out.technique, out.secret)
                self._act_publish(d, out, "failed:not connected")
                continue
            d.puback[0] = 0
            try:
                await client.publish(
                    out.topic, data, qos=out.qos, retain=out.retain,
                    properties=_properties(out.properties), timeout=self.publish_timeout_s,
                )
            except (aiomqtt.MqttError, OSError, ValueError) as exc:
                self._fail(d, out.stream, out.seq, out.topic, data, f"{type(exc).__name__}: {exc}",
                           d.profile.name, out.tags, out.technique, out.secret)
                self._act_publish(d, out, f"failed:{type(exc).__name__}")
                await self._disconnect(d)  # the next send reconnects (with backoff)
                continue
            code = d.puback[0] if out.qos else 0
            if code >= 0x80:
                # The broker refused it (e.g. 135, not authorised by the ACL): never count it as sent.
                self._fail(d, out.stream, out.seq, out.topic, data, f"PUBACK {code}", d.profile.name, out.tags,
                           out.technique, out.secret)
                self._act_publish(d, out, f"puback:{code}")
                continue
            self._truth.sent_records.append(SentRecord(
                spec.device_id, spec.device_type, out.stream, out.seq, out.topic, len(data),
                hashlib.sha256(data).hexdigest(), t_sent, data if self.keep_payloads else None,
                t_made, d.profile.name, out.tags, out.technique, out.secret,
            ))
            if out.technique:
                self._act_publish(d, out, f"puback:{code}")

    def _fail(self, d: _Device, stream: str, seq: int, topic: str, data: bytes, error: str,
              profile: str = "honest", tags: tuple[str, ...] = (), technique: str = "",
              secret: bytes | None = None) -> None:
        self._truth.failed.append(FailedRecord(
            d.spec.device_id, d.spec.device_type, stream, seq, topic, len(data),
            hashlib.sha256(data).hexdigest(), time.time(), error, profile, tags, technique, secret,
        ))

    def _act(self, d: _Device, action: str, *, technique: str = "", seq: int = 0, topic: str = "",
             secret: bytes | None = None, outcome: str = "", detail: str = "") -> None:
        technique = technique or getattr(d.profile, "technique", d.profile.name)
        self._truth.actions.append(HostileAction(
            d.spec.device_id, d.profile.name, technique, action, seq, topic, secret, outcome, time.time(), detail,
        ))

    def _act_publish(self, d: _Device, out: Outgoing, outcome: str) -> None:
        if out.technique:
            self._act(d, "publish", technique=out.technique, seq=out.seq, topic=out.topic, secret=out.secret,
                      outcome=outcome, detail=",".join(out.tags) + (",retain" if out.retain else ""))

    # ------------------------------------------------------------------------------------- connection

    async def _connect(self, d: _Device, *, deadline: float) -> bool:
        """Connect with jittered exponential backoff until ``deadline`` (loop time)."""
        assert self._connect_sem is not None
        loop = asyncio.get_running_loop()
        tls = self._tls(d.spec) if callable(self._tls) else self._tls
        profile = d.profile
        identifier = profile.client_id(d.spec)
        username_hook = getattr(profile, "username", None)
        username = username_hook(d.spec) if username_hook is not None else None
        if username is None and self.usernames:
            username = d.spec.device_id
        will_hook = getattr(profile, "will", None)
        will: Will | None = will_hook(d.spec) if will_hook is not None else None
        attempt = 0
        while True:
            client = aiomqtt.Client(
                self.host, self.port,
                identifier=identifier,
                username=username,
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=True,
                tls_context=tls,
                timeout=self.connect_timeout_s,
                keepalive=60,
                will=aiomqtt.Will(will.topic, will.payload, will.qos, will.retain) if will is not None else None,
                logger=_MQTT_LOG,
            )
            _watch_pubacks(client, d.puback)
            try:
                async with self._connect_sem:
                    await client.__aenter__()
            except (aiomqtt.MqttError, OSError) as exc:
                self.connect_failures += 1
                attempt += 1
                if identifier != d.spec.device_id or (username not in (None, d.spec.device_id)):
                    self._act_connect(d, identifier, username, f"failed:{type(exc).__name__}")
                if loop.time() >= deadline:
                    return False
                # Full jitter: a broker restart must not be answered by every device at the same instant.
                await asyncio.sleep(self._rng.uniform(0.0, min(5.0, 0.1 * 2**attempt)))
                continue
            # aiomqtt records why the broker dropped the connection on a future the simulator never
            # awaits (it learns of the drop from the next publish): mark it retrieved, or asyncio prints
            # 'Future exception was never retrieved' for every isolated device when the client is collected.
            client._disconnected.add_done_callback(_retrieve)  # noqa: SLF001
            d.client = client
            self._truth.connects[d.spec.device_id] += 1
            if profile is not HONEST:
                await self._after_hostile_connect(d, client, identifier, username, will)
            return True

    def _act_connect(self, d: _Device, identifier: str, username: str | None, outcome: str) -> None:
        secret_hook = getattr(d.profile, "identity_secret", None)
        self._act(d, "connect", secret=secret_hook(d.spec) if secret_hook is not None else None,
                  outcome=outcome, detail=f"client_id={identifier} username={username}")

    async def _after_hostile_connect(self, d: _Device, client: aiomqtt.Client, identifier: str,
                                     username: str | None, will: Will | None) -> None:
        """Record what a hostile profile did at connect, and make the subscriptions it asks for."""
        if identifier != d.spec.device_id or username not in (None, d.spec.device_id):
            self._act_connect(d, identifier, username, "connack:0")
        if will is not None:
            self._act(d, "will", technique=will.technique, topic=will.topic, secret=will.secret,
                      outcome="registered", detail="retain" if will.retain else "")
        subs_hook = getattr(d.profile, "extra_subscriptions", None)
        filters = list(subs_hook(d.spec)) if subs_hook is not None else []
        if not filters:
            return
        for f in filters:
            try:
                codes = await client.subscribe(f, qos=1, timeout=self.publish_timeout_s)
                outcome = "suback:" + ",".join(str(_code(c)) for c in (codes or []))
            except (aiomqtt.MqttError, OSError, ValueError) as exc:
                outcome = f"failed:{type(exc).__name__}"
            self._act(d, "subscribe", topic=f, outcome=outcome)
        dev = d.spec.device_id
        old = self._probe_tasks.pop(dev, None)
        if old is not None:
            old.cancel()
        self._probe_received.setdefault(dev, 0)
        self._probe_tasks[dev] = asyncio.create_task(self._count_probe(dev, client), name=f"probe:{dev}")

    async def _count_probe(self, dev: str, client: aiomqtt.Client) -> None:
        """Consume (and count) what a probing device's subscriptions bring it; the count goes to the truth."""
        try:
            async for _ in client.messages:
                self._probe_received[dev] += 1
        except (aiomqtt.MqttError, OSError):
            pass

    async def _disconnect_with_will(self, d: _Device) -> None:
        """MQTT 5 DISCONNECT with reason 0x04: the broker publishes the will, as if the device had died."""
        client, d.client = d.client, None
        if client is None:
            return
        try:
            client._client.disconnect(  # noqa: SLF001 - aiomqtt has no way to pass a reason code
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
            await asyncio.sleep(0.05)
        except (aiomqtt.MqttError, OSError, ValueError):
            pass
        self._act(d, "will", outcome="fired", detail="disconnect reason 0x04")

    async def _probe_dead_drops(self) -> None:
        """Can another client read what a hostile device left retained (messages, retained wills)?"""
        for dev, task in list(self._probe_tasks.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
            self._truth.actions.append(HostileAction(
                dev, self._profile_of(dev), "subscribe_probe", "subscribe", outcome=f"received:{self._probe_received[dev]}",
                t=time.time(), detail="messages delivered to the probing subscriptions during the run"))
        self._probe_tasks.clear()
        drops = [a for a in self._truth.actions
                 if a.technique == "dead_drop" and a.action in ("publish", "will") and a.secret is not None
                 and "retain" in a.detail]
        if not drops:
            return
        by_topic: dict[str, list[HostileAction]] = {}
        for a in drops:
            by_topic.setdefault(a.topic, []).append(a)
        ids = [d.spec.device_id for d in self._devices]
        for topic, acts in by_topic.items():
            owner = acts[0].device_id
            peer = next((i for i in ids if i != owner), "peer")  # another device's identity
            got = await self._read_retained(topic, peer)
            for a in acts:
                self._truth.actions.append(HostileAction(
                    a.device_id, a.profile, "dead_drop", "retrieve", a.seq, topic, a.secret,
                    "retrievable:" + ("yes" if got == a.secret else "no"), time.time(),
                    f"read by {peer} ({'matching' if got == a.secret else 'no matching'} retained message)",
                ))

    async def _read_retained(self, topic: str, peer: str) -> bytes | None:
        got: bytes | None = None
        tls = self._tls(next(d.spec for d in self._devices)) if callable(self._tls) else self._tls
        try:
            async with aiomqtt.Client(
                self.host, self.port, identifier=f"deaddrop-probe-{peer}", username=peer if self.usernames else None,
                protocol=aiomqtt.ProtocolVersion.V5, clean_start=True, tls_context=tls,
                timeout=self.connect_timeout_s, logger=_MQTT_LOG,
            ) as c:
                await c.subscribe(topic, qos=1)
                async with asyncio.timeout(0.5):
                    async for m in c.messages:
                        if m.retain and isinstance(m.payload, bytes):
                            got = m.payload
                            break
        except (TimeoutError, aiomqtt.MqttError, OSError):
            pass
        return got

    def _profile_of(self, dev: str) -> str:
        return next((d.profile.name for d in self._devices if d.spec.device_id == dev), "honest")

    async def _disconnect(self, d: _Device) -> None:
        client, d.client = d.client, None
        if client is None:
            return
        try:
            await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError):
            pass  # already gone: the broker has dropped the session either way (clean start)

    async def _report_progress(self, finished: asyncio.Event) -> None:
        assert self._on_progress is not None
        loop = asyncio.get_running_loop()
        last, last_at = -1, -math.inf
        while True:
            try:
                await asyncio.wait_for(finished.wait(), 0.5)
            except TimeoutError:
                pass
            sent = self._truth.sent
            if sent != last:
                # At most one call per 0.5 s, the final count included: a live view redraws on each.
                await asyncio.sleep(max(0.0, last_at + 0.5 - loop.time()))
                self._on_progress(sent)
                last, last_at = sent, loop.time()
            if finished.is_set():
                return


_PROP_NAMES = {
    "user_property": "UserProperty",
    "correlation_data": "CorrelationData",
    "response_topic": "ResponseTopic",
    "content_type": "ContentType",
    "payload_format_indicator": "PayloadFormatIndicator",
    "message_expiry_interval": "MessageExpiryInterval",
    "topic_alias": "TopicAlias",
}


def _code(rc: object) -> int:
    value = getattr(rc, "value", rc)
    return int(value) if isinstance(value, int) else 0


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _watch_pubacks(client: aiomqtt.Client, box: list[int]) -> None:
    """Keep the reason code of each PUBACK in ``box[0]`` (aiomqtt resolves the publish without it)."""
    paho = client._client  # noqa: SLF001 - the reason code is only visible in paho's callback
    # aiomqtt's own callback, set for paho's VERSION2 API (the five arguments below)
    inner = cast("CallbackOnPublish_v2", paho.on_publish)

    def on_publish(c: PahoClient, userdata: Any, mid: int, reason_code: ReasonCode,
                   properties: Properties) -> None:
        box[0] = _code(reason_code)
        inner(c, userdata, mid, reason_code, properties)

    paho.on_publish = on_publish


def _properties(props: Mapping[str, object]) -> Properties | None:
    if not props:
        return None  # the honest path: no properties object at all
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves __init__ unannotated
    for key, value in props.items():
        setattr(p, _PROP_NAMES.get(key, key), value)
    return p
