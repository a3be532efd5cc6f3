"""Traffic samples: ``MessageFacts`` as JSON Lines, for ``policy diff --traffic`` and shadow runs.

One object per line, field values never included (facts carry names and classes only)::

    {"v": 1, "device_id": "xr-00001", "device_type": "xray_baggage", "vendor": "smiths-detection",
     "site": "AMS-T1", "topic": "site/AMS-T1/dev/xr-00001/result", "stream": "result", "size": 1234,
     "fields": [["bag_tag", "pii"], ["image", "image"]]}

The gateway records with ``TrafficWriter`` (or ``facts_to_json`` + its own file handling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from gateway.errors import ConfigError
from gateway.model import MessageFacts

__all__ = ["TRAFFIC_VERSION", "facts_to_json", "facts_from_json", "read_traffic", "write_traffic", "TrafficWriter"]

TRAFFIC_VERSION = 1
_STR_KEYS = ("device_id", "device_type", "vendor", "site", "topic", "stream")


def facts_to_json(f: MessageFacts) -> dict[str, Any]:
    return {
        "v": TRAFFIC_VERSION,
        "device_id": f.device_id,
        "device_type": f.device_type,
        "vendor": f.vendor,
        "site": f.site,
        "topic": f.topic,
        "stream": f.stream,
        "size": f.size,
        "fields": [[n, c] for n, c in f.fields],
    }


def facts_from_json(d: dict[str, Any]) -> MessageFacts:
    """The inverse of ``facts_to_json``; ValueError on anything malformed."""
    if not isinstance(d, dict):
        raise ValueError("a traffic record must be an object")
    if d.get("v", TRAFFIC_VERSION) != TRAFFIC_VERSION:
        raise ValueError(f"unsupported traffic record version {d.get('v')!r}")
    for k in _STR_KEYS:
        if not isinstance(d.get(k, ""), str):
            raise ValueError(f"{k} must be a string")
    size = d.get("size", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError("size must be a whole number >= 0")
    fields = d.get("fields", [])
    if not isinstance(fields, list) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in fields
    ):
        raise ValueError("fields must be a list of [name, class] pairs")
    g = d.get
    return MessageFacts(g("device_id", ""), g("device_type", ""), g("vendor", ""), g("site", ""),
                        g("topic", ""), g("stream", ""), size, tuple((n, c) for n, c in fields))


def read_traffic(path: str | os.PathLike[str]) -> Iterator[MessageFacts]:
    """Every record of a JSON Lines traffic file; ConfigError names the first bad line."""
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield facts_from_json(json.loads(line))
                except ValueError as exc:
                    raise ConfigError(f"{path}:{n}: not a traffic record: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read traffic file {path}: {exc}") from exc


def write_traffic(path: str | os.PathLike[str], facts: Iterable[MessageFacts]) -> int:
    with TrafficWriter(open(path, "w", encoding="utf-8")) as w:
        for f in facts:
            w.write(f)
        return w.count


class TrafficWriter:
    """Appends facts to an open text stream, one JSON object per line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.count = 0

    def write(self, f: MessageFacts) -> None:
        self.stream.write(json.dumps(facts_to_json(f), separators=(",", ":")) + "\n")
        self.count += 1

    def __enter__(self) -> TrafficWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()
