"""Where the gateway's per-message CPU goes: the pipeline's stages timed in-process.

``profile_stages`` runs the messages through a stage-timed copy of ``gateway.pipeline.Pipeline.process``
(same functions, same order, ``time.perf_counter_ns`` between stages) plus ``AuditLog.append`` and the
vault append, and checks the copy against the real ``Pipeline.process`` (same deliveries and records
for every message). ``pipeline_us`` is the untimed real thing (process + audit append + group-commit
flush per 64 messages, like one ingest batch), so the MQTT adapter's share of the gateway's CPU per
message is the gateway's measured CPU per message minus ``pipeline_us``. If gateway/pipeline.py changes,
the equivalence check (same deliveries, same audit records down to their chain hashes) fails loudly
rather than profiling stale code.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditLog
from gateway.codec import decode, pack_canonical
from gateway.crypto.envelope import pack_header, seal_packed
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.detect import scan_text_fields, strip_image_trailers
from gateway.errors import RejectedMessage
from gateway.guards import check_payload, parse_topic
from gateway.model import MessageFacts
from gateway.pipeline import Delivery, Outcome, Pipeline, _quantise
from gateway.vault import VaultWriter

STAGES = ("digest", "topic+registry+rate", "decode", "guards+detect", "dedupe", "policy", "project+encode", "seal",
          "audit-record", "audit-append", "vault-append")


def _timed_process(p: Pipeline, topic: str, payload: bytes, acc: dict[str, int]) -> Outcome:
    """``Pipeline.process`` for a message that passes every guard, stage by stage (same helpers)."""
    ns = time.perf_counter_ns
    t = ns()
    policy = p.policy
    digest = hashlib.sha256(payload).hexdigest()
    t1 = ns(); acc["digest"] += t1 - t; t = t1
    if p._cache_for is not policy:
        p._new_policy(policy)
    hit = p._topics.get(topic)
    if hit is not None:
        device, stream, known = hit
    else:
        device, stream = parse_topic(topic, policy.site)
        known = p._lookup(policy, device, stream)
        if known is not None:
            p._topics[topic] = (device, stream, known)
    if (device in p.blocked or known is None or known[1] is None or known[2] is None or known[3]
            or len(payload) > known[1].max_payload):
        raise RejectedMessage("bench", "profile messages must pass the guards")
    entry, _dtype, schema, _code = known
    now_ms = p.clock_ms()
    if p.rate is not None and p.rate.observe(device, len(payload), now_ms / 1000, device_type=entry.device_type):
        raise RejectedMessage("bench", "profile messages must stay within the rate baseline")
    t1 = ns(); acc["topic+registry+rate"] += t1 - t; t = t1
    values = decode(payload, p.limits)
    t1 = ns(); acc["decode"] += t1 - t; t = t1
    fields, seq, ts = check_payload(schema, values, now_ms=now_ms)
    fields, trailers = strip_image_trailers(schema, fields)
    if scan_text_fields(schema, fields):
        raise RejectedMessage("bench", "profile messages must pass the detectors")
    t1 = ns(); acc["guards+detect"] += t1 - t; t = t1
    out = Outcome(device, stream, seq, ts)
    if not p.dedupe.is_new(device, seq):
        raise RejectedMessage("bench", "profile messages must be new")
    t1 = ns(); acc["dedupe"] += t1 - t; t = t1
    facts = MessageFacts(device_id=device, device_type=entry.device_type, vendor=entry.vendor, site=policy.site,
                         topic=topic, stream=stream, size=len(payload),
                         fields=p._field_classes_for(schema, fields))
    decision = policy.decide(facts)
    out.decision = decision
    out.facts = facts
    plan = p._plan(policy, decision)
    t1 = ns(); acc["policy"] += t1 - t; t = t1
    header_ts = p.header_ts
    plaintexts: dict[int, bytes] | None = {} if plan.shared else None
    hidden_seq: bytes | None = None
    for route, names, quantize, transport, prefix, group in plan.allowed:
        plaintext = plaintexts.get(group) if plaintexts is not None else None
        if plaintext is None:
            projected = {name: fields[name] for name in names}
            for name, step in quantize:
                if name in projected:
                    projected[name] = _quantise(projected[name], step)
            plaintext = pack_canonical(projected)
            if plaintexts is not None:
                plaintexts[group] = plaintext
        t1 = ns(); acc["project+encode"] += t1 - t; t = t1
        hts = header_ts(route.destination) if header_ts is not None else None
        if prefix is not None and p.seq_ids is not None:
            if hidden_seq is None:
                hidden_seq = p.seq_ids.hide(device, seq)
            hseq: int | bytes = hidden_seq
        else:
            hseq = seq
        header = pack_header(device, stream, hseq, ts if hts is None else hts, route.destination, decision.revision)
        sealer = p.recipients.get(route.destination)
        envelope = (seal_packed(p.keyring, header, plaintext) if sealer is None
                    else sealer.seal_packed(header, plaintext))
        topic_out = f"{prefix}{device}/{stream}" if prefix is not None else ""
        out.deliveries.append(Delivery(route.destination, transport, topic_out, envelope))
        t1 = ns(); acc["seal"] += t1 - t; t = t1
    rec = {"dev": device, "stream": stream, "seq": seq, "digest": digest, "size": len(payload),
           "rev": decision.revision, "routes": plan.routes}
    if plan.errors is not None:
        rec["errors"] = plan.errors
    out.record = rec
    if trailers:
        out.record["trailer_cut"] = [[name, n] for name, n in trailers]
    t1 = ns(); acc["audit-record"] += t1 - t
    return out


def _fresh(root: Path, policy: Any) -> tuple[Pipeline, AuditLog, VaultWriter]:
    kr = DataKeyring(root / "keys" / "datakeys.jsonl", load_or_create_kek(root / "keys" / "kek.key"))
    return (Pipeline(policy, kr, clock_ms=lambda: int(time.time() * 1000), seq_ids=kr.seq_ids), AuditLog(root / "audit"),
            VaultWriter(root / "vault"))


def profile_stages(policy: Any, msgs: list[tuple[str, bytes]], batch: int = 64) -> dict[str, Any]:
    """µs per message per stage (timed copy), and the real pipeline's µs per message (untimed).

    ``policy`` is a policy or a zero-argument callable returning a fresh one: then each pass starts
    with a cold decision memo, as the gateway process does (the first message of each device and
    stream is decided by the plan, the rest come from the memo)."""

    def pol() -> Any:
        return policy() if callable(policy) else policy

    with tempfile.TemporaryDirectory(prefix="e2e-prof-") as td:
        # 1. the real thing, untimed inside: process + audit append + vault append, flush per batch
        p, audit, vault = _fresh(Path(td) / "real", pol())
        real: list[tuple[int, list[tuple[str, str, str, int]], dict[str, Any]]] = []
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
            real.append((out.seq, [(d.destination, d.transport, d.topic, len(d.envelope)) for d in out.deliveries],
                         out.record))
        vault.flush()
        audit.flush()
        pipeline_us = (time.process_time() - c0) / len(msgs) * 1e6
        audit.close()
        vault.close()
        # 2. the stage-timed copy, on a fresh pipeline (fresh dedupe)
        p, audit, vault = _fresh(Path(td) / "timed", pol())
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
            # the same deliveries and the same audit record (with the same chain position and hash)
            got = (out.seq, [(d.destination, d.transport, d.topic, len(d.envelope)) for d in out.deliveries], out.record)
            if got != real[i]:
                raise AssertionError(f"stage-timed copy diverges from Pipeline.process at message {i}: "
                                     "update benchmarks/_e2e_profile.py")
        audit.close()
        vault.close()
    n = len(msgs)
    stages = {k: v / n / 1e3 for k, v in acc.items()}
    return {"messages": n, "deliveries_per_msg": n_deliveries / n, "stages_us": stages,
            "timed_total_us": sum(stages.values()), "pipeline_us": pipeline_us}
