"""The audit log: one record per message the gateway received, hash-chained, never a field value.

Each line of ``audit-NNNNNN.jsonl`` is one canonical JSON record with ``prev`` (the previous record's
hash) and ``h`` = SHA-256(prev || canonical record without ``h``). Files rotate by record count and the
chain runs on across them, so deleting, inserting, reordering or editing any record, or splicing
files, breaks verification. Writes are group-committed: records are buffered and written per batch,
and fsynced by the owner off the hot path (the gateway's syncer thread, once a second), never per
message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mypy_extensions import mypyc_attr

try:  # the C accelerator (CPython); the pure encoder is the fallback
    from json.encoder import c_make_encoder  # type: ignore[attr-defined]  # private: typeshed omits it
except ImportError:  # pragma: no cover
    c_make_encoder = None
from json.encoder import encode_basestring

from gateway.errors import AuditError, StorageFull
from gateway.fileio import append_all, open_append

__all__ = ["AuditLog", "VerifyResult", "verify_chain", "iter_records", "GENESIS", "JsonList"]

GENESIS = "0" * 64
_FILE_RE = re.compile(r"audit-(\d{6})\.jsonl$")
_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _hash(prev: str, body: str) -> str:
    return hashlib.sha256((prev + body).encode()).hexdigest()


def _no_default(o: Any) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


# The canonical encoder, built once (``JSONEncoder.encode`` builds a new C encoder per call); the
# same options as ``_dumps``, so the same text. No circular-reference check: records are trees.
_c_encode = (
    c_make_encoder(None, _no_default, encode_basestring, None, ":", ",", True, False, True) if c_make_encoder else None
)


def _canonical(value: Any) -> str:
    """Canonical JSON text of any record or record value (identical to ``_dumps``)."""
    if _c_encode is not None:
        return "".join(_c_encode(value, 0))
    return _dumps(value)


@mypyc_attr(native_class=False)  # mypyc compiles this module; a list subclass stays a Python class
class JsonList(list[Any]):
    """A list that carries its own canonical JSON text, computed once when it is built.

    A record value the writer would otherwise serialise again for every record: the pipeline builds
    one per policy Decision (its routes) and shares it between all the records of that decision, and
    ``AuditLog.append`` splices ``json`` into the line instead of encoding the list again. It is a
    plain list to every reader and the line is byte-identical, so ``verify_chain`` is unchanged.
    Never mutate one after it is built: the text would no longer match."""

    __slots__ = ("json",)

    def __init__(self, items: Any = ()) -> None:
        super().__init__(items)
        self.json = _canonical(self)


_KEY_TEXT: dict[str, str] = {}  # '"dev":' for each record key seen (a few dozen names)


def _key_text(k: str) -> str:
    t = _KEY_TEXT.get(k)
    if t is None:
        t = encode_basestring(k) + ":"
        if len(_KEY_TEXT) < 1024:
            _KEY_TEXT[k] = t
    return t


# The pipeline's record of a decided message, once ``append`` has chained it: written from a template.
_DECIDED = frozenset(("dev", "digest", "i", "prev", "rev", "routes", "seq", "size", "stream"))


def _encode_record(record: dict[str, Any]) -> str:
    """The record's canonical JSON (sorted keys, compact, UTF-8 as is), identical to ``_dumps``, with
    the common values written directly and a ``JsonList`` value spliced in from its cached text."""
    if record.keys() == _DECIDED:
        dev, digest, i, prev = record["dev"], record["digest"], record["i"], record["prev"]
        rev, routes, seq, size, stream = record["rev"], record["routes"], record["seq"], record["size"], record["stream"]
        if (
            type(dev) is str and type(digest) is str and type(i) is int and type(prev) is str and type(rev) is str
            and type(routes) is JsonList and type(seq) is int and type(size) is int and type(stream) is str
        ):
            enc = encode_basestring
            return (
                f'{{"dev":{enc(dev)},"digest":{enc(digest)},"i":{int.__repr__(i)},"prev":{enc(prev)},'
                f'"rev":{enc(rev)},"routes":{routes.json},"seq":{int.__repr__(seq)},"size":{int.__repr__(size)},'
                f'"stream":{enc(stream)}}}'
            )
    try:
        keys = sorted(record)
    except TypeError:  # keys of mixed types: let the encoder report it
        return _dumps(record)
    parts = []
    for k in keys:
        if type(k) is not str:
            return _dumps(record)
        v = record[k]
        t = type(v)
        if t is str:
            parts.append(_key_text(k) + encode_basestring(v))
        elif t is int:
            parts.append(_key_text(k) + int.__repr__(v))
        elif t is JsonList:
            parts.append(_key_text(k) + v.json)
        else:
            parts.append(_key_text(k) + _canonical(v))
    return "{" + ",".join(parts) + "}"


def _files(directory: Path) -> list[Path]:
    return sorted((p for p in directory.glob("audit-*.jsonl") if _FILE_RE.search(p.name)), key=lambda p: p.name)


class AuditLog:
    """Appends chained records under ``directory``. Not thread-safe; one writer per directory."""

    def __init__(self, directory: Path, *, max_records_per_file: int = 1_000_000) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.max_records_per_file = max_records_per_file
        self._buf: list[str] = []
        files = _files(directory)
        self._index = 0
        self._prev = GENESIS
        self._file_no = 1
        self._in_file = 0
        self.torn_bytes = 0
        if files:
            last = files[-1]
            m = _FILE_RE.search(last.name)
            assert m is not None  # _files() keeps only the names it matches
            self._file_no = int(m.group(1))
            # A crash mid-write leaves a partial last line. Its message was never acknowledged (the
            # acknowledgement waits for this write), so the broker redelivers it: cut the fragment.
            self.torn_bytes = _truncate_torn_tail(last)
            tail = _last_complete_line(last)
            self._in_file = _count_lines(last)
            if tail is not None:
                rec = json.loads(tail)
                self._index = int(rec["i"]) + 1
                self._prev = rec["h"]
        self._fh = open_append(self._path())

    def _path(self) -> Path:
        return self.directory / f"audit-{self._file_no:06d}.jsonl"

    @property
    def head(self) -> str:
        """Hash of the last record appended (GENESIS before any)."""
        return self._prev

    @property
    def count(self) -> int:
        return self._index

    def append(self, record: dict[str, Any]) -> str:
        """Chain and buffer one record; returns its hash. ``i``, ``prev`` and ``h`` are set here."""
        record["i"] = self._index
        record["prev"] = self._prev
        body = _encode_record(record)
        h = _hash(self._prev, body)
        # Insert h as the last key by hand so the line stays canonical JSON without a second dumps.
        self._buf.append(body[:-1] + ',"h":"' + h + '"}\n')
        self._prev = h
        self._index += 1
        return h

    def flush(self, *, sync: bool = False) -> None:
        """Write the buffered records (one write); fsync only when asked. The gateway fsyncs in its syncer
        thread: an fsync here, on its event loop, stalled every message for 5-8 ms (BENCHMARKS.md §4)."""
        try:
            buf = self._buf
            while buf:
                if self._in_file >= self.max_records_per_file:  # rotate (never to an empty file)
                    # fsynced here, on the caller's thread (the gateway's loop: 5-8 ms once per
                    # max_records_per_file records), not left to the syncer as the vault's segments
                    # are: a power cut then never leaves the chain's tail whole in the new file and
                    # torn in the old one, a gap no restart can cut away
                    os.fsync(self._fh.fileno())
                    self._fh.close()
                    self._file_no += 1
                    self._in_file = 0
                    self._fh = open_append(self._path())
                chunk = buf[: self.max_records_per_file - self._in_file]
                # All or nothing (a full disk leaves no torn record); what is unwritten stays for a retry.
                append_all(self._fh, "".join(chunk).encode(), "audit log")
                self._in_file += len(chunk)
                del buf[: len(chunk)]
            if sync:
                os.fsync(self._fh.fileno())
        except StorageFull:
            raise
        except OSError as exc:
            raise AuditError(f"audit log write failed: {exc.strerror}") from exc

    def close(self) -> None:
        if not self._fh.closed:
            self.flush(sync=True)
            self._fh.close()


def _truncate_torn_tail(path: Path) -> int:
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
    return len(data) - keep


def _last_complete_line(path: Path) -> str | None:
    data = path.read_bytes()
    if not data:
        return None
    if not data.endswith(b"\n"):
        raise AuditError(f"{path.name} ends with a partial record; run `edgeward audit verify`")
    lines = data.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1].decode()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def iter_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record in order (no verification)."""
    for path in _files(directory):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    files: int
    head: str
    error: str = ""
    where: str = ""  # file:line of the first bad record

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "files": self.files,
            "head": self.head,
            "error": self.error,
            "where": self.where,
        }


