"""A gateway killed (or stopped) while its disk was full never wrote the episode's ``disk_ok``: an
operator's ``disk_full`` alert would stay open for good. The next life closes it with its first write
(chaos run, session 13: 4 ``disk_full`` alerts and 2 ``disk_ok`` in one audit log)."""

from __future__ import annotations

import time
from pathlib import Path

from device_sim.devices import make_fleet
from gateway.audit.chain import AuditLog, iter_records
from tests.unit.test_probation import _gateway, _results


def _disk_alerts(state: Path) -> list[dict[str, object]]:
    return [r for r in iter_records(state / "audit")
            if r.get("event") == "alert" and r.get("kind") in ("disk_full", "disk_ok")]


def _previous_life(state: Path, *kinds: str) -> None:
    log = AuditLog(state / "audit")
    for kind in kinds:
        log.append({"event": "alert", "kind": kind, "detail": "no space left"})
        log.append({"event": "undelivered", "dst": "customs_nl", "dev": "xr-00001", "seq": 1, "reason": "x"})
    log.flush()
    log.close()


def _one_message(state: Path) -> None:
    gw = _gateway(state)
    try:
        spec = make_fleet(24, seed=5)[0]
        gw._on_messages(_results(spec, range(1, 2), int(time.time() * 1000)))
        gw._on_messages(_results(spec, range(2, 3), int(time.time() * 1000), pids=10))  # writes the alert
    finally:
        gw._flush_out()
        gw.audit.close()


def test_an_episode_left_open_is_closed_by_the_next_life(tmp_path: Path) -> None:
    _previous_life(tmp_path, "disk_full")
    _one_message(tmp_path)
    alerts = _disk_alerts(tmp_path)
    assert [a["kind"] for a in alerts] == ["disk_full", "disk_ok"]
    assert alerts[-1].get("after_restart") is True


def test_a_closed_episode_gets_no_second_disk_ok(tmp_path: Path) -> None:
    _previous_life(tmp_path, "disk_full", "disk_ok")
    _one_message(tmp_path)
    assert [a["kind"] for a in _disk_alerts(tmp_path)] == ["disk_full", "disk_ok"]
