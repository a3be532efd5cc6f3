"""Simulated screening devices: who they are (``DeviceSpec``, ``make_fleet``) and what they say
(``PayloadFactory``).

Everything here is pure and synchronous: no sockets, no clock. A payload is a function of
``(seed, device_id, stream, seq, ts)`` alone, so a run's ground truth can be regenerated and a unit
test can check every device type against ``gateway.catalog`` without a broker. This module must never
produce a payload the catalogue would reject: hostile behaviour belongs to firmware profiles
(``device_sim.firmware``), which transform these honest payloads and record what they did.

Images are synthetic but shaped like baseline JPEGs (SOI, an APP0/JFIF segment, SOS, entropy-coded
bytes, EOI). The entropy-coded part is sliced from one pre-generated pool that contains no 0xFF byte,
as real entropy-coded data never has an unstuffed 0xFF: the only FF D9 is the final one, so a gateway
that looks for bytes appended after the end-of-image marker does not flag honest images.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import msgpack

from gateway.catalog import DEVICE_TYPES, HEALTH_STREAM, RESULT_STREAM, DeviceType
from gateway.errors import ConfigError

__all__ = [
    "DeviceSpec",
    "PayloadFactory",
    "make_fleet",
    "encode",
    "image_bytes",
    "FLEET_WEIGHTS",
    "IMAGE_SIZES",
]


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device of the fleet: its id (also its MQTT client id), family and site."""

    device_id: str
    device_type: str
    site: str

    @property
    def kind(self) -> DeviceType:
        return DEVICE_TYPES[self.device_type]

    def topic(self, stream: str) -> str:
        return f"site/{self.site}/dev/{self.device_id}/{stream}"


# Share of each family in a site's fleet (an airport terminal with a cargo annex and a few mobile
# units): used to split n devices. Every family present gets at least one device when n allows.
FLEET_WEIGHTS: dict[str, float] = {
    "xray_baggage": 0.20,
    "cargo_scanner": 0.05,
    "body_scanner": 0.15,
    "trace_detector": 0.10,
    "face_egate": 0.20,
    "id_reader": 0.15,
    "temp_check": 0.10,
    "mobile_border": 0.05,
}


def make_fleet(
    n: int, *, site: str = "AMS-T1", seed: int = 0, types: list[str] | None = None
) -> list[DeviceSpec]:
    """``n`` devices over the device families (all of them, or ``types``), ids ``<prefix>-00001``.

    Composition and ids depend on ``n`` and ``types`` only (largest-remainder split of
    ``FLEET_WEIGHTS``, one device per family first, so every family is present when ``n`` is at least
    the number of families). ``seed`` only shuffles the list order, which is the connect order: families
    are interleaved either way so a partial connect is still a mixed fleet.
    """
    if n < 0:
        raise ConfigError(f"fleet size must be >= 0, got {n}")
    names = list(DEVICE_TYPES) if types is None else list(dict.fromkeys(types))
    unknown = [t for t in names if t not in DEVICE_TYPES]
    if unknown or not names:
        raise ConfigError(f"unknown device types {unknown}; known: {sorted(DEVICE_TYPES)}")
    counts = _split(n, names)
    if max(counts.values(), default=0) > 99_999:
        raise ConfigError("more than 99999 devices of one family do not fit the 5-digit id")
    # Interleave families round-robin so the first k devices of the list cover every family.
    by_type = {
        t: [DeviceSpec(f"{DEVICE_TYPES[t].id_prefix}-{i:05d}", t, site) for i in range(1, counts[t] + 1)]
        for t in names
    }
    fleet: list[DeviceSpec] = []
    for i in range(max(counts.values(), default=0)):
        fleet.extend(devs[i] for devs in by_type.values() if i < len(devs))
    if seed:
        random.Random(seed).shuffle(fleet)
    return fleet


