"""Sealing to a destination's X25519 key (HPKE): only that key opens it, bound to its header."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.crypto.envelope import Header
from gateway.crypto.recipient import (
    RecipientOpener,
    RecipientSealer,
    generate_recipient_key,
    key_id,
    load_private_key,
    load_public_key,
    open_envelope_for,
    open_sealed,
    public_key_from_text,
    seal_envelope_for,
    seal_for,
)
from gateway.errors import CryptoError, KeyFileError

H = Header("xr-00001", "result", 7, 1_800_000_000_000, "customs_nl", "rev1")


@pytest.fixture
def keys(tmp_path: Path) -> tuple[X25519PrivateKey, object]:
    priv_path, pub_path = generate_recipient_key(tmp_path, "customs_nl")
    return load_private_key(priv_path), load_public_key(pub_path)


def test_key_files_are_written_0600_and_refused_when_readable(tmp_path: Path) -> None:
    priv_path, pub_path = generate_recipient_key(tmp_path, "hub")
    assert os.stat(priv_path).st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in pub_path.read_bytes()
    os.chmod(priv_path, 0o644)
    with pytest.raises(KeyFileError):
        load_private_key(priv_path)
    with pytest.raises(KeyFileError):
        generate_recipient_key(tmp_path, "hub")  # never overwrites


def test_round_trip_and_ciphertext_hides_plaintext(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    ct = seal_for(pub, b"passenger-record", b"aad")
    assert b"passenger-record" not in ct
    assert open_sealed(priv, ct, b"aad") == b"passenger-record"
    assert seal_for(pub, b"x", b"aad") != seal_for(pub, b"x", b"aad")  # fresh ephemeral key each time


def test_wrong_private_key_cannot_open(keys) -> None:  # type: ignore[no-untyped-def]
    _, pub = keys
    ct = seal_for(pub, b"secret", b"aad")
    other = X25519PrivateKey.generate()
    with pytest.raises(CryptoError, match="another recipient"):
        open_sealed(other, ct, b"aad")
    # Even with the key id forged to match, the other key fails authentication.
    forged = ct[:4] + key_id(other.public_key()) + ct[12:]
    with pytest.raises(CryptoError, match="authentication"):
        open_sealed(other, forged, b"aad")


def test_tampered_aad_or_ciphertext_fails(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    ct = seal_for(pub, b"secret", b"device=xr-00001")
    with pytest.raises(CryptoError):
        open_sealed(priv, ct, b"device=xr-00002")
    for i in (4, 12, 40, len(ct) - 1):
        bad = bytearray(ct)
        bad[i] ^= 1
        with pytest.raises(CryptoError):
            open_sealed(priv, bytes(bad), b"device=xr-00001")
    with pytest.raises(CryptoError):
        open_sealed(priv, ct[:20], b"device=xr-00001")


def test_interoperates_with_plain_hpke(keys) -> None:  # type: ignore[no-untyped-def]
    """A destination needs only RFC 9180 and the documented info string, not Edgeward."""
    import hashlib

    priv, pub = keys
    ct = seal_for(pub, b"hello", b"hdr")
    kid = ct[4:12]
    info = b"edgeward/seal/v1\x00" + kid + hashlib.sha256(b"hdr").digest()
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    assert suite.decrypt(ct[12:], priv, info=info) == b"hello"


def test_envelope_binds_the_header(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    env = seal_envelope_for(pub, H, b"payload")
    assert open_envelope_for(priv, env) == (H, b"payload")
    d = msgpack.unpackb(env)
    d["h"] = Header("xr-00001", "result", 7, H.ts, "vendor_maintenance", "rev1").pack()
    with pytest.raises(CryptoError):
        open_envelope_for(priv, msgpack.packb(d))
    with pytest.raises(CryptoError):
        open_envelope_for(priv, b"\x00garbage")


def test_public_key_from_policy_text(keys) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keys
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    k = public_key_from_text(base64.b64encode(raw).decode())
    assert open_sealed(priv, seal_for(k, b"x"), b"") == b"x"
    with pytest.raises(KeyFileError):
        public_key_from_text("not a key")



def test_recipient_sealer_rotates_and_only_the_recipient_opens(tmp_path: Path) -> None:
    priv_a, pub_a = generate_recipient_key(tmp_path, "customs")
    priv_b, _ = generate_recipient_key(tmp_path, "other")
    sealer = RecipientSealer(load_public_key(pub_a), max_messages=3)
    hdr = Header("xr-00001", "result", 1, 2, "customs", "rev")
    envs = [sealer.seal(hdr, f"m{i}".encode()) for i in range(7)]
    assert len({msgpack.unpackb(e)["dkid"] for e in envs}) == 3  # rotated by volume
    opener = RecipientOpener(load_private_key(priv_a))
    assert [opener.open(e)[1] for e in reversed(envs)] == [f"m{i}".encode() for i in reversed(range(7))]
    assert b"m1" not in envs[1]
    with pytest.raises(CryptoError):
        RecipientOpener(load_private_key(priv_b)).open(envs[0])
    env = msgpack.unpackb(envs[0])
    env["h"] = Header("xr-00002", "result", 1, 2, "customs", "rev").pack()
    with pytest.raises(CryptoError):
        RecipientOpener(load_private_key(priv_a)).open(msgpack.packb(env))
