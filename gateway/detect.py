"""Detectors for hostile firmware: pure checks the guards and the pipeline call on decoded values.

Each detector answers with a stable reason code (``detect.*``) or ``None``; none of them raises for
anything a device can send, does I/O, reads a clock, or keeps more than a few numbers per device.
The codes name the technique, never the value: they go to the audit log as they are.

    free_text_suspicious(spec, value)   detect.charset | detect.hex | detect.base64 | detect.high_entropy
    scan_text_fields(schema, fields)    every (field, code) of a checked payload's strings
    strip_image_trailer(data)           (bytes up to the JPEG's true end-of-image, bytes cut)
    jpeg_end(data)                      where the image really ends, or None (detect.image_malformed)
    strip_image_trailers(schema, fields) (fields with every image cut, ((field, bytes cut), ...))
    prohibited_field(name)              detect.prohibited_class for special-category attribute names
    excess_precision(value, precision)  detect.low_bits for digits below the sensor's precision
    device_id_suspicious(id, prefix)    detect.topic_encoding for data in the device-id topic level
    RateBaseline.observe(...)           detect.burst | detect.volume against the type's normal traffic

Thresholds were chosen against the simulator's honest traffic (zero false positives over thousands of
payloads of every family, see ``tests/unit/test_detect.py``) and its hostile profiles
(``device_sim.hostile``); the figures are in ``docs/hostile-firmware.md``. A uniformly random id that
fits its catalogue pattern (a ``PAX`` reference, a bag tag) cannot be told from a secret by any
detector: there the pattern's capacity is the bound, and the catalogue keeps it small.
"""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.catalog import DEVICE_TYPES, FieldSpec, StreamSchema

__all__ = [
    "FREE_TEXT_MIN_TOKEN",
    "PROHIBITED_TERMS",
    "SUBFIELD_PRECISION",
    "free_text_suspicious",
    "scan_text_fields",
    "jpeg_end",
    "strip_image_trailer",
    "pad_image_length",
    "strip_image_trailers",
    "prohibited_field",
    "excess_precision",
    "device_id_suspicious",
    "RateBaseline",
]

# ------------------------------------------------------------------------------------------ free text

FREE_TEXT_MIN_TOKEN = 16  # shorter tokens carry too little to be worth a false positive
_HEX_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{16,}(?![0-9A-Za-z])")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_TOKEN_SPLIT = re.compile(r"\s+")
# Punctuation that identifiers and words rarely use; separators ('_', '-', '.', MRZ filler '<') are
# not counted, as ids and versions are full of them.
_SEPARATORS = frozenset("_-.<")
_SYMBOLS = frozenset("!\"#$%&'()*+,/:;=>?@[\\]^`{|}~")


def _classes(c: str) -> int:
    if c.isupper():
        return 0
    if c.islower():
        return 1
    if c.isdigit():
        return 2
    return 3


def _transitions(s: str) -> int:
    return sum(1 for a, b in zip(s, s[1:], strict=False) if _classes(a) != _classes(b))


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(k / n * math.log2(k / n) for k in Counter(s).values())


def free_text_suspicious(field_spec: FieldSpec, value: str) -> str | None:
    """Why ``value`` of ``field_spec`` looks like encoded data, or None.

    Checked in order: characters outside printable ASCII (``detect.charset``: zero-width and
    look-alike characters carry bits), a delimited run of 16+ hex digits with letters and digits
    (``detect.hex``), a run of 16+ base64 characters with both cases and the class changes of random
    text (``detect.base64``), and a token of 16+ characters whose empirical entropy or symbol count no
    identifier or word has (``detect.high_entropy``). Call it for str fields, list items (with the
    list's spec) and record subfields (with the records' spec).
    """
    if not value:
        return None
    if not value.isascii() or not value.isprintable():
        return "detect.charset"
    if len(value) < FREE_TEXT_MIN_TOKEN:
        return None
    for m in _HEX_RUN.finditer(value):
        run = m.group()
        if any(c.isdigit() for c in run) and any(c.isalpha() for c in run):
            return "detect.hex"
    for m in _B64_RUN.finditer(value):
        run = m.group().rstrip("=")
        if (len(run) >= FREE_TEXT_MIN_TOKEN and any(c.isupper() for c in run) and any(c.islower() for c in run)
                and _transitions(run) * 3 >= len(run)):
            return "detect.base64"
    for token in _TOKEN_SPLIT.split(value):
        if len(token) < FREE_TEXT_MIN_TOKEN:
            continue
        symbols = sum(1 for c in token if c in _SYMBOLS)
        classes = len({_classes(c) for c in token if c not in _SEPARATORS})
        # Random text over a large alphabet mixes upper, lower, digits and symbols with nearly
        # all-distinct characters (entropy close to log2(len)); words and identifiers use one or two
        # classes (``liquid_container``, ``AB1234567``) and few symbols.
        if (classes >= 3 and _entropy(token) >= math.log2(len(token)) - 0.8) or symbols >= 3:
            return "detect.high_entropy"
    return None


