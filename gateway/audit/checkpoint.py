"""Signed checkpoints over the audit chain, and the verifier that uses them.

The hash chain alone proves order and integrity only against someone who cannot recompute SHA-256:
whoever can write the files can rewrite the tail, or cut it off. A checkpoint closes that gap. Every
N records or T seconds (whichever comes first) the gateway signs ``(site, index, head, t)`` with the
site's Ed25519 audit key, where ``head`` is the hash of record ``index``; the checkpoint is appended
to the log as a record of its own (so it is chained like any other) and published to the operator's
topic, where the site keeps a copy the gateway host cannot edit afterwards.

``verify_with_checkpoints`` then detects:

- a modified, deleted, inserted or reordered record: the chain breaks (``verify_chain``);
- a rewritten history (hashes recomputed): the checkpoints in the log no longer verify, and a
  published checkpoint's ``head`` differs from the log's hash at its index;
- truncation: a published checkpoint's index lies beyond the end of the log. Truncation to *after*
  the last published checkpoint cannot be told from a gateway that stopped there; ``unsigned_tail``
  says how many records no checkpoint covers yet.

The signed bytes are ``b"edgeward/audit-checkpoint/v1\\x00" || canonical JSON {head, index, site, t}``.
The signing key file is 0600 (refused when group/world-readable); its public half, ``.pub``, is what
auditors are given. Nothing here logs; no error carries key material.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.audit.chain import GENESIS, AuditLog, VerifyResult, verify_chain
from gateway.crypto.keys import read_secret_file, write_secret_file
from gateway.errors import AuditError, KeyFileError

__all__ = [
    "CHECKPOINT_EVENT",
    "create_signing_key",
    "load_signing_key",
    "load_verify_key",
    "signing_key_id",
    "make_checkpoint",
    "verify_checkpoint",
    "Checkpointer",
    "CheckpointVerifyResult",
    "verify_with_checkpoints",
]

CHECKPOINT_EVENT = "checkpoint"
_LABEL = b"edgeward/audit-checkpoint/v1\x00"
_SIGNED = ("event", "index", "head", "t", "site", "kid", "sig")


# ------------------------------------------------------------------------- keys
def create_signing_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 audit key at ``path`` (PKCS#8 PEM, 0600) and its public half at ``path.pub``.
    Refuses to overwrite: a replaced key would make every earlier checkpoint unverifiable."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists; refusing to replace the audit signing key")
    key = Ed25519PrivateKey.generate()
    write_secret_file(
        path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    _pub_path(path).write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + ".pub")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    raw = read_secret_file(Path(path))
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """The public audit key from a ``.pub`` PEM file (or, given the private key's path, its ``.pub``)."""
    path = Path(path)
    if not path.name.endswith(".pub") and _pub_path(path).exists():
        path = _pub_path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"audit public key {path} does not exist") from exc
    except ValueError:
        raise KeyFileError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def signing_key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(b"edgeward/audit-kid\x00" + raw).hexdigest()[:16]


# ------------------------------------------------------------------------- checkpoints
def _signed_bytes(site: str, index: int, head: str, t: float) -> bytes:
    body = json.dumps({"head": head, "index": index, "site": site, "t": t}, sort_keys=True, separators=(",", ":"))
    return _LABEL + body.encode()


def make_checkpoint(index: int, head_hash: str, signing_key: Ed25519PrivateKey, t: float, *, site: str = "") -> dict[str, Any]:
    """A signed checkpoint over the chain up to record ``index`` (whose hash is ``head_hash``; -1 and
    GENESIS for an empty log). Append it to the AuditLog (it is then chained itself) and publish it."""
    sig = signing_key.sign(_signed_bytes(site, index, head_hash, t))
    return {
        "event": CHECKPOINT_EVENT,
        "index": index,
        "head": head_hash,
        "t": t,
        "site": site,
        "kid": signing_key_id(signing_key.public_key()),
        "sig": base64.b64encode(sig).decode(),
    }


