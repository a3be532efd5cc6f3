"""Device identity is the certificate, proved against a real Mosquitto with the site's own CA.

One broker per module (starting Mosquitto costs ~50 ms, but the CA and the certificates are shared):
a TLS listener with ``require_certificate``, ``use_identity_as_username`` and a CRL, an ACL with
``pattern write site/AMS-T1/dev/%u/#``, and a loopback listener for the gateway's subscriber.

The device side is a deliberately small synchronous MQTT 5 client over ``ssl`` sockets and the
``mqtt5`` codec, so each test sees the exact packet (CONNACK, PUBACK reason code) or TLS failure.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mqtt5
import pytest

from gateway.crypto.pki import BROKER_CN, GATEWAY_CN, SiteCA, client_ssl_context, ssl_context_for_device
from gateway.runtime.broker import MosquittoBroker, TlsListener, free_port
from tests.conftest import start_broker

SITE = "AMS-T1"


class Refused(Exception):
    """The broker did not let the client in (TLS alert, reset, or no CONNACK)."""


class RawClient:
    """A blocking MQTT 5 client: one socket, one packet at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.sock.settimeout(3.0)

    @classmethod
    def connect(
        cls, port: int, client_id: str, *, ctx: ssl.SSLContext | None, username: str | None = None
    ) -> tuple[RawClient, mqtt5.ConnAckPacket]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=3.0)
        try:
            sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx is not None else raw
            c = cls(sock)
            c.send(mqtt5.ConnectPacket(client_id, clean_start=True, username=username))
            ack = c.recv()
        except (ssl.SSLError, OSError, EOFError) as exc:
            raw.close()
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(ack, mqtt5.ConnAckPacket) or ack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            sock.close()
            raise Refused(f"CONNACK {ack!r}")
        return c, ack

    def send(self, pkt: object) -> None:
        self.sock.sendall(pkt.write())  # type: ignore[attr-defined]

    def recv(self) -> object:
        while True:
            if self.buf:
                try:
                    pkt, n = mqtt5.read(self.buf)
                    self.buf = self.buf[n:]
                    return pkt
                except IndexError:
                    pass
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed by broker")
            self.buf += data

    def publish_qos1(self, topic: str, payload: bytes, pid: int = 1) -> mqtt5.PubAckPacket:
        self.send(mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid))
        while True:
            pkt = self.recv()
            if isinstance(pkt, mqtt5.PubAckPacket):
                return pkt

    def subscribe(self, topic: str) -> None:
        self.send(mqtt5.SubscribePacket(1, [mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)]))
        ack = self.recv()
        assert isinstance(ack, mqtt5.SubAckPacket), ack
        assert [int(c) for c in ack.reason_codes] == [1], ack

    def drain(self, wait: float = 0.3) -> list[mqtt5.PublishPacket]:
        """Everything published to us within ``wait`` seconds (acknowledging QoS 1)."""
        got: list[mqtt5.PublishPacket] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                pkt = self.recv()
            except (TimeoutError, socket.timeout):
                break
            if isinstance(pkt, mqtt5.PublishPacket):
                got.append(pkt)
                if pkt.packet_id:
                    self.send(mqtt5.PubAckPacket(pkt.packet_id))
        self.sock.settimeout(3.0)
        return got

    def close(self) -> None:
        try:
            self.send(mqtt5.DisconnectPacket())
        except OSError:
            pass
        self.sock.close()


@dataclass
class Env:
    site_dir: Path
    broker: MosquittoBroker
    tls_port: int
    ca: SiteCA
    other_ca: SiteCA


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    site = tmp_path_factory.mktemp("site")
    ca = SiteCA.create(site / "ca", SITE)
    server = ca.issue(BROKER_CN, kind="server")
    ca.issue(GATEWAY_CN, kind="gateway")
    for dev in ("xr-00001", "xr-00002", "xr-00003"):
        ca.issue(dev)
    ca.revoke("xr-00003")  # rewrites ca/crl.pem before the broker reads it
    # Another CA, with a certificate whose CN is a perfectly valid device id of this site.
    other_ca = SiteCA.create(site / "other" / "ca", "EVIL")
    other_ca.issue("xr-00001", out_dir=site / "other" / "certs")
    acl = site / "acl"
    acl.write_text(
        f"user {GATEWAY_CN}\ntopic readwrite #\n\n"
        f"pattern write site/{SITE}/dev/%u/#\n"
    )
    last: Exception | None = None
    for _ in range(5):
        tls_port = free_port()
        try:
            broker = start_broker(
                site / "broker",
                tls=TlsListener(tls_port, ca.cert_path, server.cert_path, server.key_path, ca.crl_path),
                acl_file=acl,
            )
            break
        except Exception as exc:  # noqa: BLE001 - a port race; retried
            last = exc
    else:
        raise AssertionError(f"broker did not start: {last}")
    try:
        yield Env(site, broker, tls_port, ca, other_ca)
    finally:
        broker.stop()


