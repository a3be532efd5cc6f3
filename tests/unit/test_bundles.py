"""Bundles: one MQTT message per destination carries the envelopes of a whole read, each still sealed
and deduplicated on its own; an ingest message is acknowledged only when the bundles holding its
envelopes are; a destination declared down gets each bundled envelope parked on its own."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from device_sim.devices import PayloadFactory, encode, make_fleet
from gateway.catalog import HEALTH_STREAM, RESULT_STREAM
from gateway.crypto.envelope import BUNDLE_PREFIX, Header, open_envelope, pack_bundle, unbundle
from gateway.errors import CryptoError
from gateway.policy import load_policy
from gateway.runtime.mqtt import Message
from gateway.runtime.service import BUNDLE_MAX_BYTES, Gateway, GatewayConfig, _bundles

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


def test_unbundle_reads_bundles_and_passes_single_envelopes_through() -> None:
    envs = [msgpack.packb({"c": b"x" * i, "h": b"h", "kid": "k", "n": b"n" * 12, "v": 1}) for i in range(3)]
    assert unbundle(pack_bundle(envs)) == envs
    assert unbundle(envs[0]) == [envs[0]]  # a plain envelope is its own list
    assert not envs[0].startswith(BUNDLE_PREFIX)
    for bad in (BUNDLE_PREFIX + b"\xff", msgpack.packb({"bundle": ["text"], "v": 1}),
                msgpack.packb({"bundle": [b"e"], "v": 9}), msgpack.packb({"bundle": b"e", "v": 1})):
        assert bad.startswith(BUNDLE_PREFIX)
        with pytest.raises(CryptoError):
            unbundle(bad)


def _messages(n: int) -> list[Message]:
    now = int(time.time() * 1000)
    out = []
    for i, spec in enumerate(make_fleet(n, seed=3)):
        stream = RESULT_STREAM if i % 2 else HEALTH_STREAM
        payload = encode(PayloadFactory(spec, 1).make(stream, 1, now))
        out.append(Message(spec.topic(stream), payload, 1, False, 100 + i, False, False))
    return out


def _gateway(tmp_path: Path, policy_dir: Path = POLICY_DIR) -> tuple[Gateway, list[int], list[tuple[int, str, bytes]]]:
    gw = Gateway(GatewayConfig(state_dir=tmp_path / "state", port=1, rate_headroom=None, retime=False),
                 load_policy(policy_dir))
    acks: list[int] = []
    gw.ingest.ack = lambda pid, ack_id=None: acks.append(pid)  # type: ignore[method-assign]
    published: list[tuple[int, str, bytes]] = []
    real = gw.uplink.publish

    def publish(topic: str, payload: bytes, *, qos: int = 1) -> int | None:
        pid = real(topic, payload, qos=qos)
        assert pid is not None
        published.append((pid, topic, payload))
        return pid

    gw.uplink.publish = publish  # type: ignore[method-assign]
    return gw, acks, published


def test_one_read_leaves_as_one_bundle_per_destination_and_is_acknowledged_with_it(tmp_path: Path) -> None:
    gw, acks, published = _gateway(tmp_path)
    try:
        batch = _messages(40)
        gw._on_messages(batch)
        mqtt_fwd = {d: n for d, n in gw.stats.forwarded.items() if d != "local_vault"}
        assert mqtt_fwd and sum(mqtt_fwd.values()) > len(mqtt_fwd)  # several envelopes for some destination
        by_dest: dict[str, list[list[bytes]]] = {}
        for _, topic, payload in published:
            by_dest.setdefault(topic.rsplit("/", 1)[1], []).append(unbundle(payload))
        assert {gw.policy.destinations[d].topic for d in by_dest} == {t for _, t, _ in published}
        for dest, bundles in by_dest.items():
            assert sum(map(len, bundles)) == mqtt_fwd[dest]
            # a new bundle only when the next envelope would have taken this one past the size bound
            for this, nxt in itertools.pairwise(bundles):
                assert sum(map(len, this)) + len(nxt[0]) > BUNDLE_MAX_BYTES
            for env in (e for b in bundles for e in b):
                h, _ = open_envelope(gw.keyring, env)
                assert h.destination == dest and type(h.seq) is bytes  # sealed one by one, sequence hidden
        assert len(by_dest["eu_hub"]) == 1 and len(by_dest["eu_hub"][0]) > 1  # small results: one bundle
        waiting = {m.packet_id for m in batch} - set(acks)
        assert waiting, "messages with MQTT destinations wait for their bundles"
        link = gw._default_link
        for pid, _, _ in published[:-1]:
            gw._on_uplink_ack(link, pid)
        assert set(acks) != {m.packet_id for m in batch}  # the last bundle still holds some back
        gw._on_uplink_ack(link, published[-1][0])
        assert sorted(acks) == sorted(m.packet_id for m in batch)
        assert link.bundled == 0 and not link.uplink_for
        assert gw.stats.bundled == sum(mqtt_fwd.values()) and gw.stats.bundles == len(published)
    finally:
        gw.audit.close()


def test_bundle_1_sends_each_envelope_alone_on_its_device_topic(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy_dir)
    site = policy_dir / "site.yaml"
    text = site.read_text()
    for name in ("customs_nl", "eu_hub", "vendor_maintenance"):
        text = text.replace(f"    topic: edgeward/out/{name}\n", f"    topic: edgeward/out/{name}\n    bundle: 1\n")
    site.write_text(text)
    gw, _, published = _gateway(tmp_path, policy_dir)
    try:
        gw._on_messages(_messages(20))
        assert len(published) == sum(n for d, n in gw.stats.forwarded.items() if d != "local_vault") > 1
        for _, topic, payload in published:
            assert not payload.startswith(BUNDLE_PREFIX)
            h, _ = open_envelope(gw.keyring, payload)
            assert topic.startswith(f"edgeward/out/{h.destination}/{h.device}/")
        assert gw.stats.bundles == 0
    finally:
        gw.audit.close()


def test_a_destination_declared_down_parks_every_envelope_of_its_bundles(tmp_path: Path) -> None:
    gw, acks, published = _gateway(tmp_path)
    try:
        batch = _messages(40)
        gw._on_messages(batch)
        n_customs = sum(len(unbundle(p)) for _, t, p in published if t == "edgeward/out/customs_nl")
        assert n_customs > 1
        gw._declare_down(gw._default_link)
        ob = gw.outboxes["customs_nl"]
        assert ob.spool is not None and ob.spool.backlog == n_customs  # rest_at_edge: each one spooled
        items = ob.spool.next_batch(1000)
        # the very envelopes the bundles carried, in order, each under the topic it would have had alone
        assert [it.payload for it in items] == [e for _, t, p in published if t == "edgeward/out/customs_nl"
                                                 for e in unbundle(p)]
        spooled = [Header.unpack(msgpack.unpackb(item.payload)["h"]) for item in items]
        assert {h.destination for h in spooled} == {"customs_nl"}
        assert [it.topic for it in items] == [f"edgeward/out/customs_nl/{h.device}/{h.stream}" for h in spooled]
        # eu_hub and vendor_maintenance may not rest here: dropped with a reason; nothing waits any more
        assert gw.stats.undelivered["eu_hub:uplink.unreachable"] > 0
        assert sorted(acks) == sorted(m.packet_id for m in batch)
        assert gw._default_link.bundled == 0
    finally:
        gw.audit.close()


def test_a_spool_drains_in_bundles_bounded_by_count_and_size_in_order() -> None:
    items = [SimpleNamespace(id=i, payload=b"x" * n) for i, n in enumerate([10, 10, 10, BUNDLE_MAX_BYTES, 10, 10])]
    assert [[it.id for it in g] for g in _bundles(items, 2)] == [[0, 1], [2], [3], [4, 5]]
    assert [[it.id for it in g] for g in _bundles(items, 64)] == [[0, 1, 2], [3], [4, 5]]
    assert [[it.id for it in g] for g in _bundles(items, 1)] == [[i] for i in range(6)]
