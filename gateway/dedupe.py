"""(device, sequence) deduplication: QoS 1 is at-least-once; each destination must see a message once.

Per device, the highest sequence seen and the *gaps* below it: sequences within ``window`` of the
highest that have not been seen yet. Devices send in order, so gaps are normally empty and a device
costs a dict entry and a two-item list (~0.2 KB), whatever it has sent; the set of every seen
sequence this replaced grew to ~0.75 MB per device after a few hours (benchmarks/sim_scale.py).
A sequence at or below ``high - window`` is too old to judge and is treated as already seen: only
redeliveries reach that far back. A jump forward records at most ``window`` new gaps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DedupeWindow"]


class DedupeWindow:
    __slots__ = ("window", "_state")

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        # device -> [highest seq, gaps below it (set or None), first seq seen, seen below the first]
        self._state: dict[str, list[Any]] = {}

    def is_new(self, device: str, seq: int) -> bool:
        """True the first time (device, seq) is offered, False for a repeat; records it."""
        st = self._state.get(device)
        if st is None:
            self._state[device] = [seq, None, seq, None]
            return True
        high = st[0]
        if seq > high:
            if seq > high + 1:  # skipped sequences may still arrive (out of order, a redelivery)
                gaps = st[1] if st[1] is not None else set()
                gaps.update(range(max(high + 1, seq - self.window + 1), seq))
                if len(gaps) > self.window:  # prune in bulk, not on every message
                    floor = seq - self.window
                    gaps = {g for g in gaps if g > floor}
                st[1] = gaps
            st[0] = seq
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
        gaps = st[1]
        if gaps is None or seq not in gaps:
            return False
        gaps.discard(seq)
        if not gaps:
            st[1] = None
        return True

    def state(self) -> dict[str, int]:
        """The highest sequence per device (what a restart needs to keep refusing old repeats)."""
        return {dev: st[0] for dev, st in self._state.items()}

    def __len__(self) -> int:
        return len(self._state)
