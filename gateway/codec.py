"""MessagePack in and out, under explicit limits.

``decode`` is the only way device bytes become Python values. Its limits are checked before and
while unpacking (msgpack's own per-container limits, a size check first, a nesting-depth check, no
extension types, no duplicate map keys, string keys only at the top), and every failure is one
``DecodeError`` with a stable code. ``encode`` is canonical: keys sorted, binary as bin, so the same
value always yields the same bytes and device framing never survives into what the gateway sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from gateway.errors import DecodeError

__all__ = ["Limits", "DEFAULT_LIMITS", "decode", "encode", "encode_fields", "pack_canonical"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one payload. Documented with their defaults in docs/limits.md."""

    max_bytes: int = 1024 * 1024  # whole payload; per-type limits in the catalogue are lower
    max_depth: int = 4  # map -> list -> map -> scalar is the deepest a schema needs
    max_str_len: int = 4096
    max_bin_len: int = 1024 * 1024
    max_array_len: int = 256
    max_map_len: int = 64


DEFAULT_LIMITS = Limits()


def _pairs_no_duplicates(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise DecodeError("decode.duplicate_key", "a map repeats a key")
    return d


def _no_ext(code: int, data: bytes) -> object:
    raise DecodeError("decode.ext_type", f"extension type {code} is not accepted")


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Unpack one payload: a map with string keys. Raises DecodeError and nothing else."""
    if len(data) > limits.max_bytes:
        raise DecodeError("decode.too_large", f"{len(data)} bytes > limit {limits.max_bytes}")
    if not data:
        raise DecodeError("decode.empty", "empty payload")
    # Only a map can be a payload: check the first byte before handing anything to the unpacker.
    first = data[0]
    if not (0x80 <= first <= 0x8F or first in (0xDE, 0xDF)):
        raise DecodeError("decode.not_a_map", "payload is not a MessagePack map")
    try:
        value: dict[str, Any] = msgpack.unpackb(  # a map (first byte); str keys: _check_values
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            object_pairs_hook=_pairs_no_duplicates,
            ext_hook=_no_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=16,  # room for a timestamp, which is then refused by name below
        )
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError("decode.trailing_bytes", "bytes after the payload") from exc
    except UnicodeDecodeError as exc:
        raise DecodeError("decode.bad_utf8", "a string is not valid UTF-8") from exc
    except ValueError as exc:  # includes msgpack's limit errors and FormatError/StackError
        raise DecodeError("decode.malformed", type(exc).__name__) from exc
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any unpacker failure is one rejection
        raise DecodeError("decode.malformed", type(exc).__name__) from exc
    _check_values(value, limits.max_depth)
    return value


_isfinite = math.isfinite
_Timestamp = msgpack.Timestamp


def _check_values(value: object, depth_left: int) -> None:
    """Depth bound and scalar sanity, iteratively (no recursion on untrusted nesting)."""
    stack: list[tuple[object, int]] = [(value, depth_left)]
    pop, push = stack.pop, stack.append
    while stack:
        v, left = pop()
        t = type(v)
        if t is dict or t is list:
            if left <= 0:
                raise DecodeError("decode.too_deep", "nesting deeper than the limit")
            # mypy narrows `type(v) is dict` but not the hoisted `t is dict` (one type() call a node):
            # v is a dict here, and its values (like a list's items) are untyped msgpack values
            if t is dict:
                for k in v:  # type: ignore[attr-defined]
                    if type(k) is not str:
                        raise DecodeError("decode.key_type", "map keys must be strings")
                items = v.values()  # type: ignore[attr-defined]
            else:
                items = v
            for item in items:
                ti = type(item)
                if ti is dict or ti is list:
                    push((item, left - 1))
                elif ti is float:
                    if not _isfinite(item):
                        raise DecodeError("decode.non_finite", "NaN or infinity")
                elif ti is _Timestamp:
                    raise DecodeError("decode.ext_type", "timestamps are not accepted")


def encode(value: dict[str, Any]) -> bytes:
    """Canonical MessagePack: keys sorted (recursively), bin for bytes, no extension types."""
    return msgpack.packb(_canonical(value), use_bin_type=True)


_packb = msgpack.Packer(use_bin_type=True, autoreset=True).pack
# For a value the caller has already built in canonical order (sorted keys at every level).
pack_canonical = _packb


def encode_fields(fields: dict[str, Any]) -> bytes:
    """Canonical encoding of a map whose values are already canonical (the guards' output: scalars,
    lists of scalars, records with their keys in sorted order): only the top level is sorted."""
    return _packb({k: fields[k] for k in sorted(fields)})


def _canonical(v: Any) -> Any:
    if type(v) is dict:
        return {k: _canonical(v[k]) for k in sorted(v)}
    if type(v) is list or type(v) is tuple:
        return [_canonical(x) for x in v]
    return v
