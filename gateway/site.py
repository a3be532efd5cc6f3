"""A site directory: every identity and key a screening site owns, created once by ``edgeward init``.

::

    SITE_DIR/
      site.json             site name, ports, device ids, paths (no secrets)
      ca/                   the site's CA (gateway.crypto.pki): ca.crt, ca.key (0600), index.json, crl.pem
      certs/                edgeward-broker.{crt,key}  the broker's TLS server identity (127.0.0.1, localhost)
                            edgeward-gateway.{crt,key} the gateway's client identity
                            <device-id>.{crt,key}      one per registered device (CN = device id)
      keys/                 kek.enc              the KEK, wrapped under the passphrase (gateway.crypto.kek)
                            audit-signing.key    Ed25519 checkpoint key (0600); .pub is for auditors
                            broker-gateway.secret  the gateway's password on the broker's loopback listener
      policy/               a copy of the operator's policy files this site runs
      broker/               the broker's work directory (rendered config, ACL, password file, persistence)
      audit/                the audit log (created by the gateway)

Every private key and secret is 0600 and refused when group/world-readable; the directories holding
them are 0700. ``load_site`` unlocks the KEK with the passphrase and returns a ``Site`` value that
builds TLS contexts and the broker's configuration: a mutual-TLS listener for devices
(``require_certificate``, ``use_identity_as_username``, the CRL) and a loopback listener for the
gateway that refuses anonymous clients (its password never appears on a command line).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit.checkpoint import create_signing_key, load_signing_key, load_verify_key
from gateway.crypto.kek import DEFAULT_MEMORY_KIB, create_kek, unlock_kek
from gateway.crypto.keys import read_secret_file, write_secret_file
from gateway.crypto.pki import (
    BROKER_CN,
    GATEWAY_CN,
    PROBE_CN,
    SiteCA,
    client_ssl_context,
    ssl_context_for_device,
    ssl_context_for_gateway,
)
from gateway.errors import ConfigError
from gateway.runtime.broker import BrokerConfig, TlsListener, free_port

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["Site", "init_site", "load_site", "add_devices", "register_recipient", "render_acl", "mosquitto_password_line", "SITE_FORMAT"]

SITE_FORMAT = 1
DEFAULT_DEVICE_PORT = 18883
DEFAULT_GATEWAY_PORT = 11883
# Mosquitto 2.0's own format for mosquitto_passwd -H sha512-pbkdf2: $7$<iterations>$<salt>$<hash>.
_PBKDF2_ITERATIONS = 101


def mosquitto_password_line(username: str, password: str, *, iterations: int = _PBKDF2_ITERATIONS) -> str:
    """One ``password_file`` line in Mosquitto 2.0's PBKDF2-SHA512 format (what ``mosquitto_passwd``
    writes), computed here so the password is never passed to a process on its command line."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def render_acl(site: str, *, gateway_user: str = GATEWAY_CN) -> str:
    """The minimal broker ACL for a site: the gateway may do anything; a device may only publish under
    ``site/<site>/dev/<its certificate CN>/``. The policy-rendered ACL, when there is one, replaces it."""
    return (
        "# Rendered by Edgeward from the site directory.\n"
        "# The gateway (password on the loopback listener) reads and writes everything.\n"
        f"user {gateway_user}\n"
        "topic readwrite #\n\n"
        "# A device's username is its certificate's CN (use_identity_as_username): it may publish only\n"
        "# in its own namespace, and may not subscribe or read anything.\n"
        f"pattern write site/{site}/dev/%u/#\n"
    )


def _site_name_from_policy(policy_src: Path) -> str | None:
    path = policy_src / "site.yaml" if policy_src.is_dir() else policy_src
    try:
        import yaml

        doc = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - the policy checker reports policy errors; here a name is optional
        return None
    name = doc.get("site") if isinstance(doc, dict) else None
    return name if isinstance(name, str) and name else None


def _copy_policy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        shutil.copy2(src, dst / src.name)
        return
    if not src.is_dir():
        raise ConfigError(f"policy source {src} does not exist")
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif p.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)


