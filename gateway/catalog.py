"""The device catalogue: every device family of a screening site, its streams and their payload schemas.

This is the vendor-interface contract, written once and shared: the gateway's guards check every
payload against it (unknown fields, kinds, lengths, precision), the policy engine reads each field's
data class from it, and the simulator generates payloads from it. It is data, not behaviour.

A payload is one MessagePack map. Every payload carries the envelope fields ``seq`` (per-device
increasing integer) and ``ts`` (milliseconds since the epoch, device clock); the rest are the stream's
fields. Topics are ``site/<site>/dev/<device_id>/<stream>`` where ``<stream>`` is ``result`` or
``status/health``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DATA_CLASSES",
    "ENVELOPE_FIELDS",
    "STREAMS",
    "Kind",
    "FieldSpec",
    "StreamSchema",
    "DeviceType",
    "DEVICE_TYPES",
    "HEALTH_STREAM",
    "RESULT_STREAM",
    "schema_for",
]

DATA_CLASSES: tuple[str, ...] = (
    "biometric",
    "pii",
    "health",
    "image",
    "manifest",
    "location",
    "verdict",
    "operational",
    "telemetry",
    "prohibited",
)

Kind = Literal["str", "int", "float", "bool", "bytes", "list", "records"]

RESULT_STREAM = "result"
HEALTH_STREAM = "status/health"
STREAMS: tuple[str, ...] = (RESULT_STREAM, HEALTH_STREAM)

# Envelope fields present in every payload; they are validated by the guards and never projected as data.
ENVELOPE_FIELDS: frozenset[str] = frozenset({"seq", "ts"})


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One payload field: its name, data class and shape.

    ``max_len`` bounds strings and bytes (bytes: images), or the item count of lists and records.
    ``precision`` is the sensor's real resolution for floats: values are quantised to it, so digits
    below it cannot carry anything. ``item`` is the kind of a list's items; ``subfields`` the keys of
    each record with their kinds. ``pattern`` is a regular expression a string must match in full.
    """

    name: str
    cls: str
    kind: Kind
    max_len: int = 0
    precision: float = 0.0
    item: Kind = "str"
    subfields: tuple[tuple[str, Kind], ...] = ()
    pattern: str = ""
    required: bool = True
    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True, slots=True)
class StreamSchema:
    stream: str
    fields: tuple[FieldSpec, ...]
    by_name: dict[str, FieldSpec] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {f.name: f for f in self.fields})


@dataclass(frozen=True, slots=True)
class DeviceType:
    """A device family: its id prefix in the sample registry, streams, and normal traffic."""

    name: str
    title: str
    id_prefix: str
    result: StreamSchema
    health: StreamSchema
    result_interval_s: float  # typical time between two results of one device
    max_payload: int  # bytes; the guard limit for this type's payloads


def _health() -> StreamSchema:
    return StreamSchema(
        HEALTH_STREAM,
        (
            FieldSpec("serial_number", "telemetry", "str", 32, pattern=r"[A-Z0-9-]{4,32}"),
            FieldSpec("firmware_version", "telemetry", "str", 32, pattern=r"[0-9A-Za-z.+-]{1,32}"),
            FieldSpec("uptime_s", "telemetry", "int", lo=0, hi=10**10),
            FieldSpec("internal_temp_c", "telemetry", "float", precision=0.1, lo=-40, hi=125),
            FieldSpec("error_codes", "telemetry", "list", 16, item="int"),
        ),
    )


_S = FieldSpec  # shorthand for the table below

