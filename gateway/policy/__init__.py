"""The policy engine: operator files in, an indexed plan out, and a pure ``decide`` on it.

    compile_policy(text, source=...) -> Policy        parse + validate + compile; PolicyError lists all
    load_policy(path) -> Policy                       a file, or a directory of *.yaml merged into one
    Policy.decide(MessageFacts) -> Decision           pure: no I/O, clock, logging or asyncio
    Policy.render_acl() -> str                        the Mosquitto acl_file the policy implies

Never does I/O except ``load_policy`` reading the operator's files. Never sees field values: only
names and data classes. See docs/policy.md for the language and the reason codes.
"""

from __future__ import annotations

from gateway.policy.diagnostics import Diagnostic
from gateway.policy.engine import Destination, DeviceEntry, Policy
from gateway.policy.load import compile_data, compile_policy, load_policy
from gateway.policy.shadow import Divergence, shadow_divergences

__all__ = [
    "compile_policy",
    "compile_data",
    "load_policy",
    "Diagnostic",
    "Policy",
    "Destination",
    "DeviceEntry",
    "Divergence",
    "shadow_divergences",
]