def verify_checkpoint(ck: dict[str, Any], public_key: Ed25519PublicKey) -> str:
    """'' when ``ck`` carries a valid signature by ``public_key``; otherwise why not."""
    try:
        if ck.get("event") != CHECKPOINT_EVENT:
            return "not a checkpoint"
        if ck.get("kid") != signing_key_id(public_key):
            return "checkpoint signed by another key"
        index, head, t, site = ck["index"], ck["head"], ck["t"], ck["site"]
        if type(index) is not int or type(head) is not str or type(site) is not str or type(t) not in (int, float):
            return "malformed checkpoint"
        public_key.verify(base64.b64decode(ck["sig"], validate=True), _signed_bytes(site, index, head, t))
    except InvalidSignature:
        return "checkpoint signature invalid"
    except Exception:  # noqa: BLE001 - any malformed checkpoint is one answer
        return "malformed checkpoint"
    return ""


class Checkpointer:
    """Wraps an AuditLog: ``append`` as usual; a checkpoint is appended (and published) after every
    ``every_records`` records or once ``every_s`` seconds have passed since the last one, whichever
    comes first. Call ``tick()`` from a timer so a quiet gateway still checkpoints on time.

    Before a checkpoint is published the log is flushed and fsynced, so a published checkpoint never
    names records that a crash could still lose (which the verifier would report as truncation).

    ``defer_sync``: a checkpoint is appended and signed where it falls, but not flushed, fsynced or
    published there. The owner flushes the log, takes them (``take_unsynced``), fsyncs off its event
    loop and then publishes them (``publish``): a gateway's fsync of ~10,000 records took ~4 ms, and
    with it on the loop every message arriving meanwhile waited. ``checkpoint(sync=True)`` (a final one
    at a clean stop) syncs and publishes at once, with any still waiting."""

    def __init__(
        self,
        log: AuditLog,
        signing_key: Ed25519PrivateKey,
        *,
        site: str = "",
        every_records: int = 10_000,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        publish: Callable[[dict[str, Any]], None] | None = None,
        defer_sync: bool = False,
    ) -> None:
        if every_records < 1 or every_s <= 0:
            raise AuditError("checkpoint interval must be positive")
        self.log = log
        self._key = signing_key
        self.site = site
        self.every_records = every_records
        self.every_s = every_s
        self._clock = clock
        self._publish = publish
        self._since = 0
        self._last_t = clock()
        self.last: dict[str, Any] | None = None
        self.defer_sync = defer_sync
        self._unsynced: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> str:
        h = self.log.append(record)
        self._since += 1
        if self._since >= self.every_records or self._clock() - self._last_t >= self.every_s:
            self.checkpoint()
        return h

    def tick(self) -> dict[str, Any] | None:
        """Checkpoint when the interval has passed and records arrived since the last checkpoint."""
        if self._since and self._clock() - self._last_t >= self.every_s:
            return self.checkpoint()
        return None

    def checkpoint(self, *, sync: bool | None = None) -> dict[str, Any]:
        """Append a signed checkpoint of the log as it stands. Synced and published at once unless
        deferred (``defer_sync``, or ``sync=False``)."""
        now = self._clock()
        ck = make_checkpoint(self.log.count - 1, self.log.head, self._key, now, site=self.site)
        self.log.append(dict(ck))
        self._since = 0
        self._last_t = now
        self.last = ck
        defer = self.defer_sync if sync is None else not sync
        if defer:
            self._unsynced.append(ck)
        else:
            self.log.flush(sync=True)
            self.publish([*self.take_unsynced(), ck])
        return ck

    def take_unsynced(self) -> list[dict[str, Any]]:
        """The deferred checkpoints so far (and forget them). Call it once the log is flushed, and
        ``publish`` them once an fsync of the log begun after that flush has finished."""
        out, self._unsynced = self._unsynced, []
        return out

    def requeue(self, checkpoints: list[dict[str, Any]]) -> None:
        """Taken, but the fsync failed: published after a later one succeeds, before newer ones."""
        self._unsynced[:0] = checkpoints

    def publish(self, checkpoints: Iterable[dict[str, Any]]) -> None:
        if self._publish is not None:
            for ck in checkpoints:
                self._publish(ck)


