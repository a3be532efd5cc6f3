"""Holding excess volume, against a real Mosquitto: a device that bursts far beyond its normal rate
gets only its normal-rate share out, what it sent beyond that is withheld until its baseline decides,
and withdrawn (audited with a reason, never delivered) when it trips; a device slightly over its
normal rate is delayed, not refused; an honest device is not touched."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from gateway.audit.chain import iter_records, verify_chain
from gateway.policy import load_policy
from gateway.runtime.broker import MosquittoBroker
from gateway.runtime.mqtt import MqttClient
from gateway.runtime.receiver import DestinationReceiver
from gateway.runtime.service import Gateway, GatewayConfig

pytestmark = pytest.mark.broker
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
HOLD_S = 3.0


def _result(seq: int) -> bytes:
    return msgpack.packb({"seq": seq, "ts": int(time.time() * 1000), "sample_id": "S1234567",
                          "substances": [], "alarm": False})


async def _publish(port: int, device: str, seqs: range, gap_s: float = 0.0) -> None:
    c = MqttClient(host="127.0.0.1", port=port, client_id=f"t-{device}", clean_start=True, session_expiry=0)
    await c.connect()
    for s in seqs:
        c.publish(f"site/AMS-T1/dev/{device}/result", _result(s))
        c.flush()
        if gap_s:
            await asyncio.sleep(gap_s)
    for _ in range(500):
        if not c.pending_out:
            break
        await asyncio.sleep(0.01)
    await c.disconnect()


async def test_burst_is_withheld_and_withdrawn_slight_excess_only_delayed(broker: MosquittoBroker,
                                                                          tmp_path: Path) -> None:
    cfg = GatewayConfig(state_dir=tmp_path / "gw", port=broker.port, burst_hold_s=HOLD_S, retime=False,
                        isolate_after=0)
    gw = Gateway(cfg, load_policy(POLICY_DIR))
    rx = DestinationReceiver("127.0.0.1", broker.port, gw.keyring, keep=True)
    await rx.start()
    stop = asyncio.Event()
    async with gw:
        serve = asyncio.create_task(gw.serve(stop))
        # et-00001: 200 results at once (a trace detector's normal rate is a few a minute);
        # et-00002: 8 at once (a little beyond its normal-rate slack, well inside its baseline)
        t_sent = time.monotonic()
        await asyncio.gather(_publish(broker.port, "et-00001", range(1, 201)),
                             _publish(broker.port, "et-00002", range(1, 9)))
        await asyncio.sleep(0.5)
        early = Counter(m.header.device for m in rx.messages if m.header.destination == "customs_nl")
        assert early["et-00002"] < 8, "the excess must not leave before the hold is over"
        assert gw.status()["held"] > 0
        for _ in range(200):
            if gw.stats.acked + gw.stats.duplicates >= 208 - sum(gw.stats.rejected.values()) and not gw._pending:
                break
            await asyncio.sleep(0.05)
        assert await gw.drain(15)
        await asyncio.sleep(0.3)
        stop.set()
        await serve
    await rx.stop()
    got = Counter(m.header.device for m in rx.messages if m.header.destination == "customs_nl")
    late = [m for m in rx.messages if m.header.device == "et-00002"]
    assert got["et-00002"] == 8 and time.monotonic() - t_sent >= HOLD_S  # delayed, then all delivered
    assert 0 < got["et-00001"] <= 10, got  # its normal-rate slack, no more: the burst's size never left
    records = list(iter_records(cfg.state_dir / "audit"))
    withheld = [r for r in records if r.get("event") == "undelivered" and r["reason"].startswith("withheld:")]
    assert withheld and {r["dev"] for r in withheld} == {"et-00001"}
    assert {r["reason"] for r in withheld} == {"withheld:detect.burst"}
    decided = {r["seq"] for r in records if r.get("dev") == "et-00001" and "routes" in r}
    delivered = {m.header.seq for m in rx.messages if m.header.device == "et-00001"
                 and m.header.destination == "customs_nl"}
    assert delivered.isdisjoint(r["seq"] for r in withheld if r["dst"] == "customs_nl")
    assert delivered | {r["seq"] for r in withheld if r["dst"] == "customs_nl"} == decided  # every one accounted
    assert late and rx.duplicates == 0
    assert verify_chain(cfg.state_dir / "audit").ok
