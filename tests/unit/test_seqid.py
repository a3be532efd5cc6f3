"""The sequence a destination sees is the device's own hidden under the site's key: firmware that
puts data in its sequence numbers (low bits, gaps) gets nothing through, and the operator's tools
still read the number back."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from gateway.crypto.envelope import open_envelope
from gateway.crypto.keys import DataKeyring
from gateway.crypto.seqid import SeqIds
from gateway.pipeline import Pipeline
from tests.fakes import FakePolicy

NOW = 1_800_000_000_000
TOPIC = "site/AMS-T1/dev/et-00004/result"
KEK = bytes(range(32))  # fixed, so the chance assertions below are decided once, not on every run


def test_hide_is_deterministic_and_only_the_key_and_the_device_reveal_it() -> None:
    kek = os.urandom(32)
    ids = SeqIds.from_kek(kek)
    blob = ids.hide("et-00004", 7)
    assert len(blob) == 16 and blob == SeqIds.from_kek(kek).hide("et-00004", 7)  # a re-decided message: same id
    assert ids.reveal("et-00004", blob) == 7
    assert ids.reveal("et-00005", blob) is None  # made for another device
    assert SeqIds.from_kek(os.urandom(32)).reveal("et-00004", blob) is None  # another site's key
    assert ids.reveal("et-00004", blob[:15]) is None and ids.reveal("et-00004", 7) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ids.hide("et-00004", -1)


def test_the_per_device_tags_are_cached_within_a_bound() -> None:
    from gateway.crypto import seqid

    ids = SeqIds.from_kek(KEK)
    first = ids.hide("et-00004", 9)
    for i in range(seqid._TAGS_KEPT + 10):  # more devices than the cache keeps: cleared, never grown past it
        ids.hide(f"et-{i:06d}", 1)
    assert 0 < len(ids._tags) <= seqid._TAGS_KEPT
    assert ids.hide("et-00004", 9) == first and ids.reveal("et-00004", first) == 9  # the same after the clear
    assert SeqIds.from_kek(KEK).reveal("et-00005", first) is None


def test_nothing_of_the_number_shows() -> None:
    """Two bytes of a secret in the low bits, or a gap, change the whole block: neither the secret nor
    the order survives."""
    ids = SeqIds.from_kek(KEK)
    secret = b"\xbe\xef"
    seqs = [(n << 16) | int.from_bytes(secret, "big") for n in range(1, 200)]
    blobs = [ids.hide("et-00004", s) for s in seqs]
    assert len(set(blobs)) == len(blobs)
    assert sum(secret in b for b in blobs) <= 2  # chance alone: 15 positions in 65,536 per block
    assert blobs != sorted(blobs)
    assert [ids.reveal("et-00004", b) for b in blobs] == seqs


def _pipeline(tmp_path: Path) -> Pipeline:
    ring = DataKeyring(tmp_path / "dk.jsonl", KEK)
    return Pipeline(FakePolicy(), ring, clock_ms=lambda: NOW, seq_ids=ring.seq_ids)


def test_mqtt_destinations_get_the_hidden_sequence_and_the_vault_keeps_the_device_s(tmp_path: Path) -> None:
    pl = _pipeline(tmp_path)
    seq = (12 << 16) | 0xBEEF  # firmware hiding two bytes in its sequence number
    out = pl.process(TOPIC, msgpack.packb({"seq": seq, "ts": NOW, "sample_id": "S1234567", "substances": ["RDX"],
                                           "alarm": True}))
    assert out.reason == "" and out.record["seq"] == seq  # the audit log keeps the device's number
    got = {d.destination: open_envelope(pl.keyring, d.envelope)[0] for d in out.deliveries}
    assert set(got) == {"vault", "customs"}
    assert got["vault"].seq == seq  # on site: the device's own
    hidden = got["customs"].seq
    assert isinstance(hidden, bytes) and len(hidden) == 16 and b"\xbe\xef" not in hidden
    assert pl.keyring.seq_ids.reveal("et-00004", hidden) == seq
