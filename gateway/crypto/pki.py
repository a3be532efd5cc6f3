"""The site's own certificate authority: device, gateway and broker certificates, revocation, TLS contexts.

Every identity on a site's MQTT fabric is a certificate this CA issued: a device's certificate CN is its
device id (Mosquitto's ``use_identity_as_username`` makes that the MQTT username, so the ACL's ``%u``
is the certificate, not what the device claims); the broker presents a server certificate for
``127.0.0.1``/``localhost``; the gateway has a client certificate of its own. Keys are ECDSA P-256:
fast to generate (hundreds per second), and accepted by Mosquitto 2.0 on Debian's OpenSSL 3 (proved
by tests/integration/test_mtls.py). RSA is never used: issuing a fleet must take well under a second.

Layout under the CA directory (``<site>/ca``)::

    ca.crt        the CA certificate (the trust anchor every party loads)
    ca.key        its private key, 0600; refused when group/world-readable
    index.json    every certificate issued: serial -> cn, kind, not_after, revoked_at
    crl.pem       the current certificate revocation list (always present, possibly empty: with a
                  ``crlfile`` configured, OpenSSL refuses every peer when no CRL exists for the CA)

This module never logs, and no error it raises carries key material.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.crypto.keys import read_secret_file, write_secret_file
from gateway.errors import ConfigError, KeyFileError

__all__ = [
    "SiteCA",
    "IssuedCert",
    "CertKind",
    "ssl_context_for_device",
    "ssl_context_for_gateway",
    "client_ssl_context",
    "check_key_file",
    "GATEWAY_CN",
    "BROKER_CN",
    "PROBE_CN",
]

CertKind = Literal["device", "gateway", "server", "probe"]
GATEWAY_CN = "edgeward-gateway"
BROKER_CN = "edgeward-broker"
# The runtime's own client on the device listener: it connects to learn that the broker lets devices
# in again (site_runner.open_device_listener). Its client id is its own, so it takes over no device.
PROBE_CN = "edgeward-listener-probe"
_ONE_DAY = _dt.timedelta(days=1)
# Certificates are back-dated a little so a device whose clock runs slightly behind still accepts them.
_BACKDATE = _dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """One issued certificate: where its PEM files are, and its serial number."""

    cn: str
    kind: CertKind
    serial: int
    cert_path: Path
    key_path: Path


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_public(path: Path, data: bytes) -> None:
    """Certificates and CRLs are public; written atomically, 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def check_key_file(path: Path) -> None:
    """KeyFileError when ``path`` is missing or readable by group/world (before handing it to ssl)."""
    read_secret_file(path)


def _safe_name(cn: str) -> str:
    # A CN becomes a file name: refuse anything that could escape the directory or confuse a shell.
    if not cn or len(cn) > 64 or not all(c.isalnum() or c in "-_." for c in cn) or cn.startswith("."):
        raise ConfigError(f"invalid certificate name {cn!r}: use letters, digits, '-', '_' or '.' (max 64)")
    return cn