def _split(n: int, names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    base = min(n, len(names))
    for t in names[:base]:
        counts[t] = 1
    rest = n - base
    if rest:
        total = sum(FLEET_WEIGHTS.get(t, 1.0) for t in names)
        shares = {t: rest * FLEET_WEIGHTS.get(t, 1.0) / total for t in names}
        for t in names:
            counts[t] += int(shares[t])
        left = n - sum(counts.values())
        for t in sorted(names, key=lambda t: (-(shares[t] - int(shares[t])), names.index(t)))[:left]:
            counts[t] += 1
    return counts


# ---------------------------------------------------------------------------------------------- images

# (min, mode, max) bytes per image field, before clamping to the field's max_len.
IMAGE_SIZES: dict[str, tuple[int, int, int]] = {
    "image": (50_000, 150_000, 500_000),
    "portrait": (15_000, 28_000, 50_000),
    "face_crop": (5_000, 12_000, 30_000),
}
FACE_TEMPLATE_LEN = 512

_POOL_LEN = 1 << 20  # larger than the largest image, so every size has many distinct offsets
_JPEG_HEAD = (
    b"\xff\xd8"  # SOI
    b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"  # APP0 / JFIF 1.1
    b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"  # SOS: entropy-coded data follows
)
_JPEG_TAIL = b"\xff\xd9"  # EOI
_pool: bytes | None = None


def _entropy_pool() -> bytes:
    global _pool
    if _pool is None:
        # Fixed seed: the pool is part of the simulator's definition, not of a run.
        raw = random.Random(0x5CA9).randbytes(_POOL_LEN)
        _pool = raw.translate(bytes(range(255)) + b"\xfe")  # no 0xFF: see the module docstring
    return _pool


def image_bytes(rng: random.Random, size: int) -> bytes:
    """A JPEG-shaped byte string of exactly ``size`` bytes (>= 64): cheap, one slice of the pool."""
    pool = _entropy_pool()
    body = size - len(_JPEG_HEAD) - len(_JPEG_TAIL)
    off = rng.randrange(0, _POOL_LEN - body)
    return b"".join((_JPEG_HEAD, pool[off : off + body], _JPEG_TAIL))


def _image_size(rng: random.Random, field: str, max_len: int) -> int:
    lo, mode, hi = IMAGE_SIZES[field]
    hi = min(hi, max_len)
    return int(rng.triangular(lo, hi, min(mode, hi)))


# ---------------------------------------------------------------------------------------------- payloads


def encode(payload: dict[str, Any]) -> bytes:
    """The wire form of a payload: one MessagePack map, bytes as bin, strings as str."""
    return msgpack.packb(payload, use_bin_type=True)


def _q(value: float, precision: float) -> float:
    """``value`` quantised to ``precision`` and clean in decimal (0.1, not 0.30000000000000004)."""
    digits = max(0, round(-math.log10(precision)))
    return round(round(value / precision) * precision, digits)


_VERDICTS = ("clear", "alarm", "manual_search")
_VERDICT_W = (0.86, 0.06, 0.08)
_BAG_ITEMS = ("laptop", "liquid_container", "lithium_battery", "knife", "aerosol", "power_bank",
              "scissors", "lighter", "tools", "dense_object")
_BODY_ZONES = ("head", "chest", "back", "abdomen", "groin", "left_arm", "right_arm", "left_leg",
               "right_leg", "left_ankle", "right_ankle", "waist")
_SUBSTANCES = ("RDX", "PETN", "TATP", "TNT", "NG", "AN", "HMX", "EGDN")
_CARGO_GOODS = (("847130", "portable computers"), ("851712", "mobile phones"), ("610910", "cotton t-shirts"),
                ("940360", "wooden furniture"), ("870899", "vehicle parts"), ("300490", "medicaments"),
                ("090111", "coffee beans"), ("392690", "plastic articles"), ("640399", "leather footwear"),
                ("220421", "wine in bottles"))
_COUNTRIES = ("NLD", "DEU", "FRA", "BEL", "GBR", "USA", "ESP", "ITA", "POL", "TUR", "IND", "CHN", "MAR",
              "NGA", "BRA", "CAN", "JPN", "SWE", "UKR", "EGY")
_SURNAMES = ("JANSEN", "DE VRIES", "MULLER", "SMITH", "GARCIA", "ROSSI", "NOWAK", "YILMAZ", "KUMAR",
             "WANG", "OKAFOR", "SILVA", "TANAKA", "BERG", "EL AMRANI")
_GIVEN = ("ANNA", "JAN", "MARIA", "PIETER", "SOPHIE", "LUCAS", "EMMA", "NOAH", "FATIMA", "WEI",
          "OLGA", "CHIDI", "YUKI", "LARS", "AMIR")
_FIRMWARE = {t: f"{2 + i}.{(i * 7) % 10}.{(i * 3) % 5}" for i, t in enumerate(DEVICE_TYPES)}
# A mobile unit patrols around one border crossing; the base point per device is derived from its id.
_MOBILE_BASE = (50.7536, 6.0206)  # near the NL/DE border at Vaals


class PayloadFactory:
    """Honest payloads for one device, valid against the catalogue.

    A payload is a pure function of ``(seed, device_id, stream, seq, ts)``: each message reseeds one
    shared ``random.Random`` from that key (about 5 us), so per-device state is a few strings and no
    generator state (10,000 devices x 2.5 KB of Mersenne-Twister state would be 25 MB), and a payload
    does not depend on how the device's two streams happened to interleave in time.
    """

    __slots__ = ("spec", "_key", "_uptime0_s", "_boot_s", "_dev_no")

    _rng = random.Random()  # shared, reseeded per message; the simulator is single-threaded

    def __init__(self, spec: DeviceSpec, seed: int = 0) -> None:
        self.spec = spec
        self._key = f"{seed}/{spec.device_id}"
        rng = self._seeded("boot", 0)
        self._uptime0_s = rng.randrange(3_600, 90 * 86_400)  # already up this long at its first message
        self._boot_s: int | None = None
        self._dev_no = int(spec.device_id.rsplit("-", 1)[-1]) if spec.device_id[-1].isdigit() else 0

    def _seeded(self, stream: str, seq: int) -> random.Random:
        rng = self._rng
        rng.seed(f"{self._key}/{stream}/{seq}")
        return rng

    @staticmethod
    def encode(payload: dict[str, Any]) -> bytes:
        return encode(payload)

    def make(self, stream: str, seq: int, ts: int) -> dict[str, Any]:
        if stream == RESULT_STREAM:
            return self.result(seq, ts)
        if stream == HEALTH_STREAM:
            return self.health(seq, ts)
        raise ConfigError(f"unknown stream {stream!r}")

    def health(self, seq: int, ts: int) -> dict[str, Any]:
        rng = self._seeded(HEALTH_STREAM, seq)
        prefix, _, num = self.spec.device_id.partition("-")
        errors: list[int] = []
        if rng.random() < 0.03:
            errors = sorted(rng.sample((1001, 1042, 2007, 3100, 4404, 5012), rng.randint(1, 2)))
        return {
            "seq": seq,
            "ts": ts,
            "serial_number": f"SN-{prefix.upper()}-{num}",
            "firmware_version": _FIRMWARE[self.spec.device_type],
            "uptime_s": self._uptime(ts),
            "internal_temp_c": _q(rng.gauss(42.0, 3.0), 0.1),
            "error_codes": errors,
        }

    def _uptime(self, ts: int) -> int:
        # The boot time is fixed by the first message, so uptime advances with the device clock.
        if self._boot_s is None:
            self._boot_s = ts // 1000 - self._uptime0_s
        return max(0, ts // 1000 - self._boot_s)

    def result(self, seq: int, ts: int) -> dict[str, Any]:
        rng = self._seeded(RESULT_STREAM, seq)
        body = getattr(self, f"_r_{self.spec.device_type}")(rng, ts)
        return {"seq": seq, "ts": ts, **body}

    # One method per family; each returns only the stream's fields.

    def _r_xray_baggage(self, rng: random.Random, ts: int) -> dict[str, Any]:
        verdict = rng.choices(_VERDICTS, _VERDICT_W)[0]
        items = [] if verdict == "clear" and rng.random() < 0.7 else rng.sample(_BAG_ITEMS, rng.randint(1, 4))
        return {
            "bag_tag": f"{rng.randrange(10**10):010d}",
            "image": image_bytes(rng, _image_size(rng, "image", _max_len(self.spec, "image"))),
            "verdict": verdict,
            "detected_items": items,
            "operator_id": f"OP{rng.randrange(10**5):05d}",
            "passenger_ref": f"PAX{rng.getrandbits(40):010X}",
        }

    def _r_cargo_scanner(self, rng: random.Random, ts: int) -> dict[str, Any]:
        manifest = []
        for _ in range(rng.randint(1, 12)):
            hs, desc = rng.choice(_CARGO_GOODS)
            manifest.append({"hs_code": hs, "description": desc, "weight_kg": _q(rng.uniform(5, 4_000), 0.1)})
        owner = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=3)) + "U"
        serial = f"{rng.randrange(10**6):06d}"
        plate = (f"{rng.choice('BGHJKLNPRSTVXZ')}{rng.choice('BDFGHJKLNPRSTVXZ')}-"
                 f"{rng.randrange(1000):03d}-{rng.choice('BDFGHJKLNPRSTVXZ')}")
        return {
            "container_id": owner + serial + str(_iso6346_check(owner + serial)),
            "manifest": manifest,
            "image": image_bytes(rng, _image_size(rng, "image", _max_len(self.spec, "image"))),
            "verdict": rng.choices(_VERDICTS, _VERDICT_W)[0],
            "driver_id": f"DRV{rng.randrange(10**8):08d}",
            "licence_plate": plate,
        }

    def _r_body_scanner(self, rng: random.Random, ts: int) -> dict[str, Any]:
        zones = rng.sample(_BODY_ZONES, rng.randint(1, 3)) if rng.random() < 0.12 else []
        return {"anomaly_zones": zones, "passenger_ref": f"PAX{rng.getrandbits(40):010X}"}

    def _r_trace_detector(self, rng: random.Random, ts: int) -> dict[str, Any]:
        found = rng.sample(_SUBSTANCES, rng.randint(1, 2)) if rng.random() < 0.02 else []
        return {"sample_id": f"S{rng.randrange(10**8):08d}", "substances": found, "alarm": bool(found)}

    def _r_face_egate(self, rng: random.Random, ts: int) -> dict[str, Any]:
        genuine = rng.random() < 0.97
        score = rng.betavariate(18, 2) if genuine else rng.betavariate(2, 8)
        return {
            "face_template": rng.randbytes(FACE_TEMPLATE_LEN),
            "match_score": _q(score, 0.001),
            "document_number": _doc_number(rng),
            "nationality": rng.choice(_COUNTRIES),
            "liveness": rng.random() < 0.995,
        }

    def _r_id_reader(self, rng: random.Random, ts: int) -> dict[str, Any]:
        doc = _doc_number(rng)
        nat = rng.choice(_COUNTRIES)
        year, month, day = rng.randint(1940, 2012), rng.randint(1, 12), rng.randint(1, 28)
        mrz = _td3_mrz(rng, doc, nat, year, month, day)
        return {
            "mrz": mrz,
            "document_number": doc,
            "date_of_birth": f"{year:04d}-{month:02d}-{day:02d}",
            "chip_auth": rng.choices(("pass", "fail", "absent"), (0.93, 0.01, 0.06))[0],
            "portrait": image_bytes(rng, _image_size(rng, "portrait", _max_len(self.spec, "portrait"))),
        }

    def _r_temp_check(self, rng: random.Random, ts: int) -> dict[str, Any]:
        temp = _q(min(44.9, max(25.0, rng.gauss(36.7, 0.45) + (1.8 if rng.random() < 0.01 else 0.0))), 0.1)
        return {
            "temperature_c": temp,
            "face_crop": image_bytes(rng, _image_size(rng, "face_crop", _max_len(self.spec, "face_crop"))),
            "alarm": temp >= 38.0,
        }

    def _r_mobile_border(self, rng: random.Random, ts: int) -> dict[str, Any]:
        # The unit moves slowly along a loop around its post (position is a function of ts, so it is
        # continuous between messages without per-device state), plus GPS noise of a few metres.
        phase = (ts / 1000.0) / 1800.0 * 2 * math.pi + self._dev_no
        lat = _MOBILE_BASE[0] + 0.01 * math.sin(phase) + rng.gauss(0, 0.00003) + 0.002 * (self._dev_no % 7)
        lon = _MOBILE_BASE[1] + 0.015 * math.cos(phase) + rng.gauss(0, 0.00003) + 0.002 * (self._dev_no % 5)
        return {
            "gps_lat": _q(lat, 0.00001),
            "gps_lon": _q(lon, 0.00001),
            "image": image_bytes(rng, _image_size(rng, "image", _max_len(self.spec, "image"))),
            "verdict": rng.choices(_VERDICTS, _VERDICT_W)[0],
        }