DEVICE_TYPES: dict[str, DeviceType] = {
    t.name: t
    for t in (
        DeviceType(
            "xray_baggage",
            "baggage X-ray / CT",
            "xr",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("bag_tag", "pii", "str", 10, pattern=r"[0-9]{10}"),
                    _S("image", "image", "bytes", 600_000),
                    _S("verdict", "verdict", "str", 16, pattern=r"clear|alarm|manual_search"),
                    _S("detected_items", "verdict", "list", 16, item="str"),
                    _S("operator_id", "operational", "str", 16, pattern=r"OP[0-9]{4,8}"),
                    _S("passenger_ref", "pii", "str", 16, pattern=r"PAX[0-9A-F]{8,12}"),
                ),
            ),
            _health(),
            result_interval_s=6.0,
            max_payload=700_000,
        ),
        DeviceType(
            "cargo_scanner",
            "cargo / vehicle scanner",
            "cg",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("container_id", "manifest", "str", 11, pattern=r"[A-Z]{4}[0-9]{7}"),
                    _S(
                        "manifest",
                        "manifest",
                        "records",
                        64,
                        subfields=(("hs_code", "str"), ("description", "str"), ("weight_kg", "float")),
                    ),
                    _S("image", "image", "bytes", 600_000),
                    _S("verdict", "verdict", "str", 16, pattern=r"clear|alarm|manual_search"),
                    _S("driver_id", "pii", "str", 16, pattern=r"DRV[0-9]{6,10}"),
                    _S("licence_plate", "pii", "str", 10, pattern=r"[A-Z0-9-]{4,10}"),
                ),
            ),
            _health(),
            result_interval_s=30.0,
            max_payload=700_000,
        ),
        DeviceType(
            "body_scanner",
            "passenger body scanner",
            "bs",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("anomaly_zones", "verdict", "list", 12, item="str"),
                    _S("passenger_ref", "pii", "str", 16, pattern=r"PAX[0-9A-F]{8,12}"),
                ),
            ),
            _health(),
            result_interval_s=4.0,
            max_payload=4_096,
        ),
        DeviceType(
            "trace_detector",
            "explosive-trace detector",
            "et",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("sample_id", "operational", "str", 16, pattern=r"S[0-9]{6,10}"),
                    _S("substances", "verdict", "list", 8, item="str"),
                    _S("alarm", "verdict", "bool"),
                ),
            ),
            _health(),
            result_interval_s=10.0,
            max_payload=4_096,
        ),
        DeviceType(
            "face_egate",
            "face-recognition e-gate",
            "fg",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("face_template", "biometric", "bytes", 2_048),
                    _S("match_score", "verdict", "float", precision=0.001, lo=0, hi=1),
                    _S("document_number", "pii", "str", 12, pattern=r"[A-Z0-9]{6,12}"),
                    _S("nationality", "pii", "str", 3, pattern=r"[A-Z]{3}"),
                    _S("liveness", "verdict", "bool"),
                ),
            ),
            _health(),
            result_interval_s=3.0,
            max_payload=8_192,
        ),
        DeviceType(
            "id_reader",
            "ID / passport reader",
            "id",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("mrz", "pii", "str", 90, pattern=r"[A-Z0-9<]{60,90}"),
                    _S("document_number", "pii", "str", 12, pattern=r"[A-Z0-9]{6,12}"),
                    _S("date_of_birth", "pii", "str", 10, pattern=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"),
                    _S("chip_auth", "verdict", "str", 8, pattern=r"pass|fail|absent"),
                    _S("portrait", "biometric", "bytes", 60_000),
                ),
            ),
            _health(),
            result_interval_s=5.0,
            max_payload=70_000,
        ),
        DeviceType(
            "temp_check",
            "body-temperature check",
            "tc",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("temperature_c", "health", "float", precision=0.1, lo=25, hi=45),
                    _S("face_crop", "biometric", "bytes", 40_000),
                    _S("alarm", "health", "bool"),
                ),
            ),
            _health(),
            result_interval_s=2.0,
            max_payload=48_000,
        ),
        DeviceType(
            "mobile_border",
            "mobile border scanner",
            "mb",
            StreamSchema(
                RESULT_STREAM,
                (
                    _S("gps_lat", "location", "float", precision=0.00001, lo=-90, hi=90),
                    _S("gps_lon", "location", "float", precision=0.00001, lo=-180, hi=180),
                    _S("image", "image", "bytes", 600_000),
                    _S("verdict", "verdict", "str", 16, pattern=r"clear|alarm|manual_search"),
                ),
            ),
            _health(),
            result_interval_s=20.0,
            max_payload=700_000,
        ),
    )
}


def schema_for(device_type: str, stream: str) -> StreamSchema | None:
    """The schema of ``stream`` for ``device_type``, or None when either is unknown."""
    t = DEVICE_TYPES.get(device_type)
    if t is None:
        return None
    if stream == RESULT_STREAM:
        return t.result
    if stream == HEALTH_STREAM:
        return t.health
    return None
