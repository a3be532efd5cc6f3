"""The compiled core (setup.py, gateway/_native.py): used when it matches its sources, never when stale.

Each check runs a fresh interpreter, because the choice is made once, when ``gateway`` is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gateway
from gateway import _native

REPO = Path(gateway.__file__).resolve().parent.parent
PROBE = ("import json, gateway._native as n, gateway.guards as g, gateway.pipeline as p; "
         "print(json.dumps({**n.status(), 'guards': g.__file__, 'pipeline': p.__file__}))")


def _probe(root: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", _native.PURE_ENV)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=root,
                         env={**clean, "PYTHONPATH": str(root), **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    result: dict[str, str] = json.loads(out.stdout)
    return result


def _copy_tree(tmp: Path) -> Path:
    """The package as installed here (sources, extensions, manifest, mypyc's shared library)."""
    root = tmp / "site"
    shutil.copytree(REPO / "gateway", root / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in REPO.glob("*__mypyc*"):
        shutil.copy2(lib, root / lib.name)
    return root


def test_the_installed_core_is_compiled_and_current() -> None:
    # `make test` installs first, and the install compiles: a build that silently fell back to pure
    # Python (or sources edited since) would lose the speed the benchmarks record.
    got = _probe(REPO)
    assert got["mode"] == "compiled", f"{got['why']}: run `make install` (setup.py compiles the core)"
    assert got["pipeline"].endswith(".so") and got["guards"].endswith(".so")
    digests = json.loads((REPO / "gateway" / _native.MANIFEST).read_text())["modules"]
    assert sorted(digests) == sorted(_native.MODULES)


def test_an_edited_source_is_run_from_source_with_every_other_compiled_module(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert _probe(root)["mode"] == "compiled"  # the copy is current
    guards = root / "gateway" / "guards.py"
    guards.write_text(guards.read_text() + "\n# edited after the build\n")
    got = _probe(root)
    assert got["mode"] == "pure" and "gateway.guards" in got["why"] and "reinstall" in got["why"]
    # all of them from source: a compiled pipeline would call the stale compiled guards directly
    assert got["guards"] == str(guards) and got["pipeline"] == str(root / "gateway" / "pipeline.py")


def test_a_missing_manifest_or_the_switch_runs_the_sources(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    got = _probe(root, **{_native.PURE_ENV: "1"})
    assert got["mode"] == "pure" and got["pipeline"].endswith("pipeline.py")
    (root / "gateway" / _native.MANIFEST).unlink()
    got = _probe(root)
    assert got["mode"] == "pure" and _native.MANIFEST in got["why"] and got["guards"].endswith("guards.py")


def test_the_pure_python_core_passes_the_core_unit_tests() -> None:
    # The same sources run uncompiled wherever the build could not compile them (or after an edit):
    # they must behave the same. ~5 s: the core's own unit tests, in a child with the switch on.
    files = ["test_codec.py", "test_guards.py", "test_detect.py", "test_dedupe.py", "test_pipeline.py",
             "test_model.py", "test_audit.py", "test_seqid.py", "test_recipient.py"]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *[str(REPO / "tests" / "unit" / f) for f in files]],
                         cwd=REPO, env={**clean, _native.PURE_ENV: "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout
