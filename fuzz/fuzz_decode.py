"""atheris harness: ``gateway.codec.decode`` over arbitrary bytes.

Property: any input gives a str-keyed dict or one ``DecodeError`` (a documented code); whatever is
accepted re-encodes canonically (``encode(decode(encode(v))) == encode(v)``). Anything else is a crash.
Run directly (libFuzzer flags pass through) or through ``benchmarks/fuzz.py``::

    python fuzz/fuzz_decode.py -max_total_time=60 -timeout=5 /tmp/decode-corpus fuzz/corpus/decode
"""

from __future__ import annotations

import atexit
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["gateway", "msgpack"]):
    from gateway.codec import decode, encode
    from gateway.errors import DecodeError

from fuzz._harness import known_fault, report_known  # noqa: E402

CODES = frozenset(
    {"decode.too_large", "decode.empty", "decode.not_a_map", "decode.duplicate_key", "decode.ext_type",
     "decode.trailing_bytes", "decode.bad_utf8", "decode.malformed", "decode.key_type", "decode.too_deep",
     "decode.non_finite"}
)


def _str_keys_only(v: object) -> bool:
    if type(v) is dict:
        return all(type(k) is str and _str_keys_only(x) for k, x in v.items())  # type: ignore[union-attr]
    if type(v) is list:
        return all(_str_keys_only(x) for x in v)  # type: ignore[union-attr]
    return True


def TestOneInput(data: bytes) -> None:
    try:
        value = decode(data)
    except DecodeError as exc:
        if exc.code not in CODES:
            raise AssertionError(f"undocumented decode code {exc.code!r}") from exc
        return
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise AssertionError("decode returned something other than a str-keyed dict")
    if not _str_keys_only(value):
        try:
            encode(value)
        except TypeError:
            known_fault("codec.nested_non_str_keys")  # test_codec_encode_accepts_everything_decode_returns
        return
    once = encode(value)
    if decode(once) != value or encode(decode(once)) != once:
        raise AssertionError("encode is not a canonical inverse of decode")


def main() -> None:
    atexit.register(report_known)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
