"""Envelope encryption and the keyring: round trips, AAD binding, rotation, shredding, 0600."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from gateway.crypto.envelope import Header, open_envelope, seal
from gateway.crypto.keys import DataKeyring, ReloadingKeyring, load_or_create_kek, read_secret_file
from gateway.errors import CryptoError, KeyFileError


def _ring(tmp_path: Path, **kw: object) -> DataKeyring:
    kek = load_or_create_kek(tmp_path / "kek.key")
    return DataKeyring(tmp_path / "datakeys.jsonl", kek, **kw)  # type: ignore[arg-type]


H = Header("xr-00001", "result", 7, 1_800_000_000_000, "customs_nl", "rev1")


def test_seal_open_round_trip(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    env = seal(ring, H, b"plaintext")
    assert b"plaintext" not in env
    header, pt = open_envelope(ring, env)
    assert (header, pt) == (H, b"plaintext")
    # a fresh keyring from the same files reads it back
    assert open_envelope(_ring(tmp_path), env)[1] == b"plaintext"


def test_header_is_bound_as_aad(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    env = msgpack.unpackb(seal(ring, H, b"x"))
    env["h"] = Header("xr-00001", "result", 7, H.ts, "vendor_maintenance", "rev1").pack()
    with pytest.raises(CryptoError):
        open_envelope(ring, msgpack.packb(env))


def test_flipped_ciphertext_fails(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    env = bytearray(seal(ring, H, b"hello world"))
    env[-3] ^= 1
    with pytest.raises(CryptoError):
        open_envelope(ring, bytes(env))


def test_rotation_by_volume_and_age_keeps_old_keys_readable(tmp_path: Path) -> None:
    now = [1000.0]
    ring = _ring(tmp_path, max_messages=3, max_age_s=60, clock=lambda: now[0])
    envs = [seal(ring, H, bytes([i])) for i in range(7)]
    assert len(ring.list()) == 3  # 3 + 3 + 1
    now[0] += 61
    envs.append(seal(ring, H, b"late"))
    assert len(ring.list()) == 4
    fresh = _ring(tmp_path)
    assert [open_envelope(fresh, e)[1] for e in envs] == [bytes([i]) for i in range(7)] + [b"late"]


def test_a_prepared_key_makes_the_rotation_a_swap_without_io(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next key is made ahead (off the event loop in the gateway); the rotation on the hot path then
    takes it without writing or fsyncing anything, and its age counts from then."""
    now = [1000.0]
    ring = _ring(tmp_path, max_messages=3, max_age_s=60, clock=lambda: now[0])
    first = [seal(ring, H, bytes([i])) for i in range(3)]
    assert ring.prepare_next() and not ring.prepare_next()  # one is ready: not made twice
    assert ring.next_ready and len(ring.list()) == 2
    prepared = ring.list()[-1][0]
    now[0] += 50  # the prepared key is 50 s old when it starts sealing
    io: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: io.append("fsync"))
    monkeypatch.setattr(os, "open", lambda *a, **k: io.append("open"))
    second = [seal(ring, H, bytes([i])) for i in range(3, 5)]  # the first of them rotates (volume)
    assert io == [] and not ring.next_ready and ring.current().kid == prepared
    now[0] += 30  # 80 s after it was made, 30 s after it began sealing: no rotation for age
    assert ring.current().kid == prepared and io == []
    monkeypatch.undo()
    fresh = _ring(tmp_path)
    assert [open_envelope(fresh, e)[1] for e in first + second] == [bytes([i]) for i in range(5)]


def test_crypto_shredding(tmp_path: Path) -> None:
    ring = _ring(tmp_path, max_messages=1)
    e1 = seal(ring, H, b"one")
    e2 = seal(ring, H, b"two")
    kid1 = msgpack.unpackb(e1)["kid"]
    ring.destroy(kid1)
    fresh = _ring(tmp_path)
    with pytest.raises(CryptoError, match="destroyed"):
        open_envelope(fresh, e1)
    assert open_envelope(fresh, e2)[1] == b"two"


def test_key_files_are_0600_and_wider_is_refused(tmp_path: Path) -> None:
    ring = _ring(tmp_path)
    seal(ring, H, b"x")
    for name in ("kek.key", "datakeys.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "kek.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_secret_file(tmp_path / "kek.key")


def test_reloading_keyring_reads_every_worker_and_keys_made_after_it_started(tmp_path: Path) -> None:
    kek = os.urandom(32)
    w0 = DataKeyring(tmp_path / "w0.jsonl", kek)
    first = w0.current().kid
    reader = ReloadingKeyring([tmp_path / "w0.jsonl", tmp_path / "w1.jsonl"], kek)
    assert reader.get(first).kid == first
    later = DataKeyring(tmp_path / "w1.jsonl", kek).current().kid  # another worker's, after the reader
    h = Header("xr-00001", "result", 1, 0, "vault", "r1")
    env = seal(DataKeyring(tmp_path / "w1.jsonl", kek), h, b"x")
    assert open_envelope(reader, env) == (h, b"x") and reader.get(later).kid == later
    with pytest.raises(CryptoError):
        reader.get("no-such-key")
