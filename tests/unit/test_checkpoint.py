"""Signed checkpoints: made on time and volume, chained, and the verifier catches every tamper kind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import AuditLog, iter_records
from gateway.audit.checkpoint import (
    Checkpointer,
    create_signing_key,
    load_signing_key,
    load_verify_key,
    make_checkpoint,
    verify_checkpoint,
    verify_with_checkpoints,
)
from gateway.errors import KeyFileError


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _rec(i: int) -> dict[str, Any]:
    return {"dev": f"xr-{i % 7:05d}", "seq": i, "digest": f"{i:032x}", "rev": "r1"}


def _site(tmp_path: Path, n: int = 95, every: int = 20, per_file: int = 30) -> tuple[Path, Any, list[dict[str, Any]]]:
    key = create_signing_key(tmp_path / "audit.key")
    published: list[dict[str, Any]] = []
    audit = tmp_path / "audit"
    log = AuditLog(audit, max_records_per_file=per_file)
    cp = Checkpointer(log, key, site="AMS-T1", every_records=every, every_s=3600, clock=Clock(), publish=published.append)
    for i in range(n):
        cp.append(_rec(i))
    log.close()
    return audit, load_verify_key(tmp_path / "audit.key.pub"), published


def _records(audit: Path) -> list[dict[str, Any]]:
    return list(iter_records(audit))


def _rewrite(audit: Path, records: list[dict[str, Any]], per_file: int = 30) -> None:
    """What an attacker with write access can do: rebuild a perfectly valid chain from edited records."""
    shutil.rmtree(audit)
    log = AuditLog(audit, max_records_per_file=per_file)
    for r in records:
        log.append({k: v for k, v in r.items() if k not in ("i", "prev", "h")})
    log.close()


def test_key_file_is_0600_and_refused_when_readable(tmp_path: Path) -> None:
    create_signing_key(tmp_path / "k")
    assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(KeyFileError):
        load_signing_key(tmp_path / "k")
    with pytest.raises(KeyFileError):
        create_signing_key(tmp_path / "k")


def test_checkpoints_every_n_records_are_chained_and_published(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path, n=95, every=20)
    assert len(published) == 4
    cks = [r for r in _records(audit) if r.get("event") == "checkpoint"]
    assert [c["index"] for c in cks] == [c["index"] for c in published]
    # Each checkpoint signs the record right before it, and is itself a chained record.
    for c in cks:
        assert c["index"] == c["i"] - 1
    r = verify_with_checkpoints(audit, pub, published=published)
    assert r.ok, r.errors
    assert (r.checkpoints, r.published) == (4, 4)
    assert r.chain.records == 99 and r.chain.files == 4  # 95 + 4 checkpoints, rotated every 30
    assert r.unsigned_tail == 99 - 1 - cks[-1]["i"]


def test_checkpoint_by_time_and_tick(tmp_path: Path) -> None:
    key = create_signing_key(tmp_path / "k")
    clock = Clock()
    got: list[dict[str, Any]] = []
    log = AuditLog(tmp_path / "audit")
    cp = Checkpointer(log, key, every_records=1000, every_s=10, clock=clock, publish=got.append)
    cp.append(_rec(0))
    assert cp.tick() is None and got == []
    clock.t += 10
    assert cp.tick() is not None and len(got) == 1
    clock.t += 100
    assert cp.tick() is None  # nothing new to cover
    cp.append(_rec(1))  # 100 s since the last checkpoint: this append triggers one
    assert len(got) == 2 and got[-1]["index"] == 2
    log.close()
    assert verify_with_checkpoints(tmp_path / "audit", load_verify_key(tmp_path / "k"), published=got).ok


def test_deferred_checkpoints_wait_for_the_owners_fsync_and_keep_their_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A gateway defers a checkpoint's fsync to its syncer thread: nothing is synced or published where
    # the checkpoint falls (on the event loop), and nothing is published before the owner has synced.
    key = create_signing_key(tmp_path / "k")
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    got: list[dict[str, Any]] = []
    log = AuditLog(tmp_path / "audit")
    cp = Checkpointer(log, key, every_records=5, every_s=3600, clock=Clock(), publish=got.append, defer_sync=True)
    for i in range(12):
        cp.append(_rec(i))
    assert fsyncs == [] and got == []
    log.flush()
    waiting = cp.take_unsynced()
    assert [c["index"] for c in waiting] == [4, 10] and cp.take_unsynced() == []
    cp.requeue(waiting)  # the owner's fsync failed: kept, oldest first
    for i in range(12, 15):
        cp.append(_rec(i))
    assert fsyncs == [] and got == []
    final = cp.checkpoint(sync=True)  # a clean stop: synced and published at once, the waiting ones first
    assert fsyncs and [c["index"] for c in got] == [4, 10, 16, final["index"]] and final["index"] == 17
    log.close()
    in_log = [r["index"] for r in _records(tmp_path / "audit") if r.get("event") == "checkpoint"]
    assert [c["index"] for c in got] == in_log
    assert verify_with_checkpoints(tmp_path / "audit", load_verify_key(tmp_path / "k"), published=got).ok


@pytest.mark.parametrize("kind", ["modify", "delete", "reorder", "insert"])
def test_record_tampering_breaks_the_chain(tmp_path: Path, kind: str) -> None:
    audit, pub, published = _site(tmp_path)
    f = audit / "audit-000002.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    if kind == "modify":
        lines[3] = lines[3].replace('"r1"', '"r2"')
    elif kind == "delete":
        del lines[3]
    elif kind == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    else:
        lines.insert(3, lines[2])
    f.write_text("".join(lines))
    r = verify_with_checkpoints(audit, pub, published=published)
    assert not r.ok and "audit-000002.jsonl:4" in r.error


def test_rewritten_history_fails_the_in_log_checkpoints(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    recs = _records(audit)
    recs[5]["rev"] = "forged"
    _rewrite(audit, recs)
    r = verify_with_checkpoints(audit, pub, published=None)
    assert r.chain.ok  # the chain itself was recomputed...
    assert not r.ok and "does not match the chain" in r.error  # ...but the signatures name the old heads


def test_rewritten_history_without_checkpoints_fails_against_published(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    recs = [r for r in _records(audit) if r.get("event") != "checkpoint"]
    recs[5]["rev"] = "forged"
    _rewrite(audit, recs)
    assert verify_with_checkpoints(audit, pub, published=None).ok  # nothing signed left to contradict it
    r = verify_with_checkpoints(audit, pub, published=published)
    assert not r.ok and "history rewritten" in r.error


def test_truncation_behind_the_last_published_checkpoint(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    last = published[-1]["index"]
    recs = _records(audit)[: last - 3]  # cut whole records (and files) off the end
    _rewrite(audit, recs)
    assert verify_with_checkpoints(audit, pub, published=None).ok  # a clean cut looks like a stop
    r = verify_with_checkpoints(audit, pub, published=published)
    assert not r.ok and "log truncated" in r.error and str(last) in r.error


def test_truncation_after_the_last_checkpoint_shows_as_unsigned_tail(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    full = verify_with_checkpoints(audit, pub, published=published)
    recs = _records(audit)[:-2]
    _rewrite(audit, recs)
    r = verify_with_checkpoints(audit, pub, published=published)
    assert r.ok and r.unsigned_tail == full.unsigned_tail - 2


def test_bad_or_foreign_signatures(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    recs = _records(audit)
    ck_at = next(i for i, r in enumerate(recs) if r.get("event") == "checkpoint")
    other = create_signing_key(tmp_path / "other.key")
    # Signed by another key (an attacker's), placed where the real one was.
    recs[ck_at].update(make_checkpoint(recs[ck_at]["index"], recs[ck_at]["head"], other, 1.0, site="AMS-T1"))
    _rewrite(audit, recs)
    r = verify_with_checkpoints(audit, pub, published=None)
    assert not r.ok and "another key" in r.error
    # Right key id, signature over different bytes.
    good = make_checkpoint(recs[ck_at]["index"], recs[ck_at]["head"], load_signing_key(tmp_path / "audit.key"), 1.0)
    recs[ck_at].update(good, t=2.0)
    _rewrite(audit, recs)
    r = verify_with_checkpoints(audit, pub, published=None)
    assert not r.ok and "signature invalid" in r.error


def test_forged_published_checkpoint_is_reported(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path)
    forged = dict(published[0], head="f" * 64)
    assert verify_checkpoint(forged, pub) == "checkpoint signature invalid"
    r = verify_with_checkpoints(audit, pub, published=[forged])
    assert not r.ok and "published checkpoint" in r.error


def test_result_serialises(tmp_path: Path) -> None:
    audit, pub, published = _site(tmp_path, n=10, every=5)
    out = json.dumps(verify_with_checkpoints(audit, pub, published=published).to_json())
    assert '"ok": true' in out
