"""Sealing data to an external destination's public key, so only that destination can read it.

A destination declared with an X25519 public key gets its data sealed with HPKE (RFC 9180), base mode,
suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM, from ``cryptography``'s
``hazmat.primitives.hpke``. Every message is a fresh single-shot HPKE encryption: an ephemeral X25519
key, its DH with the recipient's key, the key schedule, one AEAD seal. The gateway keeps no secret that
opens it afterwards: not the gateway, its uplink connection, the broker's operator, nor a stolen spool
can read what was sealed to a recipient. (The site's own KEK does not help either; that is the point.)

Binding the context: ``cryptography``'s public HPKE API takes ``info`` but no per-message AAD, so the
associated data is bound through ``info``::

    info = b"edgeward/seal/v1\\x00" || recipient key id (8 bytes) || SHA-256(aad)

``info`` feeds HPKE's key schedule, so a different aad (header), a different recipient, or another
protocol's ciphertext derives a different key and fails authentication. Hashing the aad keeps ``info``
at 57 bytes, inside the 64 bytes every RFC 9180 implementation must accept, so a destination can open
the data with any HPKE library.

Wire format of ``seal_for``'s output: ``b"EWS1" || kid (8) || enc (32) || ciphertext+tag``.
``seal_envelope_for`` wraps that with the clear header as a MessagePack envelope ``{v: 2, rk, h, c}``
(``v: 1`` is the keyring envelope in ``gateway.crypto.envelope``).

Key files: ``<name>.x25519.key`` (PKCS#8 PEM, 0600, refused when group/world-readable; kept by the
destination, not the gateway, in production) and ``<name>.x25519.pub`` (SubjectPublicKeyInfo PEM; the
only part the gateway needs). Nothing here logs; errors never carry key bytes or plaintext.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from gateway.crypto.envelope import Header
from gateway.crypto.keys import read_secret_file, write_secret_file
from gateway.errors import CryptoError, KeyFileError

__all__ = [
    "generate_recipient_key",
    "load_public_key",
    "load_private_key",
    "public_key_from_text",
    "key_id",
    "seal_for",
    "open_sealed",
    "seal_envelope_for",
    "open_envelope_for",
    "RECIPIENT_ENVELOPE_VERSION",
    "RecipientSealer",
    "RecipientOpener",
]

_MAGIC = b"EWS1"
_LABEL = b"edgeward/seal/v1\x00"
_KID_BYTES = 8
_ENC_BYTES = 32
_TAG_BYTES = 16
RECIPIENT_ENVELOPE_VERSION = 2
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _raw(pub: X25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: X25519PublicKey) -> bytes:
    """8-byte id of a recipient key (SHA-256 of its raw bytes, truncated): names the key, not a secret."""
    return hashlib.sha256(b"edgeward/recipient-kid\x00" + _raw(public_key)).digest()[:_KID_BYTES]


def _info(kid: bytes, aad: bytes) -> bytes:
    return _LABEL + kid + hashlib.sha256(aad).digest()


# ------------------------------------------------------------------------- key files
def generate_recipient_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Create ``<name>.x25519.key`` (0600) and ``<name>.x25519.pub`` under ``directory``; returns
    (private_path, public_path). Refuses to overwrite an existing private key."""
    directory = Path(directory)
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeyFileError(f"invalid recipient key name {name!r}")
    priv_path = directory / f"{name}.x25519.key"
    pub_path = directory / f"{name}.x25519.pub"
    if priv_path.exists():
        raise KeyFileError(f"{priv_path} already exists; refusing to replace a recipient key")
    key = X25519PrivateKey.generate()
    write_secret_file(
        priv_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path


def public_key_from_text(text: str | bytes) -> X25519PublicKey:
    """A recipient public key from PEM, or from base64 of the raw 32 bytes (as a policy file may hold it)."""
    data = text.encode() if isinstance(text, str) else text
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, X25519PublicKey):
                raise KeyFileError("recipient public key is not X25519")
            return key
        raw = base64.b64decode(data.strip(), validate=True)
        return X25519PublicKey.from_public_bytes(raw)
    except KeyFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - one error for any malformed key
        raise KeyFileError(f"not an X25519 public key ({type(exc).__name__})") from None


def load_public_key(path: Path) -> X25519PublicKey:
    try:
        return public_key_from_text(Path(path).read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"recipient public key {path} does not exist") from exc


def load_private_key(path: Path) -> X25519PrivateKey:
    raw = read_secret_file(Path(path))
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 private key")
    return key


# ------------------------------------------------------------------------- sealing
def seal_for(public_key: X25519PublicKey, plaintext: bytes, aad: bytes = b"") -> bytes:
    """HPKE-seal ``plaintext`` to ``public_key``, bound to ``aad`` (see the module docstring)."""
    kid = key_id(public_key)
    return _MAGIC + kid + _SUITE.encrypt(plaintext, public_key, info=_info(kid, aad))


