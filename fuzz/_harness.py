"""Shared by the atheris harnesses: which exceptions are the documented rejection, and which are
faults already reported (tests/property/test_found_bugs.py) that a run counts instead of stopping on.

Set ``FUZZ_STRICT=1`` to make known faults crash like new ones (to confirm a fix)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

STRICT = os.environ.get("FUZZ_STRICT") == "1"
known: Counter[str] = Counter()


_KNOWN_FILE = os.environ.get("FUZZ_KNOWN_FILE")  # benchmarks/fuzz.py reads the counts from here


def known_fault(name: str) -> None:
    """Count an already-reported fault (call it inside the ``except``); re-raise it in strict mode."""
    if STRICT:
        raise  # noqa: PLE0704 - re-raises the exception being handled by the caller
    known[name] += 1
    n = known[name]
    if _KNOWN_FILE and n & (n - 1) == 0:  # 1, 2, 4, 8...: libFuzzer exits without running atexit
        report_known()


def report_known() -> None:
    if not known:
        return
    if _KNOWN_FILE:
        with open(_KNOWN_FILE, "w", encoding="utf-8") as f:
            json.dump(dict(known), f)
    else:
        print("known_faults:", dict(known), file=sys.stderr, flush=True)
