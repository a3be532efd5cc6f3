"""The site's key-encryption key (KEK), kept in a file that is useless without the operator's passphrase.

``keys/kek.enc`` is a small versioned JSON document, 0600::

    {"v": 1, "kdf": "argon2id", "m_kib": 65536, "t": 3, "p": 4,
     "salt": <16 bytes, b64>, "nonce": <12 bytes, b64>, "wrapped": <AES-256-GCM(KEK) + tag, b64>}

The wrapping key is Argon2id(passphrase, salt) with RFC 9106's second recommended parameter set
(64 MiB, 3 passes, 4 lanes: ~0.2 s on one core here, and 64 MiB per guess for an attacker). The
AEAD's associated data is the canonical JSON of every other field, so the KDF parameters cannot be
weakened in the file without the unlock failing. The KEK is 256 random bits; it wraps the data keys
(``gateway.crypto.keys.DataKeyring``) and never leaves memory unwrapped.

The passphrase comes from ``EDGEWARD_PASSPHRASE``, a 0600 file (``EDGEWARD_PASSPHRASE_FILE``), or an
interactive prompt; never from argv (a command line is visible to every local user via /proc). The
environment variable is removed from ``os.environ`` once read, so the broker and other child processes
do not inherit it. Nothing in this module logs, and no error carries the passphrase or key bytes.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import secrets
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from gateway.crypto.keys import read_secret_file, write_secret_file
from gateway.errors import ConfigError, KeyFileError

__all__ = [
    "create_kek",
    "unlock_kek",
    "change_passphrase",
    "passphrase_from_env_or_file",
    "KdfParams",
    "DEFAULT_MEMORY_KIB",
    "PASSPHRASE_ENV",
    "PASSPHRASE_FILE_ENV",
]

KEK_FORMAT = 1
KEK_BYTES = 32
DEFAULT_MEMORY_KIB = 64 * 1024  # 64 MiB: RFC 9106 §4, second recommended option
DEFAULT_ITERATIONS = 3
DEFAULT_LANES = 4
MIN_PASSPHRASE = 8
# Bounds on what a kek.enc may ask for: a doctored file must not make unlocking take hours or GiBs.
_MAX_MEMORY_KIB = 4 * 1024 * 1024
_MAX_ITERATIONS = 64
_MAX_LANES = 64
PASSPHRASE_ENV = "EDGEWARD_PASSPHRASE"
PASSPHRASE_FILE_ENV = "EDGEWARD_PASSPHRASE_FILE"


class KdfParams:
    """Argon2id cost parameters (memory in KiB, passes, lanes)."""

    __slots__ = ("m_kib", "t", "p")

    def __init__(self, m_kib: int = DEFAULT_MEMORY_KIB, t: int = DEFAULT_ITERATIONS, p: int = DEFAULT_LANES) -> None:
        if not (1 <= p <= _MAX_LANES and 1 <= t <= _MAX_ITERATIONS and 8 * p <= m_kib <= _MAX_MEMORY_KIB):
            raise KeyFileError(f"Argon2id parameters out of range (m_kib={m_kib}, t={t}, p={p})")
        self.m_kib, self.t, self.p = m_kib, t, p


def _derive(passphrase: str, salt: bytes, kdf: KdfParams) -> bytes:
    return Argon2id(
        salt=salt, length=32, iterations=kdf.t, lanes=kdf.p, memory_cost=kdf.m_kib
    ).derive(passphrase.encode("utf-8"))


def _aad(doc: dict[str, Any]) -> bytes:
    head = {k: v for k, v in doc.items() if k not in ("nonce", "wrapped")}
    return json.dumps(head, sort_keys=True, separators=(",", ":")).encode()


def _seal(kek: bytes, passphrase: str, kdf: KdfParams) -> bytes:
    salt = secrets.token_bytes(16)
    nonce = secrets.token_bytes(12)
    doc: dict[str, Any] = {
        "v": KEK_FORMAT,
        "kdf": "argon2id",
        "m_kib": kdf.m_kib,
        "t": kdf.t,
        "p": kdf.p,
        "salt": base64.b64encode(salt).decode(),
    }
    wrapped = AESGCM(_derive(passphrase, salt, kdf)).encrypt(nonce, kek, _aad(doc))
    doc["nonce"] = base64.b64encode(nonce).decode()
    doc["wrapped"] = base64.b64encode(wrapped).decode()
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def _check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise ConfigError(f"the passphrase must be at least {MIN_PASSPHRASE} characters")


def create_kek(
    path: Path,
    passphrase: str,
    *,
    memory_kib: int = DEFAULT_MEMORY_KIB,
    iterations: int = DEFAULT_ITERATIONS,
    lanes: int = DEFAULT_LANES,
) -> bytes:
    """Generate a new 256-bit KEK, write it passphrase-protected to ``path`` (0600), return it.

    Refuses to overwrite an existing file: losing a KEK crypto-shreds every data key under it."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to replace the site's KEK")
    _check_passphrase(passphrase)
    kek = secrets.token_bytes(KEK_BYTES)
    write_secret_file(path, _seal(kek, passphrase, KdfParams(memory_kib, iterations, lanes)))
    return kek


