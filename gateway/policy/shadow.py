"""Where a candidate policy would decide a message differently from the live one (shadow mode).

Pure: two decisions in, a list of differences out. The runtime feeds it; it stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.model import Decision, Route

__all__ = ["Divergence", "shadow_divergences"]


@dataclass(frozen=True, slots=True)
class Divergence:
    """One destination where live and candidate differ. ``kind`` is ``allow`` (one allows, the other
    denies), ``fields`` (both allow, different fields go), ``quantize`` or ``reason`` (both deny, for
    different reasons); ``live``/``candidate`` say what each decided, briefly."""

    destination: str
    kind: str
    live: str
    candidate: str


def _brief(r: Route | None) -> str:
    if r is None:
        return "no such destination"
    if not r.allow:
        return f"deny ({r.reason})"
    return "allow [" + ", ".join(r.fields) + "]"


def shadow_divergences(live: Decision, candidate: Decision) -> list[Divergence]:
    a = {r.destination: r for r in live.routes}
    b = {r.destination: r for r in candidate.routes}
    out: list[Divergence] = []
    for name in [*a, *(n for n in b if n not in a)]:
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.allow != y.allow:
            kind = "allow"
        elif x.allow and x.fields != y.fields:
            kind = "fields"
        elif x.allow and x.quantize != y.quantize:
            kind = "quantize"
        elif not x.allow and x.reason != y.reason:
            kind = "reason"
        else:
            continue
        out.append(Divergence(name, kind, _brief(x), _brief(y)))
    return out