def open_sealed(private_key: X25519PrivateKey, data: bytes, aad: bytes = b"") -> bytes:
    """Open ``seal_for``'s output; CryptoError for a wrong key, a different aad or any altered byte."""
    if len(data) < len(_MAGIC) + _KID_BYTES + _ENC_BYTES + _TAG_BYTES or data[: len(_MAGIC)] != _MAGIC:
        raise CryptoError("not a sealed message")
    kid = data[len(_MAGIC) : len(_MAGIC) + _KID_BYTES]
    if kid != key_id(private_key.public_key()):
        raise CryptoError("sealed for another recipient key")
    try:
        return _SUITE.decrypt(data[len(_MAGIC) + _KID_BYTES :], private_key, info=_info(kid, aad))
    except InvalidTag:
        raise CryptoError("sealed message failed authentication") from None
    except Exception as exc:  # noqa: BLE001 - malformed input is one error
        raise CryptoError(f"malformed sealed message ({type(exc).__name__})") from None


def seal_envelope_for(public_key: X25519PublicKey, header: Header, plaintext: bytes) -> bytes:
    """An envelope only the holder of ``public_key``'s private key can open: ``{v: 2, rk, h, c}``.

    The header travels in clear (routing, dedupe) and is bound as the aad, like ``envelope.seal``."""
    h = header.pack()
    return msgpack.packb(
        {"c": seal_for(public_key, plaintext, h), "h": h, "rk": key_id(public_key).hex(), "v": RECIPIENT_ENVELOPE_VERSION},
        use_bin_type=True,
    )


def open_envelope_for(private_key: X25519PrivateKey, data: bytes) -> tuple[Header, bytes]:
    try:
        env: dict[str, Any] = msgpack.unpackb(data, raw=False)
        if env.get("v") != RECIPIENT_ENVELOPE_VERSION:
            raise CryptoError(f"unknown recipient envelope version {env.get('v')!r}")
        h = env["h"]
        pt = open_sealed(private_key, env["c"], h)
        return Header.unpack(h), pt
    except CryptoError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed envelope is one error
        raise CryptoError(f"malformed envelope ({type(exc).__name__})") from None


# ------------------------------------------------------------------------- per-message sealing
RECIPIENT_STREAM_VERSION = 3
_DEK_LABEL = b"edgeward/dek/v1\x00"


class RecipientSealer:
    """Seals each message for one destination at AES-GCM cost, with HPKE only when the key turns.

    A single-shot HPKE seal per message costs ~0.1 ms (an ephemeral X25519 key and a DH each time).
    Here HPKE encapsulates a random AES-256-GCM data key to the destination once per rotation (by
    volume and age, as for the site's own data keys), and every message is sealed under that data
    key. Each envelope ``{v: 3, rk, dkid, dk, n, h, c}`` carries the HPKE-sealed data key (92 bytes),
    so any envelope opens on its own, in any order. The gateway forgets a data key when it rotates:
    from then on nothing it holds opens what was sealed under it.
    """

    def __init__(self, public_key: X25519PublicKey, *, max_messages: int = 2**20, max_age_s: float = 3600.0,
                 clock: Any = None) -> None:
        import time as _time

        self.public_key = public_key
        self.rk = key_id(public_key).hex()
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._clock = clock or _time.monotonic
        self._aead: Any = None
        self._used = 0
        self._born = 0.0
        self._dkid = b""
        self._dk = b""

    def _rotate(self) -> None:
        import os

        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        key = AESGCM.generate_key(bit_length=256)
        self._dkid = os.urandom(8)
        self._dk = seal_for(self.public_key, key, _DEK_LABEL + self._dkid)
        self._aead = AESGCM(key)
        self._used = 0
        self._born = self._clock()

    def seal(self, header: Header, plaintext: bytes) -> bytes:
        return self.seal_packed(header.pack(), plaintext)

    def seal_packed(self, h: bytes, plaintext: bytes) -> bytes:
        import os

        if self._aead is None or self._used >= self.max_messages or self._clock() - self._born >= self.max_age_s:
            self._rotate()
        self._used += 1
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, plaintext, h)
        return msgpack.packb(
            {"c": ct, "dk": self._dk, "dkid": self._dkid, "h": h, "n": nonce, "rk": self.rk,
             "v": RECIPIENT_STREAM_VERSION},
            use_bin_type=True,
        )


class RecipientOpener:
    """The destination's side of ``RecipientSealer`` (and of ``seal_envelope_for``)."""

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self.private_key = private_key
        self._keys: dict[bytes, Any] = {}

    def open(self, data: bytes) -> tuple[Header, bytes]:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            env: dict[str, Any] = msgpack.unpackb(data, raw=False)
            v = env.get("v")
            if v == RECIPIENT_ENVELOPE_VERSION:
                return open_envelope_for(self.private_key, data)
            if v != RECIPIENT_STREAM_VERSION:
                raise CryptoError(f"unknown recipient envelope version {v!r}")
            dkid = env["dkid"]
            aead = self._keys.get(dkid)
            if aead is None:
                aead = AESGCM(open_sealed(self.private_key, env["dk"], _DEK_LABEL + dkid))
                self._keys[dkid] = aead
            return Header.unpack(env["h"]), aead.decrypt(env["n"], env["c"], env["h"])
        except CryptoError:
            raise
        except InvalidTag:
            raise CryptoError("envelope failed authentication") from None
        except Exception as exc:  # noqa: BLE001 - any malformed envelope is one error
            raise CryptoError(f"malformed envelope ({type(exc).__name__})") from None
