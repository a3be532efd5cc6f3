"""Per-device state shared by the gateway workers of one site: the (device, sequence) dedupe window
and the per-device rate/volume token buckets, in one ``multiprocessing.shared_memory`` block.

Why: with ``edgeward run --workers N`` the broker spreads a shared subscription over N processes, so
two messages of one device (or a message and its redelivery) can reach different workers. Dedupe and
the rate baseline must then be decided against one state, not N.

Layout. ``stripes`` segments, each an open-addressing table (linear probing) of ``capacity /
stripes`` slots guarded by its own ``multiprocessing`` lock; a device's 16-byte BLAKE2b digest picks
the segment and the home slot. A slot, once given to a device, is never taken back (no deletion, no
eviction), so a process may remember a device's slot offset; every read-modify-write of the slot
happens under its segment's lock. Slot::

    digest 16s | used u8 | dedupe_init u8 | rate_init u8 | pad 5 | high q | msgs d | bytes d | t d
    | bitmap (window bits: bit ``seq % window`` set = that sequence was seen)

Semantics are those of the per-process objects, exactly:

- ``is_new(device, seq)`` is ``gateway.dedupe.DedupeWindow.is_new``: the highest sequence per device
  and which of the ``window`` sequences at or below it were seen; a sequence at or below ``high -
  window`` is treated as seen (only redeliveries reach that far back).
- ``observe(device, size, now, device_type=...)`` is ``gateway.detect.RateBaseline.observe`` with the
  same numbers (``RateBaseline.limits()``): a message beyond the budget is reported and not charged.

When the table is full (more distinct devices than ``capacity``, or a segment's share of them) a new
device gets no slot and is refused, never waved through: ``observe`` returns ``state.full`` (the
pipeline refuses the message with that reason; it is audited and counted in ``rejected``) and
``is_new`` returns False. ``refused_full`` counts those calls in this process. Nothing is evicted, so
no device's dedupe history is ever forgotten while the site runs: a duplicate is never granted
silently. Size ``capacity`` above the site's device count (``edgeward run --state-capacity``).

Lifetime: the creating process owns the block (``close(unlink=True)`` at the end); worker processes
receive the object through ``multiprocessing`` (spawn) and attach to the same block and locks. The
state lives as long as the run: dedupe across restarts is the done log's job (gateway.runtime.donelog).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import struct
from multiprocessing import shared_memory
from typing import Any

from gateway.catalog import DEVICE_TYPES
from gateway.detect import RateBaseline

__all__ = ["STATE_FULL", "SharedDeviceState"]

STATE_FULL = "state.full"
_HDR = struct.Struct("<16sBBB5xqddd")  # digest, used, dedupe_init, rate_init, high, msgs, bytes, t
_DIGEST = struct.Struct("<16sB")
_HIGH = struct.Struct("<q")
_BUCKET = struct.Struct("<ddd")
_OFF_DEDUPE_INIT = 17
_OFF_RATE_INIT = 18
_OFF_HIGH = 24
_OFF_BUCKET = 32
_OFF_BITMAP = _HDR.size  # 56


def _digest(device: str) -> bytes:
    return hashlib.blake2b(device.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class SharedDeviceState:
    """Dedupe window + rate baselines for every device, shared between processes.

    Pass the same object as ``Gateway(..., dedupe=state, rate=state)``. ``rate=None`` at creation
    turns the rate baseline off (``observe`` then always returns None)."""

    def __init__(
        self,
        *,
        capacity: int = 65_536,
        window: int = 4096,
        stripes: int = 64,
        rate: RateBaseline | None = None,
        ctx: Any = None,
    ) -> None:
        if capacity < 1 or window < 8 or window % 8 or stripes < 1:
            raise ValueError("capacity >= 1, window a multiple of 8 (>= 8), stripes >= 1")
        ctx = ctx or multiprocessing.get_context("spawn")
        self.stripes = min(stripes, capacity)
        self.seg_slots = -(-capacity // self.stripes)
        self.capacity = self.seg_slots * self.stripes
        self.window = window
        self.slot_size = -(-(_OFF_BITMAP + window // 8) // 64) * 64  # cache-line aligned
        self.baseline = rate
        self._locks = [ctx.Lock() for _ in range(self.stripes)]
        self._shm = shared_memory.SharedMemory(create=True, size=self.capacity * self.slot_size)
        self._owner = True
        self._attach()

    # ------------------------------------------------------------------ process plumbing
    def _attach(self) -> None:
        self._buf = self._shm.buf
        self._slots: dict[str, int] = {}  # device -> slot offset (slots are never reassigned)
        self._limits: dict[str, tuple[float, float, float, float]] = {}
        self.refused_full = 0

    def __getstate__(self) -> dict[str, Any]:
        # Only while spawning a process (the locks refuse to pickle otherwise).
        return {"name": self._shm.name, "stripes": self.stripes, "seg_slots": self.seg_slots,
                "capacity": self.capacity, "window": self.window, "slot_size": self.slot_size,
                "baseline": self.baseline, "locks": self._locks}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.stripes, self.seg_slots, self.capacity = st["stripes"], st["seg_slots"], st["capacity"]
        self.window, self.slot_size, self.baseline = st["window"], st["slot_size"], st["baseline"]
        self._locks = st["locks"]
        # A spawned child shares its parent's resource tracker, so attaching registers nothing new and
        # the block is unlinked once, by its owner.
        self._shm = shared_memory.SharedMemory(name=st["name"])
        self._owner = False
        self._attach()

    @property
    def name(self) -> str:
        return self._shm.name

    def close(self, *, unlink: bool | None = None) -> None:
        """Detach; the owner (creator) also unlinks the block unless ``unlink=False``."""
        buf, self._buf = getattr(self, "_buf", None), None
        if buf is None:
            return
        del buf
        self._shm.close()
        if self._owner if unlink is None else unlink:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ slots
    def _slot(self, device: str, *, create: bool) -> tuple[int, Any] | None:
        """(offset, lock) of the device's slot; None when it has none (and, with ``create``, the
        segment is full). Takes and releases the segment lock only to claim a new slot."""
        off = self._slots.get(device)
        d = None
        if off is None:
            d = _digest(device)
            h = int.from_bytes(d[:8], "little")
            seg = h % self.stripes
            lock = self._locks[seg]
            n = self.seg_slots
            base = seg * n
            home = (h >> 16) % n
            buf, size = self._buf, self.slot_size
            with lock:
                for k in range(n):
                    o = (base + (home + k) % n) * size
                    key, used = _DIGEST.unpack_from(buf, o)
                    if used and key == d:
                        break
                    if not used:
                        if not create:
                            return None
                        buf[o:o + size] = bytes(size)
                        _DIGEST.pack_into(buf, o, d, 1)
                        break
                else:
                    return None
            self._slots[device] = off = o
            return off, lock
        return off, self._locks[(off // self.slot_size) // self.seg_slots]

    # ------------------------------------------------------------------ dedupe (DedupeWindow.is_new)
    def is_new(self, device: str, seq: int) -> bool:
        """True the first time (device, seq) is offered in any process, False for a repeat; records it."""
        got = self._slot(device, create=True)
        if got is None:
            self.refused_full += 1
            return False  # no slot: refused, never granted (see the module docstring)
        off, lock = got
        buf = self._buf
        w = self.window
        bm = off + _OFF_BITMAP
        with lock:
            if not buf[off + _OFF_DEDUPE_INIT]:
                buf[off + _OFF_DEDUPE_INIT] = 1
                _HIGH.pack_into(buf, off + _OFF_HIGH, seq)
                p = seq % w
                buf[bm + (p >> 3)] |= 1 << (p & 7)
                return True
            (high,) = _HIGH.unpack_from(buf, off + _OFF_HIGH)
            if seq > high:
                if seq - high >= w:
                    buf[bm:bm + w // 8] = bytes(w // 8)
                else:
                    _clear(buf, bm, w, high + 1, seq)
                _HIGH.pack_into(buf, off + _OFF_HIGH, seq)
                p = seq % w
                buf[bm + (p >> 3)] |= 1 << (p & 7)
                return True
            if seq <= high - w:
                return False
            p = seq % w
            i = bm + (p >> 3)
            bit = 1 << (p & 7)
            if buf[i] & bit:
                return False
            buf[i] |= bit
            return True

    # ------------------------------------------------------------------ rate (RateBaseline.observe)
    def observe(self, device: str, size: int, now: float, *, device_type: str) -> str | None:
        """Charge one message of ``size`` bytes; a code if it is beyond the type's budget (or
        ``state.full`` when the device cannot be tracked)."""
        base = self.baseline
        if base is None or device_type not in DEVICE_TYPES:
            return None
        lim = self._limits.get(device_type)
        if lim is None:
            lim = self._limits[device_type] = base.limits(device_type)
        rate, burst, byte_rate, byte_burst = lim
        got = self._slot(device, create=True)
        if got is None:
            self.refused_full += 1
            return STATE_FULL
        off, lock = got
        buf = self._buf
        ob = off + _OFF_BUCKET
        with lock:
            if not buf[off + _OFF_RATE_INIT]:
                buf[off + _OFF_RATE_INIT] = 1
                msgs, nbytes = burst, byte_burst
            else:
                msgs, nbytes, t = _BUCKET.unpack_from(buf, ob)
                dt = now - t
                if dt > 0.0:
                    msgs = min(burst, msgs + dt * rate)
                    nbytes = min(byte_burst, nbytes + dt * byte_rate)
                else:
                    msgs, nbytes = min(burst, msgs), min(byte_burst, nbytes)
            if msgs < 1.0:
                code: str | None = "detect.burst"
            elif nbytes < size:
                code = "detect.volume"
            else:
                code = None
                msgs -= 1.0
                nbytes -= size
            _BUCKET.pack_into(buf, ob, msgs, nbytes, now)
        return code

    # ------------------------------------------------------------------ inspection
    def high(self, device: str) -> int | None:
        """The highest sequence seen from ``device`` (None: never seen)."""
        got = self._slot(device, create=False)
        if got is None:
            return None
        off, lock = got
        with lock:
            if not self._buf[off + _OFF_DEDUPE_INIT]:
                return None
            return int(_HIGH.unpack_from(self._buf, off + _OFF_HIGH)[0])

    def __len__(self) -> int:
        """Devices with a slot (all segments; takes each lock in turn)."""
        n = 0
        buf, size = self._buf, self.slot_size
        for seg, lock in enumerate(self._locks):
            with lock:
                start = seg * self.seg_slots
                n += sum(buf[(start + k) * size + 16] for k in range(self.seg_slots))
        return n


def _clear(buf: Any, bm: int, w: int, lo: int, hi: int) -> None:
    """Clear the bits of sequences lo..hi (fewer than ``w`` of them) in the bitmap at ``bm``."""
    s = lo
    while s <= hi:
        p = s % w
        if not (p & 7) and hi - s >= 7:
            buf[bm + (p >> 3)] = 0
            s += 8
        else:
            buf[bm + (p >> 3)] &= ~(1 << (p & 7)) & 0xFF
            s += 1
