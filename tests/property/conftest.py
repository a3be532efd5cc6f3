"""Hypothesis profiles for the property suite.

``ci`` (loaded by default) keeps the whole property suite well under a minute; ``long`` multiplies
every test's example budget by 100 for a soak run::

    pytest tests/property --hypothesis-profile=long

Deadlines are off: a slow example on a loaded machine is not a failure. Hangs are caught by the
per-input timeout of the fuzz harnesses (fuzz/) and by the explicit time bounds asserted here.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, **_COMMON)  # type: ignore[arg-type]
settings.register_profile("long", max_examples=10_000, **_COMMON)  # type: ignore[arg-type]
if settings.get_current_profile_name() == "default":  # an explicit --hypothesis-profile wins
    settings.load_profile("ci")


def examples(n: int) -> int:
    """``n`` examples under ``ci``, 100x that under ``long`` (tests set their own budget)."""
    return n * 100 if settings.get_current_profile_name() == "long" else n
