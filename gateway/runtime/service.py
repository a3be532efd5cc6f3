"""The running gateway: ingest from the broker, the pipeline, the vault, the uplinks, the audit log.

Delivery contract (at-least-once into every destination, nothing acknowledged early): a device's
QoS-1 message is PUBACKed to the broker only after its audit record and vault envelope have been
written and every MQTT destination has it: its uplink PUBACKed the envelope, or the envelope is in
that destination's encrypted spool, or (a destination whose data may not rest at the edge, while it
is unreachable) it was dropped with a reason in the audit log. Until then the broker keeps the
message in the gateway's persistent session, so a restart redelivers it and (device, sequence)
dedupe keeps each destination from seeing it twice.

Uplinks: each MQTT destination has an outbox. Envelopes are released in batches whose boundaries
the gateway draws (each lasts U(0.5, 1.5) x ``retime_ms``), and the header timestamp a re-timed
destination gets is that boundary, not the device's clock, so the timing of a device's messages
does not reach a destination (beyond which batch a message fell in); a batch leaves in a random
interleaving of its devices. Volume beyond a device's normal rate is held ``burst_hold_s`` and
withdrawn if the device trips its baseline meanwhile; it leaves sooner once the device has slowed
down enough to have paid for it out of its normal-rate allowance. A destination whose connection stays down
longer than ``uplink_down_after_s`` is declared down: its unacknowledged envelopes move to its spool
(``rest_at_edge``) or are dropped with ``uplink.unreachable``; when it returns, the spool drains in
order at ``spool_drain_rate`` before anything new is sent directly.

Bundles: a destination with ``bundle: N > 1`` (the default for mqtt) gets its envelopes in MQTT
messages of up to N on its own topic (``gateway.crypto.envelope.pack_bundle``), one per destination
per ingest read, release or drain step at the least; each envelope stays sealed and deduplicated on
its own. The broker and the destination then handle one message where they handled N, which is most
of what the gateway costs the broker (BENCHMARKS.md §4). A bundle adds no wait: what one read or one
release produced leaves when that read or release is done.

Bounded queues: when the uplinks fall behind, a spool is full (``when_full: refuse_new``) or a disk
is full, ingest stops reading (TCP backpressure reaches the broker, which queues for the persistent
session) and resumes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import json
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditLog
from gateway.audit.checkpoint import Checkpointer
from gateway.crypto.envelope import pack_bundle, pack_header, seal_packed, unbundle
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.crypto.recipient import RecipientSealer
from gateway.detect import CATCH_UP_WINDOW_S, MAX_CATCH_UP_S, OUTAGE_GAP_S, RateBaseline
from gateway.errors import BrokerError, EdgewardError, StorageFull
from gateway.fileio import close_first
from gateway.pipeline import Pipeline, PolicyLike
from gateway.policy.shadow import shadow_divergences
from gateway.runtime.donelog import DoneLog
from gateway.runtime.mqtt import Message, MqttClient
from gateway.runtime.spool import Spool, SpoolFull
from gateway.vault import VaultWriter

def _interleave(batch: list[tuple[str, bytes, tuple[Any, ...]]]) -> list[tuple[str, bytes, tuple[Any, ...]]]:
    """A batch in a uniformly random interleaving of its devices' messages, each device's own order
    kept. Released in arrival order, a message's place among the others would tell the destination
    when it arrived within the batch (measured: the read splits of one release decoded a 0.5 s
    timing channel through 10 s batches)."""
    by_device: dict[str, list[tuple[str, bytes, tuple[Any, ...]]]] = {}
    for item in batch:
        by_device.setdefault(item[2][2], []).append(item)
    if len(by_device) < 2:
        return batch
    turns = [dev for dev, items in by_device.items() for _ in items]
    _RNG.shuffle(turns)
    cursor = dict.fromkeys(by_device, 0)
    out = []
    for dev in turns:
        out.append(by_device[dev][cursor[dev]])
        cursor[dev] += 1
    return out


def _bundles(items: list[Any], most: int) -> list[list[Any]]:
    """Spool items (``.payload``) in runs of at most ``most`` and ``BUNDLE_MAX_BYTES``, in order."""
    groups: list[list[Any]] = []
    size = 0
    for item in items:
        if not groups or len(groups[-1]) >= most or size + len(item.payload) > BUNDLE_MAX_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += len(item.payload)
    return groups


def _since_last_audit_write(directory: Path, now: float) -> float:
    """Seconds since the newest audit file was written (0.0 for a new gateway)."""
    try:
        newest = max((p.stat().st_mtime for p in directory.glob("audit-*.jsonl")), default=None)
    except OSError:
        return 0.0
    return max(0.0, now - newest) if newest is not None else 0.0


def _disk_full_unresolved(directory: Path, tail_bytes: int = 1 << 20) -> bool:
    """Whether the audit log's last disk alert is ``disk_full``: the previous life ended inside a
    disk-full episode (killed, or stopped while the disk was full) and never wrote its ``disk_ok``.
    While the disk is full next to nothing is written, so that alert is near the end of the last file."""
    files = sorted(directory.glob("audit-*.jsonl"))
    if not files:
        return False
    try:
        with open(files[-1], "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in reversed(lines):
        if b'"disk_' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # the first line of the tail may be cut
            continue
        if type(rec) is dict and rec.get("event") == "alert" and rec.get("kind") in ("disk_full", "disk_ok"):
            return bool(rec["kind"] == "disk_full")
    return False


_RNG = random.SystemRandom()  # batch boundaries and interleavings: nothing a device sees predicts them
# Holding excess volume: a device's normal-rate allowance holds this share of its baseline's burst
# (at least PROBATION_MIN_BURST messages), refilled at PROBATION_REFILL x the type's nominal rate
# (baseline / headroom). Refilled at exactly the nominal rate, an honest device's allowance is a random
# walk without drift that sooner or later reaches 0; a quarter more gives it drift back up (honest
# 3-minute fleet: 22 envelopes held -> 0, BENCHMARKS.md §8), and the device's baseline still trips at
# 2.5 x nominal.
PROBATION_BURST_SHARE = 0.25
PROBATION_MIN_BURST = 5.0
PROBATION_REFILL = 1.25
# A device first seen has earned no slack yet: it starts with one message of allowance and builds the
# rest at the refill's drift. With the whole slack, a burst's first x8 group left whole (7 messages in
# the timing-burst scenario); with one message and no drift nor pay-back, honest traffic waited behind
# the hold (83,168 of 92,053 envelopes in 3 minutes). With both, 0 and 1,699 (BENCHMARKS.md §8).
PROBATION_START = 1.0
# After an outage each device's allowance is credited this x its refill rate x the outage: 2.5 x nominal,
# the rate baseline's own credit. An honest backlog is a count that scatters around the nominal rate x
# the outage: credited at the refill rate alone (1.25 x), some devices still waited up to 26 s of the hold
# after a 60 s restart; at 2.5 x none did (BENCHMARKS.md §8).
PROBATION_CATCH_UP = 2.0
PROBATION_MAX_DEVICES = 200_000
DISK_FULL_REMIND_S = 60.0  # a disk that stays full is alerted again this often (not on every retry)

__all__ = ["GatewayConfig", "GatewayStats", "Gateway", "SYS_DROPPED"]

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
# A bundle stays below half the broker's max_packet_size (2 MiB, gateway.runtime.broker); an envelope
# bigger than this goes in a bundle of its own.
BUNDLE_MAX_BYTES = 1024 * 1024

# Rejections that mean a device broke an invariant (not merely sent something malformed): each is
# quarantined and alerted on. detect.* codes always are.
SECURITY_REASONS = frozenset({
    "guard.unknown_field", "guard.topic", "guard.topic_site", "guard.topic_stream", "guard.unknown_device",
    "guard.retained", "guard.too_large", "guard.isolated",
})
_UNTRUSTED_ID_REASONS = frozenset({
    "guard.topic", "guard.topic_site", "guard.topic_stream", "guard.unknown_device", "detect.topic_encoding",
})


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Where the gateway keeps its state and which broker it talks to."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 1883
    uplink_host: str | None = None  # default: the ingest broker
    uplink_port: int | None = None
    client_id: str = "edgeward-gateway"
    username: str | None = None
    share_group: str | None = None  # "$share/<group>/..." when several workers share the ingest
    alert_topic: str = "edgeward/alerts"  # operator alerts (policy reload failures, detections)
    max_pending: int = 20_000  # uplink publishes not yet acknowledged before ingest pauses
    # Sealed envelopes held in memory, held for a device's excess volume, waiting for their re-timed
    # batch or for their uplink's PUBACK (max_pending counts envelopes; images make the bytes large):
    # past it, ingest pauses until releases, withdrawals and acknowledgements bring it under half.
    max_held_mb: float = 1024.0
    key_max_messages: int = 2**24
    key_max_age_s: float = 24 * 3600.0
    # A site (edgeward init) supplies these; without them (tests) a local KEK file is generated.
    password: bytes | None = field(default=None, repr=False)
    kek: bytes | None = field(default=None, repr=False)
    audit_signing_key: Any = field(default=None, repr=False)  # Ed25519 private key -> signed checkpoints
    site_name: str = ""
    checkpoint_topic: str = "edgeward/audit/checkpoints"
    checkpoint_every_records: int = 10_000
    checkpoint_every_s: float = 60.0
    recipient_keys: dict[str, Any] = field(default_factory=dict)  # destination -> X25519 public key
    # Per-device rate/volume baseline: a device beyond `headroom` x its type's normal traffic (after
    # a burst allowance) is refused with detect.burst / detect.volume. None turns it off (load tests).
    rate_headroom: float | None = 2.5
    # A registered device with this many violations within `isolate_window_s` is isolated (when the
    # runtime provides a way to: a site's CA and broker). 0 turns automatic isolation off.
    isolate_after: int = 20
    isolate_window_s: float = 60.0
    # Uplinks. A destination may have its own endpoint (destination -> (host, port)); the rest share
    # the default uplink. `retime` False ignores the policy's retime_ms (latency benchmarks only).
    uplinks: dict[str, tuple[str, int]] = field(default_factory=dict)
    retime: bool = True
    # Each re-timing batch lasts U(1 - j, 1 + j) x retime_ms, drawn by the gateway: boundaries that
    # cannot phase-lock with a device's own fixed schedule (docs/hostile-firmware.md, the sweep).
    retime_jitter: float = 0.5
    # Volume beyond a device's *normal* rate (its type's nominal rate, a few messages of slack) is held
    # this long before it may leave the site; a device that trips its rate baseline meanwhile has
    # what is held withdrawn (audited `undelivered`, reason `withheld:detect.burst`), so a burst's
    # size never reaches a destination whole. 0 turns it off. SiteRuntime (edgeward run) sets 30 s.
    burst_hold_s: float = 0.0
    # Retiring a session no process will use again (`retire_session`): connect as it, unsubscribe,
    # decide and deliver what it still holds. Used when a site changes its number of workers.
    drain_only: bool = False
    uplink_down_after_s: float = 5.0  # a connection away this long: the destination is down
    # A SUBSCRIBE unanswered this long while nothing at all comes from the broker: the connection is
    # given up and made again (a resumed session's backlog arrives first; each byte of it resets this)
    subscribe_timeout_s: float = 10.0
    spool_drain_rate: float = 2_000.0  # envelopes/s per destination when a spool drains


@dataclass(slots=True)
class _Probation:
    """A device's normal-rate allowance and the envelopes held while it sends beyond it. Every message
    is charged, held or not, so ``tokens`` below 0 is what the device owes for what it holds."""

    tokens: float
    t: float
    rate: float  # refill, messages/s
    cap: float  # slack, messages
    held: deque[tuple[float, _Outbox, str, bytes, tuple[Any, ...]]] = field(default_factory=deque)


@dataclass
class GatewayStats:
    received: int = 0
    decided: int = 0
    duplicates: int = 0
    acked: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    denied: Counter[str] = field(default_factory=Counter)  # "<destination>:<reason>"
    forwarded: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)  # built-in invariants broken, by reason
    broker_dropped: int = 0
    reconnects: int = 0
    connect_failures: int = 0  # reconnect attempts that failed (each retried after a backoff)
    shadow_divergent: int = 0  # messages a shadow policy would have decided differently
    undelivered: Counter[str] = field(default_factory=Counter)  # "<destination>:<reason>", counted drops
    spooled: Counter[str] = field(default_factory=Counter)
    held: int = 0  # envelopes held for a device's excess volume, ever
    bundles: int = 0  # MQTT messages that carried bundled envelopes
    bundled: int = 0  # envelopes they carried
    disk_full_events: int = 0
    latency_s: list[float] = field(default_factory=list)  # receipt -> last destination acknowledged

    def to_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "decided": self.decided,
            "duplicates": self.duplicates,
            "acked": self.acked,
            "held": self.held,
            "rejected": dict(self.rejected),
            "denied": dict(self.denied),
            "forwarded": dict(self.forwarded),
            "removed_fields": dict(self.removed),
            "violations": dict(self.violations),
            "broker_dropped": self.broker_dropped,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "shadow_divergent": self.shadow_divergent,
            "undelivered": dict(self.undelivered),
            "spooled": dict(self.spooled),
            "disk_full_events": self.disk_full_events,
            "bundles": self.bundles,
            "bundled": self.bundled,
        }


@dataclass(eq=False)
class _Link:
    """One uplink connection; destinations with the same endpoint share it."""

    name: str
    client: MqttClient
    uplink_for: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # pid -> delivery, bundle or spool ref
    bundled: int = 0  # envelopes in flight beyond one per MQTT message (bundles)
    down_since: float | None = None  # monotonic
    declared_down: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Outbox:
    """One MQTT destination's way out: the re-timing batch, the spool, and what could not go."""

    name: str
    link: _Link
    retime_s: float
    spool: Spool | None
    when_full: str = "refuse_new"
    queue: list[tuple[str, bytes, tuple[Any, ...]]] = field(default_factory=list)  # until the next release
    queue_bytes: int = 0
    overflow: list[tuple[str, bytes, tuple[Any, ...]]] = field(default_factory=list)  # spool full / disk full
    next_release: float = 0.0
    sent: int = 0
    drain_tokens: float = 0.0
    topic: str = ""  # the destination's topic: bundles go there
    bundle: int = 1  # envelopes per MQTT message at most (the policy's `bundle`)
    out: list[tuple[str, bytes, tuple[Any, ...]]] = field(default_factory=list)  # the bundle being filled
    out_bytes: int = 0

    @property
    def hold(self) -> bool:
        """True while new envelopes must not be sent directly (down, or older ones still waiting)."""
        if self.link.declared_down:
            return True
        return self.spool is not None and (bool(self.overflow) or self.spool.backlog > 0)


