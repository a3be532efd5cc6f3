"""Envelope encryption of one projected message for one destination.

An envelope is a canonical MessagePack map ``{v, kid, n, h, c}``: format version, the data key's id,
a random 96-bit nonce, the header, and the AES-256-GCM ciphertext. The header (device, stream,
sequence, timestamp, destination, policy revision) travels in clear so the receiver can route and
deduplicate (for an MQTT destination the sequence is 16 opaque bytes, gateway.crypto.seqid, and the
timestamp the re-timing boundary), and it is the AEAD's associated data: changing any byte of it, or moving an envelope
to another destination, fails authentication. One AESGCM object per data key; nothing is derived per
message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag

from gateway.crypto.keys import DataKeyLookup, DataKeyring
from gateway.errors import CryptoError

__all__ = ["Header", "seal", "seal_packed", "pack_header", "open_envelope", "ENVELOPE_VERSION", "pack_bundle",
           "unbundle", "BUNDLE_PREFIX"]

ENVELOPE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Header:
    device: str
    stream: str
    seq: int | bytes  # bytes: hidden under the site's key (MQTT destinations; gateway.crypto.seqid)
    ts: int
    destination: str
    revision: str

    def pack(self) -> bytes:
        return _packb([self.device, self.stream, self.seq, self.ts, self.destination, self.revision])

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        d, s, q, t, dst, rev = msgpack.unpackb(data, raw=False)
        return cls(d, s, q, t, dst, rev)


_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack_header(device: str, stream: str, seq: int | bytes, ts: int, destination: str, revision: str) -> bytes:
    """``Header(...).pack()`` without building the object (the hot path seals ~3 times a message)."""
    return _packb([device, stream, seq, ts, destination, revision])


def seal(keyring: DataKeyring, header: Header, plaintext: bytes) -> bytes:
    return seal_packed(keyring, header.pack(), plaintext)


def seal_packed(keyring: DataKeyring, h: bytes, plaintext: bytes) -> bytes:
    key = keyring.current()
    key.used += 1
    nonce = os.urandom(12)
    ct = key.aead.encrypt(nonce, plaintext, h)
    return _packb({"c": ct, "h": h, "kid": key.kid, "n": nonce, "v": ENVELOPE_VERSION})


# A bundle: several envelopes for one destination in one MQTT message, ``{bundle: [env, ...], v}``.
# Each envelope inside is sealed and authenticated on its own (the bundle adds no trust: a broker that
# drops one from a bundle could as well have dropped its message), so a receiver opens them as if they
# had come one by one. Packed with sorted keys, a bundle always starts with these bytes; an envelope
# (a map of 5 or 7 keys) never does.
BUNDLE_PREFIX = b"\x82\xa6bundle"


def pack_bundle(envelopes: list[bytes]) -> bytes:
    return _packb({"bundle": envelopes, "v": ENVELOPE_VERSION})


def unbundle(payload: bytes) -> list[bytes]:
    """The envelopes one MQTT message carries: a bundle's, in order, or the message itself.
    CryptoError for a bundle that is not well formed."""
    if not payload.startswith(BUNDLE_PREFIX):
        return [payload]
    try:
        b = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # any malformed bundle is one error
        raise CryptoError(f"malformed bundle ({type(exc).__name__})") from exc
    envs = b.get("bundle") if type(b) is dict else None
    if type(envs) is not list or b.get("v") != ENVELOPE_VERSION or not all(type(e) is bytes for e in envs):
        raise CryptoError("malformed bundle")
    return envs


def open_envelope(keyring: DataKeyLookup, data: bytes) -> tuple[Header, bytes]:
    """Authenticate and decrypt; CryptoError on anything wrong (never says more than what)."""
    try:
        env: dict[str, Any] = msgpack.unpackb(data, raw=False)
        if env.get("v") != ENVELOPE_VERSION:
            raise CryptoError(f"unknown envelope version {env.get('v')!r}")
        key = keyring.get(env["kid"])
        plaintext = key.aead.decrypt(env["n"], env["c"], env["h"])
        return Header.unpack(env["h"]), plaintext
    except CryptoError:
        raise
    except InvalidTag as exc:
        raise CryptoError("envelope failed authentication") from exc
    except Exception as exc:  # noqa: BLE001 - any malformed envelope is one error
        raise CryptoError(f"malformed envelope ({type(exc).__name__})") from exc