def init_site(
    site_dir: Path,
    *,
    policy_src: Path,
    devices: Iterable[str],
    passphrase: str,
    site: str | None = None,
    kdf_memory_kib: int = DEFAULT_MEMORY_KIB,
    device_port: int = DEFAULT_DEVICE_PORT,
    gateway_port: int = DEFAULT_GATEWAY_PORT,
    cert_days: int = 825,
) -> Path:
    """Create a site under ``site_dir`` (which must be absent or empty). ``site`` defaults to the
    policy's ``site:``. A port of 0 means "a free port each time the broker starts" (demo, tests).
    Returns ``site_dir``. The passphrase is used once, for the KEK, and never written anywhere."""
    site_dir = Path(site_dir).resolve()
    if site_dir.exists() and any(site_dir.iterdir()):
        raise ConfigError(f"{site_dir} is not empty; refusing to initialise a site over it")
    name = site or _site_name_from_policy(Path(policy_src)) or "SITE"
    device_ids = list(dict.fromkeys(devices))
    site_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(site_dir, 0o700)
    for sub in ("certs", "keys", "broker", "policy"):
        (site_dir / sub).mkdir(mode=0o700, exist_ok=True)
    # The KEK first: a passphrase that is refused (too short) fails before anything else is made.
    create_kek(site_dir / "keys" / "kek.enc", passphrase, memory_kib=kdf_memory_kib)
    ca = SiteCA.create(site_dir / "ca", name)
    ca.issue(BROKER_CN, kind="server", days=cert_days, save_index=False)
    ca.issue(GATEWAY_CN, kind="gateway", days=cert_days, save_index=False)
    ca.issue(PROBE_CN, kind="probe", days=cert_days, save_index=False)  # site_runner.open_device_listener
    for dev in device_ids:
        ca.issue(dev, kind="device", days=cert_days, save_index=False)
    ca.save()
    ca.write_crl()
    create_signing_key(site_dir / "keys" / "audit-signing.key")
    write_secret_file(site_dir / "keys" / "broker-gateway.secret", secrets.token_urlsafe(32).encode())
    _copy_policy(Path(policy_src), site_dir / "policy")
    doc = {
        "format": SITE_FORMAT,
        "site": name,
        "host": "127.0.0.1",
        "ports": {"devices": device_port, "gateway": gateway_port},
        "devices": device_ids,
        "kdf": {"name": "argon2id", "memory_kib": kdf_memory_kib},
        "paths": {
            "ca": "ca/ca.crt",
            "crl": "ca/crl.pem",
            "certs": "certs",
            "kek": "keys/kek.enc",
            "audit_key": "keys/audit-signing.key",
            "audit": "audit",
            "policy": "policy",
            "broker": "broker",
        },
    }
    _write_json(site_dir / "site.json", doc)
    return site_dir


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def add_devices(site_dir: Path, devices: Iterable[str], *, cert_days: int = 825) -> list[str]:
    """Register more devices (issue their certificates); returns the ids that were new."""
    site_dir = Path(site_dir)
    doc = _read_site_json(site_dir)
    ca = SiteCA.load(site_dir / "ca")
    known = set(doc["devices"])
    new = [d for d in dict.fromkeys(devices) if d not in known]
    for dev in new:
        ca.issue(dev, kind="device", days=cert_days, save_index=False)
    ca.save()
    doc["devices"] = list(doc["devices"]) + new
    _write_json(site_dir / "site.json", doc)
    return new


