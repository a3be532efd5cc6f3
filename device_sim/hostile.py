"""Hostile firmware profiles: every exfiltration technique the gateway and the broker must stop.

Each profile is one technique (see ``docs/hostile-firmware.md``). It is built per device
(``Profile(spec, seed=..., **options)``), transforms the honest ``Outgoing`` message into what the
hostile firmware actually sends, and marks every hostile message with its ``technique`` and the exact
``secret`` bytes it tries to leak, so the ground truth says what was attempted and leak searches can
look for it. Techniques that are actions rather than payload shapes use the fleet's optional hooks
(``username``, ``will``, ``extra_subscriptions``, ``delay_before``, ``drops_connection``;
see ``device_sim.firmware``).

Everything here is deterministic: a secret, a variant and a victim are functions of
``(seed, device_id, technique, seq)``, never of the clock or of the fleet's shared generator, so a
unit test regenerates exactly what a run attempted. The ``rng`` argument of ``shape`` is unused on
purpose. Secrets are random-looking bytes (derived with SHA-256), so finding one downstream is never a
coincidence with honest data.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from device_sim.devices import DeviceSpec
from device_sim.firmware import Outgoing, Will
from gateway.catalog import DEVICE_TYPES, HEALTH_STREAM, RESULT_STREAM, StreamSchema
from gateway.errors import ConfigError

__all__ = [
    "HostileProfile",
    "CovertFields",
    "FreeTextSecrets",
    "LowBits",
    "ImageTrailer",
    "TopicEncoding",
    "ForeignNamespace",
    "DeadDrop",
    "SubscribeProbe",
    "Mqtt5Properties",
    "Burst",
    "SizeModulation",
    "TimingChannel",
    "Impersonation",
    "ProhibitedData",
    "SeqChannel",
    "seq_channel_decode",
    "PROFILES",
    "PAYLOAD_TECHNIQUES",
    "PROHIBITED_FIELDS",
    "SUBFIELD_PRECISION",
    "secret_forms",
    "lowbit_encode",
    "lowbit_decode",
    "make_profile",
]

# Floats inside records have no precision in the catalogue; the simulator produces them at 0.1 kg.
SUBFIELD_PRECISION: dict[tuple[str, str], float] = {("manifest", "weight_kg"): 0.1}

# Special-category attributes a hostile firmware adds to results (profile 13), name -> example values.
PROHIBITED_FIELDS: dict[str, tuple[Any, ...]] = {
    "ethnicity": ("north_african", "east_asian", "roma", "arab"),
    "religion": ("muslim", "jewish", "sikh", "hindu"),
    "fasting": (True,),
    "dietary_flag": ("halal_meal", "kosher_meal"),
    "prayer_room_visits": (2, 3, 5),
    "sexual_orientation": ("undisclosed_partner",),
}


def secret_forms(secret: bytes) -> list[bytes]:
    """Every encoding the profiles use to carry a secret: search a destination's bytes for each."""
    forms = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b64encode(secret, altchars=b"+-").rstrip(b"="),
        base64.b85encode(secret),
        base64.b32encode(secret).rstrip(b"="),
    ]
    return list(dict.fromkeys(f for f in forms if f))


def _digits(precision: float) -> int:
    return max(0, round(-math.log10(precision)))


def lowbit_encode(value: float, byte: int, precision: float, hi: float | None = None) -> float:
    """``value`` (already at ``precision``) with ``byte`` (1..255) hidden in three more decimal digits.

    The hidden offset is at most 0.255 of a step, so rounding to the precision gives the honest value
    back: only a gateway that quantises removes it."""
    step = byte * precision / 1000
    sign = -1.0 if hi is not None and value + step > hi else 1.0
    return round(value + sign * step, _digits(precision) + 3)


def lowbit_decode(value: float, precision: float) -> int:
    """The byte ``lowbit_encode`` hid in ``value`` (0 when the value sits exactly on its precision)."""
    residual = value - round(value / precision) * precision
    return round(abs(residual) / precision * 1000) % 256


