"""Verify every audit chain of a site: the single gateway's (``<site>/audit``) and, when the site ran
with ``--workers N``, each worker's (``<site>/worker-<i>/audit``), each against its signed
checkpoints and the operator's copy of what that chain published
(``.../audit/published-checkpoints.jsonl``).

Chains are independent (one writer each): the site verifies when every chain verifies. The totals
add records, checkpoints and confirmed published checkpoints over the chains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.audit.checkpoint import CheckpointVerifyResult, verify_with_checkpoints

__all__ = ["SiteVerifyResult", "site_chains", "verify_site"]


def _has_chain(audit_dir: Path) -> bool:
    return audit_dir.is_dir() and any(audit_dir.glob("audit-*.jsonl"))


def site_chains(root: Path) -> list[tuple[str, Path]]:
    """(name, state directory) of every chain in a site: ``site`` for ``<site>/audit`` (the single
    gateway), ``worker-<i>`` for each worker. The site's own directory is listed when it holds a chain
    or when no worker does (so an empty site reports "no audit files")."""
    root = Path(root)
    workers = []
    for p in root.glob("worker-*"):
        suffix = p.name[len("worker-"):]
        if p.is_dir() and suffix.isdigit() and _has_chain(p / "audit"):
            workers.append((int(suffix), p))
    out = [(f"worker-{i}", p) for i, p in sorted(workers)]
    if _has_chain(root / "audit") or not out:
        out.insert(0, ("site", root))
    return out


def _published(audit_dir: Path) -> list[dict[str, Any]]:
    path = audit_dir / "published-checkpoints.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@dataclass(frozen=True, slots=True)
class SiteVerifyResult:
    chains: dict[str, CheckpointVerifyResult]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains.values())

    @property
    def records(self) -> int:
        return sum(c.chain.records for c in self.chains.values())

    @property
    def checkpoints(self) -> int:
        return sum(c.checkpoints for c in self.chains.values())

    @property
    def published(self) -> int:
        return sum(c.published for c in self.chains.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chains": {name: c.to_json() for name, c in self.chains.items()},
            "total": {"chains": len(self.chains), "records": self.records, "checkpoints": self.checkpoints,
                      "published": self.published},
        }


def verify_site(root: Path, public_key: Any) -> SiteVerifyResult:
    """Every chain of the site (see ``site_chains``), each with its checkpoints and published copies."""
    out = {}
    for name, state in site_chains(root):
        audit = state / "audit"
        out[name] = verify_with_checkpoints(audit, public_key, published=_published(audit))
    return SiteVerifyResult(out)
