"""A site, running: its Mosquitto (mTLS for devices, password on loopback for the gateway, the ACL
rendered from the policy) and its gateway (site KEK, signed audit checkpoints, recipient keys).

``edgeward run``, ``edgeward demo`` and the integration tests all come through here, so what the
demo shows is what a site runs. The operator identity (``edgeward-operator``) reads ``edgeward/#``:
alerts, published checkpoints (kept in ``audit/published-checkpoints.jsonl`` for ``audit verify``)
and, in the demo, the destinations' stand-ins.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.crypto.keys import write_secret_file
from gateway.crypto.pki import GATEWAY_CN, PROBE_CN, client_ssl_context
from gateway.errors import BrokerError
from gateway.crypto.recipient import load_public_key
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.isolation import isolate, reload_broker, write_runtime_info
from gateway.runtime.mqtt import Message, MqttClient
from gateway.runtime.service import Gateway, GatewayConfig
from gateway.site import Site, mosquitto_password_line

if TYPE_CHECKING:
    from gateway.policy import Policy

__all__ = ["OPERATOR_USER", "SiteRuntime", "broker_exited", "open_device_listener", "operator_secret_path",
           "recipient_keys", "render_site_acl", "start_site_broker"]

OPERATOR_USER = "edgeward-operator"
# What a site runs with beyond GatewayConfig's library defaults (which tests and benchmarks use).
SITE_DEFAULTS: dict[str, Any] = {"burst_hold_s": 30.0}


def render_site_acl(policy: Policy) -> str:
    """The policy's ACL, plus what the runtime itself needs: the gateway reads the broker's drop
    counter and, when several workers share the ingest (``edgeward run --workers N``), subscribes to
    the devices' namespace through the shared subscription ``$share/edgeward/...``; the operator
    identity reads the gateway's own topics (alerts, checkpoints, uplinks).

    Mosquitto 2.0 checks a shared subscription against the ACL with the ``$share/<group>/`` prefix
    removed (the policy's ``topic read site/<site>/dev/#`` already grants it; tested in
    tests/integration/test_workers.py); the explicit line keeps it granted on brokers that match the
    full filter."""
    return (
        policy.render_acl().rstrip("\n")
        + "\n\n# Runtime needs (rendered by edgeward.runtime.site_runner).\n"
        + f"user {GATEWAY_CN}\n"
        + "topic read $SYS/broker/publish/messages/dropped\n"
        + f"topic read $share/edgeward/site/{policy.site}/dev/#\n\n"
        + f"user {OPERATOR_USER}\n"
        + "topic read edgeward/#\n"
    )


def operator_secret_path(site: Site) -> Path:
    return site.broker_dir / "operator.secret"


def start_broker_process(site: Site, policy: Any, operator_password: bytes) -> MosquittoBroker:
    """The site's Mosquitto: rendered ACL (policy + runtime needs), the operator's in-memory password,
    started; ``broker/runtime.json`` names it for ``edgeward status`` and ``devices isolate``.

    It starts refusing every device: their certificates are on hold in the CRL it reads. A message
    that reaches the broker before the ingest has subscribed has nowhere to go, and the broker
    acknowledges it to the device all the same. That is the case at a site's first start, and at
    every start of ``--workers``: Mosquitto 2.0 restores a shared subscription dead
    (tests/integration/test_workers.py). The runtime calls ``open_device_listener`` once its ingest
    has subscribed; a device refused meanwhile connects again, as after any outage."""
    site.broker_dir.mkdir(parents=True, exist_ok=True)
    site.ca().write_crl(hold_devices=True)
    acl = site.broker_dir / "acl"
    acl.write_text(render_site_acl(policy))
    config = site.broker_config(acl_file=acl)
    assert config.password_file is not None
    with open(config.password_file, "a") as f:  # the operator's password: drawn for this run only
        f.write(mosquitto_password_line(OPERATOR_USER, operator_password.decode()))
    # For the operator's own tools on this host while the broker runs (`edgeward sim --scenario` reads
    # what the destinations got to measure leaks): 0600 beside the gateway's secret, gone at stop.
    write_secret_file(operator_secret_path(site), operator_password)
    broker = MosquittoBroker(config)
    broker.start()
    assert broker.proc is not None and broker.config.tls is not None
    write_runtime_info(site.root, pid=broker.proc.pid, gateway_port=broker.port, device_port=broker.config.tls.port)
    return broker


async def open_device_listener(site: Site, broker: MosquittoBroker, timeout: float = 15.0) -> None:
    """Let devices in: the CRL again holds only the isolated devices, the broker re-reads it (SIGHUP),
    and this returns once the broker has: its own probe certificate, held with the devices, connects.
    A device that connects after this returns is not refused."""
    ca = site.ca()
    probe = site.root / "certs" / f"{PROBE_CN}.crt"
    if not probe.exists():  # a site initialised before the probe existed
        ca.issue(PROBE_CN, kind="probe")
    ca.write_crl()
    assert broker.config.tls is not None
    if not reload_broker(site.root):  # SIGHUP to the broker runtime.json names
        raise BrokerError("the site's broker is not running")
    ctx = client_ssl_context(site.ca_cert, probe, site.root / "certs" / f"{PROBE_CN}.key")
    deadline = time.monotonic() + timeout
    while True:
        c = MqttClient(host="127.0.0.1", port=broker.config.tls.port, client_id=PROBE_CN, clean_start=True,
                       session_expiry=0, keepalive=0, ssl=ctx)
        try:
            await c.connect(timeout=2.0)
        except BrokerError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"the broker still refuses devices {timeout:g} s after SIGHUP: "
                                  f"{exc}") from exc
            await asyncio.sleep(0.02)
            continue
        await c.disconnect()
        return


def broker_exited(broker: MosquittoBroker) -> str | None:
    """Why the site must stop, once its broker has exited (None while it runs). The runtime does not
    start it again under a running gateway: devices would get in before the ingest had subscribed
    (``open_device_listener``). ``edgeward run`` stops instead, and starting it again is safe."""
    if broker.running:
        return None
    code = broker.proc.returncode if broker.proc is not None else None
    return f"the site's broker exited (code {code}); the site stopped: start it again with edgeward run"


async def start_site_broker(
    site: Site, policy: Any, on_checkpoints: Callable[[list[Message]], None], *, checkpoint_filter: str,
    operator_password: bytes,
) -> tuple[MosquittoBroker, MqttClient]:
    """The broker, and the operator's client subscribed to the published checkpoints (for runtimes
    other than SiteRuntime: the workers). The caller acknowledges each message it handles."""
    password = operator_password
    broker = start_broker_process(site, policy, password)
    try:
        operator = MqttClient(host="127.0.0.1", port=broker.port, client_id="edgeward-operator-checkpoints",
                              username=OPERATOR_USER, password=password, on_messages=on_checkpoints)
        await operator.connect()
        await operator.subscribe((checkpoint_filter, 1))
    except BaseException:
        broker.stop()
        raise
    return broker, operator


def single_config(site: Site, policy: Any, port: int, overrides: dict[str, Any] | None = None) -> GatewayConfig:
    """The single gateway's GatewayConfig (``edgeward run`` without workers)."""
    user, password = site.gateway_credentials()
    return GatewayConfig(
        state_dir=site.root,
        port=port,
        username=user,
        password=password,
        kek=site.kek,
        audit_signing_key=site.audit_signing_key(),
        site_name=site.name,
        recipient_keys=recipient_keys(site, policy),
        **{**SITE_DEFAULTS, **(overrides or {})},
    )