# What of a schema the detectors read, worked out once per schema (by identity: a schema's hash walks
# every field spec): its text fields, (name, spec, 0 str | 1 list of str | 2 records, str subfields),
# and its image fields. The entry keeps its schema, so the id cannot be reused while it is here.
_TextPlan = tuple[tuple[str, FieldSpec, int, tuple[str, ...]], ...]
_PLANS: dict[int, tuple[StreamSchema, _TextPlan, tuple[str, ...]]] = {}


def _plan(schema: StreamSchema) -> tuple[StreamSchema, _TextPlan, tuple[str, ...]]:
    hit = _PLANS.get(id(schema))
    if hit is None or hit[0] is not schema:
        text: list[tuple[str, FieldSpec, int, tuple[str, ...]]] = []
        for f in schema.fields:
            if f.kind == "str":
                text.append((f.name, f, 0, ()))
            elif f.kind == "list" and f.item == "str":
                text.append((f.name, f, 1, ()))
            elif f.kind == "records":
                subs = tuple(k for k, kind in f.subfields if kind == "str")
                if subs:
                    text.append((f.name, f, 2, subs))
        images = tuple(f.name for f in schema.fields if f.kind == "bytes" and f.cls in ("image", "biometric"))
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        hit = _PLANS[id(schema)] = (schema, tuple(text), images)
    return hit


