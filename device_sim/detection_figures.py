"""Detection and false-positive figures of ``gateway.detect`` against the simulator, without a broker.

    python -m device_sim.detection_figures [devices] [messages-per-device]

Honest payloads of every family (both streams) count false positives; each payload-level hostile
profile counts how many of its messages the matching detector names. Pure and deterministic.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from typing import Any

from device_sim.devices import PayloadFactory, make_fleet
from device_sim.firmware import Outgoing
from device_sim.hostile import PROFILES
from gateway.catalog import DEVICE_TYPES, ENVELOPE_FIELDS, schema_for
from gateway.detect import (
    SUBFIELD_PRECISION,
    device_id_suspicious,
    excess_precision,
    prohibited_field,
    scan_text_fields,
    strip_image_trailers,
)

NOW = 1_750_000_000_000


def _fields(p: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in p.items() if k not in ENVELOPE_FIELDS}


def _findings(device_type: str, msg: Outgoing) -> set[str]:
    schema = schema_for(device_type, msg.stream)
    assert schema is not None
    fields = _fields(msg.payload)
    found = {code for _, code in scan_text_fields(schema, fields)}
    if strip_image_trailers(schema, fields)[1]:
        found.add("detect.image_trailer")
    for name, value in fields.items():
        spec = schema.by_name.get(name)
        if spec is None:
            found.add(prohibited_field(name) or "guard.unknown_field")
        elif spec.kind == "float" and excess_precision(value, spec.precision):
            found.add("detect.low_bits")
        elif spec.kind == "records":
            for rec in value:
                p = SUBFIELD_PRECISION.get((name, "weight_kg"))
                if p and excess_precision(rec.get("weight_kg", 0.0), p):
                    found.add("detect.low_bits")
    dev = msg.topic.split("/")[3] if msg.topic.count("/") >= 4 else ""
    if device_id_suspicious(dev, DEVICE_TYPES[device_type].id_prefix):
        found.add("detect.topic_encoding")
    return found


def main(argv: list[str]) -> None:
    n_dev = int(argv[0]) if argv else 64
    per = int(argv[1]) if len(argv) > 1 else 300
    fleet = make_fleet(n_dev, seed=0)
    honest = 0
    fp: Counter[str] = Counter()
    for spec in fleet:
        f = PayloadFactory(spec, 3)
        for seq in range(1, per + 1):
            stream = "result" if seq % 2 else "status/health"
            msg = Outgoing(stream, seq, spec.topic(stream), f.make(stream, seq, NOW + seq * 1000))
            honest += 1
            fp.update(_findings(spec.device_type, msg))
    print(f"honest payloads: {honest}  false positives: {sum(fp.values())} {dict(fp)}")
    for name in ("free_text", "image_trailer", "low_bits", "topic_encoding", "covert_field", "prohibited_data"):
        total = caught = 0
        codes: Counter[str] = Counter()
        for spec in fleet:
            f = PayloadFactory(spec, 5)
            prof = PROFILES[name](spec, seed=5)
            for seq in range(1, per + 1):
                stream = "result" if seq % 2 else "status/health"
                msg = Outgoing(stream, seq, spec.topic(stream), f.make(stream, seq, NOW))
                for o in prof.shape(msg, random.Random(0)):
                    if not o.technique:
                        continue
                    total += 1
                    found = _findings(spec.device_type, o)
                    caught += bool(found)
                    codes.update(found)
        pct = 100.0 * caught / total if total else 0.0
        print(f"{name:16s} hostile messages: {total:6d}  named: {caught:6d} ({pct:6.2f} %)  {dict(codes)}")


if __name__ == "__main__":
    main(sys.argv[1:])
