"""Compile the gateway's per-message core with mypyc (the compiler mypy and black ship with).

Everything else about the package is in pyproject.toml. The modules in ``gateway/_native.py``'s
``MODULES`` are the pure, typed code every message runs through (decode, guards, detectors, policy
decision, projection, sealing, the audit record); mypyc turns them into C extensions next to their
sources. The same sources stay importable as Python: where no C compiler is found, or
``EDGEWARD_PURE_PYTHON=1`` is set, the install carries on without the extensions and the gateway runs
the same code more slowly. The build records each source's SHA-256 in ``gateway/_native.json``, and
``gateway/__init__.py`` imports the Python sources instead of any extension whose source has changed
since (an edited checkout never runs stale compiled code).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "gateway"))
# the list lives with the guard that reads it
from _native import MANIFEST, MODULES, PURE_ENV, source_path  # noqa: E402

sys.path.pop(0)


class BuildNative(build_ext):
    """build_ext that records the compiled sources' digests, and falls back to pure Python."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers: install the pure-Python package
            self._fallback(exc)
            return
        in_place = self.inplace or getattr(self, "editable_mode", False)  # pip install -e: beside the sources
        out = HERE if in_place else Path(self.build_lib)
        digests = {m: hashlib.sha256(source_path(HERE, m).read_bytes()).hexdigest() for m in MODULES}
        manifest = out / "gateway" / MANIFEST
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n")

    @staticmethod
    def _fallback(exc: Exception) -> None:
        print(f"edgeward: the compiled core could not be built ({exc}); installing pure Python "
              "(same behaviour, slower: docs/scaling.md)", file=sys.stderr)


def _ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get(PURE_ENV) == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("edgeward: mypyc is not installed; installing pure Python", file=sys.stderr)
        return []
    try:
        return list(mypycify([str(source_path(Path("."), m)) for m in MODULES], opt_level="3"))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc refused a module: still installable
        print(f"edgeward: mypyc could not compile the core ({exc!r}); installing pure Python",
              file=sys.stderr)
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": BuildNative})
