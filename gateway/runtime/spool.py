"""A destination's store-and-forward spool: encrypted, bounded, crash-safe, drained in order.

While a destination's uplink is unreachable the gateway appends that destination's outgoing
messages (an MQTT topic and an already-sealed envelope) here; when it returns, the gateway drains
the spool oldest first and marks each entry consumed once the destination has acknowledged it.

Files (the directory belongs to one spool; one process at a time):

* ``spool-<first id, 20 digits>.seg``: append-only segments, named by the first id they hold. A
  segment is a sequence of frames::

      frame = b"EwSp" | body length u32 | CRC-32 of (length, body) u32 | body   (big-endian)
      body  = id u64 | nonce (12 random bytes) | AES-256-GCM(key, nonce, plain, ad)
      plain = append time f64 (wall clock) | topic length u16 | topic UTF-8 | payload
      ad    = b"edgeward-spool/1\\0" | spool name UTF-8 | b"\\0" | id u64

  Ids increase strictly along the segments (gaps are allowed). The associated data binds every
  frame to this spool and to its id, and the reader requires increasing ids, so a frame copied from
  another spool, edited, or moved is rejected. Nothing but the magic, lengths, CRCs, ids and
  nonces is in the clear: no topic or payload byte is ever written unencrypted.
* ``state.json``: ``consumed`` (every id up to it is consumed), ``dropped_total``, a hash of the
  spool name and a key check (an AES-GCM tag under the key), replaced atomically (tmp, fsync,
  ``os.replace``, directory fsync) by :meth:`Spool.sync` and :meth:`Spool.close`.

Durability. :meth:`Spool.append` buffers; :meth:`Spool.flush` hands the buffer to the OS in one
all-or-nothing write (it survives ``kill -9``); :meth:`Spool.sync` fsyncs the segments, then writes
the state file (it survives a power cut). Fully consumed segments are deleted by ``sync`` once the
state file that covers them is on disk.

Guarantees after a crash (at-least-once; the destination dedupes):

* every entry flushed (synced, for a power cut) and not covered by the persisted ``consumed`` id is
  offered again, in order, under its original id;
* an entry covered by the persisted ``consumed`` id is never offered again. An entry acknowledged
  with :meth:`Spool.consumed` but not yet covered by a state file written before the crash (the state
  lags by up to one sync interval, and acks beyond the first gap are not persisted at all) is
  offered again;
* a torn or garbage tail (a write cut short) is truncated away on open, in any segment, and
  counted in ``torn_bytes`` (damage to the very last frame of a segment cannot be told from a torn
  write, so it is treated as one); a damaged frame in the middle (bad magic, length or CRC, or an
  id out of order), i.e. one followed by a frame that verifies, is cut out of its segment on open
  and counted in :attr:`Spool.corrupt` (skip and count, not stop: the rest is still delivered); a
  frame that fails authentication when read (tampered with, or another spool's) is skipped,
  treated as consumed and counted too;
* a wrong key is refused on open with :class:`~gateway.errors.CryptoError`, another spool's
  directory with :class:`~gateway.errors.ConfigError`.

Bounded: ``max_bytes`` caps the unconsumed bytes (whole frames: ``OVERHEAD`` + topic + payload
each); a full spool refuses new
entries (:class:`SpoolFull`) or drops the oldest (``on_full="drop_oldest"``, counted). A full disk
raises :class:`SpoolDiskFull` (a :class:`~gateway.errors.StorageFull`): the segment is cut back to its
last complete frame, the buffered entries are kept and the next ``flush`` writes the same bytes again.

Memory does not grow with the backlog: the spool keeps a per-segment index (first id, size, last
id), the position of the oldest unconsumed frame and of the read cursor, and per-entry bookkeeping
only for entries handed out by :meth:`Spool.next_batch` and not yet consumed (the gateway bounds
those). Nonces are random, so one key should seal fewer than 2**32 frames (the gateway derives one
key per destination).

Threads: every method may be called from one thread while :meth:`Spool.sync` runs in another (the
fsyncs run outside the lock).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.errors import ConfigError, CryptoError, EdgewardError, StorageFull

__all__ = ["Spool", "SpoolDiskFull", "SpoolFull", "SpoolItem"]

MAGIC = b"EwSp"
_HDR = struct.Struct(">4sII")  # magic, body length, CRC-32 of (length, body)
_U32 = struct.Struct(">I")
_ID = struct.Struct(">Q")
_PLAIN = struct.Struct(">dH")  # append time, topic length
_NONCE = 12
_TAG = 16
_MIN_BODY = _ID.size + _NONCE + _TAG + _PLAIN.size
OVERHEAD = _HDR.size + _MIN_BODY  # bytes a frame adds to topic + payload
_AD = b"edgeward-spool/1\0"
_SEG_RE = re.compile(r"spool-(\d{20})\.seg$")
_STATE = "state.json"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_BUF_LIMIT = 1 << 20  # append writes the buffer out beyond this, whether or not flush was called
_READ_CHUNK = 1 << 20

# The one write(2) the spool makes; a module attribute so a test can inject ENOSPC.
_write = os.write


class SpoolFull(EdgewardError):
    """The entry does not fit: the spool is full (``refuse_new``), or it is larger than the spool."""


class SpoolDiskFull(StorageFull):
    """Writing failed for lack of space (ENOSPC/EDQUOT). Nothing was half-written: the segment was cut
    back to its last complete frame, and the entries buffered so far are kept for the next flush."""


@dataclass(frozen=True, slots=True)
class SpoolItem:
    id: int  # monotonically increasing per spool, survives restarts
    topic: str
    payload: bytes


@dataclass(slots=True, eq=False)
class _Segment:
    first_id: int  # from the file name: every id in the file is >= it and < the next segment's
    path: Path
    size: int  # bytes of complete frames written to the file
    last_id: int  # id of the last frame written (first_id - 1 while empty)


_Pos = tuple[_Segment, int]


class _Reader:
    """Sequential reads of whole frames through one cached chunk of one segment."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.seg: _Segment | None = None
        self.fh: io.FileIO | None = None
        self.start = 0
        self.view = memoryview(b"")

    def _get(self, seg: _Segment, off: int, n: int) -> memoryview:
        if self.seg is seg and self.start <= off and off + n <= self.start + len(self.view):
            i = off - self.start
            return self.view[i : i + n]
        if self.seg is not seg or self.fh is None:
            self.close()
            self.fh = open(seg.path, "rb", buffering=0)  # noqa: SIM115 - held across calls, closed in close()
            self.seg = seg
        data = os.pread(self.fh.fileno(), min(max(n, self.chunk), seg.size - off), off)
        if len(data) < n:
            raise EdgewardError(f"spool {seg.path.name}: shorter than expected (changed while the spool was open)")
        self.start = off
        self.view = memoryview(data)
        return self.view[:n]

    def frame(self, seg: _Segment, off: int) -> tuple[int, int, memoryview]:
        """(id, end offset, body) of the frame at ``off``, which was verified when the spool opened."""
        magic, blen, crc = _HDR.unpack(self._get(seg, off, _HDR.size))
        end = off + _HDR.size + blen
        if magic == MAGIC and blen >= _MIN_BODY and end <= seg.size:
            whole = self._get(seg, off, _HDR.size + blen)
            body = whole[_HDR.size :]
            if zlib.crc32(body, zlib.crc32(whole[4:8])) == crc:
                return _ID.unpack_from(body)[0], end, body
        raise EdgewardError(f"spool {seg.path.name}: frame at byte {off} changed while the spool was open")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        self.fh = None
        self.seg = None
        self.view = memoryview(b"")