def _gateway_sub(env: Env) -> RawClient:
    c, _ = RawClient.connect(env.broker.port, "gw-observer", ctx=None, username=GATEWAY_CN)
    c.subscribe(f"site/{SITE}/#")
    return c


def test_rendered_listener_requires_certificates(env: Env) -> None:
    conf = env.broker.conf_path.read_text()
    for line in ("require_certificate true", "use_identity_as_username true", f"crlfile {env.ca.crl_path}"):
        assert line in conf


def test_device_with_its_own_certificate_publishes(env: Env) -> None:
    sub = _gateway_sub(env)
    try:
        dev, _ = RawClient.connect(env.tls_port, "xr-00001", ctx=ssl_context_for_device(env.site_dir, "xr-00001"))
        ack = dev.publish_qos1(f"site/{SITE}/dev/xr-00001/result", b"ok")
        dev.close()
        assert ack.reason_code == mqtt5.PubAckReasonCode.SUCCESS
        got = sub.drain()
        assert [(p.topic, p.payload) for p in got] == [(f"site/{SITE}/dev/xr-00001/result", b"ok")]
    finally:
        sub.close()


def test_device_claiming_another_identity_cannot_publish_as_it(env: Env) -> None:
    """xr-00001's certificate, xr-00002's client id and username: the broker takes the username from
    the certificate, so the ACL's %u is xr-00001 and B's namespace stays closed."""
    sub = _gateway_sub(env)
    try:
        ctx = ssl_context_for_device(env.site_dir, "xr-00001")
        dev, _ = RawClient.connect(env.tls_port, "xr-00002", ctx=ctx, username="xr-00002")
        ack = dev.publish_qos1(f"site/{SITE}/dev/xr-00002/result", b"forged", pid=7)
        assert ack.reason_code == mqtt5.PubAckReasonCode.NOT_AUTHORIZED  # 135
        # ... and its own namespace still works on the same connection: the identity is the cert's.
        ack2 = dev.publish_qos1(f"site/{SITE}/dev/xr-00001/result", b"mine", pid=8)
        assert ack2.reason_code == mqtt5.PubAckReasonCode.SUCCESS
        dev.close()
        got = sub.drain()
        assert [(p.topic, p.payload) for p in got] == [(f"site/{SITE}/dev/xr-00001/result", b"mine")]
    finally:
        sub.close()


def test_device_cannot_publish_outside_the_device_namespace(env: Env) -> None:
    dev, _ = RawClient.connect(env.tls_port, "xr-00002", ctx=ssl_context_for_device(env.site_dir, "xr-00002"))
    try:
        for topic in (f"site/{SITE}/gateway/cmd", f"site/{SITE}/dev", "vendor/home", "$SYS/x"):
            assert dev.publish_qos1(topic, b"x").reason_code == mqtt5.PubAckReasonCode.NOT_AUTHORIZED, topic
    finally:
        dev.close()


