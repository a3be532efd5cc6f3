"""PROTOTYPE, measured, not product code: a cheaper audit record for the gateway's hot path.

Today each message pays for ``gateway.pipeline._record`` (a dict with a freshly built list of route dicts)
and ``AuditLog.append`` (``json.dumps(sort_keys=True)`` of that whole nested record, then SHA-256). The
routes part depends only on the Decision, which ``Policy.decide`` memoises: the same Decision object
comes back for every message with the same facts. So its canonical JSON fragment can be cached per
Decision, and the line assembled from a fixed key order (the keys already sorted) — byte-identical to
what ``AuditLog`` writes today, so ``verify_chain`` and every reader are unchanged.

    python benchmarks/_e2e_proto_audit.py [N]

prints µs/message for the current path and the prototype, after checking that both produce the same
lines (same hashes) for N realistic small-mix messages.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402

from gateway.audit.chain import AuditLog, _dumps  # noqa: E402
from gateway.crypto.keys import DataKeyring, load_or_create_kek  # noqa: E402
from gateway.pipeline import Pipeline, _record  # noqa: E402

_s = json.JSONEncoder(ensure_ascii=False).encode  # a JSON string literal


class FastAudit:
    """Same chain as AuditLog.append for decided messages; lines built from cached fragments."""

    def __init__(self, prev: str = "0" * 64) -> None:
        self.prev, self.i = prev, 0
        self.lines: list[str] = []
        self._routes: dict[int, tuple[Any, str]] = {}
        self._str: dict[str, str] = {}

    def _js(self, v: str) -> str:
        r = self._str.get(v)
        if r is None:
            r = self._str[v] = _s(v)
        return r

    def append_decided(self, device: str, stream: str, seq: int, digest: str, size: int, decision: Any) -> str:
        hit = self._routes.get(id(decision))
        if hit is None or hit[0] is not decision:
            frag = _dumps(_record_routes(decision))
            hit = self._routes[id(decision)] = (decision, frag)
        js = self._js
        body = (f'{{"dev":{js(device)},"digest":"{digest}","i":{self.i},"prev":"{self.prev}",'
                f'"rev":{js(decision.revision)},"routes":{hit[1]},"seq":{seq},"size":{size},'
                f'"stream":{js(stream)}}}')
        h = hashlib.sha256((self.prev + body).encode()).hexdigest()
        self.lines.append(body[:-1] + ',"h":"' + h + '"}\n')
        self.prev = h
        self.i += 1
        return h


def _record_routes(d: Any) -> list[dict[str, Any]]:
    class _O:
        device = stream = reason = ""
        seq = 0
        decision = d
    rec = _record(_O(), "", "", 0, d.revision)  # type: ignore[arg-type]
    return rec["routes"]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    policy = e2e.load_policy(e2e.REPO / "policies")
    msgs = e2e.MessageMaker().make(n, "small")
    with tempfile.TemporaryDirectory() as td:
        root = Path(td)
        ring = DataKeyring(root / "dk.jsonl", load_or_create_kek(root / "kek"))
        p = Pipeline(policy, ring, clock_ms=lambda: int(time.time() * 1000))
        outs = [p.process(t, pl) for t, pl in msgs]
        assert all(not o.reason for o in outs)
        digests = [hashlib.sha256(pl).hexdigest() for _, pl in msgs]
        # current: _record + AuditLog.append
        audit = AuditLog(root / "audit")
        t0 = time.perf_counter()
        for (t, pl), o, dg in zip(msgs, outs, digests):
            audit.append(_record(o, t, dg, len(pl), o.decision.revision))  # type: ignore[union-attr]
        cur = (time.perf_counter() - t0) / n * 1e6
        cur_lines = audit._buf[:]  # noqa: SLF001
        fast = FastAudit()
        t0 = time.perf_counter()
        for (t, pl), o, dg in zip(msgs, outs, digests):
            fast.append_decided(o.device, o.stream, o.seq, dg, len(pl), o.decision)
        new = (time.perf_counter() - t0) / n * 1e6
        assert fast.lines == cur_lines, "prototype lines differ from AuditLog's"
    print(json.dumps({"messages": n, "current_record_plus_append_us": round(cur, 2),
                      "prototype_us": round(new, 2), "identical_lines": True}))


if __name__ == "__main__":
    main()