class HostileProfile:
    """Base of the hostile profiles: honest identity, deterministic secrets, acts on every message.

    ``every`` makes the profile act on every n-th message only (the others go out honest), so a
    scenario can mix a technique thinly into normal traffic.
    """

    name: ClassVar[str] = ""
    technique: ClassVar[str] = ""

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"{self.name}: 'every' must be >= 1")
        self.spec = spec
        self.seed = seed
        self.every = every

    def client_id(self, spec: DeviceSpec) -> str:
        return spec.device_id

    def _secret(self, seq: int, n: int, salt: str = "") -> bytes:
        out = b""
        i = 0
        while len(out) < n:
            key = f"edgeward-sim/{self.seed}/{self.spec.device_id}/{self.technique}/{salt}/{seq}/{i}"
            out += hashlib.sha256(key.encode()).digest()
            i += 1
        return out[:n]

    def _variant(self, seq: int, variants: Sequence[str]) -> str:
        # Hash-chosen, not round-robin: results and health interleave, so seq parity would tie a
        # variant to a stream.
        return variants[int.from_bytes(self._secret(seq, 4, "variant"), "big") % len(variants)]

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        if msg.seq % self.every:
            return (msg,)
        return self._shape(msg)

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        return (msg,)

    def _mark(self, msg: Outgoing, secret: bytes, *tags: str, **changes: Any) -> Outgoing:
        return replace(msg, technique=self.technique, secret=secret, tags=(self.technique, *tags), **changes)

    def _schema(self, stream: str) -> StreamSchema:
        t = DEVICE_TYPES[self.spec.device_type]
        return t.result if stream == RESULT_STREAM else t.health

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.device_id!r})"


# ------------------------------------------------------------------------------- 1. covert fields


class CovertFields(HostileProfile):
    """Extra fields the catalogue does not have: a plain hex field, or an AES-GCM ciphertext under a
    sensor-like name (the vendor holds the key; the secret recorded is the ciphertext on the wire)."""

    name = technique = "covert_field"
    VARIANTS = ("plain", "encrypted_blob")

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        variant = self._variant(msg.seq, self.VARIANTS)
        if variant == "plain":
            secret = self._secret(msg.seq, 16)
            payload = {**msg.payload, "diag": secret.hex()}
        else:
            key = hashlib.sha256(f"vendor-key/{self.seed}".encode()).digest()
            plain = self._secret(msg.seq, 24, "plain")
            nonce = self._secret(msg.seq, 12, "nonce")
            secret = nonce + AESGCM(key).encrypt(nonce, plain, None)
            payload = {**msg.payload, "detector_noise_floor": secret}
        return (self._mark(msg, secret, variant, payload=payload),)


# ------------------------------------------------------------------------------- 2. free-text / id fields

_LIST_TEXT = ("detected_items", "substances", "anomaly_zones")


class FreeTextSecrets(HostileProfile):
    """Secrets in fields the catalogue allows: base64, hex or base85 in list items and manifest
    descriptions, uppercase hex in the serial number, base64 (``+-`` alphabet) in the firmware
    version. Only formats the field's pattern accepts, so the schema guard alone lets them through."""

    name = technique = "free_text"

    def _options(self, msg: Outgoing) -> list[str]:
        if msg.stream == HEALTH_STREAM:
            return ["serial_number:hex", "firmware_version:base64"]
        fields = msg.payload
        out = [f"{f}:{enc}" for f in _LIST_TEXT if f in fields for enc in ("base64", "hex", "base85")]
        if "manifest" in fields and fields["manifest"]:
            out += ["manifest.description:base85", "manifest.description:base64"]
        return out

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        options = self._options(msg)
        if not options:
            return (msg,)
        where, enc = self._variant(msg.seq, options).split(":")
        secret = self._secret(msg.seq, 16)
        payload = dict(msg.payload)
        if where == "serial_number":
            payload[where] = secret.hex().upper()  # 32 chars of [A-Z0-9], the pattern's maximum
        elif where == "firmware_version":
            payload[where] = base64.b64encode(secret, altchars=b"+-").rstrip(b"=").decode()
        else:
            text = {"base64": base64.b64encode(secret).decode(), "hex": secret.hex(),
                    "base85": base64.b85encode(secret).decode()}[enc]
            if where == "manifest.description":
                records = [dict(r) for r in payload["manifest"]]
                records[0]["description"] = text
                payload["manifest"] = records
            else:
                payload[where] = [*payload[where], text]
        return (self._mark(msg, secret, f"field:{where}", f"encoding:{enc}", payload=payload),)


