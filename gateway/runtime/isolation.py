"""Isolating a device: disconnected now, refused by the broker until an operator releases it.

Refusal is the site CA's own mechanism: the device's certificate goes on the CRL with reason
``certificateHold`` (reversible, unlike revocation) and the broker re-reads the CRL on SIGHUP. The
live connection is cut by a session takeover: a privileged client connects under the device's
client id (client ids are broker-wide; the device listener binds them to the certificate), which
makes Mosquitto drop the device, then leaves with a clean session. Nothing here is a Mosquitto
patch or plugin.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from gateway.crypto.pki import SiteCA
from gateway.errors import BrokerError
from gateway.runtime.mqtt import MqttClient

__all__ = ["write_runtime_info", "read_runtime_info", "isolate", "release"]


def write_runtime_info(site_root: Path, *, pid: int, gateway_port: int, device_port: int) -> None:
    """Where the running broker is, for the operator's commands (no secrets)."""
    (site_root / "broker" / "runtime.json").write_text(
        json.dumps({"pid": pid, "gateway_port": gateway_port, "device_port": device_port})
    )


def read_runtime_info(site_root: Path) -> dict[str, Any] | None:
    path = site_root / "broker" / "runtime.json"
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, PermissionError, KeyError, ValueError):
        return None
    return info


def reload_broker(site_root: Path) -> bool:
    info = read_runtime_info(site_root)
    if info is None:
        return False
    os.kill(int(info["pid"]), signal.SIGHUP)  # Mosquitto re-reads its CRL (and ACL) on SIGHUP
    return True


async def kick(site_root: Path, device_id: str, credentials: tuple[str, bytes]) -> bool:
    """Cut a live connection by taking over its session; False when no broker is running."""
    info = read_runtime_info(site_root)
    if info is None:
        return False
    user, password = credentials
    c = MqttClient(host="127.0.0.1", port=int(info["gateway_port"]), client_id=device_id, clean_start=True,
                   session_expiry=0, keepalive=0, username=user, password=password)
    try:
        await c.connect()
    except BrokerError:
        return False
    await c.disconnect()
    return True


async def isolate(site_root: Path, device_id: str, credentials: tuple[str, bytes]) -> list[int]:
    serials = SiteCA.load(site_root / "ca").hold(device_id)
    reload_broker(site_root)
    await kick(site_root, device_id, credentials)
    return serials


async def release(site_root: Path, device_id: str) -> list[int]:
    serials = SiteCA.load(site_root / "ca").release(device_id)
    reload_broker(site_root)
    return serials