def _max_len(spec: DeviceSpec, name: str) -> int:
    return spec.kind.result.by_name[name].max_len


def _doc_number(rng: random.Random) -> str:
    return "".join(rng.choices("ABCDEFGHJKLMNPRSTUVWXYZ", k=2)) + "".join(rng.choices("0123456789", k=7))


def _mrz_value(c: str) -> int:
    if c.isdigit():
        return int(c)
    if c == "<":
        return 0
    return ord(c) - ord("A") + 10


def _mrz_check(s: str) -> int:
    return sum(_mrz_value(c) * (7, 3, 1)[i % 3] for i, c in enumerate(s)) % 10


def _td3_mrz(rng: random.Random, doc: str, nat: str, year: int, month: int, day: int) -> str:
    """A passport's two 44-character MRZ lines (ICAO 9303 TD3), concatenated, with valid check digits."""
    surname = rng.choice(_SURNAMES).replace(" ", "<")
    given = rng.choice(_GIVEN)
    line1 = f"P<{nat}{surname}<<{given}".ljust(44, "<")[:44]
    docf = doc.ljust(9, "<")[:9]
    dob = f"{year % 100:02d}{month:02d}{day:02d}"
    exp = f"{rng.randint(26, 35):02d}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    personal = "<" * 14
    parts = [docf, str(_mrz_check(docf)), nat, dob, str(_mrz_check(dob)), rng.choice("MF<"), exp,
             str(_mrz_check(exp)), personal, "0"]
    composite = docf + parts[1] + dob + parts[4] + exp + parts[7] + personal + parts[9]
    line2 = "".join(parts) + str(_mrz_check(composite))
    return line1 + line2


def _iso6346_check(code: str) -> int:
    """ISO 6346 container check digit (letters skip multiples of 11)."""
    values = {}
    v = 10
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        if v % 11 == 0:
            v += 1
        values[c] = v
        v += 1
    total = sum((values[c] if c.isalpha() else int(c)) * (1 << i) for i, c in enumerate(code))
    return total % 11 % 10