def _frame_end(mv: memoryview, pos: int) -> int | None:
    """End of a well-formed frame (magic, length, CRC) starting at ``pos``, or None."""
    if pos + _HDR.size > len(mv):
        return None
    magic, blen, crc = _HDR.unpack_from(mv, pos)
    end: int = pos + _HDR.size + blen
    if magic != MAGIC or blen < _MIN_BODY or end > len(mv):
        return None
    if zlib.crc32(mv[pos + _HDR.size : end], zlib.crc32(mv[pos + 4 : pos + 8])) != crc:
        return None
    return end


def _scan(data: bytes, lo: int, hi: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], int]:
    """The valid frames of one segment as (start, end, id), ids strictly increasing within [lo, hi);
    the damaged regions between them as (previous id, next id); and where the valid frames end (past
    it: a torn or garbage tail)."""
    mv = memoryview(data)
    frames: list[tuple[int, int, int]] = []
    bad: list[tuple[int, int]] = []
    last = lo - 1

    def valid(pos: int) -> tuple[int, int] | None:
        end = _frame_end(mv, pos)
        if end is None:
            return None
        fid = _ID.unpack_from(mv, pos + _HDR.size)[0]
        return (end, fid) if last < fid < hi else None

    pos = 0
    while pos < len(data):
        hit = valid(pos)
        if hit is None:
            # Resynchronise on the next well-formed frame; none means the rest is a torn tail.
            nxt = data.find(MAGIC, pos + 1)
            while nxt != -1 and valid(nxt) is None:
                nxt = data.find(MAGIC, nxt + 1)
            if nxt == -1:
                break
            bad.append((last, _ID.unpack_from(mv, nxt + _HDR.size)[0]))
            pos = nxt
            continue
        end, fid = hit
        frames.append((pos, end, fid))
        last = fid
        pos = end
    return frames, bad, frames[-1][1] if frames else 0


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # consumed and deleted meanwhile
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _storage_error(what: str, exc: OSError) -> EdgewardError:
    if exc.errno in _FULL_ERRNOS:
        return SpoolDiskFull(f"{what}: no space left ({exc.strerror})")
    return EdgewardError(f"{what}: {exc.strerror}")