OnRecord = Callable[[dict[str, Any], str, str], None]


def verify_chain(directory: Path, *, on_record: OnRecord | None = None) -> VerifyResult:
    """Recompute the whole chain. Any edit, insertion, deletion, reordering or splice fails.

    ``on_record(record, h, where)`` (optional) sees every record that verified, in order, without its
    ``h`` (the checkpoint verifier uses it); it is not called for the failing record."""
    files = _files(directory)
    if not files:
        return VerifyResult(False, 0, 0, GENESIS, "no audit files", str(directory))
    prev = GENESIS
    expected_i = 0
    n = 0
    loads = json.loads
    sha256 = hashlib.sha256
    canonical = _canonical
    for fi, path in enumerate(files):
        m = _FILE_RE.search(path.name)
        assert m is not None  # _files() keeps only the names it matches
        if int(m.group(1)) != fi + 1:
            return VerifyResult(False, n, len(files), prev, "audit file missing from the sequence", path.name)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    where = f"{path.name}:{lineno}"
                    return VerifyResult(False, n, len(files), prev, "partial record (truncated write)", where)
                try:
                    line = raw.decode("utf-8")[:-1]
                    rec = loads(line)
                    h = rec.pop("h")
                except Exception:  # noqa: BLE001 - a damaged line is a verification failure
                    where = f"{path.name}:{lineno}"
                    return VerifyResult(False, n, len(files), prev, "record is not valid JSON", where)
                if rec.get("i") != expected_i:
                    where = f"{path.name}:{lineno}"
                    return VerifyResult(False, n, len(files), prev, "record index out of sequence", where)
                if rec.get("prev") != prev:
                    where = f"{path.name}:{lineno}"
                    return VerifyResult(False, n, len(files), prev, "record does not chain to its predecessor", where)
                body = canonical(rec)
                if (
                    type(h) is not str
                    or sha256((prev + body).encode()).hexdigest() != h
                    or body[:-1] + ',"h":"' + h + '"}' != line
                ):
                    where = f"{path.name}:{lineno}"
                    return VerifyResult(False, n, len(files), prev, "record hash mismatch (modified)", where)
                if on_record is not None:
                    on_record(rec, h, f"{path.name}:{lineno}")
                prev = h
                expected_i += 1
                n += 1
    return VerifyResult(True, n, len(files), prev)
