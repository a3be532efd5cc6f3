"""Properties of ``Pipeline.process``: whatever topic and bytes a device sends, it returns an Outcome
(never raises), forwards only what was decided, and its audit record — which must survive the audit
log's canonical JSON — never contains a field value."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.audit.chain import AuditLog, verify_chain
from gateway.catalog import DEVICE_TYPES, STREAMS, schema_for
from gateway.crypto.envelope import open_envelope
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.pipeline import Outcome, Pipeline
from tests.fakes import FakePolicy
from tests.property.conftest import examples
from tests.property.test_guards_props import NOW, valid_payload

MARKER = "QXVALUEMARKERXQ"
_FRESH_SEQ = itertools.count(10**12)
SITE = FakePolicy.site
PREFIXES = [t.id_prefix for t in DEVICE_TYPES.values()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    d = tmp_path_factory.mktemp("pipeline-props")
    ring = DataKeyring(d / "dk.jsonl", load_or_create_kek(d / "kek.key"))
    return Pipeline(FakePolicy(), ring, clock_ms=lambda: NOW)


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditLog]:
    d = tmp_path_factory.mktemp("pipeline-props-audit")
    log = AuditLog(d)
    yield log
    log.close()
    assert verify_chain(d).ok


device_ids = st.one_of(
    st.tuples(st.sampled_from(PREFIXES), st.integers(0, 99999)).map(lambda p: f"{p[0]}-{p[1]:05d}"),
    st.text(max_size=20),
)
topics = st.one_of(
    st.tuples(device_ids, st.sampled_from([*STREAMS, "cmd", "result/x", ""])).map(
        lambda p: f"site/{SITE}/dev/{p[0]}/{p[1]}"
    ),
    st.text(max_size=80),
)


def _marked(v: Any) -> Any:
    """Plant the marker in every free-text string and binary value the schema lets through."""
    if type(v) is str:
        return v
    if type(v) is bytes:
        return MARKER.encode() + v
    if type(v) is list:
        return [MARKER + x if type(x) is str else _marked(x) for x in v]
    if type(v) is dict:
        return {k: MARKER + x if type(x) is str else x for k, x in v.items()}
    return v


@st.composite
def device_messages(draw: st.DrawFn) -> tuple[str, bytes]:
    """A registered device's topic and a payload: valid (values marked), mutated, or arbitrary bytes."""
    dtype = draw(st.sampled_from(list(DEVICE_TYPES.values())))
    stream = draw(st.sampled_from(STREAMS))
    topic = f"site/{SITE}/dev/{dtype.id_prefix}-{draw(st.integers(0, 99)):05d}/{stream}"
    schema = schema_for(dtype.name, stream)
    assert schema is not None
    kind = draw(st.sampled_from(["valid", "extra", "bytes", "mutated"]))
    if kind == "bytes":
        return topic, draw(st.binary(max_size=512))
    payload = {k: _marked(v) for k, v in draw(valid_payload(schema)).items()}
    if draw(st.booleans()):
        payload["seq"] = next(_FRESH_SEQ)  # half fresh (decided), half drawn (duplicates happen too)
    if kind == "extra":
        payload[draw(st.text(min_size=1, max_size=10))] = MARKER
    raw = bytearray(msgpack.packb(payload, use_bin_type=True))
    if kind == "mutated" and raw:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
    return topic, bytes(raw)


def _check(pl: Pipeline, audit: AuditLog, topic: str, payload: bytes, retain: bool = False) -> Outcome:
    out = pl.process(topic, payload, retain=retain)  # must not raise, whatever the input
    event(out.reason or "decided")
    assert isinstance(out, Outcome)
    rec = out.record
    assert rec["digest"] and rec["size"] == len(payload)
    text = json.dumps(rec)
    assert MARKER not in text and MARKER not in json.dumps(rec, ensure_ascii=False)
    if out.reason:
        assert not out.deliveries and rec["reason"] == out.reason
        assert re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", out.reason), out.reason  # a stable code, never a value
    else:
        assert out.decision is not None and "routes" in rec
        allowed = [r.destination for r in out.decision.routes if r.allow]
        assert [d.destination for d in out.deliveries] == allowed  # one sealed delivery per allowed route
        for d in out.deliveries:
            assert MARKER.encode() not in d.envelope  # sealed: the plaintext never shows
    audit.append(dict(rec))  # the record must go through the audit log's canonical JSON
    return out


@settings(max_examples=examples(400))
@given(topics, st.binary(max_size=256), st.booleans())
def test_any_topic_and_bytes_give_an_outcome(
    pipeline: Pipeline, audit: AuditLog, topic: str, payload: bytes, retain: bool
) -> None:
    _check(pipeline, audit, topic, payload, retain)


@settings(max_examples=examples(400))
@given(device_messages())
def test_registered_devices_any_payload_gives_an_outcome_and_no_value_in_the_record(
    pipeline: Pipeline, audit: AuditLog, msg: tuple[str, bytes]
) -> None:
    _check(pipeline, audit, *msg)


@settings(max_examples=examples(100))
@given(st.data())
def test_valid_marked_payloads_are_forwarded_sealed_with_the_values_intact(pipeline: Pipeline, data: st.DataObject) -> None:
    """The marker does travel — inside the vault envelope, which only the site's keyring opens."""
    dtype = data.draw(st.sampled_from([t for t in DEVICE_TYPES.values() if t.name == "trace_detector"]))
    schema = dtype.result
    payload = data.draw(valid_payload(schema))
    payload["substances"] = [MARKER]
    payload["seq"] = next(_FRESH_SEQ)  # Hypothesis replays examples: never offer dedupe the same seq twice
    device = f"{dtype.id_prefix}-{next(_FRESH_SEQ) % 100_000:05d}"  # a fresh device: no rate budget spent
    out = pipeline.process(f"site/{SITE}/dev/{device}/result", msgpack.packb(payload))
    assert out.reason == ""
    assert MARKER not in json.dumps(out.record)
    vault = next(d for d in out.deliveries if d.destination == "vault")
    assert MARKER.encode() in open_envelope(pipeline.keyring, vault.envelope)[1]


def test_the_audit_chain_of_all_those_records_verifies(audit: AuditLog) -> None:
    audit.flush(sync=True)
    assert verify_chain(audit.directory).ok


# ---------------------------------------------------------------------------------- the shipped policy
POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    from gateway.policy import load_policy

    d = tmp_path_factory.mktemp("pipeline-props-real")
    ring = DataKeyring(d / "dk.jsonl", load_or_create_kek(d / "kek.key"))
    return Pipeline(load_policy(POLICY_DIR), ring, clock_ms=lambda: NOW)


@settings(max_examples=examples(300))
@given(device_messages())
def test_with_the_shipped_policy_any_payload_gives_an_outcome_and_no_value_in_the_record(
    real_pipeline: Pipeline, audit: AuditLog, msg: tuple[str, bytes]
) -> None:
    _check(real_pipeline, audit, *msg)