class Gateway:
    """One gateway worker. ``async with Gateway(...) as gw: await gw.serve(stop_event)``."""

    def __init__(
        self,
        config: GatewayConfig,
        policy: PolicyLike,
        *,
        clock: Callable[[], float] = time.time,
        dedupe: Any = None,
        rate: Any = None,
    ) -> None:
        """``dedupe`` and ``rate`` replace the per-process (device, sequence) window and rate
        baselines, e.g. with state shared between workers (``is_new(device, seq)`` and
        ``observe(device, size, now, device_type=...)``)."""
        self.config = config
        self.stats = GatewayStats()
        self._clock = clock
        state = config.state_dir
        kek = config.kek if config.kek is not None else load_or_create_kek(state / "keys" / "kek.key")
        self.keyring = DataKeyring(
            state / "keys" / "datakeys.jsonl",
            kek,
            max_messages=config.key_max_messages,
            max_age_s=config.key_max_age_s,
            clock=clock,
        )
        downtime = _since_last_audit_write(state / "audit", clock())  # before opening cuts a torn tail
        self.audit = AuditLog(state / "audit")
        # The previous life's disk-full episode was never closed: this life's first write closes it
        # (an operator's disk_full alert would otherwise never clear).
        self._disk_ok_owed = _disk_full_unresolved(state / "audit")
        self._audit_count0 = self.audit.count
        self.checkpointer: Checkpointer | None = None
        self._record: Callable[[dict[str, Any]], str] = self.audit.append
        if config.audit_signing_key is not None:
            self.checkpointer = Checkpointer(
                self.audit,
                config.audit_signing_key,
                site=config.site_name,
                every_records=config.checkpoint_every_records,
                every_s=config.checkpoint_every_s,
                clock=clock,
                publish=self._publish_checkpoint,
                defer_sync=True,  # fsynced by _syncer's thread, then published: never on the event loop
            )
            self._record = self.checkpointer.append
        self.vault = VaultWriter(state / "vault")
        # Deliveries already made before a crash: skipped when the broker redelivers (exactly once per
        # destination). Forgotten once the redelivery window has passed.
        self.done = DoneLog(state / "done")
        self._done_before = self.done.load()
        self._done_until = time.monotonic() + 600.0
        # Evidence of violations, sealed under the site's keys like the vault (edgeward decrypt reads it).
        self.quarantine = VaultWriter(state / "quarantine")
        self._last_alert: dict[tuple[str, str], float] = {}
        self._strikes: dict[str, list[float]] = {}  # device -> [violations in window, window start]
        self.isolated: set[str] = set()
        # Set by the runtime that can isolate (SiteRuntime): an async callable taking the device id.
        self.on_isolate: Any = None
        recipients = {d: RecipientSealer(k) for d, k in config.recipient_keys.items()}
        if rate is None and config.rate_headroom:
            rate = RateBaseline(headroom=config.rate_headroom)
        self.pipeline = Pipeline(policy, self.keyring, clock_ms=lambda: int(clock() * 1000), recipients=recipients,
                                 dedupe=dedupe, rate=rate, enforce_rate=rate is not None,
                                 seq_ids=self.keyring.seq_ids)
        # Workers (SharedDeviceState) hold against one allowance per device for all of them; a single
        # gateway keeps it in _Probation.tokens.
        self._shared_state = rate if hasattr(rate, "hold_allowance") else None
        # Only re-timed uplinks stamp their headers; with re-timing off the hot path skips the call.
        self.pipeline.header_ts = self._header_ts if config.retime else None
        # A restart after downtime: the broker holds the fleet's backlog for this session and delivers
        # it at once. Every device may send that long's traffic once without tripping its rate
        # baseline (the gateway caused the burst, not the device). The audit log's last write tells
        # when the previous life stopped reading.
        if downtime and self.pipeline.rate is not None and hasattr(self.pipeline.rate, "catch_up"):
            self.pipeline.rate.catch_up(downtime, clock())
        self.ingest = MqttClient(
            host=config.host,
            port=config.port,
            client_id=config.client_id,
            username=config.username,
            password=config.password,
            on_messages=self._on_messages,
            ordered_acks=True,  # Mosquitto walks its in-flight list on every PUBACK (runtime.mqtt)
        )
        self.uplink = MqttClient(
            host=config.uplink_host or config.host,
            port=config.uplink_port or config.port,
            client_id=config.client_id + "-uplink",
            username=config.username,
            password=config.password,
            on_ack=lambda pid: self._on_uplink_ack(self._default_link, pid),
        )
        # ingest pid -> [outstanding destination acknowledgements, t0, device, seq]
        self._pending: dict[int, list[Any]] = {}
        # (device, seq) -> [outstanding, t0, ingest pid of its redelivery or None, that pid's generation]:
        # messages whose ingest connection broke while their deliveries were still on the way. The
        # broker redelivers them, dedupe calls the redelivery a duplicate, and its PUBACK must wait
        # for those deliveries as the first one did (a kill -9 in between would lose them).
        self._orphans: dict[tuple[str, int], list[Any]] = {}
        self._kek = kek
        self._default_link = _Link("default", self.uplink)
        self._links: dict[tuple[str, int] | None, _Link] = {None: self._default_link}
        self.outboxes: dict[str, _Outbox] = {}
        self._pause_reasons: set[str] = set()
        # While _connect waits for its SUBACK, a pause (a backlog message meeting a full disk) is only
        # noted: the answer comes after the backlog, and a paused transport would never read it.
        # _connect pauses the transport once it is answered.
        self._connecting = False
        self._disk_full: str | None = None
        self._disk_full_episode: list[float] | None = None  # [started, last alerted, failed retries]
        self._probation: dict[str, _Probation] = {}
        self._holding: dict[str, _Probation] = {}  # the devices in _probation with envelopes held
        self._probation_bytes = 0  # sealed envelopes held in _probation: counted against max_held_mb
        self._decision_tally: dict[int, tuple[Any, tuple[str, ...], tuple[str, ...]]] = {}
        self._nominal: dict[str, tuple[float, float]] = {}  # device type -> (normal msgs/s, slack)
        # The hold's catch-up after an outage (as RateBaseline.catch_up): since when, and how many seconds
        # of backlog each device is credited. A restart starts with its downtime.
        self._hold_grace_from = -float("inf")
        self._hold_grace_s = 0.0
        self._last_read: float | None = None
        if downtime:
            self._hold_catch_up(downtime, time.monotonic())
        self._held_acks: list[tuple[int, int | None]] = []  # (packet id, ack id)
        self._last_kind_alert: dict[str, float] = {}
        self._generation = 0
        self._paused = False
        self._closing = False
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Shadow mode: a candidate policy decides every message beside the live one, never enforced.
        self.shadow: PolicyLike | None = None
        self._shadow_log: Any = None
        # Traffic recording: the facts of every decided message (names and classes, never values).
        self._traffic: Any = None
        self._ensure_outboxes()

    def start_shadow(self, candidate: PolicyLike) -> Path:
        """Run ``candidate`` in shadow; divergences go to ``<state>/shadow-<rev>.jsonl``."""
        self.stop_shadow()
        path = self.config.state_dir / f"shadow-{candidate.revision}.jsonl"
        self._shadow_log = open(path, "a", encoding="utf-8")
        self.shadow = candidate
        self.audit_event({"event": "policy.shadow_started", "rev": candidate.revision})
        return path

    def stop_shadow(self) -> None:
        if self._shadow_log is not None:
            self._shadow_log.close()
            self._shadow_log = None
        self.shadow = None

    def record_traffic(self, path: Path | None) -> None:
        """Start (or with None stop) writing a traffic sample for ``edgeward policy diff --traffic``."""
        if self._traffic is not None:
            self._traffic.close()
            self._traffic = None
        if path is not None:
            from gateway.policy.traffic import facts_to_json

            self._facts_to_json = facts_to_json
            self._traffic = open(path, "a", encoding="utf-8")

    def alert(self, kind: str, detail: dict[str, Any]) -> None:
        """An operator alert: into the audit log and onto ``<alert_topic>/<kind>`` (QoS 1)."""
        record = {"event": "alert", "kind": kind, **detail}
        self.audit_event(record)
        if self.uplink.connected:
            self.uplink.publish(f"{self.config.alert_topic}/{kind}", json.dumps(record, sort_keys=True).encode())
            self.uplink.flush()

    @property
    def policy(self) -> PolicyLike:
        return self.pipeline.policy

    def swap_policy(self, policy: PolicyLike) -> None:
        """Atomically replace the live policy (between two messages; the loop is single-threaded)."""
        old = self.pipeline.policy.revision
        self.pipeline.policy = policy
        self._ensure_outboxes()
        self.audit.append({"event": "policy.activated", "rev": policy.revision, "previous": old})

    def audit_event(self, record: dict[str, Any]) -> None:
        """Append and write one event record now; the syncer's thread fsyncs it within a second."""
        self._record(record)
        try:
            self.audit.flush()
        except StorageFull as exc:  # kept in the buffer; written when space returns
            self._enter_disk_full(str(exc))

    def _publish_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Signed checkpoints leave the gateway at once: truncating the log behind one is detectable."""
        if self.uplink.connected:
            self.uplink.publish(self.config.checkpoint_topic, json.dumps(checkpoint, sort_keys=True).encode())
            self.uplink.flush()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Gateway:
        self._loop = asyncio.get_running_loop()
        # A fresh data key is written and fsynced where it is made (0.5-6 ms measured): now, not under
        # the first message of this life.
        self.keyring.current()
        await self._connect()
        # A long-lived service: move what start-up built (policy plan, catalogue, keys) out of the
        # cyclic collector's reach, and keep full collections as rare as before (5,000 x 50 x 1,000
        # net allocations). Measured (BENCHMARKS.md §4): full collections over a large heap were
        # latency spikes of hundreds of milliseconds; a young generation of 50,000 objects took
        # 10-35 ms to collect, which alone broke the 5 ms p99 at half load; one of 5,000 takes 1-2 ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(5_000, 50, 1_000)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        self._connecting = True
        try:
            await self._connect_ingest()
        finally:
            self._connecting = False
        if self._pause_reasons and self.ingest.transport is not None:  # paused before or meanwhile
            self.ingest.transport.pause_reading()

    async def _connect_ingest(self) -> None:
        # A new generation before the ingest connects: a resumed session redelivers at once, before
        # SUBSCRIBE returns, and those messages belong to this connection.
        self._generation += 1
        await self.uplink.connect()
        resumed = await self.ingest.connect()
        site = self.pipeline.policy.site
        topic = f"site/{site}/dev/#"
        if self.config.share_group:
            topic = f"$share/{self.config.share_group}/{topic}"
        if self.config.drain_only:  # take what the session holds, nothing new
            await self.ingest.unsubscribe(topic, SYS_DROPPED, timeout=self.config.subscribe_timeout_s)
        elif not (resumed and self._pause_reasons and not self.config.share_group):
            await self.ingest.subscribe((topic, 1), (SYS_DROPPED, 0), timeout=self.config.subscribe_timeout_s)
        # else: paused (disk full, memory) on a resumed session, which kept its subscriptions. A paused
        # transport could not read the SUBACK (the wait timed out, and the serve loop connected again
        # and again while the disk stayed full); the broker queues for the session meanwhile.
        # Not a worker's: Mosquitto 2.0 restores a shared subscription from its persistence file dead,
        # delivering nothing until it is subscribed again (tests/integration/test_workers.py), and a
        # resumed session cannot tell a dropped connection from a restarted broker. So a worker always
        # subscribes, reading, and pauses after (_connect).

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, reconnecting (jittered backoff) whenever the broker goes away."""
        backoff = 0.1
        fsync_task = asyncio.create_task(self._syncer(stop), name="gateway-audit-sync")
        helpers = [asyncio.create_task(self._deliverer(stop), name="gateway-deliverer")]
        for link in self._links.values():
            if link is not self._default_link:
                helpers.append(asyncio.create_task(self._keep_connected(link, stop), name=f"uplink-{link.name}"))
        try:
            while not stop.is_set():
                closed: list[asyncio.Future[Any]] = [
                    c.closed for c in (self.ingest, self.uplink) if c.closed is not None]
                stop_wait = asyncio.create_task(stop.wait(), name="gateway-stop-wait")
                await asyncio.wait([stop_wait, *closed], return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                if stop.is_set():
                    break
                self.stats.reconnects += 1
                for c in (self.ingest, self.uplink):
                    c.abort()
                self._reset_pending()
                while not stop.is_set():
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    try:
                        await self._connect()
                        backoff = 0.1
                        break
                    except (BrokerError, OSError):
                        self.stats.connect_failures += 1
                        backoff = min(backoff * 2, 5.0)
        finally:
            for t in (fsync_task, *helpers):
                t.cancel()
            for t in (fsync_task, *helpers):
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    async def retire_session(self, *, idle_s: float = 2.0, timeout_s: float = 600.0) -> int:
        """With ``drain_only``: serve until the resumed session has nothing more to give (no message
        for ``idle_s``), so that closing then delivers and acknowledges all of it. Returns the
        messages received. The caller deletes the session afterwards (``delete_session``)."""
        stop = asyncio.Event()
        serve = asyncio.create_task(self.serve(stop), name="gateway-retire")
        last, quiet_since = -1, time.monotonic()
        deadline = quiet_since + timeout_s
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                if self.stats.received != last:
                    last, quiet_since = self.stats.received, time.monotonic()
                elif time.monotonic() - quiet_since >= idle_s:
                    break
        finally:
            stop.set()
            await serve
        return self.stats.received

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every received message is fully acknowledged (for tests and the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and not self._orphans \
                    and not any(link.client.pending_out for link in self._links.values()) \
                    and not any(ob.queue for ob in self.outboxes.values()):
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        """Graceful stop: take no new messages, finish and acknowledge those in hand, then leave.
        Whatever is still unacknowledged stays in the broker's session for the next start."""
        transport = self.ingest.transport
        if transport is not None and self.ingest.connected:
            transport.pause_reading()
            # Release what is held and the re-timing batches now (one last batch), and keep
            # delivering until drained.
            for ref in self._release_held(time.monotonic(), everything=True):
                self._settle(ref)
            for ob in self.outboxes.values():
                ob.next_release = 0.0
            deliver = asyncio.create_task(self._deliverer(asyncio.Event()), name="gateway-final-delivery")
            await self.drain(timeout=10)
            deliver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deliver
            self.ingest.release_acks()  # also those whose older messages stay unacknowledged
            self.ingest.flush()
            # Read again (the disconnect handshake needs the PINGRESP) but leave any new PUBLISH
            # unacknowledged: the broker keeps it for the next start.
            self._closing = True
            transport.resume_reading()
        for c in (self.ingest, *(link.client for link in self._links.values())):
            with contextlib.suppress(Exception):
                await c.disconnect()
        for ob in self.outboxes.values():
            if ob.spool is not None:
                ob.spool.close()
        self.stop_shadow()
        self.record_traffic(None)
        self.vault.close()
        self.done.close()
        self.quarantine.close()
        self.audit.close()

    async def _syncer(self, stop: asyncio.Event) -> None:
        """Once a second: fsync the audit log, the vault, the done log and the quarantine (and the
        files they rolled over from) in a worker thread (an fsync on a busy disk can take tens of
        milliseconds; the event loop must not wait for it). The writes that acknowledgements depend
        on stay on the loop."""
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if self._disk_full is not None:
                self._retry_after_disk_full()
            checkpoints: list[dict[str, Any]] = []
            try:
                if self.checkpointer is not None:
                    self.checkpointer.tick()
                self.audit.flush()
                # on disk now (written, fsynced just below): published once that fsync has finished
                checkpoints = self.checkpointer.take_unsynced() if self.checkpointer is not None else []
                self.vault.flush()
                self.done.flush()
            except StorageFull as exc:
                self._enter_disk_full(str(exc))
            if self._done_before and time.monotonic() > self._done_until:
                self._done_before = {}
            # the live files, and those the vault, the done log and the quarantine rolled over from
            # since (still open: they are closed here once fsynced, never before)
            writers = (self.vault, self.done, self.quarantine)
            rolled = [(w, len(w.retired)) for w in writers]
            fds = [f.fileno() for w in writers for f in w.retired]
            fds += [f.fileno() for f in (self.audit._fh, *(w._fh for w in writers)) if not f.closed]
            synced = await asyncio.to_thread(_fsync_all, fds)
            if synced:
                for w, n in rolled:
                    close_first(w.retired, n)
            if checkpoints and self.checkpointer is not None:
                if synced:
                    self.checkpointer.publish(checkpoints)
                else:  # published after the next fsync that succeeds, never before
                    self.checkpointer.requeue(checkpoints)
            spools = [ob.spool for ob in self.outboxes.values() if ob.spool is not None]
            if spools:
                await asyncio.to_thread(_sync_spools, spools)
            if not self.keyring.next_ready:  # the next data key is made here, not under a message
                with contextlib.suppress(OSError, EdgewardError):  # else the rotation makes it, as before
                    await asyncio.to_thread(self.keyring.prepare_next)
            with contextlib.suppress(OSError):  # a full disk must not end this loop (it retries the disk)
                self.write_status()
            for f in (self._shadow_log, self._traffic):
                if f is not None:
                    f.flush()

    def _reset_pending(self) -> None:
        # Acks for a dead ingest connection are meaningless: the broker redelivers those messages,
        # and dedupe recognises them. Those whose deliveries are still on the way become orphans: the
        # redelivery is acknowledged when they are done, not at once.
        for o in self._orphans.values():
            o[2] = None  # a redelivery adopted on the dead connection: the broker sends it again
        for entry in self._pending.values():
            self._orphans[(entry[2], entry[3])] = [entry[0], entry[1], None, 0]
        self._pending.clear()
        # _uplink_for stays: the uplink re-sends what was in flight, and each PUBACK still records
        # its delivery as done; the generation keeps those from acknowledging new ingest messages.
        self._generation += 1
        self._held_acks.clear()  # their connection is gone: the broker redelivers those messages
        self._pause_reasons.discard("backpressure")
        if self._paused:
            self._paused = False

    # ------------------------------------------------------------------ the hot path
    def _on_messages(self, batch: list[Message]) -> None:
        if self._closing:
            return
        stats = self.stats
        pipeline = self.pipeline
        audit_append = self._record
        vault_append = self.vault.append
        outboxes = self.outboxes
        ready: list[tuple[int, int | None]] = []  # (packet id, ack id)
        vaulted: list[tuple[str, int, str]] = []
        withdrawn: list[tuple[Any, ...]] = []
        gen = self._generation
        t0 = time.monotonic()
        last = self._last_read
        if last is not None and t0 - last >= OUTAGE_GAP_S:  # nothing from any device: the ingest was down
            self._hold_catch_up(t0 - last, t0)
        self._last_read = t0
        for m in batch:
            if m.topic == SYS_DROPPED:
                with contextlib.suppress(ValueError):
                    stats.broker_dropped = int(m.payload)
                continue
            stats.received += 1
            # The message's own handle: two messages in flight may carry one packet id (runtime.mqtt)
            handle = m.ack_id if m.ack_id is not None else m.packet_id
            out = pipeline.process(m.topic, m.payload, retain=m.retain)
            if self._done_before and out.deliveries:
                done = self._done_before.get((out.device, out.seq))
                if done:
                    # Redelivered after a crash: only the destinations that do not have it yet.
                    out.deliveries = [d for d in out.deliveries if d.destination not in done]
                    out.record["redelivery_skipped"] = sorted(done)
                    if not out.deliveries:
                        stats.duplicates += 1
            if self.shadow is not None and out.decision is not None:
                self._shadow(out)
            if self._traffic is not None and out.facts is not None:
                self._traffic.write(json.dumps(self._facts_to_json(out.facts), separators=(",", ":")) + "\n")
            if out.reason:
                if out.duplicate:
                    stats.duplicates += 1
                else:
                    stats.rejected[out.reason] += 1
                    if out.reason in SECURITY_REASONS or out.reason.startswith("detect."):
                        self._on_violation(out, m)
                    if (out.device in self._probation or self._shared_state is not None) and (
                            out.reason.startswith("detect.") or out.reason == "guard.isolated"):
                        withdrawn.extend(self._withdraw(out.device, out.reason))
            else:
                if "trailer_cut" in out.record:
                    self._on_violation(out, m, code="detect.image_trailer")
                stats.decided += 1
                decision = out.decision
                assert decision is not None
                # What a decision denied and removed, worked out once per Decision object (the policy
                # shares equal decisions between messages and devices).
                tally = self._decision_tally.get(id(decision))
                if tally is None or tally[0] is not decision:
                    tally = (decision,
                             tuple(f"{r.destination}:{r.reason}" for r in decision.routes if not r.allow),
                             tuple(code for r in decision.routes for _, code in r.removed))
                    if len(self._decision_tally) > 100_000:
                        self._decision_tally.clear()
                    self._decision_tally[id(decision)] = tally
                for key in tally[1]:
                    stats.denied[key] += 1
                for code in tally[2]:
                    stats.removed[code] += 1
            n_up = 0
            held = self._probation_hold(out, t0) if self.config.burst_hold_s and out.deliveries else None
            for d in out.deliveries:
                stats.forwarded[d.destination] += 1
                if d.transport == "vault":
                    vault_append(d.envelope)
                    vaulted.append((out.device, out.seq, d.destination))
                    continue
                ob = outboxes.get(d.destination) or self._outbox(d.destination)
                ref = (gen, handle, out.device, out.seq, d.destination)
                if held is not None:  # beyond the device's normal volume: waits to see if it is a burst
                    held.held.append((t0, ob, d.topic, d.envelope, ref))
                    self._holding[out.device] = held
                    self._probation_bytes += len(d.envelope)
                    stats.held += 1
                    n_up += 1
                elif ob.retime_s and not ob.hold:
                    ob.queue.append((d.topic, d.envelope, ref))  # released at the next batch boundary
                    ob.queue_bytes += len(d.envelope)
                    n_up += 1
                elif self._send(ob, d.topic, d.envelope, ref):
                    n_up += 1
            audit_append(out.record)
            if handle is not None:
                if n_up:
                    self._pending[handle] = [n_up, t0, out.device, out.seq, m.packet_id, m.ack_id]
                elif out.duplicate and self._orphans and (orphan := self._orphans.get((out.device, out.seq))):
                    orphan[2], orphan[3] = (m.packet_id, m.ack_id), gen  # PUBACKed when its deliveries are done
                else:
                    # a handle means QoS 1, so a packet id: no check for mypy on the hot path
                    ready.append((m.packet_id, m.ack_id))  # type: ignore[arg-type]
        # Group commit: one write for the audit records, vault frames and spool entries of the whole
        # batch, before any of the batch is acknowledged.
        for device, seq, dest in vaulted:
            self.done.add(device, seq, dest)
        if self._commit():
            for pid, aid in ready:
                self.ingest.ack(pid, aid)
            stats.acked += len(ready)
            for ref in withdrawn:
                self._settle(ref)
        else:
            self._held_acks.extend(ready)  # acknowledged once the disk takes the batch
        self._flush_out()
        if not self._paused and self._pending_out() > self.config.max_pending:
            self._paused = True
            self._pause("backpressure")
        if self._held_bytes() > self.config.max_held_mb * 2**20:
            self._pause("memory")

    def _on_violation(self, out: Any, m: Message, *, code: str = "") -> None:
        """A device broke a built-in invariant: keep the evidence sealed in the local quarantine, and
        tell the operator (at most one alert per device and reason per second; all are audited)."""
        code = code or out.reason
        self.stats.violations[code] += 1
        header = pack_header(out.device or "?", out.stream or "?", out.seq, out.ts, "quarantine",
                             self.pipeline.policy.revision)
        self.quarantine.append(seal_packed(self.keyring, header, m.payload))
        key = (out.device, code)
        now = self._clock()
        if code not in _UNTRUSTED_ID_REASONS and out.device:
            self._strike(out.device, now)
        if now - self._last_alert.get(key, 0.0) >= 1.0:
            if len(self._last_alert) > 100_000:
                self._last_alert.clear()
            self._last_alert[key] = now
            # "code" and "ref" (the payload digest), not "reason"/"digest": the alert points at the
            # message's own audit record rather than repeating it.
            detail: dict[str, Any] = {"code": code, "seq": out.seq, "ref": out.record.get("digest")}
            if code in _UNTRUSTED_ID_REASONS:
                # The device level itself is the suspect (it may carry the data): never echo it.
                detail["device_digest"] = hashlib.sha256(out.device.encode()).hexdigest()[:16]
            else:
                detail["device"] = out.device
            self.audit_event({"event": "alert", "kind": "violation", **detail})
            if self.uplink.connected:
                self.uplink.publish(f"{self.config.alert_topic}/violation",
                                    json.dumps(detail, sort_keys=True).encode())

    def status(self) -> dict[str, Any]:
        """What `edgeward status` shows: connections, each destination's state, traffic and backlog."""
        pol = self.pipeline.policy
        dests = {}
        for name, d in pol.destinations.items():
            row: dict[str, Any] = {
                "transport": d.transport,
                "jurisdiction": d.jurisdiction,
                "forwarded": self.stats.forwarded.get(name, 0),
            }
            ob = self.outboxes.get(name)
            if d.transport == "vault":
                row["state"] = "full" if self._disk_full else "up"
            elif ob is not None:
                link = ob.link
                if ob.overflow:
                    state = "full"
                elif link.declared_down:
                    state = "down"
                elif not link.client.connected:
                    state = "reconnecting"
                elif ob.spool is not None and ob.spool.backlog:
                    state = "draining"
                else:
                    state = "up"
                row.update({
                    "state": state,
                    "uplink": link.name,
                    "retime_ms": int(ob.retime_s * 1000),
                    "bundle": ob.bundle,
                    "rest_at_edge": ob.spool is not None,
                    "batch": len(ob.queue),
                    "in_flight": sum(len(r[2]) if r[0] in ("B", "S") else 1 for r in link.uplink_for.values()
                                     if r[-1] == name or r[1] is ob),
                    "sent": ob.sent,
                    "spooled": self.stats.spooled.get(name, 0),
                    "undelivered": {k.split(":", 1)[1]: v for k, v in self.stats.undelivered.items()
                                    if k.split(":", 1)[0] == name},
                })
                if ob.spool is not None:
                    row.update({
                        "backlog": ob.spool.backlog + len(ob.overflow),
                        "backlog_bytes": ob.spool.backlog_bytes,
                        "oldest_s": ob.spool.oldest_age_s,
                        "spool_dropped": ob.spool.dropped,
                        "when_full": ob.when_full,
                    })
            dests[name] = row
        return {
            "t": self._clock(),
            "policy_revision": pol.revision,
            "ingest": "connected" if self.ingest.connected else "disconnected",
            "uplink": "connected" if self.uplink.connected else "disconnected",
            "uplink_backlog": self._pending_out(),
            "awaiting_uplink_ack": len(self._pending),
            # PUBACKs leave in arrival order (runtime.mqtt): given but waiting for older messages; held
            # past ack_wait_s and set aside; PUBLISHes that came under a packet id still in flight
            "ingest_acks": {"waiting": self.ingest.acks_waiting, "set_aside": self.ingest.acks_set_aside,
                            "reused_ids": self.ingest.reused_ids},
            # envelopes of devices sending beyond their normal rate, waiting out burst_hold_s
            "held": sum(len(p.held) for p in self._holding.values()),
            "held_mb": round(self._held_bytes() / 2**20, 1),  # sealed envelopes: held, in batches, in flight
            "paused": sorted(self._pause_reasons) if self._pause_reasons else False,
            "disk_full": self._disk_full,
            "isolated": sorted(self.isolated),
            "destinations": dests,
            "stats": self.stats.to_json(),
        }

    def write_status(self) -> None:
        path = self.config.state_dir / "status.json"
        tmp = path.with_name("status.json.tmp")
        tmp.write_text(json.dumps(self.status(), indent=1))
        os.replace(tmp, path)

    def _strike(self, device: str, now: float) -> None:
        cfg = self.config
        if not cfg.isolate_after or self.on_isolate is None or device in self.isolated:
            return
        entry = self._strikes.get(device)
        if entry is None or now - entry[1] > cfg.isolate_window_s:
            if len(self._strikes) > 100_000:
                self._strikes.clear()
            entry = self._strikes[device] = [0, now]
        entry[0] += 1
        if entry[0] >= cfg.isolate_after:
            self.isolated.add(device)
            self.pipeline.blocked = frozenset(self.pipeline.blocked | {device})
            self.alert("device_isolated", {"device": device, "violations": int(entry[0]),
                                           "window_s": cfg.isolate_window_s})
            asyncio.ensure_future(self.on_isolate(device))

    def _shadow(self, out: Any) -> None:
        assert self.shadow is not None and out.facts is not None
        try:
            candidate = self.shadow.decide(out.facts)
        except Exception as exc:  # noqa: BLE001 - a broken candidate must never disturb the live path
            divergences = [{"error": type(exc).__name__}]
        else:
            divergences = [
                {"dst": d.destination, "kind": d.kind, "live": d.live, "candidate": d.candidate}
                for d in shadow_divergences(out.decision, candidate)
            ]
        if divergences:
            self.stats.shadow_divergent += 1
            self._shadow_log.write(
                json.dumps({"dev": out.device, "stream": out.stream, "seq": out.seq, "divergences": divergences},
                           separators=(",", ":")) + "\n"
            )

    def _on_uplink_ack(self, link: _Link, uplink_pid: int) -> None:
        ref = link.uplink_for.pop(uplink_pid, None)
        if ref is None:
            return
        self._schedule_flush()
        if ref[0] == "B":  # a bundle: the destination has every envelope in it
            ob, items = ref[1], ref[2]
            link.bundled -= len(items) - 1
            ob.sent += len(items)
            done_add, settle = self.done.add, self._settle
            for _topic, r in items:
                done_add(r[2], r[3], r[4])
                settle(r)
            return
        if ref[0] == "S":  # from a spool: the destination has them, the entries can go
            ob, ids = ref[1], ref[2]
            link.bundled -= len(ids) - 1
            ob.sent += len(ids)
            if ob.spool is not None:
                for item_id in ids:
                    ob.spool.consumed(item_id)
            return
        self.outboxes[ref[4]].sent += 1
        self.done.add(ref[2], ref[3], ref[4])  # the destination has it, whatever happens to the ingest ack
        self._settle(ref)

    def _settle(self, ref: tuple[Any, ...]) -> None:
        """One destination of an ingest message is taken care of; PUBACK the message once all are."""
        gen, key = ref[0], ref[1]
        if key is None:
            return
        if gen != self._generation:
            self._settle_orphan(ref)
            return
        entry = self._pending.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._pending[key]
            if self._ack_ingest(entry[4], entry[5]):
                lat = self.stats.latency_s
                if len(lat) < 200_000:
                    lat.append(time.monotonic() - entry[1])

    def _settle_orphan(self, ref: tuple[Any, ...]) -> None:
        """A delivery of a message from an earlier ingest connection is taken care of: once all are,
        PUBACK its redelivery (if it came on the current connection; otherwise the next one will)."""
        key = (ref[2], ref[3])
        orphan = self._orphans.get(key)
        if orphan is None:
            return
        orphan[0] -= 1
        if orphan[0] > 0:
            return
        del self._orphans[key]
        handle = orphan[2]
        if handle is None or orphan[3] != self._generation:
            return  # not redelivered yet: the redelivery is a duplicate with nothing outstanding
        self._ack_ingest(*handle)

    def _ack_ingest(self, pid: int, ack_id: int | None = None) -> bool:
        """PUBACK one ingest message, or keep it for later while the disk is full. True when sent."""
        if self._disk_full is not None:
            self._held_acks.append((pid, ack_id))
            return False
        self.ingest.ack(pid, ack_id)
        self._schedule_flush()
        self.stats.acked += 1
        return True

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        try:
            self.done.flush()  # recorded before the PUBACKs that depend on it leave
        except StorageFull as exc:
            self._enter_disk_full(str(exc))
            return
        self.ingest.flush()
        if self._paused and self._pending_out() < self.config.max_pending // 2:
            self._paused = False
            self._unpause("backpressure")
        self._unpause_memory()

    # ------------------------------------------------------------------ uplinks, spools, the disk
    def _ensure_outboxes(self) -> None:
        for name, d in self.pipeline.policy.destinations.items():
            if d.transport == "mqtt":
                ob = self.outboxes.get(name)
                if ob is None:
                    self._outbox(name)
                else:  # a reload may move the destination or change its bundle size
                    if ob.out:
                        self._publish_bundle(ob)
                    ob.topic, ob.bundle = d.topic, getattr(d, "bundle", 1)

    def _outbox(self, name: str) -> _Outbox:
        d = self.pipeline.policy.destinations[name]
        endpoint = self.config.uplinks.get(name)
        link = self._links.get(endpoint)
        if link is None:
            assert endpoint is not None
            host, port = endpoint

            def on_ack(pid: int, ep: tuple[str, int] | None = endpoint) -> None:
                self._on_uplink_ack(self._links[ep], pid)

            client = MqttClient(host=host, port=port, client_id=f"{self.config.client_id}-uplink-{name}",
                                username=self.config.username, password=self.config.password, on_ack=on_ack)
            link = self._links[endpoint] = _Link(f"{host}:{port}", client)
            if self._loop is not None:  # added by a policy reload while serving
                link.task = asyncio.ensure_future(self._keep_connected(link, None))
        spool = None
        if d.rest_at_edge:
            spool = Spool(self.config.state_dir / "spool" / name, self._spool_key(name), name=name,
                          max_bytes=int(d.spool_max_mb * 2**20), on_full=d.spool_when_full)
            if spool.backlog:
                self.audit_event({"event": "spool.opened", "dst": name, "backlog": spool.backlog})
        retime_s = d.retime_ms / 1000.0 if self.config.retime else 0.0
        ob = self.outboxes[name] = _Outbox(name, link, retime_s, spool, d.spool_when_full,
                                           topic=d.topic, bundle=getattr(d, "bundle", 1))
        if retime_s:
            ob.next_release = self._next_boundary(ob, self._clock())
        return ob

    def _spool_key(self, name: str) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"edgeward spool v1 " + name.encode()).derive(self._kek)

    def _pending_out(self) -> int:
        """Envelopes sent and not yet acknowledged by their uplinks."""
        return sum(link.client.pending_out + link.bundled for link in self._links.values())

    def _send(self, ob: _Outbox, topic: str, envelope: bytes, ref: tuple[Any, ...]) -> bool:
        """Send one envelope now (into the outbox's bundle, published by ``_flush_out``), or spool or
        drop it if the destination is held. True while the ingest message must still wait for this
        destination."""
        if ob.hold:
            return self._park(ob, topic, envelope, ref)
        if ob.bundle > 1:
            if ob.out and ob.out_bytes + len(envelope) > BUNDLE_MAX_BYTES:
                self._publish_bundle(ob)
            ob.out.append((topic, envelope, ref))
            ob.out_bytes += len(envelope)
            if len(ob.out) >= ob.bundle:
                self._publish_bundle(ob)
            return True
        pid = ob.link.client.publish(topic, envelope)
        assert pid is not None
        ob.link.uplink_for[pid] = ref
        return True

    def _publish_bundle(self, ob: _Outbox) -> None:
        items, ob.out, ob.out_bytes = ob.out, [], 0
        link = ob.link
        pid = link.client.publish(ob.topic, pack_bundle([item[1] for item in items]))
        assert pid is not None
        # The bundle's bytes (kept by the client until acknowledged) are the only copy of its envelopes:
        # the ref keeps each one's topic and ingest ref, and a destination declared down unbundles them.
        link.uplink_for[pid] = ("B", ob, [(item[0], item[2]) for item in items])
        link.bundled += len(items) - 1
        self.stats.bundles += 1
        self.stats.bundled += len(items)

    def _flush_out(self) -> None:
        """Publish the bundles being filled and write everything out: the end of every read, release,
        drain or retry step, so a bundle never waits for the next one."""
        for ob in self.outboxes.values():
            if ob.out:
                self._publish_bundle(ob)
        for link in self._links.values():
            link.client.flush()

    def _park(self, ob: _Outbox, topic: str, envelope: bytes, ref: tuple[Any, ...]) -> bool:
        """A held destination: into its spool (settled once the spool is flushed: False), behind
        what already overflowed (True, ingest paused), or dropped with a reason (False)."""
        if ob.spool is None:
            self.stats.undelivered[f"{ob.name}:uplink.unreachable"] += 1
            self._record({"event": "undelivered", "dst": ob.name, "dev": ref[2], "seq": ref[3],
                          "reason": "uplink.unreachable"})
            return False
        if not ob.overflow:
            try:
                dropped = ob.spool.append(topic, envelope)
            except SpoolFull:
                self._alert_once(f"spool_full:{ob.name}", "spool_full", {"dst": ob.name, "when_full": "refuse_new",
                                                                        "backlog": ob.spool.backlog})
            except StorageFull as exc:
                self._enter_disk_full(f"spool {ob.name}: {exc}")
            else:
                if dropped:
                    self.stats.undelivered[f"{ob.name}:spool.dropped_oldest"] += dropped
                    self._alert_once(f"spool_drop:{ob.name}", "spool_dropped_oldest",
                                     {"dst": ob.name, "dropped_total": ob.spool.dropped})
                self.stats.spooled[ob.name] += 1
                self.done.add(ref[2], ref[3], ob.name)
                return False
        ob.overflow.append((topic, envelope, ref))
        self._pause(f"spool:{ob.name}")
        return True

    def _commit(self) -> bool:
        """Group commit of everything buffered; False (and intake paused) when the disk is full."""
        try:
            for ob in self.outboxes.values():
                if ob.spool is not None:
                    ob.spool.flush()
            self.vault.flush()
            self.done.flush()
            self.quarantine.flush()
            self.audit.flush()
        except StorageFull as exc:
            self._enter_disk_full(str(exc))
            return False
        if self._disk_ok_owed and self.audit.count > self._audit_count0:  # this life has written
            self._disk_ok_owed = False
            self.alert("disk_ok", {"after_restart": True})
        return True

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and not self._connecting:
            transport = self.ingest.transport
            if transport is not None:
                transport.pause_reading()
        self._pause_reasons.add(reason)

    def _unpause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons:
                transport = self.ingest.transport
                if transport is not None:
                    transport.resume_reading()

    def _alert_once(self, key: str, kind: str, detail: dict[str, Any], every_s: float = 10.0) -> None:
        now = time.monotonic()
        if now - self._last_kind_alert.get(key, -1e9) >= every_s:
            self._last_kind_alert[key] = now
            self.alert(kind, detail)

    def _enter_disk_full(self, why: str) -> None:
        """Stop taking messages (the broker holds them for the session); retried every second. One
        ``disk_full`` alert per episode, repeated once a minute while it lasts, not once per retry."""
        if self._disk_full is not None:
            return
        self._disk_full = why
        self._disk_ok_owed = False  # still full: this episode's disk_ok closes the previous life's too
        now = time.monotonic()
        episode = self._disk_full_episode
        if episode is None:
            self._disk_full_episode = [now, now, 0]  # started, last alerted, failed retries
            self.stats.disk_full_events += 1
            self._pause("disk_full")
            with contextlib.suppress(StorageFull, EdgewardError, OSError):
                self.alert("disk_full", {"detail": why})
            return
        episode[2] += 1  # a retry that failed: same episode
        if now - episode[1] >= DISK_FULL_REMIND_S:
            episode[1] = now
            with contextlib.suppress(StorageFull, EdgewardError, OSError):
                self.alert("disk_full", {"detail": why, "still": True, "for_s": round(now - episode[0], 1),
                                         "retries": episode[2]})

    def _retry_after_disk_full(self) -> None:
        self._disk_full = None  # so the flushes below may raise again
        if not self._commit():
            return
        self._retry_overflow()
        held, self._held_acks = self._held_acks, []
        for pid, aid in held:
            self.ingest.ack(pid, aid)
        self.stats.acked += len(held)
        self.ingest.flush()
        self._unpause("disk_full")
        episode, self._disk_full_episode = self._disk_full_episode, None
        paused = round(time.monotonic() - episode[0], 1) if episode else 0.0
        self.alert("disk_ok", {"acknowledged": len(held), "paused_s": paused, "retries": episode[2] if episode else 0})

    def _retry_overflow(self) -> None:
        for ob in self.outboxes.values():
            if not ob.overflow or ob.spool is None:
                continue
            waiting, ob.overflow = ob.overflow, []
            settled = []
            for i, (topic, envelope, ref) in enumerate(waiting):
                if not ob.link.declared_down and not ob.spool.backlog and not ob.overflow:
                    if self._send(ob, topic, envelope, ref):
                        continue
                elif self._park(ob, topic, envelope, ref):
                    ob.overflow.extend(waiting[i + 1:])  # still no room: keep the order
                    break
                settled.append(ref)
            if self._commit():
                for ref in settled:
                    self._settle(ref)
            if not ob.overflow:
                self._unpause(f"spool:{ob.name}")
        self._flush_out()

    async def _deliverer(self, stop: asyncio.Event) -> None:
        """Every 20 ms: release re-timed batches whose boundary has passed, watch the uplinks, drain
        spools at the bounded rate, and move overflow into spools that have room again."""
        tick = 0.02
        while not stop.is_set():
            await asyncio.sleep(tick)
            try:
                self._deliver_tick(tick)
            except Exception as exc:  # noqa: BLE001 - the delivery loop must survive; the error is audited
                with contextlib.suppress(Exception):
                    self.alert("delivery_error", {"error": type(exc).__name__, "detail": str(exc)[:200]})
                await asyncio.sleep(1.0)

    def _deliver_tick(self, tick: float) -> None:
        now_wall = self._clock()
        now = time.monotonic()
        settled: list[tuple[Any, ...]] = []
        for link in self._links.values():
            self._watch_link(link, now)
        if self._holding:
            settled.extend(self._release_held(now))
        for ob in self.outboxes.values():
            if ob.retime_s and now_wall >= ob.next_release:
                # Released only at the gateway's own boundaries, drawn whatever the devices do: the
                # destination sees batches, and the header says the boundary, not the device's ts.
                if ob.queue:
                    batch, ob.queue, ob.queue_bytes = _interleave(ob.queue), [], 0
                    for topic, envelope, ref in batch:
                        if not self._send(ob, topic, envelope, ref):
                            settled.append(ref)
                ob.next_release = self._next_boundary(ob, now_wall)
            if ob.spool is not None and ob.spool.backlog:
                self._drain(ob, tick)
        if any(ob.overflow for ob in self.outboxes.values()) and self._disk_full is None:
            self._retry_overflow()
        if settled and self._commit():
            for ref in settled:
                self._settle(ref)
        self._flush_out()
        self._unpause_memory()

    def _held_bytes(self) -> int:
        """Bytes of sealed envelopes in memory: held for a device's excess volume, waiting for their
        re-timed batch, published and not yet acknowledged by their uplink, and the copies of those
        still in an uplink's socket buffer."""
        return (self._probation_bytes + sum(ob.queue_bytes for ob in self.outboxes.values())
                + sum(link.client.pending_out_bytes + link.client.write_buffer_bytes
                      for link in self._links.values()))

    def _unpause_memory(self) -> None:
        if "memory" in self._pause_reasons and self._held_bytes() < self.config.max_held_mb * 2**19:
            self._unpause("memory")

    # ------------------------------------------------------------------ holding excess volume
    def _probation_hold(self, out: Any, now: float) -> _Probation | None:
        """The device's hold when this message is beyond its normal rate (or older ones still wait:
        a device's order is kept); None when it may go out now."""
        facts = out.facts
        if facts is None:
            return None
        lim = self._nominal.get(facts.device_type)
        if lim is None:
            lim = self._nominal[facts.device_type] = self._nominal_limits(facts.device_type)
        if not lim[0]:
            return None  # no baseline for this type: nothing to compare with
        p = self._probation.get(out.device)
        state = self._shared_state
        if p is None:
            start = min(PROBATION_START, lim[1])
            if now - self._hold_grace_from < CATCH_UP_WINDOW_S:  # first seen while an outage's backlog drains
                start += PROBATION_CATCH_UP * lim[0] * self._hold_grace_s
            p = self._probation[out.device] = _Probation(start, now, lim[0], lim[1])
            if len(self._probation) > PROBATION_MAX_DEVICES:
                self._forget_quiet_probation(now)
            if state is not None:  # the other workers may know the device: theirs is the allowance
                tokens = state.hold_allowance(out.device, now, p.rate, p.cap, charge=1.0, start=start)
                if tokens is not None:
                    p.tokens = tokens
                    return p if tokens < 0.0 else None
        elif state is not None and (got := state.hold_allowance(out.device, now, p.rate, p.cap,
                                                                 charge=1.0)) is not None:
            p.tokens, p.t = got, now  # (None: the shared table is full; the local bucket decides)
            return p if p.held or got < 0.0 else None
        else:
            # Refilled up to the slack; a catch-up credit above it is kept until spent, never clamped.
            p.tokens = max(p.tokens, min(p.cap, p.tokens + (now - p.t) * p.rate))
            p.t = now
        p.tokens -= 1.0  # held or not: a held message is a debt, paid back as the allowance refills
        return p if p.held or p.tokens < 0.0 else None

    def _hold_catch_up(self, seconds: float, now: float) -> None:
        """The gateway read nothing for ``seconds`` before ``now`` (it was down, or its ingest was): what
        comes next is every device's backlog, which the gateway caused. Each device's allowance is
        credited that long at 2.5 x its nominal rate once (``PROBATION_CATCH_UP``), as the rate
        baseline is (``RateBaseline.catch_up``): the devices it already knows now, and those first
        seen within ``CATCH_UP_WINDOW_S``. Without it the backlog is a debt that takes ~4 x the outage
        to pay: after a 60 s restart, 98.5 % of an honest 1,000-device fleet's next 90 s waited out
        ``burst_hold_s`` (BENCHMARKS.md §8). The credit is also what a device may burst unheld right
        after an outage, once: what its rate baseline lets through after the outage anyway
        (``MAX_CATCH_UP_S`` at most). A device holding envelopes when the outage ended gets no credit:
        what it owes was sent before, not backlog."""
        grace = min(MAX_CATCH_UP_S, max(0.0, seconds))
        self._hold_grace_from, self._hold_grace_s = now, grace
        state = self._shared_state
        for device, p in self._probation.items():
            if p.held:
                continue
            if state is not None:  # each worker notices the outage; the allowance is credited once
                credit, since = PROBATION_CATCH_UP * p.rate * grace, now - grace
                tokens = state.hold_allowance(device, now, p.rate, p.cap, credit=credit, unless_since=since)
                if tokens is not None:
                    p.tokens, p.t = tokens, now
                    continue
            refilled = max(p.tokens, min(p.cap, p.tokens + (now - p.t) * p.rate))
            p.tokens = refilled + PROBATION_CATCH_UP * p.rate * grace
            p.t = now

    def _nominal_limits(self, device_type: str) -> tuple[float, float]:
        """(refill in messages/s, slack in messages) for a device type: the rate baseline's allowance
        without its headroom (x PROBATION_REFILL), and a share of its burst. (0, 0) when there is no
        baseline for it."""
        rate = self.pipeline.rate
        base: Any = getattr(rate, "baseline", rate)  # a RateBaseline (duck-typed: the shared state holds one)
        if base is None:
            return (0.0, 0.0)
        try:
            msgs_s, burst = base.limits(device_type)[:2]
        except (AttributeError, KeyError):
            return (0.0, 0.0)
        headroom = getattr(base, "headroom", 1.0) or 1.0
        return (PROBATION_REFILL * msgs_s / headroom, max(PROBATION_MIN_BURST, PROBATION_BURST_SHARE * burst))

    def _forget_quiet_probation(self, now: float) -> None:
        for dev in [d for d, p in self._probation.items() if not p.held and now - p.t > 600.0]:
            del self._probation[dev]

    def _withdraw(self, device: str, reason: str) -> list[tuple[Any, ...]]:
        """The device tripped its baseline (or was isolated): what it had held never leaves."""
        if self._shared_state is not None:  # the other workers withdraw what they hold of it too
            self._shared_state.hold_withdraw(device, time.monotonic(), reason)
        return self._withdraw_held(device, reason)

    def _withdraw_held(self, device: str, reason: str) -> list[tuple[Any, ...]]:
        p = self._holding.pop(device, None)
        if p is None:
            return []
        refs = []
        while p.held:
            _, ob, _, envelope, ref = p.held.popleft()
            self._probation_bytes -= len(envelope)
            why = f"withheld:{reason}"
            self.stats.undelivered[f"{ob.name}:{why}"] += 1
            self._record({"event": "undelivered", "dst": ob.name, "dev": ref[2], "seq": ref[3], "reason": why})
            refs.append(ref)
        return refs

    def _release_held(self, now: float, *, everything: bool = False) -> list[tuple[Any, ...]]:
        """Held envelopes whose hold has passed without a trip go on as any other would, and so does
        all a device holds once its allowance has refilled past what it owes: it has slowed down to
        within its normal rate, so what it sent is what a device at that rate may send. Without that,
        a device that sends more often than every ``burst_hold_s`` never empties its hold once it
        starts one: each message waits behind the last, and every one is 30 s late for good (2.8 % of
        an honest 10-minute fleet, BENCHMARKS.md §8). A device that keeps bursting never pays."""
        settled: list[tuple[Any, ...]] = []
        hold_s = self.config.burst_hold_s
        state = self._shared_state
        for device, p in list(self._holding.items()):
            if state is not None:  # also at close: a tripped device's burst never leaves
                when, why = state.hold_withdrawn(device)
                if p.held and when >= p.held[0][0]:  # another worker saw it trip while this one held
                    settled.extend(self._withdraw_held(device, why))
                    continue
            tokens = state.hold_allowance(device, now, p.rate, p.cap) if state is not None else None
            if tokens is None:
                tokens = max(p.tokens, min(p.cap, p.tokens + (now - p.t) * p.rate))
            p.tokens = tokens
            p.t = now
            paid = everything or p.tokens >= 0.0
            while p.held and (paid or now - p.held[0][0] >= hold_s):
                _, ob, topic, envelope, ref = p.held.popleft()
                self._probation_bytes -= len(envelope)
                if ob.retime_s and not ob.hold:
                    ob.queue.append((topic, envelope, ref))
                    ob.queue_bytes += len(envelope)
                elif not self._send(ob, topic, envelope, ref):
                    settled.append(ref)
            if not p.held:
                del self._holding[device]
        return settled

    def _next_boundary(self, ob: _Outbox, now_wall: float) -> float:
        j = min(max(self.config.retime_jitter, 0.0), 0.9)
        period = ob.retime_s * (_RNG.uniform(1.0 - j, 1.0 + j) if j else 1.0)
        if not j:  # fixed batches stay wall-clock aligned
            return (now_wall // ob.retime_s + 1) * ob.retime_s
        nxt = ob.next_release + period
        return nxt if nxt > now_wall else now_wall + period

    def _header_ts(self, destination: str) -> int | None:
        """The timestamp sealed into a re-timed destination's header: the boundary its batch will be
        released at (ms). None for destinations sent at once (or the vault): the device's own ts."""
        ob = self.outboxes.get(destination)
        if ob is None:
            d = self.pipeline.policy.destinations.get(destination)
            if d is None or d.transport != "mqtt":
                return None
            ob = self._outbox(destination)
        if not ob.retime_s:
            return None
        nr = ob.next_release
        return int((nr if nr > 0 else self._clock()) * 1000)

    def _drain(self, ob: _Outbox, tick: float) -> None:
        link = ob.link
        if link.declared_down or not link.client.connected or ob.spool is None:
            ob.drain_tokens = 0.0
            return
        rate = self.config.spool_drain_rate
        ob.drain_tokens = min(rate, ob.drain_tokens + rate * tick)
        n = min(int(ob.drain_tokens), max(0, 1000 - link.client.pending_out - link.bundled))
        if n <= 0:
            return
        items = ob.spool.next_batch(n)
        ob.drain_tokens -= len(items)
        for group in _bundles(items, ob.bundle):  # as bundles when the destination takes them
            if ob.bundle > 1:
                pid = link.client.publish(ob.topic, pack_bundle([item.payload for item in group]))
            else:
                pid = link.client.publish(group[0].topic, group[0].payload)
            assert pid is not None
            link.uplink_for[pid] = ("S", ob, tuple(item.id for item in group))
            link.bundled += len(group) - 1

    def _watch_link(self, link: _Link, now: float) -> None:
        if link.client.connected:
            link.down_since = None
            if link.declared_down:
                link.declared_down = False
                names = [ob.name for ob in self.outboxes.values() if ob.link is link]
                self.alert("destination_up", {"uplink": link.name, "destinations": names})
            return
        if link.down_since is None:
            link.down_since = now
        elif not link.declared_down and now - link.down_since >= self.config.uplink_down_after_s:
            self._declare_down(link)

    def _declare_down(self, link: _Link) -> None:
        """The connection stayed away: what waited for it goes to the spools or is dropped with a
        reason, so ingest is not held up by a destination that is not there."""
        link.declared_down = True
        names = [ob.name for ob in self.outboxes.values() if ob.link is link]
        self.alert("destination_down", {"uplink": link.name, "destinations": names,
                                        "after_s": self.config.uplink_down_after_s})
        settled: list[tuple[Any, ...]] = []
        rewind: set[int] = set()
        for pid, topic, payload in link.client.take_pending():
            ref = link.uplink_for.pop(pid, None)
            if ref is None:
                continue  # an alert or checkpoint: kept locally already
            if ref[0] == "S":
                link.bundled -= len(ref[2]) - 1
                rewind.add(id(ref[1]))
                continue
            if ref[0] == "B":  # a bundle: each envelope is parked on its own, in order
                ob = ref[1]
                items = [(t, env, r) for (t, r), env in zip(ref[2], unbundle(payload), strict=True)]
                link.bundled -= len(items) - 1
            else:
                ob, items = self.outboxes[ref[4]], [(topic, payload, ref)]
            for item_topic, envelope, r in items:
                if not self._park(ob, item_topic, envelope, r):
                    settled.append(r)
        for ob in self.outboxes.values():
            if id(ob) in rewind and ob.spool is not None:
                ob.spool.rewind()
            if ob.link is link and ob.queue:  # the batch not yet released follows, in its order
                batch, ob.queue, ob.queue_bytes = ob.queue, [], 0
                for topic, payload, ref in batch:
                    if not self._park(ob, topic, payload, ref):
                        settled.append(ref)
        if self._commit():
            for ref in settled:
                self._settle(ref)

    async def _keep_connected(self, link: _Link, stop: asyncio.Event | None) -> None:
        """A destination's own uplink: connect, and reconnect with jittered backoff whenever it drops."""
        backoff = 0.1
        while stop is None or not stop.is_set():
            if not link.client.connected:
                try:
                    await link.client.connect()
                    backoff = 0.1
                except (BrokerError, OSError):
                    await asyncio.sleep(backoff * (0.5 + random.random()))
                    backoff = min(backoff * 2, 5.0)
                    continue
            closed = link.client.closed
            if closed is not None:
                await asyncio.shield(closed)
            await asyncio.sleep(backoff * (0.5 + random.random()))


def _sync_spools(spools: list[Spool]) -> None:
    for sp in spools:
        with contextlib.suppress(OSError, EdgewardError):
            sp.sync()


def _fsync_all(fds: list[int]) -> bool:
    """fsync each; False if one failed. EBADF does not count: an audit file rotated away meanwhile
    was fsynced when it was rotated (the other writers keep theirs open until fsynced here)."""
    ok = True
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            ok = ok and exc.errno == errno.EBADF
    return ok
