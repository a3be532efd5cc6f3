"""Built-in guards: invariants no operator file can relax. They run before the policy.

Pure functions over decoded values: the topic is the device's identity (``site/<site>/dev/<id>/<stream>``),
the payload must match its stream's schema exactly (no unknown field, no missing field, every value of
its kind, length, pattern and bounds), floats are quantised to the sensor's declared precision so the
digits below it cannot carry a covert channel, and retained publishes are refused. Every failure is a
``RejectedMessage`` with a stable ``guard.*`` code whose detail names the field, never its value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from gateway.catalog import ENVELOPE_FIELDS, STREAMS, FieldSpec, StreamSchema
from gateway.detect import SUBFIELD_PRECISION, prohibited_field
from gateway.errors import RejectedMessage

__all__ = ["parse_topic", "check_payload", "MAX_LIST_STR", "Checked"]

MAX_LIST_STR = 64  # the longest string a list item may hold (detected items, substances, zones)
MAX_TS_SKEW_MS = 7 * 24 * 3600 * 1000  # device clocks may drift, but not by more than a week

Checked = tuple[dict[str, Any], int, int]  # (fields, seq, ts)


def parse_topic(topic: str, site: str) -> tuple[str, str]:
    """``site/<site>/dev/<device_id>/<stream>`` -> (device_id, stream)."""
    parts = topic.split("/", 4)
    if len(parts) != 5 or parts[0] != "site" or parts[2] != "dev" or not parts[3]:
        raise RejectedMessage("guard.topic", "topic outside the device namespace layout")
    if parts[1] != site:
        raise RejectedMessage("guard.topic_site", "topic names another site")
    if parts[4] not in STREAMS:
        raise RejectedMessage("guard.topic_stream", "unknown stream")
    return parts[3], parts[4]


def _bad(name: str, why: str) -> RejectedMessage:
    return RejectedMessage("guard.bad_value", f"field {name}: {why}")


def _scalar_checker(name: str, kind: str, spec: FieldSpec | None) -> Callable[[Any], Any]:
    max_len = spec.max_len if spec else MAX_LIST_STR
    pattern = re.compile(spec.pattern) if spec and spec.pattern else None
    lo = spec.lo if spec else None
    hi = spec.hi if spec else None
    ndigits = max(0, round(-math.log10(spec.precision))) if spec and spec.precision else None

    if kind == "str":

        def check_str(v: Any) -> Any:
            if type(v) is not str:
                raise _bad(name, "not a string")
            if len(v) > max_len:
                raise _bad(name, f"longer than {max_len}")
            if pattern is not None and pattern.fullmatch(v) is None:
                raise _bad(name, "does not match its format")
            return v

        return check_str
    if kind == "int":

        def check_int(v: Any) -> Any:
            if type(v) is not int:
                raise _bad(name, "not an integer")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise _bad(name, "out of range")
            return v

        return check_int
    if kind == "float":

        def check_float(v: Any) -> Any:
            t = type(v)
            if t is not float and t is not int:
                raise _bad(name, "not a number")
            if not math.isfinite(v):
                raise _bad(name, "not finite")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise _bad(name, "out of range")
            # Quantise: below the sensor's precision there is no signal, only room for a channel.
            return round(float(v), ndigits) if ndigits is not None else float(v)

        return check_float
    if kind == "bool":

        def check_bool(v: Any) -> Any:
            if type(v) is not bool:
                raise _bad(name, "not a boolean")
            return v

        return check_bool
    if kind == "bytes":

        def check_bytes(v: Any) -> Any:
            if type(v) is not bytes:
                raise _bad(name, "not binary")
            if len(v) > max_len:
                raise _bad(name, f"larger than {max_len} bytes")
            return v

        return check_bytes
    raise ValueError(f"no scalar checker for kind {kind}")


def _sub_spec(spec: FieldSpec, key: str, kind: str) -> FieldSpec | None:
    """A record subfield's own precision (a manifest's weight has one), so it is quantised too."""
    precision = SUBFIELD_PRECISION.get((spec.name, key)) if kind == "float" else None
    if precision is None:
        return None
    return FieldSpec(f"{spec.name}.{key}", spec.cls, "float", precision=precision)


def _field_checker(spec: FieldSpec) -> Callable[[Any], Any]:
    name = spec.name
    if spec.kind == "list":
        item = _scalar_checker(name, spec.item, None)
        limit = spec.max_len

        def check_list(v: Any) -> Any:
            if type(v) is not list:
                raise _bad(name, "not a list")
            if len(v) > limit:
                raise _bad(name, f"more than {limit} items")
            return [item(x) for x in v]

        return check_list
    if spec.kind == "records":
        subs = {
            k: _scalar_checker(f"{name}.{k}", kind, _sub_spec(spec, k, kind)) for k, kind in spec.subfields
        }
        keys = frozenset(subs)
        ordered = sorted(subs)  # records come out with sorted keys: canonical without a second pass
        limit = spec.max_len

        def check_records(v: Any) -> Any:
            if type(v) is not list:
                raise _bad(name, "not a list of records")
            if len(v) > limit:
                raise _bad(name, f"more than {limit} records")
            out = []
            for r in v:
                if type(r) is not dict or r.keys() != keys:
                    raise _bad(name, "record keys differ from the schema")
                out.append({k: subs[k](r[k]) for k in ordered})
            return out

        return check_records
    return _scalar_checker(name, spec.kind, spec)


@cache
def _compile(schema: StreamSchema) -> tuple[dict[str, Callable[[Any], Any]], frozenset[str]]:
    checkers = {f.name: _field_checker(f) for f in schema.fields}
    required = frozenset(f.name for f in schema.fields if f.required)
    return checkers, required


# By identity first: a schema is a frozen dataclass whose hash walks every field spec, on every
# message. The entry keeps its schema, so the id cannot be reused while it is here.
_BY_ID: dict[int, tuple[StreamSchema, dict[str, Callable[[Any], Any]], frozenset[str]]] = {}


def _compiled(schema: StreamSchema) -> tuple[dict[str, Callable[[Any], Any]], frozenset[str]]:
    hit = _BY_ID.get(id(schema))
    if hit is None or hit[0] is not schema:
        checkers, required = _compile(schema)
        if len(_BY_ID) >= 4096:
            _BY_ID.clear()
        hit = _BY_ID[id(schema)] = (schema, checkers, required)
    return hit[1], hit[2]


def check_payload(schema: StreamSchema, payload: dict[str, Any], *, now_ms: int) -> Checked:
    """Validate and normalise one decoded payload against its stream schema."""
    checkers, required = _compiled(schema)
    seq = payload.get("seq")
    ts = payload.get("ts")
    if type(seq) is not int or seq <= 0 or seq >= 2**63:
        raise RejectedMessage("guard.bad_envelope", "seq must be a positive integer")
    if type(ts) is not int or abs(ts - now_ms) > MAX_TS_SKEW_MS:
        raise RejectedMessage("guard.bad_timestamp", "ts missing or too far from the gateway clock")
    out: dict[str, Any] = {}
    for name, value in payload.items():
        if name in ENVELOPE_FIELDS:
            continue
        check = checkers.get(name)
        if check is None:
            # Special-category data (ethnicity, religion, inferred flags) is named as such.
            code = prohibited_field(name) or "guard.unknown_field"
            raise RejectedMessage(code, f"field {name[:64]!r} is not in the schema")
        out[name] = check(value)
    if not required <= out.keys():
        missing = sorted(required.difference(out))
        raise RejectedMessage("guard.missing_field", f"missing {', '.join(missing)}")
    return out, seq, ts