def _read_site_json(site_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((site_dir / "site.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{site_dir} is not a site directory (no site.json); run `edgeward init {site_dir}`") from exc
    except ValueError as exc:
        raise ConfigError(f"{site_dir}/site.json is not valid JSON") from exc
    if doc.get("format") != SITE_FORMAT:
        raise ConfigError(f"{site_dir}/site.json has unsupported format {doc.get('format')!r}")
    return dict(doc)


@dataclass(frozen=True, slots=True)
class Site:
    """An opened site. ``kek`` is the unlocked key-encryption key (keep it in memory only)."""

    root: Path
    name: str
    host: str
    device_port: int
    gateway_port: int
    devices: tuple[str, ...]
    kek: bytes = field(repr=False)

    # ------------------------------------------------------------ paths
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.root / "ca" / "crl.pem"

    @property
    def certs_dir(self) -> Path:
        return self.root / "certs"

    @property
    def policy_dir(self) -> Path:
        return self.root / "policy"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def keyring_path(self) -> Path:
        """Where the DataKeyring lives (its keys wrapped under ``kek``)."""
        return self.root / "keys" / "datakeys.jsonl"

    @property
    def audit_key_path(self) -> Path:
        return self.root / "keys" / "audit-signing.key"

    @property
    def audit_public_key_path(self) -> Path:
        return self.root / "keys" / "audit-signing.key.pub"

    @property
    def checkpoints_path(self) -> Path:
        """Where ``edgeward audit verify`` finds the operator's copy of published checkpoints (JSON lines)."""
        return self.root / "audit" / "published-checkpoints.jsonl"

    @property
    def checkpoint_topic(self) -> str:
        return f"site/{self.name}/gateway/audit/checkpoint"

    def device_topic(self, device_id: str, stream: str) -> str:
        return f"site/{self.name}/dev/{device_id}/{stream}"

    # ------------------------------------------------------------ keys and contexts
    def audit_signing_key(self) -> Ed25519PrivateKey:
        return load_signing_key(self.audit_key_path)

    def audit_verify_key(self) -> Ed25519PublicKey:
        return load_verify_key(self.audit_public_key_path)

    def device_ssl_context(self, device_id: str) -> ssl.SSLContext:
        return ssl_context_for_device(self.root, device_id)

    def gateway_ssl_context(self) -> ssl.SSLContext:
        return ssl_context_for_gateway(self.root)

    def anonymous_ssl_context(self) -> ssl.SSLContext:
        """Trusts the site's CA, presents no certificate (for tests that must be refused)."""
        return client_ssl_context(self.ca_cert, None, None)

    def gateway_credentials(self) -> tuple[str, bytes]:
        """(username, password) for the gateway on the broker's loopback listener."""
        return GATEWAY_CN, read_secret_file(self.root / "keys" / "broker-gateway.secret").strip()

    def ca(self) -> SiteCA:
        return SiteCA.load(self.root / "ca")

    # ------------------------------------------------------------ broker
    def broker_config(
        self,
        workdir: Path | None = None,
        *,
        acl_file: Path | None = None,
        device_port: int | None = None,
        gateway_port: int | None = None,
        device_host: str | None = None,
        **overrides: Any,
    ) -> BrokerConfig:
        """The broker for this site: loopback listener for the gateway (password, not anonymous) and the
        devices' mTLS listener (certificate required, CN = username, CRL). Writes the password file and,
        unless ``acl_file`` is given, the site's minimal ACL into ``workdir`` (default ``broker/``).
        A port of 0 (here or in site.json) picks a free port now."""
        wd = Path(workdir) if workdir is not None else self.broker_dir
        wd.mkdir(parents=True, exist_ok=True)
        user, password = self.gateway_credentials()
        pw_file = wd / "passwords"
        write_secret_file(pw_file, mosquitto_password_line(user, password.decode()).encode())
        if acl_file is None:
            acl_file = wd / "acl"
            acl_file.write_text(render_acl(self.name))
        dport = self.device_port if device_port is None else device_port
        gport = self.gateway_port if gateway_port is None else gateway_port
        certs = self.certs_dir
        return BrokerConfig(
            port=gport or free_port(),
            workdir=wd,
            host=self.host,
            tls=TlsListener(
                port=dport or free_port(),
                cafile=self.ca_cert,
                certfile=certs / f"{BROKER_CN}.crt",
                keyfile=certs / f"{BROKER_CN}.key",
                crlfile=self.crl,
                host=device_host,
            ),
            acl_file=acl_file,
            password_file=pw_file,
            **overrides,
        )


def load_site(site_dir: Path, passphrase: str) -> Site:
    """Open ``site_dir``: check its files, unlock the KEK (KeyFileError on a wrong passphrase)."""
    root = Path(site_dir).resolve()
    doc = _read_site_json(root)
    for rel in ("ca/ca.crt", "ca/crl.pem", f"certs/{BROKER_CN}.crt", f"certs/{GATEWAY_CN}.crt"):
        if not (root / rel).exists():
            raise ConfigError(f"site {root} is incomplete: {rel} is missing")
    # Permission checks on every secret the broker or gateway will read, before anything starts.
    for rel in (f"certs/{BROKER_CN}.key", f"certs/{GATEWAY_CN}.key", "keys/audit-signing.key", "keys/broker-gateway.secret"):
        read_secret_file(root / rel)
    kek = unlock_kek(root / "keys" / "kek.enc", passphrase)
    ports = doc.get("ports", {})
    return Site(
        root=root,
        name=str(doc["site"]),
        host=str(doc.get("host", "127.0.0.1")),
        device_port=int(ports.get("devices", DEFAULT_DEVICE_PORT)),
        gateway_port=int(ports.get("gateway", DEFAULT_GATEWAY_PORT)),
        devices=tuple(doc.get("devices", ())),
        kek=kek,
    )


def register_recipient(site_dir: Path, destination: str, public_key: Path) -> None:
    """Seal ``destination``'s data to this X25519 public key (PEM): copied into the site and named in
    site.json, where the runtime picks it up."""
    doc = json.loads((site_dir / "site.json").read_text())
    rel = Path("recipients") / f"{destination}.pub"
    (site_dir / rel).parent.mkdir(exist_ok=True)
    (site_dir / rel).write_bytes(public_key.read_bytes())
    doc.setdefault("recipients", {})[destination] = str(rel)
    (site_dir / "site.json").write_text(json.dumps(doc, indent=2) + "\n")
