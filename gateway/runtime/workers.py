"""``edgeward run SITE --workers N``: one broker, N gateway processes sharing the ingest.

The site's Mosquitto starts once (``site_runner.start_site_broker``: the same listeners, ACL and
operator identity as a single gateway). Each worker is a ``multiprocessing`` (spawn) process running
a full ``Gateway`` with

- its own state directory ``<site>/worker-<i>/`` (audit chain, vault, quarantine, done log, data keys
  wrapped under the site KEK, status.json), laid out as the single gateway lays out ``<site>/``;
- client id ``edgeward-gateway-w<i>`` (stable across restarts) subscribed to
  ``$share/edgeward/site/<site>/dev/#``, so the broker hands each message to one worker;
- its signed audit checkpoints on ``edgeward/audit/checkpoints/w<i>``; the operator side keeps them
  in ``<site>/worker-<i>/audit/published-checkpoints.jsonl`` for ``edgeward audit verify``;
- the site's per-device dedupe window and rate buckets in shared memory
  (``gateway.runtime.shared_state``), so a device whose messages reach different workers is judged
  once: a redelivery that lands on another worker is refused as ``dedupe.duplicate``.

What Mosquitto 2.0 does with a shared subscription (verified in tests/integration/test_workers.py):
messages are dealt round-robin to the group's members *including members that are offline with a
persistent session*: a crashed worker's share is queued in its session, and the QoS-1 messages it had
received but not acknowledged are redelivered (DUP) to it, and only to it, when it reconnects with
the same client id. Nothing is rebalanced to the surviving workers. Hence the supervisor here restarts
a worker that dies (same index, same client id, same state directory); its done log then keeps each
destination from seeing a redelivered message twice, as for a single gateway.

Stop (SIGINT/SIGTERM to the parent): every worker gets SIGTERM, stops reading, finishes and
acknowledges what it holds, writes a final signed checkpoint and leaves; then the broker stops.
SIGHUP is passed on to every worker (policy reload); each worker also watches the policy files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from gateway.errors import EdgewardError
from gateway.runtime.site_runner import broker_exited
from gateway.site import Site

__all__ = [
    "SHARE_GROUP",
    "SiteWorkers",
    "WorkersError",
    "merge_stats",
    "worker_checkpoint_topic",
    "worker_client_id",
    "worker_dirs",
    "worker_state_dir",
]

SHARE_GROUP = "edgeward"
CHECKPOINT_TOPIC = "edgeward/audit/checkpoints"
WORKERS_FILE = "workers.json"


class WorkersError(EdgewardError):
    """A worker could not start, or kept dying (``edgeward run`` exits 2 with this message)."""


def worker_state_dir(root: Path, index: int) -> Path:
    return Path(root) / f"worker-{index}"


def worker_client_id(index: int) -> str:
    return f"edgeward-gateway-w{index}"


def worker_checkpoint_topic(index: int) -> str:
    return f"{CHECKPOINT_TOPIC}/w{index}"


def worker_dirs(root: Path) -> list[tuple[int, Path]]:
    """(index, directory) of every ``worker-<i>`` directory under a site, by index."""
    out = []
    for p in Path(root).glob("worker-*"):
        suffix = p.name[len("worker-"):]
        if p.is_dir() and suffix.isdigit():
            out.append((int(suffix), p))
    return sorted(out)


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum GatewayStats.to_json() dictionaries (numbers add, counters add key by key)."""
    total: dict[str, Any] = {}
    for st in parts:
        for k, v in st.items():
            if isinstance(v, dict):
                d = total.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    if "broker_dropped" in total and parts:  # the broker's own counter, seen by every worker
        total["broker_dropped"] = max(p.get("broker_dropped", 0) for p in parts)
    return total


# ---------------------------------------------------------------------------------------- the worker
@dataclass(frozen=True)
class _WorkerArgs:
    index: int
    site: Site
    port: int
    overrides: dict[str, Any]
    shadow: str | None = None
    record_traffic: str | None = None