class SiteCA:
    """A site's CA. ``create`` makes a new one; ``load`` opens an existing one (0600 key enforced)."""

    def __init__(self, directory: Path, site: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.directory = directory
        self.site = site
        self._key = key
        self.cert = cert
        self._index: dict[str, dict[str, object]] = {}
        idx = directory / "index.json"
        if idx.exists():
            self._index = json.loads(idx.read_text())

    # ----------------------------------------------------------------- lifecycle
    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.directory / "crl.pem"

    @classmethod
    def create(cls, directory: Path, site: str, *, days: int = 3650) -> SiteCA:
        """A new CA for ``site`` under ``directory`` (refuses to overwrite an existing one)."""
        directory = Path(directory)
        if (directory / "ca.key").exists():
            raise ConfigError(f"{directory} already holds a CA; refusing to overwrite it")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, site),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Edgeward site CA {site}"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + days * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        write_secret_file(directory / "ca.key", _key_pem(key))
        _write_public(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(directory, site, key, cert)
        ca._save_index()
        ca.write_crl()
        return ca

    @classmethod
    def load(cls, directory: Path) -> SiteCA:
        directory = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        except FileNotFoundError as exc:
            raise ConfigError(f"{directory} holds no CA certificate (ca.crt); run `edgeward init`") from exc
        except ValueError as exc:
            raise ConfigError(f"{directory}/ca.crt is not a PEM certificate") from exc
        raw = read_secret_file(directory / "ca.key")
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{directory}/ca.key is not a PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{directory}/ca.key is not an EC key")
        cert_key = cert.public_key()  # any kind of key: only an EC one has public_numbers() to compare
        if not isinstance(cert_key, ec.EllipticCurvePublicKey) or (
            key.public_key().public_numbers() != cert_key.public_numbers()
        ):
            raise KeyFileError(f"{directory}/ca.key does not belong to {directory}/ca.crt")
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        site = str(orgs[0].value) if orgs else ""
        return cls(directory, site, key, cert)

    def _save_index(self) -> None:
        path = self.directory / "index.json"
        tmp = path.with_name("index.json.tmp")
        tmp.write_text(json.dumps(self._index, indent=1, sort_keys=True))
        os.replace(tmp, path)

    # ----------------------------------------------------------------- issuing
    def issue(
        self,
        cn: str,
        *,
        kind: CertKind = "device",
        days: int = 825,
        out_dir: Path | None = None,
        save_index: bool = True,
    ) -> IssuedCert:
        """Issue a certificate and a fresh P-256 key for ``cn``; write ``<cn>.crt`` (0644) and ``<cn>.key``
        (0600) into ``out_dir`` (default: ``<site>/certs``). ``kind`` sets the extended key usage:
        ``device``/``gateway``/``probe`` are TLS clients, ``server`` is the broker (SAN 127.0.0.1, localhost).

        ``save_index=False`` defers writing index.json (call ``save()`` after a batch)."""
        _safe_name(cn)
        if kind not in ("device", "gateway", "server", "probe"):
            raise ConfigError(f"unknown certificate kind {kind!r}")
        if kind == "device" and cn in (GATEWAY_CN, BROKER_CN, PROBE_CN):
            # The broker's ACL grants the gateway's name everything: no device may ever carry it.
            raise ConfigError(f"{cn!r} is reserved and cannot be a device id")
        out = Path(out_dir) if out_dir is not None else self.directory.parent / "certs"
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        serial = x509.random_serial_number()
        eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.site),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + days * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
        )
        if kind == "server":
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"), x509.DNSName(cn)]
                ),
                critical=False,
            )
        cert = b.sign(self._key, hashes.SHA256())
        cert_path, key_path = out / f"{cn}.crt", out / f"{cn}.key"
        write_secret_file(key_path, _key_pem(key))
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._index[str(serial)] = {
            "cn": cn,
            "kind": kind,
            "not_after": cert.not_valid_after_utc.isoformat(),
            "revoked_at": None,
        }
        if save_index:
            self._save_index()
        return IssuedCert(cn, kind, serial, cert_path, key_path)

    def save(self) -> None:
        """Write index.json (after ``issue(..., save_index=False)`` batches)."""
        self._save_index()

    def issued(self) -> list[tuple[int, str, str, bool]]:
        """(serial, cn, kind, revoked) for every certificate this CA issued."""
        return [(int(s), str(r["cn"]), str(r["kind"]), r["revoked_at"] is not None) for s, r in self._index.items()]

    # ----------------------------------------------------------------- revocation
    def revoke(self, which: int | str) -> list[int]:
        """Revoke by serial (int) or by CN (every unrevoked certificate with that CN); rewrites the CRL.

        Returns the serials newly revoked; ConfigError when nothing matched."""
        now = _now().isoformat()
        hit: list[int] = []
        for s, r in self._index.items():
            match = int(s) == which if isinstance(which, int) else r["cn"] == which
            if match and r["revoked_at"] is None:
                r["revoked_at"] = now
                hit.append(int(s))
        if not hit:
            raise ConfigError(f"no unrevoked certificate matches {which!r}")
        self._save_index()
        self.write_crl()
        return hit

    def hold(self, cn: str) -> list[int]:
        """Isolate a device: its unrevoked certificates go on the CRL with reason certificateHold
        (reversible, unlike revocation). Returns the serials put on hold."""
        now = _now().isoformat()
        hit = []
        for s, r in self._index.items():
            if r["cn"] == cn and r["revoked_at"] is None and not r.get("held_at"):
                r["held_at"] = now
                hit.append(int(s))
        if not hit and cn not in self.held():
            raise ConfigError(f"no certificate to hold for {cn!r}")
        self._save_index()
        self.write_crl()
        return hit

    def release(self, cn: str) -> list[int]:
        """Lift a hold: the device's certificates leave the CRL again."""
        hit = []
        for s, r in self._index.items():
            if r["cn"] == cn and r.get("held_at"):
                r["held_at"] = None
                hit.append(int(s))
        if not hit:
            raise ConfigError(f"{cn!r} is not isolated")
        self._save_index()
        self.write_crl()
        return hit

    def held(self) -> set[str]:
        """CNs with a certificate on hold (isolated devices)."""
        return {str(r["cn"]) for r in self._index.values() if r.get("held_at") and r["revoked_at"] is None}

    def write_crl(self, path: Path | None = None, *, days: int = 30, hold_devices: bool = False) -> Path:
        """Write the CRL (PEM) listing every revoked serial; default path ``<ca>/crl.pem``.

        Mosquitto reads the CRL when it starts: restart the broker after revoking. The CRL's
        ``next_update`` is ``days`` ahead; re-run this (``edgeward devices revoke`` does) before then.
        ``hold_devices`` puts every device certificate (and the runtime's probe) on hold as well,
        without recording it in the index: the broker then refuses every device until the CRL is
        written again without it (a site's start, until its ingest has subscribed:
        ``site_runner.open_device_listener``)."""
        now = _now()
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + days * _ONE_DAY)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        for s, r in self._index.items():
            if r["revoked_at"] is not None:
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(s))
                    .revocation_date(_dt.datetime.fromisoformat(str(r["revoked_at"])))
                    .build()
                )
            elif r.get("held_at") or (hold_devices and r["kind"] in ("device", "probe")):
                held_at = r.get("held_at")
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(s))
                    .revocation_date(_dt.datetime.fromisoformat(str(held_at)) if held_at else now - _BACKDATE)
                    .add_extension(x509.CRLReason(x509.ReasonFlags.certificate_hold), critical=False)
                    .build()
                )
        crl = b.sign(self._key, hashes.SHA256())
        out = path if path is not None else self.crl_path
        _write_public(out, crl.public_bytes(serialization.Encoding.PEM))
        return out