def _read(path: Path) -> tuple[dict[str, Any], KdfParams, bytes, bytes, bytes]:
    raw = read_secret_file(Path(path))  # 0600 enforced, missing -> KeyFileError
    try:
        doc = json.loads(raw)
        if doc.get("v") != KEK_FORMAT or doc.get("kdf") != "argon2id":
            raise KeyFileError(f"{path}: unsupported KEK file version or KDF")
        kdf = KdfParams(int(doc["m_kib"]), int(doc["t"]), int(doc["p"]))
        salt = base64.b64decode(doc["salt"], validate=True)
        nonce = base64.b64decode(doc["nonce"], validate=True)
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
    except KeyFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage is one error, without the file's content
        raise KeyFileError(f"{path} is not a valid KEK file ({type(exc).__name__})") from None
    if len(salt) < 16 or len(nonce) != 12 or len(wrapped) != KEK_BYTES + 16:
        raise KeyFileError(f"{path} is not a valid KEK file (field sizes)")
    return doc, kdf, salt, nonce, wrapped


def unlock_kek(path: Path, passphrase: str) -> bytes:
    """The KEK in ``path``; KeyFileError when the passphrase is wrong or the file was altered."""
    doc, kdf, salt, nonce, wrapped = _read(path)
    try:
        return AESGCM(_derive(passphrase, salt, kdf)).decrypt(nonce, wrapped, _aad(doc))
    except InvalidTag:
        # ``from None``: the traceback must not lead anyone to the derived key or the passphrase.
        raise KeyFileError(f"cannot unlock {path}: wrong passphrase, or the file was modified") from None


def change_passphrase(path: Path, old: str, new: str, *, memory_kib: int | None = None) -> None:
    """Re-wrap the same KEK under a new passphrase (fresh salt and nonce); data keys are untouched."""
    doc, kdf, *_ = _read(path)
    kek = unlock_kek(path, old)
    _check_passphrase(new)
    params = KdfParams(memory_kib if memory_kib is not None else kdf.m_kib, kdf.t, kdf.p)
    write_secret_file(Path(path), _seal(kek, new, params))


def passphrase_from_env_or_file(
    *,
    file: Path | None = None,
    environ: MutableMapping[str, str] | None = None,
    prompt: bool = True,
    confirm: bool = False,
    stdin: TextIO | None = None,
) -> str:
    """The site passphrase, from (in order): ``EDGEWARD_PASSPHRASE``; ``file`` or
    ``EDGEWARD_PASSPHRASE_FILE`` (0600 enforced, one trailing newline stripped); an interactive prompt
    when stdin is a terminal and ``prompt`` is true (``confirm`` asks twice, for ``init``).

    The environment variable is deleted once read, so child processes (the broker) never inherit it.
    ConfigError, naming the three ways, when none is available."""
    env = os.environ if environ is None else environ
    value = env.pop(PASSPHRASE_ENV, None)
    if value:
        return value
    fpath = file if file is not None else (Path(env[PASSPHRASE_FILE_ENV]) if env.get(PASSPHRASE_FILE_ENV) else None)
    if fpath is not None:
        data = read_secret_file(Path(fpath)).decode("utf-8")
        data = data[:-1] if data.endswith("\n") else data
        data = data[:-1] if data.endswith("\r") else data
        if not data:
            raise ConfigError(f"passphrase file {fpath} is empty")
        return data
    tty = stdin if stdin is not None else sys.stdin
    if prompt and tty is not None and tty.isatty():
        first = getpass.getpass("Site passphrase: ")
        if confirm and getpass.getpass("Repeat passphrase: ") != first:
            raise ConfigError("the passphrases did not match")
        if not first:
            raise ConfigError("empty passphrase")
        return first
    raise ConfigError(
        f"no site passphrase: set {PASSPHRASE_ENV}, or {PASSPHRASE_FILE_ENV} to a 0600 file, "
        "or run interactively (it is never accepted on the command line)"
    )