def _worker_main(args: _WorkerArgs, state: Any, events: Any) -> None:
    """The body of one worker process (spawned: a fresh interpreter)."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop ships with edgeward
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(_worker_async(args, state, events))
        except BaseException as exc:
            events.put({"event": "error", "worker": args.index, "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            if state is not None:
                state.close()


def worker_config(site: Site, policy: Any, i: int, port: int, overrides: dict[str, Any] | None = None) -> Any:
    """Worker ``i``'s GatewayConfig: its own client id, state directory and checkpoint topic, in the
    site's share group."""
    from gateway.runtime.service import GatewayConfig
    from gateway.runtime.site_runner import SITE_DEFAULTS, recipient_keys

    user, password = site.gateway_credentials()
    return GatewayConfig(
        state_dir=worker_state_dir(site.root, i),
        port=port,
        username=user,
        password=password,
        client_id=worker_client_id(i),
        share_group=SHARE_GROUP,
        kek=site.kek,
        audit_signing_key=site.audit_signing_key(),
        site_name=site.name,
        checkpoint_topic=worker_checkpoint_topic(i),
        recipient_keys=recipient_keys(site, policy),
        **{**SITE_DEFAULTS, **(overrides or {})},
    )


async def _worker_async(args: _WorkerArgs, state: Any, events: Any) -> None:
    from gateway.policy import load_policy
    from gateway.runtime.isolation import isolate
    from gateway.runtime.reload import PolicyReloader
    from gateway.runtime.service import Gateway

    i, site = args.index, args.site
    tag = f"[w{i}] "

    def log(s: str) -> None:
        print(tag + s, file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    policy = load_policy(site.policy_dir)
    state_dir = worker_state_dir(site.root, i)
    state_dir.mkdir(mode=0o700, exist_ok=True)
    user, password = site.gateway_credentials()
    config = worker_config(site, policy, i, args.port, args.overrides)
    view = state.for_worker(i) if state is not None else None
    if view is not None and view.previous:
        log(f"restarted: {len(view.previous)} keys accepted before the restart may come back from the broker")
    gw = Gateway(config, policy, dedupe=view, rate=view if view is not None and view.baseline else None)
    creds = (user, password)

    async def _isolate(device: str) -> None:
        await isolate(site.root, device, creds)
        log(f"device {device} isolated (certificate on hold, disconnected)")

    gw.on_isolate = _isolate
    gw.pipeline.blocked = frozenset(site.ca().held())
    reloader = PolicyReloader(gw, site.policy_dir, load_policy, log=log)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload_now()))
    if args.shadow:
        log(f"shadow divergences -> {gw.start_shadow(load_policy(Path(args.shadow)))}")
    if args.record_traffic:
        gw.record_traffic(Path(f"{args.record_traffic}.w{i}"))
    await gw.__aenter__()
    events.put({"event": "ready", "worker": i, "pid": os.getpid()})
    tasks = [asyncio.create_task(reloader.watch(stop), name="policy-watch"),
             asyncio.create_task(_watch_held(site, gw, stop), name="held-watch")]
    try:
        await gw.serve(stop)
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        if gw.checkpointer is not None and gw.uplink.connected:
            gw.checkpointer.checkpoint(sync=True)  # a final signed checkpoint on a clean stop
            await gw.drain(5)
        await gw.close()
        gw.write_status()
        events.put({"event": "final", "worker": i, "stats": gw.stats.to_json()})


async def _watch_held(site: Site, gw: Any, stop: asyncio.Event) -> None:
    """Follow the CA's holds (edgeward devices isolate/release, or another worker isolating)."""
    index = site.root / "ca" / "index.json"
    seen = None
    while not stop.is_set():
        await asyncio.sleep(1.0)
        try:
            stamp = index.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        if stamp != seen:
            seen = stamp
            held = frozenset(site.ca().held())
            gw.pipeline.blocked = held
            gw.isolated = set(held)


