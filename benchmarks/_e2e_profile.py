"""Where the gateway's per-message CPU goes: the pipeline's stages timed in-process.

``profile_stages`` runs the messages through a stage-timed copy of ``gateway.pipeline.Pipeline.process``
(same functions, same order, ``time.perf_counter_ns`` between stages) plus ``AuditLog.append`` and the
vault append, and checks the copy against the real ``Pipeline.process`` (same deliveries and records
for every message). ``pipeline_us`` is the untimed real thing (process + audit append + group-commit
flush per 64 messages, like one ingest batch), so the MQTT adapter's share of the gateway's CPU per
message is the gateway's measured CPU per message minus ``pipeline_us``. If gateway/pipeline.py changes,
the equivalence check fails loudly rather than profiling stale code.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditLog
from gateway.catalog import DEVICE_TYPES, schema_for
from gateway.codec import decode, encode
from gateway.crypto.envelope import Header, seal
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.errors import RejectedMessage
from gateway.guards import check_payload, parse_topic
from gateway.model import MessageFacts
from gateway.pipeline import Delivery, Outcome, Pipeline, _quantise, _record
from gateway.vault import VaultWriter

STAGES = ("digest", "topic+registry", "decode", "guards", "dedupe", "policy", "project+encode", "seal",
          "audit-record", "audit-append", "vault-append")


def _timed_process(p: Pipeline, topic: str, payload: bytes, acc: dict[str, int]) -> Outcome:
    ns = time.perf_counter_ns
    t = ns()
    policy = p.policy
    digest = hashlib.sha256(payload).hexdigest()
    t1 = ns(); acc["digest"] += t1 - t; t = t1
    device, stream = parse_topic(topic, policy.site)
    entry = policy.device(device)
    dtype = DEVICE_TYPES.get(entry.device_type)
    schema = schema_for(entry.device_type, stream)
    if dtype is None or schema is None or len(payload) > dtype.max_payload:
        raise RejectedMessage("bench", "profile messages must pass the guards")
    t1 = ns(); acc["topic+registry"] += t1 - t; t = t1
    values = decode(payload, p.limits)
    t1 = ns(); acc["decode"] += t1 - t; t = t1
    fields, seq, ts = check_payload(schema, values, now_ms=p.clock_ms())
    t1 = ns(); acc["guards"] += t1 - t; t = t1
    out = Outcome(device, stream, seq, ts)
    if not p.dedupe.is_new(device, seq):
        raise RejectedMessage("bench", "profile messages must be new")
    t1 = ns(); acc["dedupe"] += t1 - t; t = t1
    by_name = schema.by_name
    facts = MessageFacts(device_id=device, device_type=entry.device_type, vendor=entry.vendor, site=policy.site,
                         topic=topic, stream=stream, size=len(payload),
                         fields=tuple((name, by_name[name].cls) for name in fields))
    decision = policy.decide(facts)
    out.decision = decision
    t1 = ns(); acc["policy"] += t1 - t; t = t1
    destinations = policy.destinations
    for route in decision.routes:
        if not route.allow:
            continue
        projected = {name: fields[name] for name in route.fields}
        for name, step in route.quantize:
            if name in projected:
                projected[name] = _quantise(projected[name], step)
        dest = destinations[route.destination]
        header = Header(device, stream, seq, ts, route.destination, decision.revision)
        plaintext = encode(projected)
        t1 = ns(); acc["project+encode"] += t1 - t; t = t1
        envelope = seal(p.keyring, header, plaintext)
        t1 = ns(); acc["seal"] += t1 - t; t = t1
        topic_out = f"{dest.topic}/{device}/{stream}" if dest.transport == "mqtt" else ""
        out.deliveries.append(Delivery(route.destination, dest.transport, topic_out, envelope))
    out.record = _record(out, topic, digest, len(payload), decision.revision)
    t1 = ns(); acc["audit-record"] += t1 - t
    return out


def _fresh(root: Path, policy: Any) -> tuple[Pipeline, AuditLog, VaultWriter]:
    kr = DataKeyring(root / "keys" / "datakeys.jsonl", load_or_create_kek(root / "keys" / "kek.key"))
    return (Pipeline(policy, kr, clock_ms=lambda: int(time.time() * 1000)), AuditLog(root / "audit"),
            VaultWriter(root / "vault"))


def profile_stages(policy: Any, msgs: list[tuple[str, bytes]], batch: int = 64) -> dict[str, Any]:
    """µs per message per stage (timed copy), and the real pipeline's µs per message (untimed)."""
    with tempfile.TemporaryDirectory(prefix="e2e-prof-") as td:
        # 1. the real thing, untimed inside: process + audit append + vault append, flush per batch
        p, audit, vault = _fresh(Path(td) / "real", policy)
        real: list[tuple[int, list[tuple[str, str]], list[str]]] = []
        c0 = time.process_time()
        for i, (topic, payload) in enumerate(msgs):
            out = p.process(topic, payload)
            audit.append(out.record)
            for d in out.deliveries:
                if d.transport == "vault":
                    vault.append(d.envelope)
            if i % batch == batch - 1:
                vault.flush()
                audit.flush()
            real.append((out.seq, [(d.destination, d.topic) for d in out.deliveries], sorted(out.record)))
        vault.flush()
        audit.flush()
        pipeline_us = (time.process_time() - c0) / len(msgs) * 1e6
        audit.close()
        vault.close()
        # 2. the stage-timed copy, on a fresh pipeline (fresh dedupe)
        p, audit, vault = _fresh(Path(td) / "timed", policy)
        acc = dict.fromkeys(STAGES, 0)
        ns = time.perf_counter_ns
        n_deliveries = 0
        for i, (topic, payload) in enumerate(msgs):
            out = _timed_process(p, topic, payload, acc)
            t = ns()
            audit.append(out.record)
            if i % batch == batch - 1:
                audit.flush()
            t1 = ns(); acc["audit-append"] += t1 - t; t = t1
            for d in out.deliveries:
                if d.transport == "vault":
                    vault.append(d.envelope)
            if i % batch == batch - 1:
                vault.flush()
            acc["vault-append"] += ns() - t
            n_deliveries += len(out.deliveries)
            r = real[i]
            if (out.seq, [(d.destination, d.topic) for d in out.deliveries], sorted(out.record)) != r:
                raise AssertionError(f"stage-timed copy diverges from Pipeline.process at message {i}: "
                                     "update benchmarks/_e2e_profile.py")
        audit.close()
        vault.close()
    n = len(msgs)
    stages = {k: v / n / 1e3 for k, v in acc.items()}
    return {"messages": n, "deliveries_per_msg": n_deliveries / n, "stages_us": stages,
            "timed_total_us": sum(stages.values()), "pipeline_us": pipeline_us}