# ------------------------------------------------------------------------------- 3. low bits in numbers


class LowBits(HostileProfile):
    """One byte per float field, hidden in three decimal digits below the sensor's precision
    (``lowbit_encode``). Catalogue floats, the health temperature, and manifest weights (records,
    whose floats have no precision in the catalogue) all carry it."""

    name = technique = "low_bits"

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        schema = self._schema(msg.stream)
        payload = dict(msg.payload)
        key = self._secret(msg.seq, 64)
        used: list[int] = []
        fields: list[str] = []

        def next_byte() -> int:
            b = key[len(used)] % 255 + 1  # never 0: a quantised value decodes to 0
            used.append(b)
            return b

        for spec in schema.fields:
            if spec.kind == "float" and spec.name in payload:
                payload[spec.name] = lowbit_encode(payload[spec.name], next_byte(), spec.precision, spec.hi)
                fields.append(spec.name)
            elif spec.kind == "records" and spec.name in payload:
                records = []
                for r in payload[spec.name]:
                    r = dict(r)
                    for sub, kind in spec.subfields:
                        p = SUBFIELD_PRECISION.get((spec.name, sub))
                        if kind == "float" and p is not None and len(used) < len(key):
                            r[sub] = lowbit_encode(r[sub], next_byte(), p)
                            fields.append(f"{spec.name}.{sub}")
                    records.append(r)
                payload[spec.name] = records
        if not used:
            return (msg,)
        where = "subfield" if any("." in f for f in fields) else "catalogue"
        return (self._mark(msg, bytes(used), f"where:{where}", f"field:{fields[0]}", payload=payload),)


# ------------------------------------------------------------------------------- 4. image trailer


class ImageTrailer(HostileProfile):
    """Bytes appended after an image's end-of-image marker (FF D9). Every second message the trailer
    itself ends in FF D9, to defeat a gateway that cuts at the *last* marker."""

    name = technique = "image_trailer"
    VARIANTS = ("after_eoi", "fake_eoi")

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        schema = self._schema(msg.stream)
        images = [f for f in schema.fields if f.kind == "bytes" and f.cls in ("image", "biometric")
                  and f.name != "face_template" and f.name in msg.payload]
        if not images:
            return (msg,)
        spec = images[0]
        variant = self._variant(msg.seq, self.VARIANTS)
        secret = self._secret(msg.seq, 32)
        trailer = secret + (b"\xff\xd9" if variant == "fake_eoi" else b"")
        data = msg.payload[spec.name] + trailer
        if len(data) > spec.max_len:
            return (msg,)
        payload = {**msg.payload, spec.name: data}
        return (self._mark(msg, secret, variant, f"field:{spec.name}", payload=payload),)


# ------------------------------------------------------------------------------- 5. topic / client id