# ---------------------------------------------------------------------------------------- the parent
@dataclass
class SiteWorkers:
    """``async with SiteWorkers(site, policy, workers=N) as sw: await sw.supervise(stop)``."""

    site: Site
    policy: Any
    workers: int = 2
    log: Callable[[str], None] = lambda s: None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    state_capacity: int = 65_536
    shadow: str | None = None
    record_traffic: str | None = None
    restart_limit: int = 5  # restarts of one worker within a minute before the site gives up
    operator_password: bytes = field(default_factory=lambda: secrets.token_urlsafe(24).encode(), repr=False)
    broker: Any = None
    state: Any = None
    final: dict[int, dict[str, Any]] = field(default_factory=dict)
    _procs: dict[int, Any] = field(default_factory=dict)
    _restarts: dict[int, list[float]] = field(default_factory=dict)
    _operator: Any = None
    _stopping: bool = False

    @property
    def gateway_port(self) -> int:
        return int(self.broker.port)

    @property
    def device_port(self) -> int:
        return int(self.broker.config.tls.port)

    async def __aenter__(self) -> Self:
        from gateway.detect import RateBaseline
        from gateway.runtime.shared_state import SharedDeviceState
        from gateway.runtime.site_runner import start_site_broker

        self._ctx = multiprocessing.get_context("spawn")
        self._events = self._ctx.Queue()
        self.broker, self._operator = await start_site_broker(self.site, self.policy, self._on_checkpoints,
                                                              checkpoint_filter=CHECKPOINT_TOPIC + "/#",
                                                              operator_password=self.operator_password)
        try:
            # Sessions of processes that ran here before and will not now (the single gateway, workers
            # beyond N): decide and deliver what they hold, then delete them, before the workers
            # subscribe (gateway/runtime/retire.py).
            from gateway.runtime.retire import retire_stale_sessions

            await retire_stale_sessions(self.site, self.policy, self.broker.port, workers=self.workers,
                                        log=self.log, overrides=self.config_overrides)
            headroom = self.config_overrides.get("rate_headroom", 2.5)
            self.state = SharedDeviceState(capacity=self.state_capacity, workers=self.workers,
                                           rate=RateBaseline(headroom=headroom) if headroom else None)
            for i in range(self.workers):
                self._spawn(i)
            await self._wait_ready(set(range(self.workers)), timeout=60.0)  # each has subscribed
            from gateway.runtime.site_runner import open_device_listener

            await open_device_listener(self.site, self.broker)
        except BaseException:
            await self._shutdown()
            raise
        self._write_workers_file()
        self.log(f"site {self.site.name}: broker devices mTLS 127.0.0.1:{self.device_port}, gateway "
                 f"127.0.0.1:{self.gateway_port}; {self.workers} workers (share group {SHARE_GROUP}); "
                 f"policy {self.policy.revision}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._shutdown()

    def _spawn(self, i: int) -> None:
        args = _WorkerArgs(i, self.site, self.broker.port, dict(self.config_overrides), self.shadow,
                           self.record_traffic)
        p = self._ctx.Process(target=_worker_main, args=(args, self.state, self._events),
                              name=f"edgeward-worker-{i}", daemon=False)
        p.start()
        self._procs[i] = p

    async def _wait_ready(self, pending: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pending:
            for ev in self._poll_events():
                if ev["event"] == "ready":
                    pending.discard(ev["worker"])
                elif ev["event"] == "error" and ev["worker"] in pending:
                    raise WorkersError(f"worker {ev['worker']} failed to start: {ev['error']}")
            for i in list(pending):
                if self._procs[i].exitcode is not None:
                    raise WorkersError(f"worker {i} exited with {self._procs[i].exitcode} while starting")
            if time.monotonic() > deadline:
                raise WorkersError(f"workers {sorted(pending)} did not start within {timeout:.0f}s")
            await asyncio.sleep(0.05)

    def _poll_events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                return out
            if ev.get("event") == "final":
                self.final[ev["worker"]] = ev["stats"]
            elif ev.get("event") == "error":
                self.log(f"worker {ev['worker']}: {ev['error']}")
            out.append(ev)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Until ``stop``: restart any worker that dies (same client id and state directory, so its
        persistent session's unacknowledged and queued messages come back to it)."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            self._poll_events()
            if stop.is_set():
                break
            why = broker_exited(self.broker) if self.broker is not None else None
            if why is not None:
                raise WorkersError(why)
            for i, p in list(self._procs.items()):
                if p.exitcode is None:
                    continue
                now = time.monotonic()
                recent = [t for t in self._restarts.get(i, []) if now - t < 60.0]
                if len(recent) >= self.restart_limit:
                    raise WorkersError(f"worker {i} died {len(recent)} times within a minute; stopping the site")
                self.log(f"worker {i} exited with {p.exitcode}; restarting it (client id {worker_client_id(i)})")
                self._restarts[i] = [*recent, now]
                self._spawn(i)
                try:
                    await self._wait_ready({i}, timeout=60.0)
                except WorkersError as exc:
                    self.log(str(exc))
                self._write_workers_file()

    def signal_workers(self, sig: int) -> None:
        for p in self._procs.values():
            if p.exitcode is None and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def kill_worker(self, i: int) -> None:
        """SIGKILL one worker (fault tests); the supervisor restarts it."""
        p = self._procs[i]
        if p.exitcode is None and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)

    def pids(self) -> dict[int, int]:
        return {i: p.pid for i, p in self._procs.items()}

    def total_stats(self) -> dict[str, Any]:
        return merge_stats([self.final[i] for i in sorted(self.final)])

    async def _shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            self.signal_workers(signal.SIGTERM)
            deadline = time.monotonic() + 30.0
            while any(p.exitcode is None for p in self._procs.values()) and time.monotonic() < deadline:
                self._poll_events()
                await asyncio.sleep(0.05)
            for i, p in self._procs.items():
                if p.exitcode is None:
                    self.log(f"worker {i} did not stop within 30 s; killing it")
                    p.kill()
                p.join(5)
            self._poll_events()
            if self._operator is not None:
                await asyncio.sleep(0.3)  # the last checkpoints reach the operator side
                await self._operator.disconnect()
        finally:
            if self.broker is not None:
                self.broker.stop()
                (self.site.broker_dir / "runtime.json").unlink(missing_ok=True)
                (self.site.broker_dir / "operator.secret").unlink(missing_ok=True)
            (self.site.root / WORKERS_FILE).unlink(missing_ok=True)
            if self.state is not None:
                self.state.close()

    def _write_workers_file(self) -> None:
        doc = {"workers": self.workers, "pids": {str(i): p.pid for i, p in self._procs.items()},
               "share_group": SHARE_GROUP, "state_capacity": self.state_capacity}
        tmp = self.site.root / (WORKERS_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.site.root / WORKERS_FILE)

    def _on_checkpoints(self, batch: list[Any]) -> None:
        """The operator's copy of each worker's published checkpoints, beside that worker's chain."""
        for m in batch:
            last = m.topic.rsplit("/", 1)[-1]
            if last.startswith("w") and last[1:].isdigit():
                path = worker_state_dir(self.site.root, int(last[1:])) / "audit" / "published-checkpoints.jsonl"
            else:
                path = self.site.checkpoints_path
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(m.payload.rstrip(b"\n") + b"\n")
            if m.packet_id is not None:
                self._operator.ack(m.packet_id)


def read_workers_file(root: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((Path(root) / WORKERS_FILE).read_text()))
    except (FileNotFoundError, ValueError):
        return None
