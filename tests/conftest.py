"""Shared fixtures. The broker tests start their own Mosquitto on a free loopback port with a
generated config; when Mosquitto is missing they fail with the install step, never skip."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port


def start_broker(workdir: Path, **overrides: object) -> MosquittoBroker:
    last: Exception | None = None
    for _ in range(5):  # a free port can be taken between choosing and binding it
        broker = MosquittoBroker(BrokerConfig(port=free_port(), workdir=workdir, **overrides))  # type: ignore[arg-type]
        try:
            broker.start()
            return broker
        except Exception as exc:  # noqa: BLE001 - retried, then re-raised
            last = exc
    assert last is not None
    raise last


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private Mosquitto for one test."""
    b = start_broker(tmp_path / "broker")
    try:
        yield b
    finally:
        b.stop()
