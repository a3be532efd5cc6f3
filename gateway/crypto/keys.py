"""Keys the site owns: the key-encryption key (KEK) and the data keys it wraps.

The KEK never leaves its file (0600; refused when group- or world-readable) and never appears in a
log or an error. Data keys are AES-256-GCM keys, wrapped with the KEK (AES key wrap, RFC 3394, from
``cryptography``) and appended to a keyring file; each has an id that every envelope names, so data
stays readable while its key is retained, and destroying a key (crypto-shredding) makes everything
under it unreadable. Keys rotate by volume and by age; the clock is injected.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from gateway.crypto.seqid import SeqIds
from gateway.errors import CryptoError, KeyFileError

__all__ = ["write_secret_file", "read_secret_file", "load_or_create_kek", "DataKey", "DataKeyring",
           "DataKeyLookup", "ReloadingKeyring"]

KEY_BYTES = 32


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 from the first byte on (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret_file(path: Path) -> bytes:
    """Read a key file, refusing one that group or others could read."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"key file {path} does not exist") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    return path.read_bytes()


def load_or_create_kek(path: Path) -> bytes:
    """The site's KEK: generated on first run, then read back (0600 enforced)."""
    if not path.exists():
        write_secret_file(path, secrets.token_bytes(KEY_BYTES))
    kek = read_secret_file(path)
    if len(kek) != KEY_BYTES:
        raise KeyFileError(f"key file {path} does not hold a {KEY_BYTES * 8}-bit key")
    return kek


@dataclass(slots=True)
class DataKey:
    kid: str
    aead: AESGCM
    created: float
    used: int = 0


class DataKeyLookup(Protocol):
    """What opening an envelope needs of a keyring: a data key by its id, CryptoError when it has none.
    ``DataKeyring`` is one; a reader beside a running gateway may re-read the file on a miss."""

    def get(self, kid: str) -> DataKey: ...


