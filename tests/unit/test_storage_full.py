"""A full disk never leaves half a record behind: the write is cut back, StorageFull is raised, and
the same bytes go out on the retry (the audit chain, the vault and the done log)."""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pytest

from gateway.audit.chain import AuditLog, verify_chain
from gateway.errors import StorageFull
from gateway.fileio import append_all, open_append
from gateway.runtime.donelog import DoneLog
from gateway.vault import VaultWriter, read_vault


class HalfThenFull(io.FileIO):
    """Writes part of the first chunk, then fails as a full disk does; ``full = False`` heals it."""

    full = True

    def write(self, b):  # type: ignore[override]
        if self.full:
            super().write(bytes(b)[: max(1, len(b) // 2)])
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


def _swap(obj: object, attr: str = "_fh") -> HalfThenFull:
    old = getattr(obj, attr)
    name = old.name
    old.close()
    fh = HalfThenFull(name, "ab")
    setattr(obj, attr, fh)
    return fh


def test_append_all_cuts_back_and_reports_other_errors_unchanged(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fh = open_append(p)
    append_all(fh, b"first\n", "f")
    fh.close()
    flaky = HalfThenFull(p, "ab")
    with pytest.raises(StorageFull, match="no space"):
        append_all(flaky, b"second line\n", "f")
    assert p.read_bytes() == b"first\n"
    flaky.full = False
    append_all(flaky, b"second line\n", "f")
    assert p.read_bytes() == b"first\nsecond line\n"


def test_audit_chain_survives_a_full_disk_and_retries(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append({"event": "a"})
    log.flush()
    fh = _swap(log)
    log.append({"event": "b"})
    log.append({"event": "c"})
    with pytest.raises(StorageFull):
        log.flush()
    assert verify_chain(tmp_path).ok and verify_chain(tmp_path).records == 1
    fh.full = False
    log.flush()
    log.close()
    r = verify_chain(tmp_path)
    assert r.ok and r.records == 3


def test_vault_and_done_log_retry_after_a_full_disk(tmp_path: Path) -> None:
    v = VaultWriter(tmp_path / "vault")
    v.append(b"one")
    v.flush()
    fh = _swap(v)
    v.append(b"two")
    with pytest.raises(StorageFull):
        v.flush()
    fh.full = False
    v.flush()
    v.close()
    assert list(read_vault(tmp_path / "vault", strict=True)) == [b"one", b"two"]

    d = DoneLog(tmp_path / "done")
    d.add("xr-00001", 1, "eu_hub")
    fh = _swap(d)
    with pytest.raises(StorageFull):
        d.flush()
    fh.full = False
    d.flush()
    d.close()
    assert DoneLog(tmp_path / "done").load() == {("xr-00001", 1): {"eu_hub"}}
