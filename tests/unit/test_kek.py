"""The passphrase-protected KEK file: round trip, wrong passphrase, tampering, 0600, passphrase sources."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest

from gateway.crypto.kek import (
    PASSPHRASE_ENV,
    PASSPHRASE_FILE_ENV,
    change_passphrase,
    create_kek,
    passphrase_from_env_or_file,
    unlock_kek,
)
from gateway.errors import ConfigError, KeyFileError

# Argon2id's real cost (64 MiB) is exercised once; everything else runs with the minimum for speed.
FAST = {"memory_kib": 64, "iterations": 1, "lanes": 1}
PW = "correct horse battery"


def test_create_then_unlock_returns_the_same_256_bit_key(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    kek = create_kek(p, PW, **FAST)
    assert len(kek) == 32
    assert unlock_kek(p, PW) == kek
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert kek not in p.read_bytes() and PW.encode() not in p.read_bytes()


def test_default_parameters_are_memory_hard(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    kek = create_kek(p, PW)
    doc = json.loads(p.read_text())
    assert (doc["kdf"], doc["m_kib"], doc["t"], doc["p"]) == ("argon2id", 65536, 3, 4)
    assert unlock_kek(p, PW) == kek


def test_wrong_passphrase_is_refused_without_echoing_it(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    create_kek(p, PW, **FAST)
    with pytest.raises(KeyFileError) as ei:
        unlock_kek(p, "hunter2-wrong-guess")
    assert "hunter2" not in str(ei.value) and PW not in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


@pytest.mark.parametrize("field", ["m_kib", "t", "salt", "nonce", "wrapped"])
def test_any_edit_to_the_file_fails_unlock(tmp_path: Path, field: str) -> None:
    p = tmp_path / "kek.enc"
    create_kek(p, PW, **FAST)
    doc = json.loads(p.read_text())
    if field in ("m_kib", "t"):
        doc[field] = doc[field] + 8  # e.g. an attacker "downgrading" or changing the cost
    else:
        raw = bytearray(base64.b64decode(doc[field]))
        raw[0] ^= 1
        doc[field] = base64.b64encode(bytes(raw)).decode()
    p.write_text(json.dumps(doc))
    os.chmod(p, 0o600)
    with pytest.raises(KeyFileError):
        unlock_kek(p, PW)


def test_absurd_parameters_are_refused_before_deriving(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    create_kek(p, PW, **FAST)
    doc = json.loads(p.read_text())
    doc["m_kib"] = 1 << 40
    p.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="out of range"):
        unlock_kek(p, PW)


def test_group_readable_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    create_kek(p, PW, **FAST)
    os.chmod(p, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        unlock_kek(p, PW)


def test_create_refuses_to_overwrite_and_short_passphrases(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    with pytest.raises(ConfigError):
        create_kek(p, "short", **FAST)
    create_kek(p, PW, **FAST)
    with pytest.raises(ConfigError, match="refusing"):
        create_kek(p, PW, **FAST)


def test_change_passphrase_keeps_the_kek(tmp_path: Path) -> None:
    p = tmp_path / "kek.enc"
    kek = create_kek(p, PW, **FAST)
    change_passphrase(p, PW, "a new long passphrase")
    assert unlock_kek(p, "a new long passphrase") == kek
    with pytest.raises(KeyFileError):
        unlock_kek(p, PW)


def test_passphrase_from_env_is_consumed(tmp_path: Path) -> None:
    env = {PASSPHRASE_ENV: PW}
    assert passphrase_from_env_or_file(environ=env, prompt=False) == PW
    assert PASSPHRASE_ENV not in env  # a child process started afterwards does not inherit it


def test_passphrase_from_file_requires_0600(tmp_path: Path) -> None:
    f = tmp_path / "pass"
    f.write_text(PW + "\n")
    os.chmod(f, 0o600)
    assert passphrase_from_env_or_file(environ={PASSPHRASE_FILE_ENV: str(f)}, prompt=False) == PW
    assert passphrase_from_env_or_file(file=f, environ={}, prompt=False) == PW
    os.chmod(f, 0o644)
    with pytest.raises(KeyFileError):
        passphrase_from_env_or_file(file=f, environ={}, prompt=False)


def test_no_source_says_how_without_prompting_a_non_terminal() -> None:
    with pytest.raises(ConfigError, match="never accepted on the command line"):
        passphrase_from_env_or_file(environ={}, stdin=io.StringIO(""))