class DataKeyring:
    """The site's data keys, wrapped under the KEK, in an append-only JSON-lines file.

    ``current()`` returns the key to seal with, rotating first when the current one has sealed
    ``max_messages`` messages or is older than ``max_age_s``. ``get(kid)`` returns any retained key.
    ``destroy(kid)`` crypto-shreds a key. The file is rewritten atomically only on destroy.

    Making a key writes and fsyncs its record (0.5-6 ms measured). ``prepare_next()``, called off the
    event loop (the gateway's syncer thread does, once a second), makes the next key ahead of time, so
    the rotation itself, which falls on the hot path every ``max_messages`` seals (~14 minutes at
    20,000 seals a second), is a swap without I/O. A prepared key's age counts from when it becomes
    current, not from when it was made; one never used (the process stopped) sealed nothing.
    """

    def __init__(
        self,
        path: Path,
        kek: bytes,
        *,
        max_messages: int = 2**24,
        max_age_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._kek = kek
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: dict[str, DataKey] = {}
        self._destroyed: set[str] = set()
        self._current: DataKey | None = None
        self._next: DataKey | None = None  # made ahead by prepare_next, taken by rotate
        self._seq_ids: SeqIds | None = None
        self._load()

    @property
    def seq_ids(self) -> SeqIds:
        """The site's header-sequence key under this KEK (gateway.crypto.seqid.SeqIds): what the
        operator's tools use to read the device's sequence behind an MQTT destination's header."""
        if self._seq_ids is None:
            self._seq_ids = SeqIds.from_kek(self._kek)
        return self._seq_ids

    def _load(self) -> None:
        if not self.path.exists():
            return
        read_secret_file(self.path)  # permission check
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            kid = rec["kid"]
            if rec.get("destroyed"):
                self._destroyed.add(kid)
                self._keys.pop(kid, None)
                continue
            try:
                raw = aes_key_unwrap(self._kek, base64.b64decode(rec["wrapped"]))
            except InvalidUnwrap as exc:
                raise CryptoError(f"data key {kid} does not unwrap under this site's KEK") from exc
            key = DataKey(kid, AESGCM(raw), float(rec["created"]), int(rec.get("used", 0)))
            self._keys[kid] = key
            self._current = key
        # A restart starts a fresh key rather than trusting an unknown use count of the last one.
        if self._current is not None:
            self._current.used = self.max_messages

    def _append(self, rec: dict[str, object]) -> None:
        line = (json.dumps(rec, sort_keys=True) + "\n").encode()
        exists = self.path.exists()
        if not exists:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make(self) -> DataKey:
        raw = secrets.token_bytes(KEY_BYTES)
        kid = secrets.token_hex(8)
        created = self._clock()
        self._append(
            {"kid": kid, "wrapped": base64.b64encode(aes_key_wrap(self._kek, raw)).decode(), "created": created}
        )
        key = DataKey(kid, AESGCM(raw), created)
        self._keys[kid] = key
        return key

    @property
    def next_ready(self) -> bool:
        return self._next is not None

    def prepare_next(self) -> bool:
        """Make the next key now (its record written and fsynced: call this off the event loop); False
        when one is ready already. Safe beside ``current()`` on another thread: the key is published
        by one assignment once it is on disk."""
        if self._next is not None:
            return False
        self._next = self._make()
        return True

    def rotate(self) -> DataKey:
        """Start sealing with a new key: the prepared one if there is one, else one made here."""
        key, self._next = self._next, None
        if key is None:
            key = self._make()
        else:
            key.created = self._clock()
        self._current = key
        return key

    def current(self) -> DataKey:
        key = self._current
        if key is None or key.used >= self.max_messages or self._clock() - key.created >= self.max_age_s:
            key = self.rotate()
        return key

    def get(self, kid: str) -> DataKey:
        key = self._keys.get(kid)
        if key is None:
            why = "was destroyed" if kid in self._destroyed else "is not in this keyring"
            raise CryptoError(f"data key {kid} {why}")
        return key

    def list(self) -> list[tuple[str, float, bool]]:
        """(kid, created, is_current) for every retained key, oldest first."""
        cur = self._current.kid if self._current else None
        return [(k.kid, k.created, k.kid == cur) for k in self._keys.values()]

    def destroy(self, kid: str) -> None:
        """Crypto-shred ``kid``: its wrapped key is erased from the file; what it sealed is gone."""
        self.get(kid)
        self._keys.pop(kid)
        self._destroyed.add(kid)
        if self._current is not None and self._current.kid == kid:
            self._current = None
        if self._next is not None and self._next.kid == kid:
            self._next = None
        lines = []
        for line in self.path.read_text().splitlines():
            if line.strip() and json.loads(line)["kid"] != kid:
                lines.append(line)
        lines.append(json.dumps({"kid": kid, "destroyed": True}, sort_keys=True))
        write_secret_file(self.path, ("\n".join(lines) + "\n").encode())


class ReloadingKeyring:
    """The site's data keys for a reader beside running gateways: every keyring file in ``paths`` (one
    per gateway worker, all under the site's KEK), read again when an envelope names a key none of
    them had when this process last read them (a rotation, or a restarted gateway's first key)."""

    def __init__(self, paths: Path | list[Path], kek: bytes) -> None:
        self._paths = [paths] if isinstance(paths, Path) else list(paths)
        self._kek = kek
        self._keys: dict[str, DataKey] = {}
        self._read()
        self.seq_ids = SeqIds.from_kek(kek)  # reads the device's sequence behind a destination's header

    def _read(self) -> None:
        keys: dict[str, DataKey] = {}  # anew: a key destroyed meanwhile is gone here too
        for path in self._paths:
            ring = DataKeyring(path, self._kek)
            for kid, _created, _current in ring.list():
                keys[kid] = ring.get(kid)
        self._keys = keys

    def get(self, kid: str) -> DataKey:
        key = self._keys.get(kid)
        if key is None:
            self._read()
            key = self._keys.get(kid)
            if key is None:
                raise CryptoError(f"data key {kid} is not in this site's keyrings")
        return key