# ------------------------------------------------------------------------- verification
@dataclass(frozen=True, slots=True)
class CheckpointVerifyResult:
    """``ok`` only when the chain verifies, every checkpoint in it is valid, and every published
    checkpoint is found in the log. ``errors`` lists every problem, first one first."""

    ok: bool
    chain: VerifyResult
    checkpoints: int  # valid signed checkpoints found in the log
    published: int  # published checkpoints confirmed by the log
    last_signed: int  # index of the last record a valid checkpoint covers (-1: none)
    unsigned_tail: int  # records after the last valid checkpoint record (not yet covered)
    errors: tuple[str, ...] = field(default=())

    @property
    def error(self) -> str:
        return self.errors[0] if self.errors else ""

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chain": self.chain.to_json(),
            "checkpoints": self.checkpoints,
            "published": self.published,
            "last_signed": self.last_signed,
            "unsigned_tail": self.unsigned_tail,
            "errors": list(self.errors),
        }


def verify_with_checkpoints(
    audit_dir: Path,
    public_key: Ed25519PublicKey,
    *,
    published: Iterable[dict[str, Any]] | None = None,
) -> CheckpointVerifyResult:
    """Verify the chain, every checkpoint in it, and the log against ``published`` (the checkpoints the
    operator topic received). See the module docstring for what each check detects."""
    errors: list[str] = []
    pub = list(published or [])
    wanted: dict[int, list[dict[str, Any]]] = {}
    for ck in pub:
        why = verify_checkpoint(ck, public_key)
        if why:
            errors.append(f"published checkpoint (index {ck.get('index')!r}): {why}")
            continue
        wanted.setdefault(int(ck["index"]), []).append(ck)
    seen: dict[int, str] = {}
    state = {"valid": 0, "last_signed": -1, "last_ck_i": -1}

    def on_record(rec: dict[str, Any], h: str, where: str) -> None:
        i = rec["i"]
        if i in wanted:
            seen[i] = h
        if rec.get("event") != CHECKPOINT_EVENT:
            return
        ck = {k: rec.get(k) for k in _SIGNED}
        why = verify_checkpoint(ck, public_key)
        if not why and (ck["index"] != i - 1 or ck["head"] != rec["prev"]):
            why = "checkpoint does not match the chain before it"
        if why:
            errors.append(f"{where}: {why}")
            return
        state["valid"] += 1
        state["last_signed"] = i - 1
        state["last_ck_i"] = i

    chain = verify_chain(Path(audit_dir), on_record=on_record)
    if not chain.ok:
        errors.insert(0, f"{chain.where}: {chain.error}")
    confirmed = 0
    last_i = chain.records - 1
    for index in sorted(wanted):
        for ck in wanted[index]:
            if index == -1:
                ok = ck["head"] == GENESIS
            elif index > last_i:
                if chain.ok:
                    errors.append(
                        f"log truncated: published checkpoint covers record {index}, the log ends at {last_i}"
                    )
                else:
                    errors.append(f"published checkpoint at record {index} cannot be confirmed (chain broken)")
                continue
            else:
                ok = seen.get(index) == ck["head"]
            if ok:
                confirmed += 1
            else:
                errors.append(f"log differs from the published checkpoint at record {index} (history rewritten)")
    unsigned_tail = chain.records - 1 - state["last_ck_i"] if chain.records else 0
    return CheckpointVerifyResult(
        ok=not errors,
        chain=chain,
        checkpoints=state["valid"],
        published=confirmed,
        last_signed=state["last_signed"],
        unsigned_tail=unsigned_tail,
        errors=tuple(errors),
    )
