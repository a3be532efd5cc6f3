"""The private broker starts on loopback with Edgeward's rendered limits and carries QoS-1 traffic."""

from __future__ import annotations

import subprocess

from gateway.runtime.broker import MosquittoBroker


def test_private_broker_renders_limits_and_serves(broker: MosquittoBroker) -> None:
    conf = broker.conf_path.read_text()
    assert "max_queued_messages 1000000" in conf
    assert "max_inflight_messages 20000" in conf
    assert f"listener {broker.port} 127.0.0.1" in conf
    out = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "$SYS/broker/version",
         "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    assert out.stdout.startswith("mosquitto version 2.")
