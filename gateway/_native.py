"""Which gateway modules are compiled (setup.py, mypyc), and the guard that never runs a stale one.

The install compiles ``MODULES`` into C extensions that sit next to their ``.py`` sources, and records
each source's SHA-256 in ``_native.json``. Python prefers an extension to a source of the same name,
so a checkout whose sources were edited after the install would run the old compiled code. Before
any of them is imported, ``gateway/__init__.py`` calls ``guard()``: when a source no longer matches
its digest, or the manifest is gone, or ``EDGEWARD_PURE_PYTHON=1`` is set, every compiled module is
imported from its source instead (all of them: compiled modules call each other directly, so a mix
of the two would still run the stale code). ``status()`` says which it is.

This file is imported by setup.py before the package exists: standard library only.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["MODULES", "MANIFEST", "source_path", "guard", "status"]

# The per-message core: the typed code every message runs through, from decode to the audit record
# (its only I/O: the audit, vault and data-key files' writes, through the standard library).
MODULES = (
    "gateway.codec",
    "gateway.guards",
    "gateway.detect",
    "gateway.dedupe",
    "gateway.model",
    "gateway.pipeline",
    "gateway.vault",
    "gateway.crypto.envelope",
    "gateway.crypto.seqid",
    "gateway.crypto.recipient",
    "gateway.audit.chain",
    "gateway.catalog",
    "gateway.errors",
    "gateway.crypto.keys",
    "gateway.policy.engine",
)
MANIFEST = "_native.json"
PURE_ENV = "EDGEWARD_PURE_PYTHON"

_state: dict[str, object] = {"mode": "pure", "why": "not guarded yet"}


def source_path(root: Path, module: str) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the listed modules from their ``.py`` files, whatever else lies beside them."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(name)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(name, file)


def _compiled_beside(root: Path, module: str) -> bool:
    src = source_path(root, module)
    return any(src.with_suffix(sfx).exists() for sfx in importlib.machinery.EXTENSION_SUFFIXES)


def guard(package_dir: Path) -> None:
    """Decide, once per process and before any listed module is imported, compiled or source."""
    root = package_dir.parent
    built = [m for m in MODULES if _compiled_beside(root, m)]
    if not built:
        _state.update(mode="pure", why="not compiled (no C extensions installed)")
        return
    why = ""
    if os.environ.get(PURE_ENV) == "1":
        why = f"{PURE_ENV}=1"
    else:
        try:
            digests = json.loads((package_dir / MANIFEST).read_text())["modules"]
        except (OSError, ValueError, KeyError, TypeError):
            digests = {}
            why = f"no readable {MANIFEST} beside the extensions"
        if not why:
            stale = [m for m in built
                     if digests.get(m) != hashlib.sha256(source_path(root, m).read_bytes()).hexdigest()]
            if stale:
                why = f"source changed since the build: {', '.join(stale)} (reinstall to recompile)"
    if why:
        sys.meta_path.insert(0, _SourceFirst({m: source_path(root, m) for m in MODULES}))
        _state.update(mode="pure", why=why)
    else:
        _state.update(mode="compiled", why=f"{len(built)} modules compiled by mypyc")


def status() -> dict[str, object]:
    """``{"mode": "compiled" | "pure", "why": ...}`` for this process."""
    return dict(_state)
