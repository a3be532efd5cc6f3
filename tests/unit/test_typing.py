"""``mypy --strict`` on the shipped packages (configured in pyproject.toml, ``[tool.mypy]``), so a type
error fails the test run like any other regression.

mypy runs in this process from the repository root and keeps its cache in ``.mypy_cache`` there: the
first run checks everything (several seconds), later ones only what changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api  # a test dependency (pyproject.toml): `make test` installs it, never skipped

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # pyproject.toml's settings and the package paths are read from here
    out, err, status = api.run(["gateway", "device_sim"])
    assert status == 0, f"mypy reported (exit {status}):\n{out}{err}"