def test_device_without_a_certificate_is_refused(env: Env) -> None:
    ctx = client_ssl_context(env.ca.cert_path, None, None)
    with pytest.raises(Refused):
        RawClient.connect(env.tls_port, "xr-00001", ctx=ctx, username="xr-00001")
    with pytest.raises(Refused, match="HANDSHAKE_FAILURE"):
        RawClient.connect(env.tls_port, "xr-00001", ctx=_tls12(client_ssl_context(env.ca.cert_path, None, None)))
    # The client can see the refusal before Mosquitto's log has the line (seen once, in a clean-clone
    # CI run of session 12): wait for it, as an operator's tail would.
    deadline = time.monotonic() + 5.0
    while "peer did not return a certificate" not in (log := env.broker.log_path.read_text()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "peer did not return a certificate" in log


def test_plain_tcp_to_the_device_listener_is_refused(env: Env) -> None:
    with pytest.raises(Refused):
        RawClient.connect(env.tls_port, "xr-00001", ctx=None, username="xr-00001")


def _tls12(ctx: ssl.SSLContext) -> ssl.SSLContext:
    # Under TLS 1.3 the client finishes its side of the handshake before the broker judges the
    # certificate, so the broker's alert races its close (seen as EOF). TLS 1.2 reports the alert
    # deterministically, which lets the test check *why* the broker refused.
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def test_revoked_certificate_is_refused(env: Env) -> None:
    with pytest.raises(Refused):
        RawClient.connect(env.tls_port, "xr-00003", ctx=ssl_context_for_device(env.site_dir, "xr-00003"))
    with pytest.raises(Refused, match="CERTIFICATE_REVOKED"):
        RawClient.connect(env.tls_port, "xr-00003", ctx=_tls12(ssl_context_for_device(env.site_dir, "xr-00003")))


def test_certificate_from_another_ca_is_refused(env: Env) -> None:
    other = env.site_dir / "other" / "certs"
    def ctx() -> ssl.SSLContext:
        return client_ssl_context(env.ca.cert_path, other / "xr-00001.crt", other / "xr-00001.key")

    with pytest.raises(Refused):
        RawClient.connect(env.tls_port, "xr-00001", ctx=ctx())
    with pytest.raises(Refused, match="UNKNOWN_CA"):
        RawClient.connect(env.tls_port, "xr-00001", ctx=_tls12(ctx()))


def test_device_refuses_a_broker_from_another_ca(env: Env) -> None:
    """The other direction: a device trusting only its site's CA will not talk to an impostor broker."""
    ctx = client_ssl_context(env.other_ca.cert_path, env.site_dir / "certs" / "xr-00001.crt",
                             env.site_dir / "certs" / "xr-00001.key")
    with pytest.raises(Refused, match="CERTIFICATE_VERIFY_FAILED"):
        RawClient.connect(env.tls_port, "xr-00001", ctx=ctx)


# --------------------------------------------------------------------------- a whole site, end to end
def test_site_broker_end_to_end_and_revocation(tmp_path: Path) -> None:
    """``init_site`` + ``Site.broker_config``: devices over mTLS, the gateway with its password on the
    loopback listener, anonymous loopback clients refused, and ``revoke`` effective after SIGHUP."""
    import os as _os

    from gateway.site import init_site, load_site

    policy = Path(__file__).resolve().parents[2] / "policies"
    root = init_site(tmp_path / "site", policy_src=policy, devices=["xr-00001", "xr-00002"],
                     passphrase="integration passphrase", kdf_memory_kib=64, device_port=0, gateway_port=0)
    site = load_site(root, "integration passphrase")
    broker = MosquittoBroker(site.broker_config())
    broker.start()
    try:
        user, password = site.gateway_credentials()
        with pytest.raises(Refused):
            RawClient.connect(broker.port, "intruder", ctx=None)  # anonymous on the gateway's listener
        with pytest.raises(Refused):
            RawClient.connect(broker.port, "intruder", ctx=None, username=user)  # the name without the password
        gw = _connect_with_password(broker.port, user, password)
        gw.subscribe(f"site/{SITE}/#")
        tls_port = broker.config.tls.port  # type: ignore[union-attr]
        dev, _ = RawClient.connect(tls_port, "xr-00002", ctx=site.device_ssl_context("xr-00002"))
        assert dev.publish_qos1(site.device_topic("xr-00002", "result"), b"r").reason_code == mqtt5.PubAckReasonCode.SUCCESS
        dev.close()
        assert [p.topic for p in gw.drain()] == [site.device_topic("xr-00002", "result")]
        gw.close()

        # `edgeward devices revoke xr-00002`: the CRL is rewritten and the broker re-reads it on SIGHUP
        # (no restart: the gateway's session and queued messages are untouched).
        site.ca().revoke("xr-00002")
        assert broker.proc is not None
        _os.kill(broker.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while True:
            try:
                c, _ = RawClient.connect(tls_port, "xr-00002", ctx=site.device_ssl_context("xr-00002"))
            except Refused:
                break
            c.close()
            assert time.monotonic() < deadline, "revoked certificate still accepted 5 s after SIGHUP"
            time.sleep(0.05)
        ok, _ = RawClient.connect(tls_port, "xr-00001", ctx=site.device_ssl_context("xr-00001"))
        ok.close()
        assert _os.stat(root / "broker" / "passwords").st_mode & 0o077 == 0
    finally:
        broker.stop()


def _connect_with_password(port: int, user: str, password: bytes) -> RawClient:
    raw = socket.create_connection(("127.0.0.1", port), timeout=3.0)
    c = RawClient(raw)
    c.send(mqtt5.ConnectPacket("gw-observer", clean_start=True, username=user, password=password))
    ack = c.recv()
    assert isinstance(ack, mqtt5.ConnAckPacket) and ack.reason_code == mqtt5.ConnAckReasonCode.SUCCESS, ack
    return c
