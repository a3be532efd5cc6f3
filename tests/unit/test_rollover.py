"""The vault and the done log roll over to a new file without an fsync on the caller's thread (the
gateway's event loop): the full file stays open in ``retired`` until its owner has fsynced it, and
``close`` fsyncs and closes whatever is still there. The audit log still fsyncs where it rotates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.audit.chain import AuditLog, verify_chain
from gateway.fileio import close_first
from gateway.runtime.donelog import DoneLog
from gateway.vault import VaultWriter, read_vault


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def test_a_full_vault_segment_waits_in_retired_for_its_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v = VaultWriter(tmp_path / "vault", segment_bytes=50)  # every frame fills one
    fsyncs = _count_fsyncs(monkeypatch)
    for i in range(6):
        v.append(bytes([i]) * 60)
        v.flush()
    assert fsyncs == []  # rolled over six times, none of it fsynced here
    assert [os.path.basename(fh.name) for fh in v.retired] == [f"vault-00000{i}.seg" for i in range(1, 7)]
    assert not any(fh.closed for fh in v.retired)
    first = v.retired[0]
    close_first(v.retired, 2)  # what the gateway's syncer does once it has fsynced them
    assert first.closed and len(v.retired) == 4
    v.close()
    assert sorted(fsyncs) == [f"vault-00000{i}.seg" for i in range(3, 8)] and v.retired == []
    assert list(read_vault(tmp_path / "vault", strict=True)) == [bytes([i]) * 60 for i in range(6)]


def test_a_full_done_log_waits_in_retired_for_its_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = DoneLog(tmp_path / "done", max_file_bytes=30, keep_files=10)
    fsyncs = _count_fsyncs(monkeypatch)
    for seq in range(1, 5):
        d.add("xr-00001", seq, "eu_hub")
        d.flush()
    assert fsyncs == [] and len(d.retired) == 2 and not any(fh.closed for fh in d.retired)
    d.close()
    assert sorted(fsyncs) == ["done-000001.log", "done-000002.log", "done-000003.log"] and d.retired == []
    loaded = DoneLog(tmp_path / "done", keep_files=10).load()
    assert loaded == {("xr-00001", s): {"eu_hub"} for s in range(1, 5)}


def test_the_audit_log_still_fsyncs_the_file_it_rotates_away_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit", max_records_per_file=2)
    fsyncs = _count_fsyncs(monkeypatch)
    for i in range(5):
        log.append({"event": "x", "n": i})
    log.flush()
    assert fsyncs == ["audit-000001.jsonl", "audit-000002.jsonl"]
    log.close()
    assert verify_chain(tmp_path / "audit").ok
