"""The validated policy: what an operator's files mean, before any indexing.

These values are produced by ``validate`` and read by both evaluators: the compiled, indexed one
(``engine``) and the slow reference one (``reference``). Every rule carries its id (explicit ``id:``
or derived from its position) and its ``order``, its position in the merged policy, which is how
"the first matching rule" is defined everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "When",
    "DataClassSpec",
    "VendorSpec",
    "DeviceTypeSpec",
    "DeviceSpec",
    "DenySpec",
    "GrantSpec",
    "RuleSpec",
    "ObligationSpec",
    "DestinationSpec",
    "PolicySpec",
    "Mode",
]

Mode = Literal["remove", "deny"]


@dataclass(frozen=True, slots=True)
class When:
    """Conditions on the message; ``None`` means any. All given conditions must hold."""

    devices: tuple[str, ...] | None = None  # ids or globs
    device_types: frozenset[str] | None = None
    vendors: frozenset[str] | None = None
    streams: frozenset[str] | None = None
    topics: tuple[str, ...] | None = None  # MQTT filters, placeholders substituted

    @property
    def always(self) -> bool:
        return (
            self.devices is None
            and self.device_types is None
            and self.vendors is None
            and self.streams is None
            and self.topics is None
        )


ALWAYS = When()


@dataclass(frozen=True, slots=True)
class DataClassSpec:
    name: str
    vault_only: bool = False
    reside: frozenset[str] | None = None  # jurisdictions where it may rest; None = anywhere allowed


@dataclass(frozen=True, slots=True)
class VendorSpec:
    name: str
    maintenance_contract: bool = False


@dataclass(frozen=True, slots=True)
class DeviceTypeSpec:
    name: str
    rule_id: str
    order: int
    max_size: int | None = None


# The three per-device kinds below are NamedTuples, not dataclasses: a large site has one per device,
# and building thousands of frozen dataclasses would dominate compile time.
class DeviceSpec(NamedTuple):
    pattern: str  # an exact id or a glob
    device_type: str
    vendor: str
    maintenance: bool | None  # None: follow the vendor's contract
    rule_id: str
    order: int


class DenySpec(NamedTuple):
    pattern: str
    rule_id: str
    order: int


class GrantSpec(NamedTuple):
    rule_id: str
    order: int
    devices: tuple[str, ...] | None  # ids/globs; None = any device (subject to device_types)
    device_types: frozenset[str] | None
    topics: tuple[str, ...]  # filters; may hold {site} and {device}


@dataclass(frozen=True, slots=True)
class RuleSpec:
    rule_id: str
    order: int
    effect: Literal["permit", "forbid"]
    destinations: frozenset[str] | None  # None = every destination
    classes: frozenset[str] | None  # None = any class (never 'prohibited' for a permit: built in)
    fields: frozenset[str] | None  # None = any field name
    when: When

    @property
    def whole_route(self) -> bool:
        """A forbid without classes or fields forbids the whole message for its destinations."""
        return self.classes is None and self.fields is None


@dataclass(frozen=True, slots=True)
class ObligationSpec:
    rule_id: str
    order: int
    destination: str
    kind: Literal["remove", "quantize", "drop"]
    fields: frozenset[str] | None  # remove/drop: field names; None = by class only
    classes: frozenset[str] | None  # remove/drop: classes
    steps: tuple[tuple[str, float], ...]  # quantize: (field, step)
    when: When


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    name: str
    jurisdiction: str
    trust: str
    transport: Literal["vault", "mqtt"]
    topic: str
    rest_at_edge: bool
    recipient_key: str | None
    on_disallowed_field: Mode
    requires_contract: bool
    drop_when_empty: bool
    obligations: tuple[ObligationSpec, ...]
    retime_ms: int = 0  # uplink released in batches every retime_ms (0: at once)
    spool_max_mb: float = 256.0  # store-and-forward spool bound (rest_at_edge destinations)
    spool_when_full: str = "refuse_new"  # or "drop_oldest"
    bundle: int = 1  # envelopes per MQTT message at most (1: one each, on <topic>/<device>/<stream>)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    site: str
    jurisdiction: str
    allowed_jurisdictions: frozenset[str]
    require_registered: bool
    data_classes: dict[str, DataClassSpec]
    vendors: dict[str, VendorSpec]
    device_types: dict[str, DeviceTypeSpec]
    devices: tuple[DeviceSpec, ...]
    denylist: tuple[DenySpec, ...]
    grants: tuple[GrantSpec, ...]
    rules: tuple[RuleSpec, ...]
    destinations: tuple[DestinationSpec, ...]  # in declaration order: the order of Decision.routes
    rule_order: dict[str, int]  # every deciding rule id -> its order (builtins: negative; not registry entries)
