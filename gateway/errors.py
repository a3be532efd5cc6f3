"""Edgeward's one exception tree.

Every error Edgeward raises on purpose is an ``EdgewardError``; third-party exceptions are translated
at the boundary (``raise ... from exc``) so callers catch one family::

    EdgewardError
    ├── RejectedMessage        a device message refused; carries a stable reason code (``code``)
    │   └── DecodeError        bytes that are not a well-formed payload within the limits
    ├── PolicyError            a policy that cannot go live; carries every Diagnostic at once
    ├── CryptoError            sealing/opening/keys failed (never says which byte or key material)
    │   └── KeyFileError       a key file missing, malformed, or readable by group/world
    ├── AuditError             the audit chain cannot be written or does not verify
    ├── BrokerError            the private Mosquitto could not be started or reached
    └── ConfigError            a site directory or command-line setting is unusable

Messages shown to a device (none, today: MQTT gives it only the PUBACK) are generic; the reason code
and the details go to the audit log. Nothing here ever carries a field value or a secret.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "EdgewardError",
    "RejectedMessage",
    "DecodeError",
    "PolicyError",
    "CryptoError",
    "KeyFileError",
    "AuditError",
    "BrokerError",
    "ConfigError",
]


class EdgewardError(Exception):
    """Base of every error Edgeward raises deliberately."""


class RejectedMessage(EdgewardError):
    """A device message refused before any destination saw it.

    ``code`` is a stable, machine-readable reason (``decode.too_large``, ``guard.unknown_field``...);
    ``detail`` is for the audit log and names fields or limits, never values.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


class DecodeError(RejectedMessage):
    """The payload is not MessagePack within the documented limits (see ``gateway.codec``)."""


class PolicyError(EdgewardError):
    """A policy failed to parse, validate or compile. ``diagnostics`` holds all of them, sorted."""

    def __init__(self, diagnostics: Sequence[object]) -> None:
        self.diagnostics = diagnostics
        first = str(diagnostics[0]) if diagnostics else "invalid policy"
        more = f" (+{len(diagnostics) - 1} more)" if len(diagnostics) > 1 else ""
        super().__init__(first + more)


class CryptoError(EdgewardError):
    """Encryption, decryption or key handling failed. Never carries key material."""


class KeyFileError(CryptoError):
    """A key file is missing, malformed, or has permissions wider than 0600."""


class AuditError(EdgewardError):
    """The audit log could not be written, or it does not verify."""


class StorageFull(EdgewardError):
    """A local write failed for lack of space; nothing was half-written, and the same write can be
    retried. The gateway stops taking messages until it succeeds."""


class BrokerError(EdgewardError):
    """The private Mosquitto could not be started, configured or reached."""


class ConfigError(EdgewardError):
    """A site directory, file or option is unusable."""
