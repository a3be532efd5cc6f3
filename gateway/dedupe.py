"""(device, sequence) deduplication: QoS 1 is at-least-once; each destination must see a message once.

Per device, the highest sequence seen and the set of sequences seen within a window below it. A
sequence at or below ``high - window`` is too old to judge and is treated as already seen: devices
send in order, so only redeliveries reach that far back. Memory is bounded per device by ``window``.
"""

from __future__ import annotations

__all__ = ["DedupeWindow"]


class DedupeWindow:
    __slots__ = ("window", "_high", "_seen")

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._high: dict[str, int] = {}
        self._seen: dict[str, set[int]] = {}

    def is_new(self, device: str, seq: int) -> bool:
        """True the first time (device, seq) is offered, False for a repeat; records it."""
        high = self._high.get(device)
        if high is None:
            self._high[device] = seq
            self._seen[device] = {seq}
            return True
        seen = self._seen[device]
        if seq > high:
            self._high[device] = seq
            seen.add(seq)
            if len(seen) > 2 * self.window:  # prune in bulk, not on every message
                floor = seq - self.window
                self._seen[device] = {s for s in seen if s > floor}
            return True
        if seq <= high - self.window or seq in seen:
            return False
        seen.add(seq)
        return True

    def state(self) -> dict[str, int]:
        """The highest sequence per device (what a restart needs to keep refusing old repeats)."""
        return dict(self._high)

    def __len__(self) -> int:
        return len(self._high)
