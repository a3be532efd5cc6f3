"""Bugs found by the property tests and fuzzers, each as a failing test with the smallest input known.

These fail until the gateway code is fixed; they are deliberately neither skipped nor xfailed. Each
docstring names the fault and the proposed fix. When one passes, move it to the file of its module.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.codec import decode, encode
from gateway.crypto.keys import DataKeyring, load_or_create_kek
from gateway.errors import PolicyError
from gateway.pipeline import Pipeline
from tests.fakes import FakePolicy

POLICY_DIR = Path(__file__).resolve().parents[2] / "policies"
SHIPPED = "".join(p.read_text(encoding="utf-8") + "\n" for p in sorted(POLICY_DIR.glob("*.yaml")))


def _policy_error_or_crash(text: str) -> PolicyError:
    from gateway.policy import compile_policy

    with pytest.raises(PolicyError) as info:  # anything else (KeyError, AttributeError...) fails here
        compile_policy(text, source="bug.yaml")
    return info.value


# ------------------------------------------------------------------ policy loader: explicit YAML tags
@pytest.mark.parametrize(
    "text",
    [
        "a: !!timestamp foo",  # AttributeError: 'NoneType' object has no attribute 'groupdict'
        "a: !!bool maybe",  # KeyError: 'maybe'
        "a: !!int ''",  # IndexError: string index out of range
        "a: !!float ''",  # IndexError
    ],
)
def test_policy_explicit_yaml_tags_give_a_policy_error(text: str) -> None:
    """BUG gateway/policy/syntax.py ``_Walker.scalar`` — it catches (ConstructorError, ValueError,
    TypeError) around PyYAML's SafeConstructor, but SafeConstructor raises AttributeError, KeyError and
    IndexError for explicitly tagged scalars it cannot read. Fix: catch ``Exception`` there (untrusted
    text: any constructor failure is one ``syntax.scalar`` diagnostic), or refuse explicit tags outright
    (``node.tag`` not among the implicit resolver tags -> ``syntax.tag``)."""
    err = _policy_error_or_crash(text)
    assert err.diagnostics


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["!!int", "!!float", "!!bool", "!!timestamp", "!!null", "!!binary", "!!str", "!!merge", "!!omap"]),
    st.text(max_size=12),
)
def test_policy_any_tagged_scalar_gives_a_policy_or_a_policy_error(tag: str, value: str) -> None:
    """The same bug, as the general property: ``key: <tag> <value>`` compiles or raises PolicyError."""
    from gateway.policy import compile_policy

    text = f"a: {tag} {value!r}"
    try:
        compile_policy(text, source="bug.yaml")
    except PolicyError:
        pass


# ------------------------------------------------------------------ policy loader: alias expansion
def _alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_policy_alias_expansion_is_bounded() -> None:
    """BUG gateway/policy/syntax.py ``_Walker.walk`` — it expands YAML aliases by walking the shared node
    again at every reference, recording a position per path: a 279-byte file of 6 nested 10-way aliases
    is 10^6 nodes (~3.4 s here), 329 bytes is 10^7 (~40 s, memory growing with the position table),
    the classic "billion laughs". ``_MAX_TEXT`` (16 MiB) bounds the text, not the expansion.
    Fix: count nodes walked and stop with a ``syntax.too_large`` diagnostic past a budget (e.g. 100 000),
    or refuse aliases (``syntax.alias``; the shipped policies use none)."""
    t0 = time.perf_counter()
    err = _policy_error_or_crash(_alias_bomb(6))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{len(_alias_bomb(6))}-byte policy took {elapsed:.2f}s to refuse"
    assert any(getattr(d, "code", "").startswith("syntax.") for d in err.diagnostics)


# ------------------------------------------------------------------ codec: nested non-str keys
def test_codec_encode_accepts_everything_decode_returns() -> None:
    """BUG gateway/codec.py — decode() checks that *top-level* keys are strings, but accepts bytes keys
    in nested maps, and a nested map mixing str and bytes keys then makes encode() raise TypeError
    ('<' not supported between 'bytes' and 'str') in ``_canonical``'s ``sorted``. Not reachable through
    the pipeline today (records' keys are checked against the schema), but decode's contract is
    "string keys", and encode(decode(x)) must not raise. Fix: in ``_check_values`` reject non-str keys
    of every nested map with ``decode.key_type``."""
    raw = msgpack.packb({"a": {"x": 1, b"y": 2}}, use_bin_type=True)
    try:
        value = decode(raw)
    except Exception as exc:  # noqa: BLE001 - a DecodeError is the fix
        assert type(exc).__name__ == "DecodeError"
        return
    assert decode(encode(value)) == value


# ------------------------------------------------------------------ guards: no rate bound
def test_a_flood_from_one_device_is_refused_with_a_reason_and_others_still_pass(tmp_path: Path) -> None:
    """MISSING GUARD — DESIGN.md promises "size and rate bounds" among the built-in guards, and the issue
    asks that a flood from one device be rejected with a reason code. Today nothing bounds one device's
    rate: 2 000 distinct, valid results from one trace detector within one millisecond of gateway clock
    are all decided and sealed (the broker's per-client queue is the only limit, and it is global).
    Proposed fix: a per-device token bucket in the pipeline after the topic guard
    (``guard.rate``, e.g. default 50 msg/s with a burst of 200, in ``Limits`` or GatewayConfig,
    documented in docs/limits.md), refusing before decode so a flood costs little."""
    ring = DataKeyring(tmp_path / "dk.jsonl", load_or_create_kek(tmp_path / "kek.key"))
    now = 1_800_000_000_000
    pl = Pipeline(FakePolicy(), ring, clock_ms=lambda: now)
    topic = "site/AMS-T1/dev/et-00001/result"
    reasons = set()
    for seq in range(1, 2001):
        payload = {"seq": seq, "ts": now, "sample_id": "S1234567", "substances": [], "alarm": False}
        reasons.add(pl.process(topic, msgpack.packb(payload)).reason)
    other = {"seq": 1, "ts": now, "sample_id": "S7654321", "substances": [], "alarm": False}
    assert pl.process("site/AMS-T1/dev/et-00002/result", msgpack.packb(other)).reason == ""
    assert any(r.startswith("guard.") for r in reasons), f"2000 msgs in 1 ms from one device: reasons {reasons}"
