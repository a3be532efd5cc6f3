"""The running gateway: ingest from the broker, the pipeline, the vault, the uplinks, the audit log.

Delivery contract (at-least-once into every destination, nothing acknowledged early): a device's
QoS-1 message is PUBACKed to the broker only after its audit record and vault envelope have been
written and every MQTT uplink has PUBACKed its envelope. Until then the broker keeps it in the
gateway's persistent session, so a restart redelivers it and (device, sequence) dedupe keeps each
destination from seeing it twice. Bounded queues: when the uplinks fall behind, ingest stops
reading (TCP backpressure reaches the broker, which queues for the persistent session).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditLog
from gateway.audit.checkpoint import Checkpointer
from gateway.crypto.envelope import pack_header, seal_packed
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.crypto.recipient import RecipientSealer
from gateway.detect import RateBaseline
from gateway.errors import BrokerError
from gateway.pipeline import Pipeline, PolicyLike
from gateway.policy.shadow import shadow_divergences
from gateway.runtime.donelog import DoneLog
from gateway.runtime.mqtt import Message, MqttClient
from gateway.vault import VaultWriter

__all__ = ["GatewayConfig", "GatewayStats", "Gateway", "SYS_DROPPED"]

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"

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
    shadow_divergent: int = 0  # messages a shadow policy would have decided differently
    latency_s: list[float] = field(default_factory=list)  # receipt -> last destination acknowledged

    def to_json(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "decided": self.decided,
            "duplicates": self.duplicates,
            "acked": self.acked,
            "rejected": dict(self.rejected),
            "denied": dict(self.denied),
            "forwarded": dict(self.forwarded),
            "removed_fields": dict(self.removed),
            "violations": dict(self.violations),
            "broker_dropped": self.broker_dropped,
            "reconnects": self.reconnects,
            "shadow_divergent": self.shadow_divergent,
        }


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
        self.audit = AuditLog(state / "audit")
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
                                 dedupe=dedupe, rate=rate, enforce_rate=rate is not None)
        self.ingest = MqttClient(
            host=config.host,
            port=config.port,
            client_id=config.client_id,
            username=config.username,
            password=config.password,
            on_messages=self._on_messages,
        )
        self.uplink = MqttClient(
            host=config.uplink_host or config.host,
            port=config.uplink_port or config.port,
            client_id=config.client_id + "-uplink",
            username=config.username,
            password=config.password,
            on_ack=self._on_uplink_ack,
        )
        # uplink pid -> (ingest generation, ingest pid, device, seq, destination);
        # ingest pid -> [outstanding uplink acks, t0]
        self._uplink_for: dict[int, tuple[int, int | None, str, int, str]] = {}
        self._pending: dict[int, list[float]] = {}
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
        self.audit.append({"event": "policy.activated", "rev": policy.revision, "previous": old})

    def audit_event(self, record: dict[str, Any]) -> None:
        self._record(record)
        self.audit.flush(now=self._clock())

    def _publish_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Signed checkpoints leave the gateway at once: truncating the log behind one is detectable."""
        if self.uplink.connected:
            self.uplink.publish(self.config.checkpoint_topic, json.dumps(checkpoint, sort_keys=True).encode())
            self.uplink.flush()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Gateway:
        self._loop = asyncio.get_running_loop()
        await self._connect()
        # A long-lived service: move what start-up built (policy plan, catalogue, keys) out of the
        # cyclic collector's reach and collect less often. Measured: full collections over a large
        # heap showed up as latency spikes of hundreds of milliseconds.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        # A new generation before the ingest connects: a resumed session redelivers at once, before
        # SUBSCRIBE returns, and those messages belong to this connection.
        self._generation += 1
        await self.uplink.connect()
        await self.ingest.connect()
        site = self.pipeline.policy.site
        topic = f"site/{site}/dev/#"
        if self.config.share_group:
            topic = f"$share/{self.config.share_group}/{topic}"
        await self.ingest.subscribe((topic, 1), (SYS_DROPPED, 0))

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, reconnecting (jittered backoff) whenever the broker goes away."""
        backoff = 0.1
        fsync_task = asyncio.create_task(self._syncer(stop), name="gateway-audit-sync")
        try:
            while not stop.is_set():
                closed = [c.closed for c in (self.ingest, self.uplink) if c.closed is not None]
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
                        backoff = min(backoff * 2, 5.0)
        finally:
            fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fsync_task

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every received message is fully acknowledged (for tests and the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._pending and self.uplink.pending_out == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    async def close(self) -> None:
        """Graceful stop: take no new messages, finish and acknowledge those in hand, then leave.
        Whatever is still unacknowledged stays in the broker's session for the next start."""
        transport = self.ingest.transport
        if transport is not None and self.ingest.connected:
            transport.pause_reading()
            await self.drain(timeout=10)
            self.ingest.flush()
            # Read again (the disconnect handshake needs the PINGRESP) but leave any new PUBLISH
            # unacknowledged: the broker keeps it for the next start.
            self._closing = True
            transport.resume_reading()
        for c in (self.ingest, self.uplink):
            with contextlib.suppress(Exception):
                await c.disconnect()
        self.stop_shadow()
        self.record_traffic(None)
        self.vault.close()
        self.done.close()
        self.quarantine.close()
        self.audit.close()

    async def _syncer(self, stop: asyncio.Event) -> None:
        """Once a second: fsync the audit log and the vault in a worker thread (an fsync on a busy
        disk can take tens of milliseconds; the event loop must not wait for it). The writes that
        acknowledgements depend on stay on the loop."""
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if self.checkpointer is not None:
                self.checkpointer.tick()
            self.audit.flush()
            self.vault.flush()
            if self._done_before and time.monotonic() > self._done_until:
                self._done_before = {}
            self.done.flush()
            fds = [f.fileno() for f in (self.audit._fh, self.vault._fh, self.done._fh) if not f.closed]
            await asyncio.to_thread(_fsync_all, fds)
            self.write_status()
            for f in (self._shadow_log, self._traffic):
                if f is not None:
                    f.flush()

    def _reset_pending(self) -> None:
        # Acks for a dead ingest connection are meaningless: the broker redelivers those messages,
        # and dedupe recognises the ones whose deliveries already went out.
        self._pending.clear()
        # _uplink_for stays: the uplink re-sends what was in flight, and each PUBACK still records
        # its delivery as done; the generation keeps those from acknowledging new ingest messages.
        self._generation += 1
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
        uplink_publish = self.uplink.publish
        ready: list[int] = []
        vaulted: list[tuple[str, int, str]] = []
        gen = self._generation
        t0 = time.monotonic()
        for m in batch:
            if m.topic == SYS_DROPPED:
                with contextlib.suppress(ValueError):
                    stats.broker_dropped = int(m.payload)
                continue
            stats.received += 1
            out = pipeline.process(m.topic, m.payload, retain=m.retain)
            if self._done_before and out.deliveries:
                done = self._done_before.get((out.device, out.seq))
                if done:
                    # Redelivered after a crash: only the destinations that do not have it yet.
                    out.deliveries = [d for d in out.deliveries if d.destination not in done]
                    out.record["redelivery_skipped"] = sorted(done)
                    if not out.deliveries:
                        stats.duplicates += 1
            audit_append(out.record)
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
            else:
                if "trailer_cut" in out.record:
                    self._on_violation(out, m, code="detect.image_trailer")
                stats.decided += 1
                assert out.decision is not None
                for r in out.decision.routes:
                    if not r.allow:
                        stats.denied[f"{r.destination}:{r.reason}"] += 1
                    for _, code in r.removed:
                        stats.removed[code] += 1
            n_up = 0
            for d in out.deliveries:
                stats.forwarded[d.destination] += 1
                if d.transport == "vault":
                    vault_append(d.envelope)
                    vaulted.append((out.device, out.seq, d.destination))
                else:
                    pid = uplink_publish(d.topic, d.envelope)
                    if pid is not None:
                        self._uplink_for[pid] = (gen, m.packet_id, out.device, out.seq, d.destination)
                        if m.packet_id is not None:
                            n_up += 1
            if m.packet_id is not None:
                if n_up:
                    self._pending[m.packet_id] = [n_up, t0]
                else:
                    ready.append(m.packet_id)
        # Group commit: one write for the audit records and vault frames of the whole batch, before
        # any of the batch is acknowledged.
        self.vault.flush()
        for device, seq, dest in vaulted:
            self.done.add(device, seq, dest)
        self.done.flush()
        self.quarantine.flush()
        self.audit.flush()
        for pid in ready:
            self.ingest.ack(pid)
        stats.acked += len(ready)
        self.uplink.flush()
        if not self._paused and self.uplink.pending_out > self.config.max_pending:
            transport = self.ingest.transport
            if transport is not None:
                transport.pause_reading()
                self._paused = True

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
        """What `edgeward status` shows: connections, each destination's traffic and backlog."""
        pol = self.pipeline.policy
        dests = {}
        for name, d in pol.destinations.items():
            dests[name] = {
                "transport": d.transport,
                "jurisdiction": d.jurisdiction,
                "state": "up" if d.transport == "vault" or self.uplink.connected else "down",
                "forwarded": self.stats.forwarded.get(name, 0),
            }
        return {
            "t": self._clock(),
            "policy_revision": pol.revision,
            "ingest": "connected" if self.ingest.connected else "disconnected",
            "uplink": "connected" if self.uplink.connected else "disconnected",
            "uplink_backlog": self.uplink.pending_out,
            "awaiting_uplink_ack": len(self._pending),
            "paused": self._paused,
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

    def _on_uplink_ack(self, uplink_pid: int) -> None:
        ref = self._uplink_for.pop(uplink_pid, None)
        if ref is None:
            return
        gen, ingest_pid, device, seq, dest = ref
        self.done.add(device, seq, dest)  # the destination has it, whatever happens to the ingest ack
        self._schedule_flush()
        if gen != self._generation or ingest_pid is None:
            return
        entry = self._pending.get(ingest_pid)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._pending[ingest_pid]
            self.ingest.ack(ingest_pid)
            self.stats.acked += 1
            lat = self.stats.latency_s
            if len(lat) < 200_000:
                lat.append(time.monotonic() - entry[1])

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        self.done.flush()  # recorded before the PUBACKs that depend on it leave
        self.ingest.flush()
        if self._paused and self.uplink.pending_out < self.config.max_pending // 2:
            transport = self.ingest.transport
            if transport is not None:
                transport.resume_reading()
            self._paused = False


def _fsync_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):  # a file rotated away meanwhile was synced on rotation
            os.fsync(fd)
