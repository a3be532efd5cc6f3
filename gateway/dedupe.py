"""(device, sequence) deduplication: QoS 1 is at-least-once; each destination must see a message once.

Per device, the highest sequence seen and the *gaps* below it: sequences within ``window`` of the
highest that have not been seen yet, as the bits of one integer (bit ``i``: ``high - i`` is still
unseen). Devices send in order, so gaps are normally 0 and a device costs a dict entry and a short
list (~0.2 KB), whatever it has sent; the set of every seen sequence this replaced grew to ~0.75 MB
per device after a few hours (benchmarks/sim_scale.py). A sequence at or below ``high - window`` is
too old to judge and is treated as already seen: only redeliveries reach that far back.

A jump forward costs a shift and a mask, whatever its size. (A set of gaps cost ~320 µs a message
for firmware that numbers ``seq * 65536 + secret``: 4,095 new gaps each time, from a device the rate
baseline lets send normally; a whole fleet doing it would have stalled the gateway.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["DedupeWindow"]


class DedupeWindow:
    __slots__ = ("_full", "_state", "window")

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._full = (1 << window) - 1
        # device -> [highest seq, gaps below it (bits, see above), first seq seen, seen below the first]
        self._state: dict[str, list[Any]] = {}

    def is_new(self, device: str, seq: int) -> bool:
        """True the first time (device, seq) is offered, False for a repeat; records it."""
        st = self._state.get(device)
        if st is None:
            self._state[device] = [seq, 0, seq, None]
            return True
        high = st[0]
        if seq > high:
            shift = seq - high
            gaps = st[1]
            # Shift the unseen marks up by the jump (those beyond the window fall off), then mark the
            # skipped sequences within the window: they may still arrive (out of order, a redelivery).
            gaps = (gaps << shift) & self._full if gaps and shift < self.window else 0
            if shift > 1:
                gaps |= ((1 << min(shift, self.window) - 1) - 1) << 1
            st[0], st[1] = seq, gaps
            return True
        if seq <= high - self.window:
            return False
        if seq < st[2]:  # below the first sequence seen (e.g. older messages redelivered after it)
            below = st[3]
            if below is None:
                below = st[3] = set()
            elif seq in below:
                return False
            below.add(seq)
            if len(below) > self.window:
                floor = high - self.window
                st[3] = {b for b in below if b > floor}
            return True
        bit = 1 << (high - seq)
        gaps = st[1]
        if not gaps & bit:
            return False
        st[1] = gaps & ~bit
        return True

    def state(self) -> dict[str, int]:
        """The highest sequence per device (what a restart needs to keep refusing old repeats)."""
        return {dev: st[0] for dev, st in self._state.items()}

    def __len__(self) -> int:
        return len(self._state)
