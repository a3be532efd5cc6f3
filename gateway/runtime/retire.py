"""Changing a site's number of gateway processes without losing what the old ones were owed.

Every gateway process has a persistent MQTT session (7 days). When a site that ran as one gateway
starts with ``--workers N``, or shrinks from N workers to fewer (or back to one), the sessions of
the processes that no longer run stay on the broker:

- a worker's session is a member of the shared subscription ``$share/edgeward/...``: Mosquitto keeps
  queueing its share of the devices' messages to it while it is offline, so those messages would
  wait for a process that never comes back;
- the single gateway's session has a plain subscription: it holds every message sent while no
  gateway ran, and would take a copy of every message the workers handle after that.

So before the new set of processes subscribes, each stale session is *retired*: a gateway connects
as it (same client id and state directory: its own audit chain, vault, done log and keys),
unsubscribes, decides and delivers what the session still holds, closes cleanly, and the session is
then deleted (a clean-start connect with session expiry 0). A session the broker no longer has
costs one connect. Nothing a stale session held is dropped; nothing is decided twice, because each
message was queued to exactly one session before the unsubscribe (the copies a plain subscription
would take start only once workers share the ingest, and the retire runs before they subscribe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.runtime.mqtt import MqttClient

__all__ = ["delete_session", "retire_stale_sessions", "stale_sessions"]


def stale_sessions(site: Any, *, workers: int) -> list[tuple[str, int | None]]:
    """(label, worker index or None for the single gateway) of processes that ran on this site
    before and will not run now. ``workers`` 0 means the single gateway runs now."""
    from gateway.runtime.workers import worker_dirs

    out: list[tuple[str, int | None]] = []
    if workers > 0 and any((site.root / "audit").glob("audit-*.jsonl")):
        out.append(("the single gateway", None))
    for i, _ in worker_dirs(site.root):
        if workers == 0 or i >= workers:
            out.append((f"worker-{i}", i))
    return out


async def delete_session(host: str, port: int, client_id: str, username: str | None, password: bytes | None) -> None:
    """Clean start with session expiry 0: the broker discards the session and its subscriptions."""
    c = MqttClient(host=host, port=port, client_id=client_id, username=username, password=password,
                   clean_start=True, session_expiry=0)
    await c.connect()
    await c.disconnect()


async def retire_stale_sessions(site: Any, policy: Any, port: int, *, workers: int,
                                log: Callable[[str], None] = lambda s: None,
                                overrides: dict[str, Any] | None = None,
                                idle_s: float = 2.0) -> list[dict[str, Any]]:
    """Retire every stale session (see the module docstring); one summary per session retired."""
    from gateway.runtime.service import Gateway
    from gateway.runtime.site_runner import single_config
    from gateway.runtime.workers import worker_config

    done = []
    for label, index in stale_sessions(site, workers=workers):
        over = {**(overrides or {}), "drain_only": True}
        config = (single_config(site, policy, port, over) if index is None
                  else worker_config(site, policy, index, port, over))
        async with Gateway(config, policy) as gw:
            present = gw.ingest.session_present
            handled = await gw.retire_session(idle_s=idle_s) if present else 0
        await delete_session(config.host, port, config.client_id, config.username, config.password)
        if present:
            log(f"retired {label}'s session ({config.client_id}): {handled} queued message(s) decided and "
                f"delivered under its own audit chain, then the session was deleted")
        done.append({"session": label, "client_id": config.client_id, "present": present, "messages": handled})
    return done
