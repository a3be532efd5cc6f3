"""Properties of ``gateway.guards``: every topic string and every decoded payload gives either an
accepted value or one ``RejectedMessage`` with a ``guard.*`` code; what is accepted conforms to its
schema exactly; the detail of a rejection never carries a field value."""

from __future__ import annotations

import math
import re
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.catalog import DEVICE_TYPES, ENVELOPE_FIELDS, STREAMS, FieldSpec, StreamSchema
from gateway.errors import RejectedMessage
from gateway.guards import MAX_LIST_STR, MAX_TS_SKEW_MS, check_payload, parse_topic
from tests.property.conftest import examples

SITE = "AMS-T1"
NOW = 1_800_000_000_000
MARKER = "ZQXMARKERQZX"  # a value that must never appear in a rejection's detail

TOPIC_CODES = frozenset({"guard.topic", "guard.topic_site", "guard.topic_stream"})
PAYLOAD_CODES = frozenset(
    {"guard.bad_envelope", "guard.bad_timestamp", "guard.unknown_field", "guard.missing_field", "guard.bad_value"}
)

SCHEMAS: list[tuple[str, StreamSchema]] = [
    (f"{t.name}:{s.stream}", s) for t in DEVICE_TYPES.values() for s in (t.result, t.health)
]
schemas = st.sampled_from(SCHEMAS).map(lambda p: p[1])

# ---------------------------------------------------------------------------------- topics
topic_parts = st.one_of(
    st.sampled_from(["site", "dev", SITE, "AMS-T2", "", "+", "#", "$SYS", "..", "result", "status", "health", "xr-00001"]),
    st.text(max_size=12),
)


@settings(max_examples=examples(500))
@given(st.one_of(st.text(max_size=200), st.lists(topic_parts, max_size=8).map("/".join)))
def test_any_topic_parses_to_its_device_and_stream_or_one_guard_code(topic: str) -> None:
    try:
        device, stream = parse_topic(topic, SITE)
    except RejectedMessage as exc:
        assert exc.code in TOPIC_CODES
        return
    # accepted: the topic is exactly the namespace layout, the identity is one non-empty level
    assert topic == f"site/{SITE}/dev/{device}/{stream}"
    assert device and "/" not in device
    assert stream in STREAMS


@settings(max_examples=examples(200))
@given(st.text(min_size=1, max_size=40).filter(lambda d: "/" not in d), st.sampled_from(STREAMS))
def test_every_well_formed_device_topic_is_accepted(device: str, stream: str) -> None:
    # any non-empty level, odd Unicode included: the registry, not the parser, decides who exists
    assert parse_topic(f"site/{SITE}/dev/{device}/{stream}", SITE) == (device, stream)


# ---------------------------------------------------------------------------------- payload strategies
def _scalar(kind: str, spec: FieldSpec | None) -> st.SearchStrategy[Any]:
    """Values of ``kind`` that the checker for ``spec`` accepts."""
    max_len = spec.max_len if spec else MAX_LIST_STR
    if kind == "str":
        if spec and spec.pattern:
            return st.from_regex(re.compile(spec.pattern), fullmatch=True).filter(lambda s: len(s) <= max_len)
        return st.text(max_size=max_len)
    if kind == "int":
        lo = int(spec.lo) if spec and spec.lo is not None else -(2**63)
        hi = int(spec.hi) if spec and spec.hi is not None else 2**63 - 1
        return st.integers(lo, hi)
    if kind == "float":
        lo = spec.lo if spec and spec.lo is not None else None
        hi = spec.hi if spec and spec.hi is not None else None
        return st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if kind == "bool":
        return st.booleans()
    if kind == "bytes":
        return st.binary(max_size=min(max_len, 256))
    raise AssertionError(kind)


def _valid_field(spec: FieldSpec) -> st.SearchStrategy[Any]:
    if spec.kind == "list":
        return st.lists(_scalar(spec.item, None), max_size=spec.max_len)
    if spec.kind == "records":
        rec = st.fixed_dictionaries({k: _scalar(kind, None) for k, kind in spec.subfields})
        return st.lists(rec, max_size=min(spec.max_len, 4))
    return _scalar(spec.kind, spec)


def valid_payload(schema: StreamSchema) -> st.SearchStrategy[dict[str, Any]]:
    required = {f.name: _valid_field(f) for f in schema.fields if f.required}
    optional = {f.name: _valid_field(f) for f in schema.fields if not f.required}
    envelope = {"seq": st.integers(1, 2**63 - 1), "ts": st.integers(NOW - MAX_TS_SKEW_MS, NOW + MAX_TS_SKEW_MS)}
    return st.fixed_dictionaries({**envelope, **required}, optional=optional)


# Anything decode can return as a value (64-bit ints, finite floats, bytes, nested containers).
decoded_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20).map(lambda s: MARKER + s),
    st.binary(max_size=20).map(lambda b: MARKER.encode() + b),
)
decoded_values = st.recursive(
    decoded_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def schema_and_payload(draw: st.DrawFn) -> tuple[StreamSchema, dict[str, Any]]:
    """A schema and a payload that is valid, or valid but for a few mutations of any kind."""
    schema = draw(schemas)
    payload = dict(draw(valid_payload(schema)))
    names = [f.name for f in schema.fields] + sorted(ENVELOPE_FIELDS)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "drop", "add", "ts", "seq", "item"]))
        if op == "replace":
            payload[draw(st.sampled_from(names))] = draw(decoded_values)
        elif op == "drop" and payload:
            payload.pop(draw(st.sampled_from(sorted(payload))))
        elif op == "add":
            payload[draw(st.text(max_size=70))] = draw(decoded_values)
        elif op == "ts":
            payload["ts"] = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), decoded_values))
        elif op == "seq":
            payload["seq"] = draw(st.one_of(st.integers(-(2**63), 2**64 - 1), decoded_values))
        elif op == "item":
            lists = [k for k, v in payload.items() if type(v) is list and v]
            if lists:
                k = draw(st.sampled_from(lists))
                payload[k] = [*payload[k][:-1], draw(decoded_values)]
    return schema, payload


