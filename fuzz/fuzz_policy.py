"""atheris harness: the policy loader (``gateway.policy.compile_policy``) over arbitrary text.

Property: any text gives a ``Policy`` or one ``PolicyError`` with positioned diagnostics; a Policy
that compiles decides a message without raising. Anything else is a crash; an input running past
libFuzzer's ``-timeout`` is a hang. Faults already reported in tests/property/test_found_bugs.py are
counted, not crashed on (``FUZZ_STRICT=1`` to crash on them too)::

    python fuzz/fuzz_policy.py -max_total_time=60 -timeout=5 /tmp/policy-corpus fuzz/corpus/policy
"""

from __future__ import annotations

import atexit
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["gateway", "yaml"]):
    from gateway.errors import PolicyError
    from gateway.model import MessageFacts
    from gateway.policy import compile_policy

from fuzz._harness import known_fault, report_known  # noqa: E402

FIELDS = (("sample_id", "operational"), ("alarm", "verdict"), ("religion", "prohibited"))


def TestOneInput(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        policy = compile_policy(text, source="fuzz.yaml")
    except PolicyError as exc:
        if not exc.diagnostics:
            raise AssertionError("PolicyError without diagnostics") from exc
        return
    except (AttributeError, KeyError, IndexError):
        if "!" in text:  # explicit YAML tags: test_policy_explicit_yaml_tags_give_a_policy_error
            known_fault("policy.yaml_tag_constructor")
            return
        raise
    dev = "et-00004"
    facts = MessageFacts(dev, "trace_detector", "smiths-detection", policy.site,
                         f"site/{policy.site}/dev/{dev}/result", "result", 10, FIELDS)
    decision = policy.decide(facts)
    if any("religion" in r.fields for r in decision.routes):
        raise AssertionError("a prohibited field was routed")


def main() -> None:
    atexit.register(report_known)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
