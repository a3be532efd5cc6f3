"""Hot reload of the operator's policy: compile beside the live revision, swap only when valid.

The watcher polls the policy files' (name, size, mtime) — no dependency, no inotify limits — and
SIGHUP asks for a reload at once. A new revision is loaded and compiled in a worker thread, off the
hot path; only a policy that compiled and validated is swapped in, between two messages, so no
message is ever decided under a half-loaded policy. A failure keeps the old revision and is
reported three ways: the log, the audit log, and an operator alert on the MQTT alert topic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import EdgewardError
from gateway.runtime.service import Gateway

__all__ = ["PolicyReloader"]


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    files = [path] if path.is_file() else sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class PolicyReloader:
    def __init__(
        self,
        gateway: Gateway,
        path: Path,
        load: Callable[[Path], Any],
        *,
        interval: float = 1.0,
        log: Callable[[str], None] = lambda s: None,
    ) -> None:
        self.gateway = gateway
        self.path = path
        self.load = load
        self.interval = interval
        self.log = log
        self._seen = _fingerprint(path)
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.failures = 0

    async def reload_now(self) -> bool:
        """Compile the files as they are now; swap if valid. True when a new revision went live."""
        async with self._lock:
            self._seen = _fingerprint(self.path)
            live = self.gateway.policy.revision
            try:
                policy = await asyncio.to_thread(self.load, self.path)
            except EdgewardError as exc:
                self.failures += 1
                text = str(exc)
                diags = getattr(exc, "diagnostics", [])
                self.gateway.alert(
                    "policy_reload_failed",
                    {"live": live, "errors": len(diags) or 1, "first": text.splitlines()[0][:300]},
                )
                self.log(f"policy reload failed; revision {live} stays live:\n{text}")
                return False
            if policy.site != self.gateway.policy.site:
                self.failures += 1
                self.gateway.alert("policy_reload_failed", {"live": live, "errors": 1,
                                                            "first": "the site cannot change without a restart"})
                self.log("policy reload refused: the site cannot change without a restart")
                return False
            if policy.revision == live:
                return False
            self.gateway.swap_policy(policy)
            self.reloads += 1
            self.log(f"policy revision {policy.revision} is live (was {live})")
            return True

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                break
            if _fingerprint(self.path) != self._seen:
                await self.reload_now()
