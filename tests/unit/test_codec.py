"""The decoder: one way to fail, limits checked, canonical re-encoding."""

from __future__ import annotations

import msgpack
import pytest

from gateway.codec import Limits, decode, encode
from gateway.errors import DecodeError


def test_round_trip_is_canonical() -> None:
    a = encode({"b": 1, "a": [1, {"z": 1, "y": b"\x00"}]})
    b = encode({"a": [1, {"y": b"\x00", "z": 1}], "b": 1})
    assert a == b
    assert decode(a) == {"a": [1, {"y": b"\x00", "z": 1}], "b": 1}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "decode.empty"),
        (b"\x01", "decode.not_a_map"),
        (msgpack.packb([1, 2]), "decode.not_a_map"),
        (msgpack.packb({"a": float("nan")}), "decode.non_finite"),
        (msgpack.packb({"a": float("inf")}), "decode.non_finite"),
        (msgpack.packb({"a": 1}) + b"x", "decode.trailing_bytes"),
        (b"\x82\xa1a\x01\xa1a\x02", "decode.duplicate_key"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"xx")}), "decode.ext_type"),
        (msgpack.packb({"a": msgpack.Timestamp(1, 0)}), "decode.ext_type"),
        (msgpack.packb({"a": [[[[[[1]]]]]]}), "decode.too_deep"),
        (b"\x81\xa1a\xc1", "decode.malformed"),
        (b"\xdf\xff\xff\xff\xff", "decode.malformed"),
        (b"\x81\xa1a\xa2\xff\xfe", "decode.bad_utf8"),
        (msgpack.packb({1: 2}), "decode.malformed"),
    ],
)
def test_bad_bytes_get_one_error_type_with_a_code(data: bytes, code: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data)
    assert info.value.code == code


def test_size_is_checked_before_unpacking() -> None:
    with pytest.raises(DecodeError) as info:
        decode(msgpack.packb({"a": "x" * 100}), Limits(max_bytes=50))
    assert info.value.code == "decode.too_large"


def test_container_limits() -> None:
    with pytest.raises(DecodeError):
        decode(msgpack.packb({"a": list(range(300))}))
    with pytest.raises(DecodeError):
        decode(msgpack.packb({str(i): i for i in range(100)}))