class TopicEncoding(HostileProfile):
    """Data in the topic: an extra level, case changes in the device id, or a suffix on the device id
    (``xr-00001-<hex>``, which a registry glob ``xr-*`` still matches). Optionally data in the
    client id (default on) and the username (default off) as well."""

    name = technique = "topic_encoding"
    VARIANTS = ("extra_level", "case", "id_suffix")

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1, encode_client_id: bool = True,
                 encode_username: bool = False) -> None:
        super().__init__(spec, seed=seed, every=every)
        self.encode_client_id = encode_client_id
        self.encode_username = encode_username

    def identity_secret(self, spec: DeviceSpec) -> bytes | None:
        return self._secret(0, 8, "identity") if self.encode_client_id or self.encode_username else None

    def client_id(self, spec: DeviceSpec) -> str:
        if not self.encode_client_id:
            return spec.device_id
        return f"{spec.device_id}.{self._secret(0, 8, 'identity').hex()}"

    def username(self, spec: DeviceSpec) -> str | None:
        if not self.encode_username:
            return None
        return f"{spec.device_id}.{self._secret(0, 8, 'identity').hex()}"

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        variant = self._variant(msg.seq, self.VARIANTS)
        dev = self.spec.device_id
        if variant == "extra_level":
            secret = self._secret(msg.seq, 8)
            topic = f"{msg.topic}/{secret.hex()}"
        elif variant == "case":
            bits = self._secret(msg.seq, 1)[0]
            letters = [i for i, c in enumerate(dev) if c.isalpha()]
            chars = list(dev)
            for k, i in enumerate(letters):
                if bits >> k & 1:
                    chars[i] = chars[i].upper()
            if chars == list(dev):
                chars[letters[0]] = chars[letters[0]].upper()
            cased = "".join(chars)
            secret = cased.encode()  # the case pattern is the data; the cased id is how it would show
            topic = msg.topic.replace(f"/dev/{dev}/", f"/dev/{cased}/", 1)
        else:
            secret = self._secret(msg.seq, 4)
            topic = msg.topic.replace(f"/dev/{dev}/", f"/dev/{dev}-{secret.hex()}/", 1)
        return (self._mark(msg, secret, variant, topic=topic),)


# ------------------------------------------------------------------------------- 6. foreign namespaces


class ForeignNamespace(HostileProfile):
    """Publishing outside its own namespace, in addition to its honest message: a valid health report
    in another device's namespace (the secret in ``uptime_s``: integers are never quantised; the
    victim's vendor may have a maintenance uplink the attacker's vendor lacks), or raw bytes straight
    into the gateway's own uplink topics (``edgeward/out/...``), where destinations subscribe."""

    name = technique = "namespace"
    VARIANTS = ("other_device", "gateway_topic")

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1, victim: str = "") -> None:
        super().__init__(spec, seed=seed, every=every)
        self.victim = victim or ("xr-00001" if spec.device_id != "xr-00001" else "fg-00001")

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        variant = self._variant(msg.seq, self.VARIANTS)
        if variant == "other_device":
            secret = bytes([0x10 | self._secret(msg.seq, 1)[0] & 0x7F]) + self._secret(msg.seq, 3, "rest")
            health = dict(msg.payload) if msg.stream == HEALTH_STREAM else None
            if health is None:
                return (msg,)
            health["uptime_s"] = int.from_bytes(secret, "big")  # uint32: msgpack carries it as 4 raw bytes
            topic = f"site/{self.spec.site}/dev/{self.victim}/{HEALTH_STREAM}"
            extra = self._mark(msg, secret, variant, f"victim:{self.victim}", topic=topic, payload=health)
        else:
            secret = self._secret(msg.seq, 16)
            topic = f"edgeward/out/vendor_maintenance/{self.spec.device_id}/{msg.stream}"
            extra = self._mark(msg, secret, variant, topic=topic, raw=secret)
        return (msg, extra)


# ------------------------------------------------------------------------------- 7. dead drops


class DeadDrop(HostileProfile):
    """Retained messages and a retained will as dead drops: data left on the broker for whoever reads
    the topic later. The will is fired at the end of the run (MQTT 5 DISCONNECT reason 0x04)."""

    name = technique = "dead_drop"
    drops_connection = True

    def will(self, spec: DeviceSpec) -> Will:
        return Will(spec.topic(RESULT_STREAM) + "/lw", self._secret(0, 16, "will"), retain=True,
                    technique=self.technique, secret=self._secret(0, 16, "will"))

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        secret = self._secret(msg.seq, 16)
        drop = self._mark(msg, secret, "retained", raw=secret, retain=True)
        return (msg, drop)


# ------------------------------------------------------------------------------- 8. subscription probes


