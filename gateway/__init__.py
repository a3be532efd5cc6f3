"""Edgeward's gateway. Its per-message core may be compiled (gateway._native says when it is used)."""

from pathlib import Path

from gateway import _native

_native.guard(Path(__file__).resolve().parent)
