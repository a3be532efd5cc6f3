"""A device that keeps violating is isolated: disconnected at once, refused by the broker until an
operator releases it; every other device carries on. Real Mosquitto, real certificates."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.codec import encode
from gateway.errors import BrokerError
from gateway.policy import load_policy
from gateway.runtime.isolation import release
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.site_runner import SiteRuntime
from gateway.site import init_site, load_site

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def _result(seq: int, **extra: object) -> bytes:
    return encode({"seq": seq, "ts": int(time.time() * 1000), "sample_id": "S1000001", "substances": [],
                   "alarm": False, **extra})


async def _device(rt: SiteRuntime, device: str) -> MqttClient:
    c = MqttClient(host="127.0.0.1", port=rt.device_port, client_id=device, clean_start=True, session_expiry=0,
                   ssl=rt.device_ssl(device))
    await c.connect()
    return c


async def _published(c: MqttClient) -> None:
    c.flush()
    for _ in range(300):
        if not c.pending_out:
            return
        await asyncio.sleep(0.01)


@pytest.mark.broker
async def test_repeat_offender_is_isolated_until_released(tmp_path: Path) -> None:
    root = init_site(tmp_path / "site", policy_src=POLICY_DIR, devices=["et-00001", "et-00002"],
                     passphrase="isolation test passphrase", kdf_memory_kib=8192, device_port=0, gateway_port=0)
    site = load_site(root, "isolation test passphrase")
    policy = load_policy(site.policy_dir)
    async with SiteRuntime(site, policy, config_overrides={"isolate_after": 3}) as rt:
        gw = rt.gateway
        assert gw is not None
        stop = asyncio.Event()
        serve = asyncio.create_task(gw.serve(stop))
        bad = await _device(rt, "et-00001")
        good = await _device(rt, "et-00002")
        for seq in range(1, 4):
            bad.publish("site/AMS-T1/dev/et-00001/result", _result(seq, exfil="x"))
        await _published(bad)
        assert bad.closed is not None
        await asyncio.wait_for(asyncio.shield(bad.closed), 10)  # cut off by the session takeover
        assert "et-00001" in gw.isolated and "et-00001" in site.ca().held()
        for _ in range(50):  # its certificate is on hold: once the broker re-read the CRL, TLS refuses it
            try:
                sneak = await _device(rt, "et-00001")
            except BrokerError as exc:
                assert "revoked" in str(exc)
                break
            await sneak.disconnect()
            await asyncio.sleep(0.1)
        else:
            pytest.fail("an isolated device could still connect")
        good.publish("site/AMS-T1/dev/et-00002/result", _result(1))
        await _published(good)
        await gw.drain(5)
        assert gw.stats.decided == 1  # the other device is unaffected
        await release(site.root, "et-00001")
        for _ in range(50):  # Mosquitto re-reads the CRL on SIGHUP, a moment later
            try:
                again = await _device(rt, "et-00001")
                break
            except BrokerError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("a released device could not connect again")
        for _ in range(40):  # the running gateway follows the CA's holds
            if "et-00001" not in gw.pipeline.blocked:
                break
            await asyncio.sleep(0.1)
        again.publish("site/AMS-T1/dev/et-00001/result", _result(10))
        await _published(again)
        await gw.drain(5)
        assert gw.stats.decided == 2  # released: its messages are decided again
        await again.disconnect()
        await good.disconnect()
        stop.set()
        await serve
    from gateway.audit.chain import iter_records

    kinds = [r.get("kind") for r in iter_records(site.audit_dir) if r.get("event") == "alert"]
    assert "device_isolated" in kinds