class SubscribeProbe(HostileProfile):
    """Subscribes to ``#``, ``$SYS/#``, every device's results and the gateway's uplink topics (the
    SUBACK reason codes and the number of messages delivered go into the ground truth)."""

    name = technique = "subscribe_probe"

    def extra_subscriptions(self, spec: DeviceSpec) -> Sequence[str]:
        return ("#", "$SYS/#", f"site/{spec.site}/dev/+/result", "edgeward/#")


# ------------------------------------------------------------------------------- 9. MQTT 5 properties


class Mqtt5Properties(HostileProfile):
    """Data in MQTT 5 publish properties: a user property, correlation data, a response topic or a
    content type. The payload stays honest."""

    name = technique = "mqtt5_properties"
    VARIANTS = ("user_property", "correlation_data", "response_topic", "content_type")

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        variant = self._variant(msg.seq, self.VARIANTS)
        secret = self._secret(msg.seq, 16)
        by_variant: dict[str, dict[str, Any]] = {
            "user_property": {"user_property": [("trace", base64.b64encode(secret).decode())]},
            "correlation_data": {"correlation_data": secret},
            "response_topic": {"response_topic": f"edgeward/out/{secret.hex()}"},
            "content_type": {"content_type": f"application/vnd.{secret.hex()}"},
        }
        props = by_variant[variant]
        return (self._mark(msg, secret, variant, properties=props),)


# ------------------------------------------------------------------------------- 10. size and volume


class Burst(HostileProfile):
    """Volume far beyond the type's normal traffic: each message followed by ``factor - 1`` copies
    (own sequence numbers: ``seq * 16 + i``), the copy count itself carrying nothing but volume."""

    name = technique = "burst"

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1, factor: int = 8) -> None:
        super().__init__(spec, seed=seed, every=every)
        if not 1 < factor <= 16:
            raise ConfigError("burst: factor must be in 2..16")
        self.factor = factor

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        # Every message gets the x16 sequence space, so sequence numbers stay increasing.
        base = replace(msg, seq=msg.seq * 16, payload={**msg.payload, "seq": msg.seq * 16})
        if msg.seq % self.every:
            return (base,)
        secret = self._secret(msg.seq, 1)
        out = [base]
        for i in range(1, self.factor):
            out.append(self._mark(base, secret, f"copy:{i}", seq=base.seq + i, payload={**base.payload,
                                                                                         "seq": base.seq + i}))
        return out


class SizeModulation(HostileProfile):
    """One byte per message in an image's length (``len % 256``), the image still ending in FF D9."""

    name = technique = "size_modulation"

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        schema = self._schema(msg.stream)
        f = next((s for s in schema.fields if s.kind == "bytes" and s.cls == "image" and s.name in msg.payload), None)
        if f is None:
            return (msg,)
        img: bytes = msg.payload[f.name]
        secret = self._secret(msg.seq, 1)
        cut = (len(img) - secret[0]) % 256
        data = img[: len(img) - 2 - cut] + b"\xff\xd9"
        return (self._mark(msg, secret, f"field:{f.name}", payload={**msg.payload, f.name: data}),)


# ------------------------------------------------------------------------------- 11. timing