def scan_text_fields(schema: StreamSchema, fields: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """Every ``(field, code)`` where a string of a checked payload looks like encoded data, in the
    order of ``fields``.

    Strings, items of string lists and string subfields of records (named ``manifest.description``)."""
    hits: list[tuple[str, str, str]] = []  # (field, what is named, code)
    get = fields.get
    for name, spec, mode, subs in _plan(schema)[1]:
        value = get(name)
        if value is None:
            continue
        if mode == 0:
            if isinstance(value, str):
                code = free_text_suspicious(spec, value)
                if code:
                    hits.append((name, name, code))
        elif not isinstance(value, list):
            continue
        elif mode == 1:
            for item in value:
                code = free_text_suspicious(spec, item) if isinstance(item, str) else None
                if code:
                    hits.append((name, name, code))
                    break
        else:
            for sub in subs:
                for rec in value:
                    v = rec.get(sub) if isinstance(rec, dict) else None
                    code = free_text_suspicious(spec, v) if isinstance(v, str) else None
                    if code:
                        hits.append((name, f"{name}.{sub}", code))
                        break
    if not hits:
        return ()
    if len(hits) > 1:
        order = {n: i for i, n in enumerate(fields)}
        hits.sort(key=lambda h: order[h[0]])  # stable: a record's subfields stay in schema order
    return tuple([(named, code) for _, named, code in hits])


# ------------------------------------------------------------------------------------------ images

_RST = range(0xD0, 0xD8)


def jpeg_end(data: bytes) -> int | None:
    """The offset just past the JPEG's true end-of-image marker, or None if ``data`` is not a JPEG
    whose segments parse up to an EOI.

    Walks the marker segments from SOI; inside entropy-coded data after SOS, ``FF 00`` (stuffing),
    ``FF D0..D7`` (restart) and fill ``FF`` bytes are data, any other marker ends the scan. So a
    trailer that carries its own ``FF D9`` is still cut at the first, real one."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return i + 2
        if marker in _RST or marker == 0x01:  # standalone markers
            i += 2
            continue
        if i + 4 > n:
            return None
        seg_end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if seg_end > n or seg_end < i + 4:
            return None
        if marker != 0xDA:
            i = seg_end
            continue
        j = seg_end  # entropy-coded data of this scan
        while True:
            j = data.find(b"\xff", j)
            if j < 0 or j + 1 >= n:
                return None
            nxt = data[j + 1]
            if nxt == 0x00 or nxt in _RST:
                j += 2
            elif nxt == 0xFF:
                j += 1
            else:
                break
        i = j
    return None


def strip_image_trailer(data: bytes) -> tuple[bytes, int]:
    """``data`` cut at the JPEG's true end (``jpeg_end``) and the number of bytes cut.

    Data that is not a parseable JPEG comes back whole with 0 cut: the caller should treat
    ``jpeg_end(data) is None`` as ``detect.image_malformed`` (reject), never forward it as an image."""
    end = jpeg_end(data)
    if end is None or end == len(data):
        return data, 0
    return data[:end], len(data) - end


IMAGE_SIZE_QUANTUM = 1024  # image lengths leave the gateway as multiples of this


def pad_image_length(data: bytes, quantum: int = IMAGE_SIZE_QUANTUM) -> bytes:
    """Round a JPEG's length up to a multiple of ``quantum`` with a zero-filled COM segment placed just
    before its end-of-image marker, so the exact length (a size-modulation channel) does not leave
    the site. The image decodes as before: COM segments carry no pixels."""
    if not data.endswith(b"\xff\xd9"):
        return data
    pad = (-len(data) - 4) % quantum  # a COM segment costs 4 bytes of header (marker + length)
    seg_len = pad + 2
    while seg_len > 0xFFFF:  # cannot happen with quantum <= 64 KiB; kept as a guard
        pad -= quantum
        seg_len = pad + 2
    # One copy of the image, not one per ``+`` (five of up to 500 KB each, ~15 % of an image's CPU).
    with memoryview(data) as mv:
        return b"".join((mv[:-2], b"\xff\xfe", seg_len.to_bytes(2, "big"), bytes(pad), b"\xff\xd9"))


def strip_image_trailers(
    schema: StreamSchema, fields: Mapping[str, Any]
) -> tuple[dict[str, Any], tuple[tuple[str, int], ...]]:
    """``fields`` with every image-class JPEG cut at its end-of-image (what was cut is returned) and
    its length rounded up to ``IMAGE_SIZE_QUANTUM``: a new dict when it holds a JPEG, else ``fields``
    itself (a dict) or a copy."""
    out: dict[str, Any] | None = None
    cut: list[tuple[str, int]] = []
    for name in _plan(schema)[2]:
        value = fields.get(name)
        if not isinstance(value, bytes) or not value.startswith(b"\xff\xd8"):
            continue  # absent, or not a JPEG (a face template): nothing to cut
        clean, n = strip_image_trailer(value)
        if n:
            cut.append((name, n))
        if out is None:
            out = dict(fields)
        out[name] = pad_image_length(clean)
    if out is None:
        return (fields if type(fields) is dict else dict(fields)), ()
    if len(cut) > 1:
        order = {n: i for i, n in enumerate(fields)}
        cut.sort(key=lambda c: order[c[0]])
    return out, tuple(cut)


# ------------------------------------------------------------------------------------------ prohibited

# Name parts of special-category data (GDPR art. 9) and of flags derived from it. A field whose name
# contains one is ``prohibited`` whatever the catalogue or a rule says.
PROHIBITED_TERMS: tuple[str, ...] = (
    "ethnic", "race", "racial", "religio", "faith", "belief", "creed", "caste",
    "fasting", "ramadan", "halal", "kosher", "dietary", "meal_pref", "prayer", "worship", "church",
    "mosque", "synagogue", "temple",
    "sexual", "orientation", "sex_life", "gender_identity", "transgender",
    "political", "party_member", "trade_union", "union_member",
    "disability", "pregnan", "hiv", "diagnosis", "genetic", "dna",
)
_PROHIBITED = re.compile("|".join(re.escape(t) for t in PROHIBITED_TERMS))
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def prohibited_field(name: str) -> str | None:
    """``detect.prohibited_class`` when a field name names special-category data, else None."""
    norm = _CAMEL.sub("_", name).lower().replace("-", "_").replace(" ", "_")
    return "detect.prohibited_class" if _PROHIBITED.search(norm) else None


# ------------------------------------------------------------------------------------------ numbers

# Floats inside records have no precision in the catalogue; these are the sensors' real resolutions.
SUBFIELD_PRECISION: dict[tuple[str, str], float] = {("manifest", "weight_kg"): 0.1}


def excess_precision(value: float, precision: float) -> str | None:
    """``detect.low_bits`` when ``value`` has digits below ``precision`` (a covert channel that
    quantising removes; detecting it says the firmware tried)."""
    if precision <= 0 or not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None
    residual = abs(value - round(value / precision) * precision)
    return "detect.low_bits" if residual > precision * 1e-4 else None


# ------------------------------------------------------------------------------------------ topics


def device_id_suspicious(device_id: str, id_prefix: str) -> str | None:
    """``detect.topic_encoding`` when the device-id level of a topic is not ``<prefix>-<digits>``.

    Registry globs (``xr-*``) accept ``xr-00001-9f3a...``; ids are lower-case prefixes and 1-8 digits,
    so suffixes, case changes and extra characters are data, not identity."""
    head, sep, num = device_id.partition("-")
    if not sep or head != id_prefix or not (1 <= len(num) <= 8) or not num.isdigit() or not num.isascii():
        return "detect.topic_encoding"
    return None


# ------------------------------------------------------------------------------------------ rate


@dataclass(slots=True)
class _Bucket:
    msgs: float
    bytes: float
    t: float


# Steady-state burst allowance: 30 s of the type's allowed rate (75 s of its normal traffic), at least
# 20 messages. Honest devices send 1/headroom of that rate, so the bucket stays full for them, and a
# device (or the network, or a starved gateway) that stalls for up to about a minute and then sends
# what it queued still fits; 10 s was measured too tight (benchmarks/honest_fp.py: 62 false
# positives in 258,648 messages after a CPU stall). An x8 burst is throttled within 5-30 s.
BURST_S = 30.0
MIN_BURST = 20
# Store-and-forward units send an outage's backlog at once: their burst covers an hour offline.
BURST_S_BY_TYPE: dict[str, float] = {"mobile_border": 3600.0}
# The gateway saw nothing from any device for this long: it (or its ingest) was down, and what comes
# next is every device's backlog. Each device is credited the gap (at most MAX_CATCH_UP_S) once.
OUTAGE_GAP_S = 10.0
MAX_CATCH_UP_S = 3600.0
CATCH_UP_WINDOW_S = 300.0  # devices first seen this long after an outage or catch_up() get the credit too


class RateBaseline:
    """Per-device message and byte budgets from the catalogue's normal traffic (token buckets).

    A device of type T may send ``headroom`` times its normal rate (``1 / result_interval_s`` results
    plus ``1 / health_interval_s`` health reports) with a burst of ``burst_s`` seconds of that rate
    (at least ``min_burst`` messages; ``burst_s_by_type`` gives store-and-forward units an hour, as
    a mobile unit's backlog after an outage is honest), and ``headroom`` times ``max_payload`` bytes
    per normal result interval. A message beyond the budget is reported (``detect.burst`` for the
    count, ``detect.volume`` for bytes) and not charged, so a device that slows down recovers.

    The allowance is tight (30 s of the allowed rate, was 120 s: an x8 burst is throttled within 5-30 s
    and then passes at most ``headroom`` x the normal rate). Backlogs the *gateway* causes are credited:
    when no device at all was seen for ``outage_gap_s`` (the gateway or its ingest was down), every
    device may send what it accumulated over the gap once (``catch_up``), and a restarted gateway
    that knows its downtime can call ``catch_up(seconds, now)`` itself. A credit above the burst is
    never clamped, only spent.

    Memory: three numbers per device, at most ``max_devices`` devices (least recently seen evicted).
    Time comes in as ``now`` (seconds, any monotonic origin).
    """

    __slots__ = ("_buckets", "_grace_from", "_grace_s", "_last_any", "_limits", "burst_s", "burst_s_by_type",
                 "headroom", "health_interval_s", "max_devices", "min_burst", "outage_gap_s")

    def __init__(self, *, headroom: float = 2.5, health_interval_s: float = 5.0, burst_s: float = BURST_S,
                 burst_s_by_type: Mapping[str, float] | None = None, min_burst: int = MIN_BURST,
                 max_devices: int = 100_000, outage_gap_s: float = OUTAGE_GAP_S) -> None:
        self.headroom = headroom
        self.health_interval_s = health_interval_s
        self.burst_s = burst_s
        self.burst_s_by_type = dict(burst_s_by_type) if burst_s_by_type is not None else dict(BURST_S_BY_TYPE)
        self.min_burst = min_burst
        self.max_devices = max_devices
        self.outage_gap_s = outage_gap_s
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._limits: dict[str, tuple[float, float, float, float]] = {}
        self._last_any: float | None = None
        self._grace_from = -math.inf  # devices last seen before this instant get the catch-up credit
        self._grace_s = 0.0

    def limits(self, device_type: str) -> tuple[float, float, float, float]:
        """(messages/s, message burst, bytes/s, byte burst) for a device type."""
        lim = self._limits.get(device_type)
        if lim is None:
            t = DEVICE_TYPES[device_type]
            burst_s = self.burst_s_by_type.get(device_type, self.burst_s)
            rate = self.headroom * (1.0 / t.result_interval_s + 1.0 / self.health_interval_s)
            burst = max(float(self.min_burst), rate * burst_s)
            byte_rate = self.headroom * t.max_payload / t.result_interval_s
            byte_burst = max(byte_rate * burst_s, 4.0 * t.max_payload)
            lim = self._limits[device_type] = (rate, burst, byte_rate, byte_burst)
        return lim

    def catch_up(self, seconds: float, now: float) -> None:
        """The gateway was not reading for ``seconds`` before ``now``: every device seen before now (and
        every device first seen from now on) may send that long's backlog once, on top of its burst."""
        self._grace_from = now
        self._grace_s = min(MAX_CATCH_UP_S, max(0.0, seconds))

    def observe(self, device: str, size: int, now: float, *, device_type: str) -> str | None:
        """Charge one message of ``size`` bytes; a code if it is beyond the type's budget."""
        if device_type not in DEVICE_TYPES:
            return None
        last = self._last_any
        if last is not None and now - last >= self.outage_gap_s:
            self.catch_up(now - last, now)
        self._last_any = now if last is None else max(last, now)
        rate, burst, byte_rate, byte_burst = self.limits(device_type)
        b = self._buckets.get(device)
        if b is None:
            # First seen while a backlog drains (a restarted gateway that called catch_up): same credit.
            extra = self._grace_s if now - self._grace_from < CATCH_UP_WINDOW_S else 0.0
            b = self._buckets[device] = _Bucket(burst + rate * extra, byte_burst + byte_rate * extra, now)
            if len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(device)
            dt = max(0.0, now - b.t)
            cap, byte_cap = burst, byte_burst
            if b.t < self._grace_from:  # its first message since the gateway's outage: the backlog's credit
                cap += rate * self._grace_s
                byte_cap += byte_rate * self._grace_s
            # Refill up to the cap; a credit already above it is kept until spent, never clamped.
            b.msgs = max(b.msgs, min(cap, b.msgs + dt * rate))
            b.bytes = max(b.bytes, min(byte_cap, b.bytes + dt * byte_rate))
            b.t = now
        if b.msgs < 1.0:
            return "detect.burst"
        if b.bytes < size:
            return "detect.volume"
        b.msgs -= 1.0
        b.bytes -= size
        return None

    def __len__(self) -> int:
        return len(self._buckets)
