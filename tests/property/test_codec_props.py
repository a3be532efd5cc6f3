"""Properties of ``gateway.codec``: any bytes give a str-keyed dict or one ``DecodeError`` with a
documented code — never another exception, a hang, or memory out of proportion to the input — and
``encode`` is a canonical inverse of ``decode`` on everything the schema can carry."""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codec import DEFAULT_LIMITS, Limits, decode, encode
from gateway.errors import DecodeError
from tests.property.conftest import examples

# Every code decode may raise (docs/limits.md lists them with the limit each one enforces).
DECODE_CODES = frozenset(
    {
        "decode.too_large",
        "decode.empty",
        "decode.not_a_map",
        "decode.duplicate_key",
        "decode.ext_type",
        "decode.trailing_bytes",
        "decode.bad_utf8",
        "decode.malformed",
        "decode.key_type",
        "decode.too_deep",
        "decode.non_finite",
    }
)


def decode_or_code(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any] | str:
    """The decoded dict, or the DecodeError's code. Any other exception escapes and fails the test."""
    try:
        value = decode(data, limits)
    except DecodeError as exc:
        assert exc.code in DECODE_CODES, exc.code
        assert "\n" not in exc.detail
        return exc.code
    assert type(value) is dict
    assert all(type(k) is str for k in value)
    return value


def _depth(v: object) -> int:
    if type(v) is dict:
        return 1 + max((_depth(x) for x in v.values()), default=0)  # type: ignore[union-attr]
    if type(v) is list:
        return 1 + max((_depth(x) for x in v), default=0)  # type: ignore[union-attr]
    return 0


# ---------------------------------------------------------------------------------- strategies
keys = st.text(max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.binary(max_size=40),
)


def values(depth_left: int) -> st.SearchStrategy[Any]:
    """Values that fit DEFAULT_LIMITS with ``depth_left`` containers still allowed below."""
    if depth_left <= 0:
        return scalars
    inner = values(depth_left - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=6),
        st.dictionaries(keys, inner, max_size=6),
    )


# Payloads: a top-level map (one level) with three more levels of containers below it.
payloads = st.dictionaries(keys, values(DEFAULT_LIMITS.max_depth - 1), max_size=8)


# ---------------------------------------------------------------------------------- arbitrary bytes
@settings(max_examples=examples(700))
@given(st.binary(max_size=2048))
def test_any_bytes_decode_to_a_dict_or_one_decode_error(data: bytes) -> None:
    decode_or_code(data)


@settings(max_examples=examples(700))
@given(st.sampled_from([0x80, 0x81, 0x83, 0x8F, 0xDE, 0xDF]), st.binary(max_size=512))
def test_bytes_after_any_map_header_decode_or_fail_cleanly(first: int, rest: bytes) -> None:
    # Arbitrary bytes almost never start with a map header; these get past the first-byte check.
    decode_or_code(bytes([first]) + rest)


@settings(max_examples=examples(150))
@given(payloads, st.data())
def test_mutated_valid_payloads_decode_or_fail_cleanly(value: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(msgpack.packb(value, use_bin_type=True))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="op")
        i = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[i] = data.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xC7, 0xCA, 0xCB, 0xD4, 0xDC, 0xDD, 0xDF, 0xFF]))
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[i]
        elif op == "truncate":
            del raw[i:]
    decode_or_code(bytes(raw))


# ---------------------------------------------------------------------------------- round trip
@settings(max_examples=examples(150))
@given(payloads)
def test_decode_inverts_msgpack_for_every_value_within_the_limits(value: dict[str, Any]) -> None:
    got = decode_or_code(msgpack.packb(value, use_bin_type=True))
    if _depth(value) > DEFAULT_LIMITS.max_depth:  # pragma: no cover - the strategy stays within
        assert got == "decode.too_deep"
    else:
        assert got == value


@settings(max_examples=examples(150))
@given(payloads)
def test_encode_is_a_canonical_inverse_of_decode(value: dict[str, Any]) -> None:
    once = encode(value)
    assert decode(once) == value
    assert encode(decode(once)) == once  # idempotent: re-encoding what was decoded changes nothing
    # key order of the input never shows in the output
    assert encode(dict(reversed(list(value.items())))) == once


@settings(max_examples=examples(150))
@given(st.binary(max_size=1024))
def test_whatever_decode_accepts_re_encodes_canonically(data: bytes) -> None:
    got = decode_or_code(data)
    if isinstance(got, dict):
        once = encode(got)
        assert decode(once) == got
        assert encode(decode(once)) == once


# ---------------------------------------------------------------------------------- each limit, its code
def _wrap(inner: bytes) -> bytes:
    """{"v": <inner>} as raw msgpack."""
    return b"\x81\xa1v" + inner


@settings(max_examples=examples(100))
@given(
    st.sampled_from(
        [
            b"\xcb" + struct.pack(">d", math.nan),
            b"\xcb" + struct.pack(">d", math.inf),
            b"\xcb" + struct.pack(">d", -math.inf),
            b"\xca" + struct.pack(">f", math.nan),
            b"\xca" + struct.pack(">f", math.inf),
            b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x01",  # a NaN with a payload in its mantissa
        ]
    ),
    st.integers(0, DEFAULT_LIMITS.max_depth - 1),
)
def test_nan_and_infinity_are_refused_at_every_depth(number: bytes, depth: int) -> None:
    inner = b"\x91" * depth + number  # wrapped in `depth` one-element arrays
    assert decode_or_code(_wrap(inner)) == "decode.non_finite"