def recipient_keys(site: Site, policy: Any) -> dict[str, Any]:
    """Destination -> X25519 public key: the policy's ``recipient_key`` (relative to the policy
    directory) and the site's ``recipients`` in site.json (``edgeward init --recipient``)."""
    out: dict[str, Any] = {}
    doc = json.loads((site.root / "site.json").read_text())
    for dest, rel in doc.get("recipients", {}).items():
        out[dest] = load_public_key(site.root / rel)
    for name, d in policy.destinations.items():
        if getattr(d, "recipient_key", None):
            out[name] = load_public_key((site.policy_dir / d.recipient_key).resolve())
    return out


@dataclass
class SiteRuntime:
    """``async with SiteRuntime(site, policy) as rt``: broker + gateway up; ``rt.device_port``."""

    site: Site
    policy: Any
    log: Callable[[str], None] = lambda s: None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    broker: MosquittoBroker | None = None
    gateway: Gateway | None = None
    operator_password: bytes = field(default_factory=lambda: secrets.token_urlsafe(24).encode(), repr=False)
    _operator: MqttClient | None = None
    _held_watch: asyncio.Task[None] | None = None

    @property
    def device_port(self) -> int:
        assert self.broker is not None and self.broker.config.tls is not None
        return self.broker.config.tls.port

    @property
    def gateway_port(self) -> int:
        assert self.broker is not None
        return self.broker.port

    def device_ssl(self, device_id: str) -> ssl.SSLContext:
        return self.site.device_ssl_context(device_id)

    async def __aenter__(self) -> SiteRuntime:
        site = self.site
        self.broker = start_broker_process(site, self.policy, self.operator_password)
        user, password = site.gateway_credentials()
        gw_config = single_config(site, self.policy, self.broker.port, self.config_overrides)
        # Worker sessions of an earlier `run --workers N` would keep their share of the traffic:
        # decide and deliver what they hold, then delete them (gateway/runtime/retire.py).
        from gateway.runtime.retire import retire_stale_sessions

        await retire_stale_sessions(site, self.policy, self.broker.port, workers=0, log=self.log,
                                    overrides=self.config_overrides)
        # Published checkpoints are kept by the operator side, outside the gateway's reach.
        self._operator = self.operator_client("edgeward-operator-checkpoints", self._on_operator)
        await self._operator.connect()
        await self._operator.subscribe((gw_config.checkpoint_topic, 1))
        self.gateway = Gateway(gw_config, self.policy)
        creds = (user, password)

        async def _isolate(device: str) -> None:
            await isolate(site.root, device, creds)
            self.log(f"device {device} isolated (certificate on hold, disconnected); "
                     f"edgeward devices release {site.root} {device} lets it back")

        self.gateway.on_isolate = _isolate
        self.gateway.pipeline.blocked = frozenset(site.ca().held())
        self._held_watch = asyncio.create_task(self._watch_held(), name="site-held-watch")
        await self.gateway.__aenter__()  # connected and subscribed
        try:
            await open_device_listener(site, self.broker)
        except BaseException:
            await self.__aexit__(None, None, None)  # the gateway closed, the broker stopped
            raise
        self.log(
            f"site {site.name}: broker devices mTLS 127.0.0.1:{self.device_port}, gateway 127.0.0.1:{self.broker.port}; "
            f"policy {self.policy.revision}"
        )
        return self

    async def _watch_held(self) -> None:
        """Follow the CA's holds (edgeward devices isolate/release from another process)."""
        index = self.site.root / "ca" / "index.json"
        seen = None
        while True:
            await asyncio.sleep(1.0)
            try:
                stamp = index.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if stamp != seen and self.gateway is not None:
                seen = stamp
                held = frozenset(self.site.ca().held())
                self.gateway.pipeline.blocked = held
                self.gateway.isolated = set(held)

    def operator_client(self, client_id: str, on_messages: Callable[[list[Message]], None]) -> MqttClient:
        assert self.broker is not None
        return MqttClient(host="127.0.0.1", port=self.broker.port, client_id=client_id, username=OPERATOR_USER,
                          password=self.operator_password, on_messages=on_messages)

    def _on_operator(self, batch: list[Message]) -> None:
        path = self.site.checkpoints_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            for m in batch:
                f.write(m.payload.rstrip(b"\n") + b"\n")
        assert self._operator is not None
        for m in batch:
            if m.packet_id is not None:
                self._operator.ack(m.packet_id)

    async def __aexit__(self, *exc: object) -> None:
        if self._held_watch is not None:
            self._held_watch.cancel()
        try:
            if self.gateway is not None:
                if self.gateway.checkpointer is not None and self.gateway.uplink.connected:
                    self.gateway.checkpointer.checkpoint(sync=True)  # a final signed checkpoint on clean shutdown
                    await self.gateway.drain(5)
                    await asyncio.sleep(0.2)  # let the operator side take it before the broker stops
                await self.gateway.close()
            if self._operator is not None:
                await self._operator.disconnect()
        finally:
            if self.broker is not None:
                self.broker.stop()
                (self.site.broker_dir / "runtime.json").unlink(missing_ok=True)
                operator_secret_path(self.site).unlink(missing_ok=True)