# --------------------------------------------------------------------- TLS contexts
def client_ssl_context(cafile: Path, certfile: Path | None, keyfile: Path | None) -> ssl.SSLContext:
    """A TLS client context that trusts only ``cafile`` and presents ``certfile``/``keyfile`` (if given).

    Hostname checking stays on: the broker's certificate names 127.0.0.1 and localhost."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(cafile))
    if certfile is not None and keyfile is not None:
        check_key_file(keyfile)
        try:
            ctx.load_cert_chain(str(certfile), str(keyfile))
        except (ssl.SSLError, OSError) as exc:
            raise KeyFileError(f"cannot load certificate {certfile.name} with its key") from exc
    return ctx


def ssl_context_for_device(site_dir: Path, device_id: str) -> ssl.SSLContext:
    """The TLS context device ``device_id`` connects with (its own certificate, the site's CA)."""
    site_dir = Path(site_dir)
    _safe_name(device_id)
    certs = site_dir / "certs"
    if not (certs / f"{device_id}.crt").exists():
        raise ConfigError(f"device {device_id} is not registered at this site (no certificate)")
    return client_ssl_context(site_dir / "ca" / "ca.crt", certs / f"{device_id}.crt", certs / f"{device_id}.key")


def ssl_context_for_gateway(site_dir: Path) -> ssl.SSLContext:
    """The gateway's TLS client context (its own certificate, the site's CA)."""
    site_dir = Path(site_dir)
    certs = site_dir / "certs"
    return client_ssl_context(site_dir / "ca" / "ca.crt", certs / f"{GATEWAY_CN}.crt", certs / f"{GATEWAY_CN}.key")