@settings(max_examples=examples(60))
@given(st.integers(-128, 127).filter(lambda c: c != -1), st.binary(max_size=16))
def test_extension_types_are_refused(code: int, body: bytes) -> None:
    # built by hand: msgpack's ExtType refuses the negative (reserved) codes a device may still send
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if len(body) in fixed:
        ext = bytes([fixed[len(body)], code & 0xFF]) + body
    else:
        ext = bytes([0xC7, len(body), code & 0xFF]) + body
    assert decode_or_code(_wrap(ext)) == "decode.ext_type"
    assert decode_or_code(_wrap(b"\x91" + ext)) == "decode.ext_type"


@settings(max_examples=examples(60))
@given(st.integers(-(2**40), 2**40), st.integers(0, 999_999_999))
def test_timestamps_are_refused_far_past_or_future(seconds: int, nanos: int) -> None:
    ts = msgpack.packb(msgpack.Timestamp(seconds, nanos), datetime=False)
    assert decode_or_code(_wrap(ts)) == "decode.ext_type"
    assert decode_or_code(_wrap(b"\x91" + ts)) == "decode.ext_type"


@settings(max_examples=examples(100))
@given(st.text(max_size=10), st.data())
def test_duplicate_keys_are_refused_at_any_level(key: str, data: st.DataObject) -> None:
    k = msgpack.packb(key)
    dup = b"\x82" + k + b"\x01" + k + b"\x02"
    depth = data.draw(st.integers(0, DEFAULT_LIMITS.max_depth - 1))
    raw = dup if depth == 0 else _wrap(b"\x91" * (depth - 1) + dup)
    assert decode_or_code(raw) == "decode.duplicate_key"


@settings(max_examples=examples(50))
@given(st.integers(DEFAULT_LIMITS.max_depth + 1, 5000))
def test_nesting_beyond_the_limit_is_too_deep_or_malformed(depth: int) -> None:
    raw = _wrap(b"\x91" * (depth - 1) + b"\x01")
    # within msgpack's own stack it is our depth check; beyond it, msgpack's StackError (malformed)
    assert decode_or_code(raw) in {"decode.too_deep", "decode.malformed"}


@pytest.mark.parametrize(
    ("limit", "header"),
    [
        ("max_array_len", lambda n: b"\xdd" + struct.pack(">I", n)),
        ("max_map_len", lambda n: b"\xdf" + struct.pack(">I", n)),
        ("max_str_len", lambda n: b"\xdb" + struct.pack(">I", n)),
        ("max_bin_len", lambda n: b"\xc6" + struct.pack(">I", n)),
    ],
)
def test_container_headers_claiming_more_than_the_limit_cost_nothing(limit: str, header: Any) -> None:
    """A 10-byte payload claiming 4 G elements is refused before anything is allocated for them."""
    claim = 2**32 - 1
    raw = _wrap(header(claim))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        assert decode_or_code(raw) == "decode.malformed"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{limit}: peak {peak} bytes for a {len(raw)}-byte input"
    assert time.perf_counter() - t0 < 1.0


@settings(max_examples=examples(30))
@given(st.sampled_from(["max_array_len", "max_map_len"]), st.integers(1, 40))
def test_containers_one_over_the_limit_are_refused(limit: str, over: int) -> None:
    n = getattr(DEFAULT_LIMITS, limit) + over
    if limit == "max_array_len":
        raw = msgpack.packb({"v": [0] * n})
    else:
        raw = msgpack.packb({"v": {f"k{i}": 0 for i in range(n)}})
    assert decode_or_code(raw) == "decode.malformed"
    # and exactly at the limit it is accepted
    at = getattr(DEFAULT_LIMITS, limit)
    ok = msgpack.packb({"v": [0] * at}) if limit == "max_array_len" else msgpack.packb({"v": {f"k{i}": 0 for i in range(at)}})
    assert isinstance(decode_or_code(ok), dict)


@settings(max_examples=examples(30))
@given(st.integers(1, 64))
def test_payload_over_max_bytes_is_refused_before_parsing(over: int) -> None:
    limits = Limits(max_bytes=256)
    raw = b"\x81\xa1v\xc4" + bytes([255]) + b"x" * 255 + b"\x00" * over  # a valid map, padded over the limit
    assert decode_or_code(raw, limits) == "decode.too_large"


@settings(max_examples=examples(100))
@given(payloads, st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(value: dict[str, Any], tail: bytes) -> None:
    got = decode_or_code(msgpack.packb(value, use_bin_type=True) + tail)
    assert isinstance(got, str)  # never silently accepted with the tail ignored


def test_huge_but_legal_flat_payload_decodes_in_bounded_time() -> None:
    """The widest payload the limits admit (64 keys x 256-item lists) decodes quickly just under the
    1 MiB cap, and a little more is refused by size before msgpack sees it."""
    fits = {f"k{i}": ["x" * 60] * 256 for i in range(64)}
    raw = msgpack.packb(fits)
    assert len(raw) <= DEFAULT_LIMITS.max_bytes
    t0 = time.perf_counter()
    assert decode_or_code(raw) == fits
    assert time.perf_counter() - t0 < 1.0
    over = msgpack.packb({f"k{i}": ["x" * 64] * 256 for i in range(64)})
    assert len(over) > DEFAULT_LIMITS.max_bytes
    assert decode_or_code(over) == "decode.too_large"