class Spool:
    """One destination's spool under ``directory``. See the module docstring for format and guarantees."""

    def __init__(
        self,
        directory: Path,
        key: bytes,
        *,
        name: str,
        max_bytes: int = 256 * 2**20,
        on_full: str = "refuse_new",
        segment_bytes: int = 4 * 2**20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if on_full not in ("refuse_new", "drop_oldest"):
            raise ConfigError(f"spool {name}: on_full must be refuse_new or drop_oldest, not {on_full!r}")
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ConfigError(f"spool {name}: max_bytes and segment_bytes must be positive")
        if not isinstance(key, bytes | bytearray) or len(key) != 32:
            raise CryptoError(f"spool {name}: the key must be 32 bytes (AES-256)")
        self.directory = directory
        self.name = name
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.segment_bytes = segment_bytes
        self._clock = clock
        self._aes = AESGCM(bytes(key))
        self._ad = _AD + name.encode() + b"\0"
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._closed = False
        self.torn_bytes = 0  # cut from segment tails on open
        self._corrupt = 0
        self._dropped = 0
        self._live_count = 0  # frames after the consumed prefix (written or buffered)
        self._live_bytes = 0
        self._acked_count = 0  # of those, acknowledged out of order
        self._acked_bytes = 0
        # Entries handed out (or passed) by next_batch after the prefix: id -> (segment, end, size),
        # in id order; the first one, when there is one, is always the head frame.
        self._handed: OrderedDict[int, tuple[_Segment, int, int]] = OrderedDict()
        self._acked: set[int] = set()
        self._buf: deque[tuple[int, float, bytes]] = deque()  # (id, append time, frame) not yet written
        self._buf_bytes = 0
        self._retired: list[Path] = []  # rolled-over segments not yet fsynced
        self._dead: list[_Segment] = []  # fully consumed, to delete once the state covers them
        self._data_dirty = False
        self._dir_dirty = False
        self._need_roll = False
        self._age: tuple[int, float] | None = None
        self._rd = _Reader(_READ_CHUNK)  # the next_batch cursor
        self._rd_head = _Reader(64 * 1024)  # the oldest entry (drop_oldest, oldest_age_s)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self._open()

    # ------------------------------------------------------------------ open

    def _open(self) -> None:
        state_path = self.directory / _STATE
        name_hash = hashlib.sha256(self.name.encode()).hexdigest()[:32]
        fresh_state = not state_path.exists()
        if fresh_state:
            self._prefix, self._dropped_total = 0, 0
        else:
            try:
                st = json.loads(state_path.read_bytes())
                self._prefix, self._dropped_total = int(st["consumed"]), int(st["dropped_total"])
                check = bytes.fromhex(st["check"])
                stored_name = st["name"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"spool {self.name}: {state_path} is unreadable") from exc
            if stored_name != name_hash:
                raise ConfigError(f"spool {self.name}: {self.directory} holds another spool's files")
            try:
                self._aes.decrypt(check[:_NONCE], check[_NONCE:], self._ad + b"check")
            except InvalidTag:
                raise CryptoError(f"spool {self.name}: the key does not match the one the spool was written with") from None
        self._name_hash = name_hash
        self._check = os.urandom(_NONCE)
        self._check += self._aes.encrypt(self._check, b"", self._ad + b"check")

        files = sorted((int(m.group(1)), p) for p in self.directory.iterdir() if (m := _SEG_RE.match(p.name)))
        self._segs: list[_Segment] = []
        head: _Pos | None = None
        last_seen = 0
        for i, (first, path) in enumerate(files):
            bound = files[i + 1][0] if i + 1 < len(files) else 2**64
            if i + 1 < len(files) and bound - 1 <= self._prefix:
                path.unlink()  # every id in it is below the next segment's first: all consumed
                continue
            data = path.read_bytes()
            frames, bad, good_end = _scan(data, max(first, last_seen + 1), bound)
            if bad:
                # Cut the damaged frames out: the segment keeps only frames that verify, in order.
                _write_file_atomically(path, b"".join(data[s:e] for s, e, _ in frames))
                self.torn_bytes += len(data) - good_end
                for prev, nxt in bad:
                    self._corrupt += max(1, nxt - max(prev, self._prefix) - 1) if nxt > self._prefix else 0
                moved, pos = [], 0
                for s, e, fid in frames:
                    moved.append((pos, pos + e - s, fid))
                    pos += e - s
                frames = moved
            elif good_end < len(data):
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
                self.torn_bytes += len(data) - good_end
            if not frames and i + 1 < len(files):
                path.unlink()
                continue
            seg = _Segment(first, path, frames[-1][1] if frames else 0, frames[-1][2] if frames else first - 1)
            self._segs.append(seg)
            for s, e, fid in frames:
                if fid > self._prefix:
                    if head is None:
                        head = (seg, s)
                    self._live_count += 1
                    self._live_bytes += e - s
            if frames:
                last_seen = frames[-1][2]
        last_first = self._segs[-1].first_id if self._segs else 1
        self._next_id = max(last_seen + 1, last_first, self._prefix + 1)
        if fresh_state:
            if head is not None:  # the state file was lost: at least make sure the key is right
                fid, _, body = self._rd_head.frame(*head)
                if self._decrypt(fid, body) is None:
                    raise CryptoError(f"spool {self.name}: the key does not match the one the spool was written with")
            self._write_state(self._prefix, self._dropped_total)
        if not self._segs:
            self._segs.append(self._new_segment(self._next_id))
            _fsync_dir(self.directory)
        self._active = self._segs[-1]
        self._fh = self._open_append(self._active.path)
        self._head: _Pos = head if head is not None else (self._active, self._active.size)
        self._cursor: _Pos = self._head
        self._state_dirty = False

    def _new_segment(self, first_id: int) -> _Segment:
        path = self.directory / f"spool-{first_id:020d}.seg"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return _Segment(first_id, path, 0, first_id - 1)

    @staticmethod
    def _open_append(path: Path) -> io.FileIO:
        return open(path, "ab", buffering=0)

    # ------------------------------------------------------------------ frames

    def _seal(self, fid: int, t: float, topic: bytes, payload: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        idb = _ID.pack(fid)
        ct = self._aes.encrypt(nonce, b"".join((_PLAIN.pack(t, len(topic)), topic, payload)), self._ad + idb)
        body = b"".join((idb, nonce, ct))
        lb = _U32.pack(len(body))
        return b"".join((MAGIC, lb, _U32.pack(zlib.crc32(body, zlib.crc32(lb))), body))

    def _decrypt(self, fid: int, body: memoryview) -> tuple[float, str, bytes] | None:
        try:
            plain = self._aes.decrypt(
                body[_ID.size : _ID.size + _NONCE], body[_ID.size + _NONCE :], self._ad + _ID.pack(fid)
            )
            t, tlen = _PLAIN.unpack_from(plain)
            end = _PLAIN.size + tlen
            return t, plain[_PLAIN.size : end].decode(), plain[end:]
        except (InvalidTag, struct.error, UnicodeDecodeError):
            return None

    # ------------------------------------------------------------------ positions

    def _next_seg(self, seg: _Segment) -> _Segment | None:
        for s in self._segs:
            if s.first_id > seg.first_id:
                return s
        return None

    def _norm(self, pos: _Pos) -> _Pos:
        seg, off = pos
        while off >= seg.size and seg is not self._active:
            nxt = self._next_seg(seg)
            if nxt is None:
                break
            seg, off = nxt, 0
        return seg, off

    def _set_head(self, pos: _Pos) -> None:
        self._head = self._norm(pos)
        h, c = self._head, self._cursor
        if (c[0].first_id, c[1]) < (h[0].first_id, h[1]):
            self._cursor = self._head

    # ------------------------------------------------------------------ writing

    def append(self, topic: str, payload: bytes) -> int:
        """Buffer one entry; returns how many of the oldest entries were dropped to make room.

        Raises SpoolFull (it does not fit with ``refuse_new``, or it is larger than ``max_bytes``)
        or SpoolDiskFull (the buffer had to be written out and the disk is full); either way this
        entry was not added."""
        tb = topic.encode()
        if len(tb) > 0xFFFF:
            raise ValueError("topic longer than 65535 bytes")
        size = OVERHEAD + len(tb) + len(payload)
        with self._lock:
            self._check_open()
            if size > self.max_bytes:
                raise SpoolFull(f"spool {self.name}: an entry of {size} bytes is larger than the spool ({self.max_bytes})")
            if self._buf_bytes + size > _BUF_LIMIT:
                self._write_buffer()
            dropped = 0
            if self._live_bytes - self._acked_bytes + size > self.max_bytes:
                if self.on_full == "refuse_new":
                    raise SpoolFull(f"spool {self.name}: full ({self._live_bytes - self._acked_bytes} bytes)")
                dropped = self._drop_for(size)
            fid = self._next_id
            self._next_id += 1
            t = self._clock()
            frame = self._seal(fid, t, tb, payload)
            self._buf.append((fid, t, frame))
            self._buf_bytes += len(frame)
            self._live_count += 1
            self._live_bytes += len(frame)
            return dropped

    def _drop_for(self, size: int) -> int:
        n = 0
        while self._live_bytes - self._acked_bytes + size > self.max_bytes and self._live_count > self._acked_count:
            seg, off = self._head
            if seg is self._active and off >= seg.size:
                # The oldest is still in the buffer: it is never written. (Ids may have gaps.)
                fid, _, frame = self._buf.popleft()
                self._buf_bytes -= len(frame)
                fsize = len(frame)
            else:
                fid, end, _ = self._rd_head.frame(seg, off)
                fsize = end - off
                if self._handed and next(iter(self._handed)) == fid:
                    self._handed.popitem(last=False)  # in flight: its ack will be ignored
                self._set_head((seg, end))
            self._prefix = fid
            self._live_count -= 1
            self._live_bytes -= fsize
            n += 1
            self._advance()  # over entries acknowledged out of order right behind it
        self._dropped += n
        self._dropped_total += n
        self._state_dirty = True
        return n

    def flush(self) -> None:
        """Write the buffered entries in one all-or-nothing write (to the OS, not yet to the disk)."""
        with self._lock:
            self._check_open()
            self._write_buffer()

    def _write_buffer(self) -> None:
        if self._need_roll:
            self._roll(required=True)
        if not self._buf:
            return
        seg = self._active
        data = b"".join([f for _, _, f in self._buf])
        fd = self._fh.fileno()
        view = memoryview(data)
        try:
            while view:
                view = view[_write(fd, view) :]
        except OSError as exc:
            try:
                os.ftruncate(fd, seg.size)  # O_APPEND: the next write lands right after it
            except OSError:
                self._need_roll = True  # never write after a tail that could not be cut
            raise _storage_error(f"spool {self.name}: writing {seg.path.name}", exc) from exc
        seg.size += len(data)
        seg.last_id = self._buf[-1][0]
        self._buf.clear()
        self._buf_bytes = 0
        self._data_dirty = True
        if seg.size >= self.segment_bytes:
            self._roll(required=False)

    def _roll(self, *, required: bool) -> None:
        try:
            seg = self._new_segment(self._next_id)
            fh = self._open_append(seg.path)
        except OSError as exc:
            if required:
                raise _storage_error(f"spool {self.name}: starting a segment", exc) from exc
            return  # try again after the next write
        self._fh.close()
        self._retired.append(self._active.path)
        self._fh = fh
        self._segs.append(seg)
        self._active = seg
        self._need_roll = False
        self._dir_dirty = True
        self._head = self._norm(self._head)
        self._cursor = self._norm(self._cursor)

    # ------------------------------------------------------------------ reading and consuming

    def next_batch(self, n: int) -> list[SpoolItem]:
        """Up to ``n`` of the oldest flushed entries not consumed and not handed out since the spool
        was opened or rewound. Entries still in the append buffer wait for ``flush``."""
        out: list[SpoolItem] = []
        with self._lock:
            self._check_open()
            while len(out) < n:
                seg, off = self._cursor
                if off >= seg.size:
                    nxt = self._next_seg(seg)
                    if nxt is None:
                        break
                    self._cursor = (nxt, 0)
                    continue
                fid, end, body = self._rd.frame(seg, off)
                self._cursor = (seg, end)
                if fid in self._acked:
                    continue  # consumed after an earlier hand-out
                if fid not in self._handed:
                    self._handed[fid] = (seg, end, end - off)
                opened = self._decrypt(fid, body)
                if opened is None:
                    self._corrupt += 1  # tampered with or not ours: it can never be delivered
                    self._ack(fid)
                    continue
                out.append(SpoolItem(fid, opened[1], opened[2]))
        return out

    def rewind(self) -> None:
        """Forget what was handed out and not consumed: next_batch starts again at the oldest."""
        with self._lock:
            self._cursor = self._head

    def consumed(self, item_id: int) -> None:
        """The destination has the entry. Acks may come in any order; ids not handed out are ignored."""
        with self._lock:
            if item_id > self._prefix and item_id not in self._acked and item_id in self._handed:
                self._ack(item_id)

    def _ack(self, fid: int) -> None:
        self._acked.add(fid)
        self._acked_count += 1
        self._acked_bytes += self._handed[fid][2]
        self._advance()

    def _advance(self) -> None:
        """Move the consumed prefix over the acknowledged entries at the front, so the head (the
        oldest entry after the prefix) is never an acknowledged one."""
        handed = self._handed
        while handed:
            first = next(iter(handed))
            if first not in self._acked:
                break
            seg, end, size = handed.popitem(last=False)[1]
            self._acked.remove(first)
            self._prefix = first
            self._live_count -= 1
            self._live_bytes -= size
            self._acked_count -= 1
            self._acked_bytes -= size
            self._set_head((seg, end))
            self._state_dirty = True

    # ------------------------------------------------------------------ durability

    def sync(self) -> None:
        """fsync the segments, then persist the consumed state; delete segments it fully covers.
        Safe to call from another thread; the fsyncs happen outside the lock."""
        with self._sync_lock:
            with self._lock:
                if self._closed:
                    return
                dup = os.dup(self._fh.fileno()) if self._data_dirty else None
                self._data_dirty = False
                retired, self._retired = self._retired, []
                state = (self._prefix, self._dropped_total) if self._state_dirty else None
                self._state_dirty = False
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                for seg in [s for s in self._segs if s is not self._active and s.last_id <= self._prefix]:
                    self._segs.remove(seg)
                    self._dead.append(seg)
                dead = list(self._dead)
            try:
                if dup is not None:
                    os.fsync(dup)
                for path in retired:
                    _fsync_path(path)
                if state is not None:
                    self._write_state(*state)
                elif dir_dirty:
                    _fsync_dir(self.directory)
            except OSError as exc:
                with self._lock:
                    self._data_dirty |= dup is not None
                    self._retired[:0] = retired
                    self._state_dirty |= state is not None
                    self._dir_dirty |= dir_dirty
                raise _storage_error(f"spool {self.name}: sync", exc) from exc
            finally:
                if dup is not None:
                    os.close(dup)
            for seg in dead:
                seg.path.unlink(missing_ok=True)
            with self._lock:
                self._dead = [s for s in self._dead if s not in dead]

    def _write_state(self, consumed: int, dropped_total: int) -> None:
        body = {
            "version": 1,
            "name": self._name_hash,
            "consumed": consumed,
            "dropped_total": dropped_total,
            "check": self._check.hex(),
        }
        _write_file_atomically(self.directory / _STATE, json.dumps(body, sort_keys=True).encode() + b"\n")

    def close(self) -> None:
        """Flush, sync and close. If the disk is full, what could not be written is lost (it was
        never flushed, so nobody relied on it) and the state file keeps its previous contents."""
        try:
            with self._lock:
                if self._closed:
                    return
                with contextlib.suppress(StorageFull):
                    self._write_buffer()
            with contextlib.suppress(StorageFull):
                self.sync()
        finally:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._close_files()

    def _close_files(self) -> None:
        self._fh.close()
        self._rd.close()
        self._rd_head.close()

    def _check_open(self) -> None:
        if self._closed:
            raise EdgewardError(f"spool {self.name} is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ figures

    @property
    def backlog(self) -> int:
        """Entries not consumed (buffered ones included)."""
        return self._live_count - self._acked_count

    @property
    def backlog_bytes(self) -> int:
        """Frame bytes of the entries not consumed (what ``max_bytes`` bounds)."""
        return self._live_bytes - self._acked_bytes

    @property
    def dropped(self) -> int:
        """Entries dropped by ``drop_oldest`` since the spool was opened."""
        return self._dropped

    @property
    def dropped_total(self) -> int:
        """Entries dropped by ``drop_oldest`` over the spool's life (persisted by sync and close)."""
        return self._dropped_total

    @property
    def corrupt(self) -> int:
        """Entries skipped since open because their frame was damaged or did not authenticate."""
        return self._corrupt

    @property
    def oldest_age_s(self) -> float | None:
        """Seconds since the oldest unconsumed entry was appended (None when there is none)."""
        with self._lock:
            if self._live_count == self._acked_count or self._closed:
                return None
            seg, off = self._head  # never an acknowledged entry: acks beyond it do not move it
            if seg is self._active and off >= seg.size:
                t = self._buf[0][1]
            else:
                fid, _, body = self._rd_head.frame(seg, off)
                if self._age is None or self._age[0] != fid:
                    opened = self._decrypt(fid, body)
                    if opened is None:
                        return None
                    self._age = (fid, opened[0])
                t = self._age[1]
            return max(0.0, self._clock() - t)
