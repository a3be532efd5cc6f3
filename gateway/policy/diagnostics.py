"""Diagnostics: what the policy loader says about an operator's file.

A ``Diagnostic`` names a position (``file:line:col``, 1-based), a stable code, a message and a hint.
Every stage collects all of them before failing, so an operator fixes a file in one pass; they are
sorted by position so the output reads top to bottom. Codes are part of the interface (docs/policy.md
lists them) and never change meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Diagnostic", "Severity", "sort_diagnostics"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True, order=False)
class Diagnostic:
    file: str
    line: int
    col: int
    code: str
    message: str
    hint: str = ""
    severity: Severity = "error"

    def __str__(self) -> str:
        head = f"{self.file}:{self.line}:{self.col}: {self.code}: {self.message}"
        return f"{head}\n    hint: {self.hint}" if self.hint else head

    def sort_key(self) -> tuple[str, int, int, int, str, str]:
        return (self.file, self.line, self.col, 0 if self.severity == "error" else 1, self.code, self.message)

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "severity": self.severity,
        }


def sort_diagnostics(diags: list[Diagnostic]) -> list[Diagnostic]:
    """Sorted by position, errors before warnings at one position, duplicates removed."""
    seen: set[Diagnostic] = set()
    out = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out
