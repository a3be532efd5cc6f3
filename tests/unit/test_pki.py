"""The site CA and the site directory: what is issued, with which rights, where, and how it is refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.crypto.pki import BROKER_CN, GATEWAY_CN, PROBE_CN, SiteCA, ssl_context_for_device
from gateway.errors import ConfigError, KeyFileError
from gateway.site import init_site, load_site, mosquitto_password_line, render_acl

POLICY = Path(__file__).resolve().parents[2] / "policies"
PW = "site passphrase for tests"


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_ca_issues_device_server_and_gateway_certificates(tmp_path: Path) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    dev = ca.issue("xr-00001")
    srv = ca.issue(BROKER_CN, kind="server")
    gw = ca.issue(GATEWAY_CN, kind="gateway")
    d = _cert(dev.cert_path)
    assert d.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "xr-00001"
    assert d.issuer == ca.cert.subject
    assert list(d.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not d.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    s = _cert(srv.cert_path)
    san = s.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert list(s.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _cert(gw.cert_path).issuer == ca.cert.subject
    for issued in (dev, srv, gw):
        assert os.stat(issued.key_path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "ca" / "ca.key").st_mode & 0o777 == 0o600
    ca.cert.public_key().verify(d.signature, d.tbs_certificate_bytes, ec.ECDSA(d.signature_hash_algorithm))  # type: ignore[arg-type,call-arg]


def test_ca_reloads_and_refuses_a_readable_key(tmp_path: Path) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    ca.issue("xr-00001")
    again = SiteCA.load(tmp_path / "ca")
    assert again.site == "AMS-T1" and [c[1] for c in again.issued()] == ["xr-00001"]
    with pytest.raises(ConfigError):
        SiteCA.create(tmp_path / "ca", "AMS-T1")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(KeyFileError):
        SiteCA.load(tmp_path / "ca")


def test_a_ca_certificate_with_another_kind_of_key_is_refused(tmp_path: Path) -> None:
    # ca.crt replaced by an Ed25519 certificate (no public_numbers): the key does not belong to it,
    # a KeyFileError like any other mismatch, not an AttributeError
    SiteCA.create(tmp_path / "ca", "AMS-T1")
    other = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the site CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(other, None))
    (tmp_path / "ca" / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(KeyFileError, match="does not belong"):
        SiteCA.load(tmp_path / "ca")


def test_revocation_lands_in_the_crl(tmp_path: Path) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    a, b = ca.issue("xr-00001"), ca.issue("xr-00002")
    assert len(list(x509.load_pem_x509_crl(ca.crl_path.read_bytes()))) == 0  # written empty at creation
    assert ca.revoke("xr-00002") == [b.serial]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(b.serial) is not None
    assert crl.get_revoked_certificate_by_serial_number(a.serial) is None
    assert ca.revoke(a.serial) == [a.serial]
    with pytest.raises(ConfigError):
        ca.revoke("xr-00002")  # already revoked: nothing left to revoke
    # The revocation survives a reload.
    assert {s for s, _, _, r in SiteCA.load(tmp_path / "ca").issued() if r} == {a.serial, b.serial}


def test_a_crl_can_hold_every_device_for_a_while_without_isolating_any(tmp_path: Path) -> None:
    """A site's broker starts with every device (and the runtime's probe) on hold, until its ingest
    has subscribed; the broker's and the gateway's certificates stay valid, and no device is recorded
    as isolated, so the next CRL lets them all in again."""
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    dev, probe = ca.issue("xr-00001"), ca.issue(PROBE_CN, kind="probe")
    server, gw = ca.issue(BROKER_CN, kind="server"), ca.issue(GATEWAY_CN, kind="gateway")
    crl = x509.load_pem_x509_crl(ca.write_crl(hold_devices=True).read_bytes())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    for held in (dev, probe):
        entry = crl.get_revoked_certificate_by_serial_number(held.serial)
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason == x509.ReasonFlags.certificate_hold
    assert crl.get_revoked_certificate_by_serial_number(server.serial) is None
    assert crl.get_revoked_certificate_by_serial_number(gw.serial) is None
    assert SiteCA.load(tmp_path / "ca").held() == set()
    assert len(list(x509.load_pem_x509_crl(ca.write_crl().read_bytes()))) == 0
    with pytest.raises(ConfigError, match="reserved"):
        ca.issue(PROBE_CN)  # no device may carry the probe's name


@pytest.mark.parametrize("cn", ["../etc", "", "a b", ".hidden", "x" * 65])
def test_unsafe_names_are_refused(tmp_path: Path, cn: str) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    with pytest.raises(ConfigError):
        ca.issue(cn)


def test_a_device_cannot_be_named_like_the_gateway(tmp_path: Path) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    with pytest.raises(ConfigError, match="reserved"):
        ca.issue(GATEWAY_CN)


def test_device_context_trusts_only_the_site_ca(tmp_path: Path) -> None:
    ca = SiteCA.create(tmp_path / "ca", "AMS-T1")
    ca.issue("xr-00001")
    ctx = ssl_context_for_device(tmp_path, "xr-00001")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert len(ctx.get_ca_certs()) == 1
    with pytest.raises(ConfigError, match="not registered"):
        ssl_context_for_device(tmp_path, "xr-09999")
    os.chmod(tmp_path / "certs" / "xr-00001.key", 0o640)
    with pytest.raises(KeyFileError):
        ssl_context_for_device(tmp_path, "xr-00001")


def test_init_site_layout_and_permissions(tmp_path: Path) -> None:
    root = init_site(tmp_path / "site", policy_src=POLICY, devices=["xr-00001", "ct-00002"], passphrase=PW,
                     kdf_memory_kib=64)
    doc = json.loads((root / "site.json").read_text())
    assert doc["site"] == "AMS-T1" and doc["devices"] == ["xr-00001", "ct-00002"]
    for rel in ("ca/ca.crt", "ca/crl.pem", "certs/xr-00001.crt", "certs/ct-00002.crt", f"certs/{BROKER_CN}.crt",
                f"certs/{GATEWAY_CN}.crt", "keys/kek.enc", "keys/audit-signing.key.pub", "policy/site.yaml"):
        assert (root / rel).is_file(), rel
    for rel in ("ca/ca.key", "certs/xr-00001.key", "keys/kek.enc", "keys/audit-signing.key",
                "keys/broker-gateway.secret"):
        assert os.stat(root / rel).st_mode & 0o077 == 0, rel
    for rel in (".", "ca", "keys", "certs"):
        assert os.stat(root / rel).st_mode & 0o077 == 0, rel
    text = "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())
    assert PW not in text
    with pytest.raises(ConfigError, match="not empty"):
        init_site(root, policy_src=POLICY, devices=[], passphrase=PW, kdf_memory_kib=64)


def test_load_site_unlocks_and_renders_the_broker(tmp_path: Path) -> None:
    root = init_site(tmp_path / "site", policy_src=POLICY, devices=["xr-00001"], passphrase=PW, kdf_memory_kib=64,
                     device_port=0, gateway_port=0)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_site(root, "not the passphrase")
    site = load_site(root, PW)
    assert len(site.kek) == 32 and site.kek.hex() not in repr(site) and "kek" not in repr(site)
    cfg = site.broker_config(tmp_path / "work")
    conf = cfg.render()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert f"crlfile {site.crl}" in conf and "allow_anonymous true" not in conf
    assert f"password_file {tmp_path / 'work' / 'passwords'}" in conf
    password = site.gateway_credentials()[1].decode()
    assert password not in conf and password not in (tmp_path / "work" / "passwords").read_text()
    assert "pattern write site/AMS-T1/dev/%u/#" in (tmp_path / "work" / "acl").read_text()


def test_password_line_and_acl_format() -> None:
    line = mosquitto_password_line("edgeward-gateway", "s3cret")
    user, rest = line.rstrip("\n").split(":", 1)
    _, seven, iters, salt, digest = rest.split("$")
    assert (user, seven, iters) == ("edgeward-gateway", "7", "101") and "s3cret" not in line
    assert "topic readwrite #" in render_acl("X") and "pattern write site/X/dev/%u/#" in render_acl("X")