class TimingChannel(HostileProfile):
    """One bit of ``secret`` in the delay before each message: ``unit_s`` for a 1, none for a 0."""

    name = technique = "timing"

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1, unit_s: float = 0.2,
                 secret_len: int = 4) -> None:
        super().__init__(spec, seed=seed, every=every)
        self.unit_s = unit_s
        self.secret = self._secret(0, secret_len)

    def bit(self, seq: int) -> int:
        i = (seq - 1) % (8 * len(self.secret))
        return self.secret[i // 8] >> (7 - i % 8) & 1

    def delay_before(self, seq: int) -> float:
        return self.unit_s * self.bit(seq)


# ------------------------------------------------------------------------------- 12. impersonation


class Impersonation(HostileProfile):
    """Connects with another device's client id (session takeover: the broker disconnects the
    victim). It still publishes in its own namespace; without certificate-bound identity it could
    publish in the victim's as well (see ``ForeignNamespace``)."""

    name = technique = "impersonation"

    def __init__(self, spec: DeviceSpec, *, seed: int = 0, every: int = 1, victim: str = "") -> None:
        super().__init__(spec, seed=seed, every=every)
        self.victim = victim or ("xr-00001" if spec.device_id != "xr-00001" else "fg-00001")

    def client_id(self, spec: DeviceSpec) -> str:
        return self.victim


# ------------------------------------------------------------------------------- 13. prohibited data


class ProhibitedData(HostileProfile):
    """Special-category attributes added to results: ethnicity, religion, or flags derived from
    behaviour (``fasting`` from dining records). The secret is the attribute's name: if the name
    reaches a destination, the attribute did."""

    name = technique = "prohibited_data"

    def _shape(self, msg: Outgoing) -> Sequence[Outgoing]:
        if msg.stream != RESULT_STREAM:
            return (msg,)
        names = list(PROHIBITED_FIELDS)
        field = self._variant(msg.seq, names)
        values = PROHIBITED_FIELDS[field]
        value = values[self._secret(msg.seq, 1)[0] % len(values)]
        return (self._mark(msg, field.encode(), f"field:{field}", payload={**msg.payload, field: value}),)


# ------------------------------------------------------------------------------- 14. sequence numbers


class SeqChannel(HostileProfile):
    """Two secret bytes in every message's sequence number: ``seq * 65536 + secret`` (still a valid,
    strictly increasing sequence, so no guard on the numbering can refuse it; the gaps carry the data).
    A destination reads the low 16 bits of the header's sequence."""

    name = technique = "seq_channel"

    def shape(self, msg: Outgoing, rng: random.Random) -> Sequence[Outgoing]:
        # Every message gets the x65536 sequence space, so sequence numbers stay increasing.
        base = msg.seq << 16
        if msg.seq % self.every:
            return (replace(msg, seq=base, payload={**msg.payload, "seq": base}),)
        secret = self._secret(msg.seq, 2)
        seq = base | int.from_bytes(secret, "big")
        return (self._mark(msg, secret, "header:seq", seq=seq, payload={**msg.payload, "seq": seq}),)


def seq_channel_decode(wire_seq: Any) -> bytes | None:
    """What a destination reads out of a header's sequence (``SeqChannel``): its low 16 bits. None for
    a sequence the gateway hid (16 opaque bytes: without the site's key they say nothing)."""
    if type(wire_seq) is int and wire_seq >= 0:
        return (wire_seq & 0xFFFF).to_bytes(2, "big")
    return None


# ------------------------------------------------------------------------------- registry

PROFILES: dict[str, type[HostileProfile]] = {
    p.name: p
    for p in (CovertFields, FreeTextSecrets, LowBits, ImageTrailer, TopicEncoding, ForeignNamespace, DeadDrop,
              SubscribeProbe, Mqtt5Properties, Burst, SizeModulation, TimingChannel, Impersonation, ProhibitedData,
              SeqChannel)
}

# The techniques that live in what is published (payload, topic, properties), not in connection actions.
PAYLOAD_TECHNIQUES: frozenset[str] = frozenset({
    "covert_field", "free_text", "low_bits", "image_trailer", "topic_encoding", "namespace",
    "mqtt5_properties", "prohibited_data", "size_modulation", "burst", "dead_drop", "seq_channel",
})


def make_profile(name: str, spec: DeviceSpec, *, seed: int = 0, **options: Any) -> HostileProfile:
    """The profile called ``name`` for one device; unknown names and options are a ``ConfigError``."""
    cls = PROFILES.get(name)
    if cls is None:
        raise ConfigError(f"unknown firmware profile {name!r}; known: honest, {', '.join(sorted(PROFILES))}")
    try:
        return cls(spec, seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(f"profile {name}: {exc}") from exc


def techniques(records: Iterable[Any]) -> set[str]:
    """The techniques present in ground-truth records (anything with a ``technique`` attribute)."""
    return {r.technique for r in records if getattr(r, "technique", "")}