def check_or_code(schema: StreamSchema, payload: dict[str, Any], now_ms: int = NOW) -> tuple[Any, ...] | str:
    try:
        return check_payload(schema, payload, now_ms=now_ms)
    except RejectedMessage as exc:
        assert exc.code in PAYLOAD_CODES, exc.code
        assert MARKER not in exc.detail and MARKER not in str(exc), "a rejection carried a field value"
        return exc.code


def _conforms(spec: FieldSpec, v: Any) -> bool:
    if spec.kind == "list":
        return type(v) is list and len(v) <= spec.max_len
    if spec.kind == "records":
        keys = {k for k, _ in spec.subfields}
        return type(v) is list and len(v) <= spec.max_len and all(type(r) is dict and r.keys() == keys for r in v)
    if spec.kind == "str":
        return type(v) is str and len(v) <= spec.max_len and (not spec.pattern or re.fullmatch(spec.pattern, v) is not None)
    if spec.kind == "bytes":
        return type(v) is bytes and len(v) <= spec.max_len
    if spec.kind == "int":
        return type(v) is int and (spec.lo is None or v >= spec.lo) and (spec.hi is None or v <= spec.hi)
    if spec.kind == "float":
        if type(v) is not float or not math.isfinite(v):
            return False
        if spec.precision:
            nd = max(0, round(-math.log10(spec.precision)))
            return round(v, nd) == v
        return True
    return type(v) is bool


# ---------------------------------------------------------------------------------- payload properties
@settings(max_examples=examples(150))
@given(st.data())
def test_every_valid_payload_is_accepted_and_conforms(data: st.DataObject) -> None:
    schema = data.draw(schemas)
    payload = data.draw(valid_payload(schema))
    got = check_or_code(schema, payload)
    assert not isinstance(got, str), f"a schema-valid payload was rejected: {got}"
    fields, seq, ts = got
    assert (seq, ts) == (payload["seq"], payload["ts"])
    assert set(fields) == set(payload) - ENVELOPE_FIELDS
    for name, v in fields.items():
        assert _conforms(schema.by_name[name], v), name


@settings(max_examples=examples(250))
@given(schema_and_payload())
def test_any_payload_is_accepted_or_rejected_with_one_guard_code(case: tuple[StreamSchema, dict[str, Any]]) -> None:
    schema, payload = case
    got = check_or_code(schema, payload)
    if isinstance(got, str):
        return
    fields, seq, ts = got
    assert type(seq) is int and 0 < seq < 2**63
    assert type(ts) is int and abs(ts - NOW) <= MAX_TS_SKEW_MS
    assert not (set(fields) - set(schema.by_name)), "an unknown field got through"
    assert {f.name for f in schema.fields if f.required} <= set(fields)
    for name, v in fields.items():
        assert _conforms(schema.by_name[name], v), name
    # normalising is idempotent: what the guard returns passes the guard unchanged
    assert check_payload(schema, {**fields, "seq": seq, "ts": ts}, now_ms=NOW) == got


@settings(max_examples=examples(120))
@given(schemas.flatmap(lambda s: st.tuples(st.just(s), valid_payload(s))), st.integers(-(2**63), 2**64 - 1))
def test_timestamps_outside_the_skew_are_refused_and_inside_accepted(
    case: tuple[StreamSchema, dict[str, Any]], ts: int
) -> None:
    schema, payload = case
    got = check_or_code(schema, {**payload, "ts": ts})
    if abs(ts - NOW) > MAX_TS_SKEW_MS:
        assert got == "guard.bad_timestamp"
    else:
        assert not isinstance(got, str)


@settings(max_examples=examples(100))
@given(
    schemas.flatmap(lambda s: st.tuples(st.just(s), valid_payload(s))),
    st.text(min_size=1, max_size=200).filter(lambda k: k not in ENVELOPE_FIELDS),
    decoded_values,
)
def test_any_extra_field_is_refused(case: tuple[StreamSchema, dict[str, Any]], name: str, value: Any) -> None:
    schema, payload = case
    assume(name not in schema.by_name)
    assert check_or_code(schema, {**payload, name: value}) == "guard.unknown_field"


@settings(max_examples=examples(200))
@given(st.data())
def test_floats_below_the_declared_precision_are_quantised_away(data: st.DataObject) -> None:
    floats = [(s, f) for _, s in SCHEMAS for f in s.fields if f.kind == "float" and f.precision]
    schema, spec = data.draw(st.sampled_from(floats))
    payload = data.draw(valid_payload(schema))
    noise = data.draw(st.floats(-spec.precision / 4, spec.precision / 4))
    base = payload[spec.name]
    noisy = base + noise
    assume(spec.lo is not None and spec.hi is not None and spec.lo <= noisy <= spec.hi)
    got = check_or_code(schema, {**payload, spec.name: noisy})
    assert not isinstance(got, str)
    nd = max(0, round(-math.log10(spec.precision)))
    assert got[0][spec.name] == round(noisy, nd)
    assert abs(got[0][spec.name] - noisy) <= spec.precision / 2 + 1e-12
