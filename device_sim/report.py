"""The leak report: per technique, what hostile firmware tried and what reached any destination.

Measured, never claimed: every secret the simulator planted (ground truth) is searched for, in its raw,
hex and base64 forms, in everything each destination received after decryption — field values,
topics and device names — and low-bit channels are decoded from the delivered numbers. A message is
*detected* when the gateway's audit log holds a reason code or a cut for its exact bytes (matched by
payload digest), *neutralised* when nothing of its secret arrived anywhere.

Two channels carry no bytes, so no search can find them; they are decoded the way the destination
would, from what it observed:

- **Timing** (``TimingChannel``: a delay of ``unit_s`` before a message means 1). For each timing
  device, each off-site destination and each clock the destination has — its own arrival times
  (``Received.arrival``) and the device timestamps the envelope header carries (``ts``, ms) — the
  device's messages are taken in sequence order and each bit is decoded from the gap to the previous
  message (of any stream, and of the same stream: health reports come on a fixed schedule) with the
  *best* threshold (the one that agrees most with the truth bits: the adversary's
  best case), once plainly and once with the previous bit's delay added back (decision feedback
  with a genie: the delay before message i-1 also shortens gap i). The channel *leaks* for that
  device when the agreement is above chance with p < 0.01 after a Bonferroni correction over the
  decoders, clocks and destinations tried; p comes from a permutation test (the truth bits shuffled
  ``PERMUTATIONS`` times, the threshold re-optimised each time), which is the right null for a fitted
  threshold — a plain binomial test would call noise a leak. Bits recovered beyond chance: the
  capacity of the measured binary channel, ``n * (1 - h(error rate))``. Leaked = the timing attempts
  of leaking devices. Without any arrival or header time in the log (an old caller), the channel is
  *not measured* and, as before, counted leaked whenever a message reached an off-site destination.
- **Burst** (``Burst``: each message followed by copies, sequence numbers ``seq * 16 + i``). The
  channel is the volume: one symbol per burst group (the messages sharing ``seq // 16``), the number
  of messages in it (1..16, so at most 4 bits per group; the simulator always sends ``factor``). A
  destination recovers a group's symbol when it received exactly as many messages of the group as
  the device had acknowledged; a group the rate baseline cut short arrives with a count the gateway
  chose. Leaked = the copies of intact groups at an off-site destination. A rate limit only bounds
  this channel: a firmware that modulates its volume *within* the allowance (up to ``headroom`` x its
  normal rate) still gets ``log2(1 + messages allowed per period)`` bits per period through, and only
  constant-rate shaping of the uplink would close it.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
import math
import os
import random
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgpack

from device_sim.hostile import lowbit_decode, secret_forms, seq_channel_decode
from device_sim.truth import GroundTruth, SentRecord
from gateway.catalog import schema_for
from gateway.detect import SUBFIELD_PRECISION

__all__ = [
    "ALPHA",
    "ON_SITE",
    "PERMUTATIONS",
    "RUN_FILES",
    "Delivered",
    "TechniqueRow",
    "TimingDecode",
    "burst_groups",
    "decode_timing",
    "format_report",
    "leak_report",
    "load_run",
    "lowbits_in",
    "measure_run",
    "save_run",
    "timing_batch_sweep",
    "timing_channels",
]

ON_SITE = frozenset({"local_vault"})  # destinations inside the site: volume and timing there leak nothing
ALPHA = 0.01  # significance of a timing channel (after Bonferroni over the decoders tried)
PERMUTATIONS = 4999  # p down to 1/5000: enough for p < 0.01 after Bonferroni over up to 49 tests


@dataclass
class Delivered:
    """Everything the destinations received, decrypted."""

    by_msg: dict[tuple[str, int], list[tuple[str, str, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))
    corpus: bytearray = field(default_factory=bytearray)
    names: bytearray = field(default_factory=bytearray)
    # (device, destination) -> [(seq, arrival at the destination (monotonic s) or None, header ts (ms) or None,
    # stream)]
    times: dict[tuple[str, str], list[tuple[int, float | None, int | None, str]]] = field(
        default_factory=lambda: defaultdict(list))
    # (device, seq, destination) -> the header's sequence as that destination saw it, where it differs
    # from the device's (the gateway hides it: 16 opaque bytes, gateway.crypto.seqid)
    wire_seq: dict[tuple[str, int, str], Any] = field(default_factory=dict)

    def add(self, destination: str, device: str, stream: str, seq: int, fields: dict[str, Any], topic: str,
            *, arrival: float | None = None, ts: int | None = None, wire_seq: Any = None) -> None:
        self.by_msg[(device, seq)].append((destination, stream, fields))
        if wire_seq is not None and wire_seq != seq:
            self.wire_seq[(device, seq, destination)] = wire_seq
        self.corpus += msgpack.packb(fields, use_bin_type=True) + b"\0"
        self.names += f"{topic}\0{device}\0".encode()
        if arrival or ts is not None:
            self.times[(device, destination)].append((seq, arrival or None, ts, stream))

    def add_received(self, r: Any) -> None:
        """One ``gateway.runtime.receiver.Received`` (header, fields, arrival time)."""
        h = r.header
        self.add(h.destination, h.device, h.stream, h.seq, r.fields, r.topic, arrival=r.arrival or None, ts=h.ts,
                 wire_seq=getattr(r, "wire_seq", None))


@dataclass(frozen=True, slots=True)
class TechniqueRow:
    technique: str
    attempts: int  # hostile messages sent plus hostile actions (connects, subscriptions, wills...)
    detected: int  # hostile messages the gateway named (a reason code or a cut in the audit log)
    refused: int  # actions or publishes the broker refused (ACL, identity) before the gateway saw them
    neutralised: int
    leaked: int  # attempts with secret bytes found at any destination (timing, burst: decoded, see above)
    detail: dict[str, Any] = field(default_factory=dict)  # the decoder's figures (timing, burst)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"attempts": self.attempts, "detected": self.detected,
                               "refused_by_broker": self.refused, "neutralised": self.neutralised,
                               "leaked": self.leaked}
        if self.detail:
            out["measure"] = self.detail
        return out


def lowbits_in(fields: dict[str, Any], device_type: str, stream: str) -> bytes:
    """The bytes a low-bit channel would carry in these delivered numbers (one per float)."""
    schema = schema_for(device_type, stream)
    out = []
    for spec in schema.fields if schema else ():
        v = fields.get(spec.name)
        if v is None:
            continue
        if spec.kind == "float":
            out.append(lowbit_decode(v, spec.precision))
        elif spec.kind == "records":
            p = SUBFIELD_PRECISION.get((spec.name, "weight_kg"))
            for rec in v:
                if p is not None and "weight_kg" in rec:
                    out.append(lowbit_decode(rec["weight_kg"], p))
    return bytes(out)


_EXTERNAL_ONLY = frozenset({"burst", "timing"})


def _leaked(rec: SentRecord, got: Delivered) -> bool:
    secret = rec.secret or b""
    delivered = got.by_msg.get((rec.device_id, rec.seq), [])
    if rec.technique in _EXTERNAL_ONLY:
        # Unmeasured fallback: the channel leaks whenever such a message reaches an off-site destination.
        return any(dest not in ON_SITE for dest, _, _ in delivered)
    if not secret:
        return False
    if rec.technique == "seq_channel":  # read where the device put it: the header's sequence, as delivered
        return any(dest not in ON_SITE
                   and seq_channel_decode(got.wire_seq.get((rec.device_id, rec.seq, dest), rec.seq)) == secret
                   for dest, _, _ in delivered)
    if rec.technique == "size_modulation":
        return any(isinstance(v, bytes) and len(v) % 256 == secret[0]
                   for _, _, fields in delivered for v in fields.values())
    if rec.technique == "low_bits":
        return any(lowbits_in(f, rec.device_type, s) == secret for _, s, f in got.by_msg.get((rec.device_id, rec.seq), []))
    forms = secret_forms(secret)
    if any(f in got.names for f in forms):
        return True
    if rec.technique == "topic_encoding":
        return False  # topic data can only surface in topics and names (checked above)
    if len(secret) >= 8 and any(f in got.corpus for f in forms):
        return True
    if len(secret) < 4:
        return False  # too short to tell from chance in a payload
    return any(any(f in msgpack.packb(fields, use_bin_type=True) for f in forms) for _, _, fields in delivered)


# ------------------------------------------------------------------------------------------ timing


@dataclass(frozen=True, slots=True)
class TimingDecode:
    """The best threshold decoder's result on one (device, destination, clock, decoder)."""

    device: str
    destination: str
    clock: str  # "arrival" (the destination's own clock) or "header_ts" (the device timestamp it got)
    decoder: str  # "gap" or "gap+feedback"
    bits: int  # bits with a gap to decode (messages delivered after another one)
    agree: int  # decoded bits equal to the truth, with the best threshold
    threshold_s: float
    p_value: float  # permutation test, one-sided
    info_bits: float  # n * (1 - h(error rate)): bits recovered beyond chance

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "destination": self.destination, "clock": self.clock,
                "decoder": self.decoder, "bits": self.bits, "agree": self.agree,
                "threshold_s": round(self.threshold_s, 4), "p_value": round(self.p_value, 4),
                "info_bits": round(self.info_bits, 2)}


def _h2(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def _best_agreement(order: Sequence[int], cuts: Sequence[int], bits: Sequence[int]) -> tuple[int, int]:
    """Max over thresholds of #(bit 0 at or below it) + #(bit 1 above it), and the cut that gives it.

    ``order`` sorts the gaps ascending; ``cuts`` are the positions where a threshold can fall
    (between two *different* gap values: tied gaps cannot be told apart)."""
    ones_total = sum(bits)
    best, best_k = -1, 0
    zeros_below = ones_below = 0
    k = 0
    for cut in cuts:
        while k < cut:
            if bits[order[k]]:
                ones_below += 1
            else:
                zeros_below += 1
            k += 1
        score = zeros_below + ones_total - ones_below
        if score > best:
            best, best_k = score, cut
    return best, best_k


def decode_timing(gaps: Sequence[float], bits: Sequence[int], *, permutations: int = PERMUTATIONS,
                  seed: int = 0, stop_above: float = 1.0) -> tuple[int, float, float]:
    """(agreeing bits, threshold, p) of the best threshold decoder ``bit = gap > threshold``.

    p is a one-sided permutation test: the share of ``permutations`` shufflings of ``bits`` whose own
    best threshold agrees at least as well (plus one, over ``permutations + 1``). Once p is sure to
    exceed ``stop_above`` the test stops early and returns the estimate so far (above ``stop_above``)."""
    n = len(gaps)
    if n == 0:
        return 0, 0.0, 1.0
    order = sorted(range(n), key=gaps.__getitem__)
    cuts = [0] + [i for i in range(1, n) if gaps[order[i]] > gaps[order[i - 1]]] + [n]
    agree, k = _best_agreement(order, cuts, bits)
    if k == 0:
        thr = gaps[order[0]] - 1e-9
    elif k == n:
        thr = gaps[order[-1]]
    else:
        thr = (gaps[order[k - 1]] + gaps[order[k]]) / 2
    rng = random.Random(seed)
    shuffled = list(bits)
    at_least = 0
    limit = stop_above * (permutations + 1)
    for i in range(permutations):
        rng.shuffle(shuffled)
        if _best_agreement(order, cuts, shuffled)[0] >= agree:
            at_least += 1
            if at_least + 1 > limit:
                return agree, thr, (at_least + 1) / (i + 2)
    return agree, thr, (at_least + 1) / (permutations + 1)


def _truth_bits(truth: GroundTruth) -> tuple[dict[str, dict[int, int]], dict[str, float], dict[str, int]]:
    """device -> {seq: bit}, device -> unit_s, device -> attempts, from the ``timing`` actions."""
    bits: dict[str, dict[int, int]] = defaultdict(dict)
    unit: dict[str, float] = defaultdict(float)
    attempts: dict[str, int] = defaultdict(int)
    for a in truth.actions:
        if a.action != "timing":
            continue
        attempts[a.device_id] += 1
        try:
            delay = float(a.outcome.split(":", 1)[1])
        except (IndexError, ValueError):
            continue
        bits[a.device_id][a.seq] = int(delay > 0)
        unit[a.device_id] = max(unit[a.device_id], delay)
    return bits, unit, attempts


def _pairs(pts: Sequence[tuple[int, float, str]], *, by_stream: bool) -> list[tuple[int, int, float, float]]:
    """(seq before, seq, time before, time) of consecutive messages, over all or within each stream
    (a stream on a fixed schedule, like health reports, makes the gap far less noisy)."""
    if not by_stream:
        return [(a[0], b[0], a[1], b[1]) for a, b in itertools.pairwise(pts)]
    last: dict[str, tuple[int, float]] = {}
    out = []
    for seq, t, stream in pts:
        if stream in last:
            out.append((last[stream][0], seq, last[stream][1], t))
        last[stream] = (seq, t)
    return out


def timing_channels(truth: GroundTruth, got: Delivered, *, permutations: int = PERMUTATIONS,
                    alpha: float = ALPHA) -> dict[str, Any]:
    """Decode every timing device's channel at every off-site destination (see the module docstring).

    Returns ``{"measured": bool, "leaking": {device: best TimingDecode}, "decodes": [TimingDecode],
    "bits_sent": int, "attempts": {device: n}}``."""
    bits, unit, attempts = _truth_bits(truth)
    decodes: list[TimingDecode] = []
    measured = False
    per_device: dict[str, list[TimingDecode]] = defaultdict(list)
    for device, truth_bits in sorted(bits.items()):
        for (dev, dest), rows in sorted(got.times.items()):
            if dev != device or dest in ON_SITE:
                continue
            rows = sorted(rows)
            idx: Literal[1, 2]  # the row's arrival or header timestamp
            for clock, idx, scale in (("arrival", 1, 1.0), ("header_ts", 2, 0.001)):
                pts = [(row[0], tm * scale, row[3]) for row in rows if (tm := row[idx]) is not None]
                if len(pts) < 2:
                    continue
                measured = True
                for view in ("all", "stream"):
                    pairs = _pairs(pts, by_stream=view == "stream")
                    gaps = [(s0, s1, t1 - t0) for s0, s1, t0, t1 in pairs if s1 in truth_bits]
                    if not gaps:
                        continue
                    tb = [truth_bits[s1] for _, s1, _ in gaps]
                    for feedback in (False, True):
                        # feedback: the delay before the earlier message shortened this gap; add it back
                        g = [gap + (unit[device] * truth_bits.get(s0, 0) if feedback else 0.0)
                             for s0, _, gap in gaps]
                        decoder = ("gap" if view == "all" else "stream_gap") + ("+feedback" if feedback else "")
                        agree, thr, p = decode_timing(g, tb, permutations=permutations, stop_above=alpha,
                                                      seed=zlib.crc32(f"{device}/{dest}/{clock}/{decoder}".encode()))
                        n = len(g)
                        err = 1 - agree / n
                        d = TimingDecode(device, dest, clock, decoder, n, agree, thr, p,
                                         n * (1 - _h2(err)) if agree * 2 > n else 0.0)
                        decodes.append(d)
                        per_device[device].append(d)
    leaking: dict[str, TimingDecode] = {}
    for device, ds in per_device.items():
        tests = len(ds)
        best = min(ds, key=lambda d: (d.p_value, -d.info_bits))
        if best.p_value * tests < alpha:
            leaking[device] = best
    return {"measured": measured, "leaking": leaking, "decodes": decodes,
            "bits_sent": sum(attempts.values()), "attempts": dict(attempts)}


# ------------------------------------------------------------------------------------------ burst


def burst_groups(truth: GroundTruth, got: Delivered) -> dict[str, Any]:
    """Per burst group (device, seq // 16): messages acknowledged vs messages each off-site destination
    received. Returns ``{"groups": n, "intact": n, "cut": n, "leaked_seqs": {(device, seq)}, "bits": float}``."""
    burst_devices = {r.device_id for r in truth.sent_records if r.technique == "burst"}
    sent: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in truth.sent_records:
        if r.device_id in burst_devices:
            sent[(r.device_id, r.seq // 16)].append(r.seq)
    intact = cut = 0
    leaked: set[tuple[str, int]] = set()
    for (device, g), seqs in sent.items():
        if len(seqs) < 2:
            continue  # not a burst group (the copies were refused by the broker or never sent)
        counts: dict[str, int] = defaultdict(int)
        for s in seqs:
            for dest, _, _ in got.by_msg.get((device, s), []):
                if dest not in ON_SITE:
                    counts[dest] += 1
        if any(n == len(seqs) for n in counts.values()):
            intact += 1
            leaked.update((device, s) for s in seqs)
        else:
            cut += 1
    groups = intact + cut
    return {"groups": groups, "intact": intact, "cut": cut, "leaked_seqs": leaked,
            "bits_capacity": 4 * intact}  # a count of 1..16 per intact group


# ------------------------------------------------------------------------------------------ report


def leak_report(truth: GroundTruth, got: Delivered, audit_records: Iterable[dict[str, Any]],
                *, permutations: int = PERMUTATIONS) -> list[TechniqueRow]:
    flagged: set[str] = set()
    for r in audit_records:
        if "digest" in r and ("reason" in r or "trailer_cut" in r):
            flagged.add(r["digest"])
    timing = timing_channels(truth, got, permutations=permutations)
    burst = burst_groups(truth, got)
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for rec in truth.sent_records:
        if not rec.technique:
            continue
        row = rows[rec.technique]
        row[0] += 1
        leaked = (rec.device_id, rec.seq) in burst["leaked_seqs"] if rec.technique == "burst" else _leaked(rec, got)
        row[1] += rec.sha256 in flagged
        row[3] += not leaked
        row[4] += leaked
    for frec in truth.failed:
        if getattr(frec, "technique", ""):
            row = rows[frec.technique]
            row[0] += 1
            row[2] += 1
            row[3] += 1
    for a in truth.actions:
        if a.action == "publish":
            continue  # counted with the sent/failed records above
        row = rows[a.technique]
        row[0] += 1
        if a.action == "timing":  # the bit rides in the delay before message `seq`
            if timing["measured"]:
                leaked = a.device_id in timing["leaking"]
            else:
                leaked = any(dest not in ON_SITE for dest, _, _ in got.by_msg.get((a.device_id, a.seq), []))
            row[3] += not leaked
            row[4] += leaked
            continue
        refused = a.outcome.startswith(("puback:135", "suback:135", "connack:1", "failed", "retrievable:no",
                                        "received:0"))
        leaked = bool(a.secret) and any(f in got.names or f in got.corpus for f in secret_forms(a.secret or b""))
        row[2] += refused
        row[3] += not leaked
        row[4] += leaked
    details: dict[str, dict[str, Any]] = {}
    if "timing" in rows:
        best: dict[str, TimingDecode] = {}
        for d in timing["decodes"]:
            if d.device not in best or (d.p_value, -d.info_bits) < (best[d.device].p_value, -best[d.device].info_bits):
                best[d.device] = d
        details["timing"] = {
            "measured": timing["measured"],
            "bits_sent": timing["bits_sent"],
            "bits_recovered": round(sum(d.info_bits for d in timing["leaking"].values()), 1),
            "devices": len(timing["attempts"]),
            "leaking_devices": sorted(timing["leaking"]),
            "best_decoder": [d.to_json() for d in best.values()],
            "test": f"permutation test ({permutations}), p < {ALPHA} after Bonferroni",
        }
    if "burst" in rows:
        details["burst"] = {"groups": burst["groups"], "intact_at_destination": burst["intact"],
                            "cut_by_gateway": burst["cut"], "bits_capacity": burst["bits_capacity"]}
    return [TechniqueRow(t, v[0], v[1], v[2], v[3], v[4], detail=details.get(t, {}))
            for t, v in sorted(rows.items())]


# ------------------------------------------------------------------------------------------ batching


def timing_batch_sweep(periods: Sequence[float], *, unit_s: float = 0.25, result_interval_s: float = 6.0,
                       rate_scale: float = 4.0, health_interval_s: float = 5.0, seconds: float = 30.0,
                       runs: int = 20, permutations: int = 999, seed: int = 0,
                       jitter: bool = False) -> list[dict[str, Any]]:
    """What the destination's arrival-time decoder gets when the gateway releases each destination's
    envelopes only at multiples of ``period`` (0: immediately), for one timing device on the
    simulator's schedule (results every ``result_interval_s / rate_scale`` x U(0.5, 1.5), health
    every ``health_interval_s``, a ``unit_s`` delay before each 1 bit, a 32-bit secret repeated).

    Per period: over ``runs`` simulated runs of ``seconds``, the share of runs in which the channel is
    found (p < ALPHA) and the mean agreement and information bits. Device timestamps are assumed
    quantised or removed too; with them intact no batching helps (they carry the send time).
    ``jitter``: each batch lasts U(0.5, 1.5) x ``period`` (drawn by the gateway, unknown to devices),
    so batch boundaries cannot phase-lock with a device's fixed reporting schedule."""
    out = []
    for period in periods:
        found = 0
        agree_sum = info_sum = n_sum = 0.0
        for run in range(runs):
            rng = random.Random(seed * 1_000_003 + run)
            secret = [rng.getrandbits(1) for _ in range(32)]
            made: list[tuple[float, str]] = []
            t = rng.uniform(0, result_interval_s / rate_scale)
            while t < seconds:
                made.append((t, "result"))
                t += result_interval_s / rate_scale * rng.uniform(0.5, 1.5)
            t = rng.uniform(0, health_interval_s)
            while t < seconds:
                made.append((t, "health"))
                t += health_interval_s
            made.sort()
            phase = rng.uniform(0, period) if period else 0.0
            bounds: list[float] = []
            if period:
                b = phase
                while b < seconds + 10 * period:
                    bounds.append(b)
                    b += period * (rng.uniform(0.5, 1.5) if jitter else 1.0)
            prev = 0.0
            pts, bits = [], {}
            for i, (tm, stream) in enumerate(made, 1):
                bit = bits[i] = secret[i % 32]
                send = max(tm, prev) + unit_s * bit
                prev = send + 0.004  # publish and PUBACK
                at = send + rng.uniform(0.001, 0.004)  # device -> gateway -> destination
                if period:
                    at = bounds[bisect.bisect_left(bounds, at)]  # released at the next batch boundary
                pts.append((i, at, stream))
            best_p, best = 2.0, (0, 0)
            tests = 0
            for by_stream in (False, True):
                pairs = _pairs(pts, by_stream=by_stream)
                tb = [bits[s1] for _, s1, _, _ in pairs]
                for fb in (False, True):
                    g = [t1 - t0 + (unit_s * bits[s0] if fb else 0.0) for s0, _, t0, t1 in pairs]
                    agree, _, p = decode_timing(g, tb, permutations=permutations, seed=run)
                    tests += 1
                    if (p, -agree) < (best_p, -best[0]):
                        best_p, best = p, (agree, len(g))
            if best_p * tests < ALPHA:
                found += 1
            n = best[1] or 1
            agree_sum += best[0] / n if n else 0.5
            e = 1 - best[0] / n if n else 0.5
            info_sum += n * (1 - _h2(e)) if best[0] * 2 > n else 0.0
            n_sum += n
        out.append({"period_s": period, "bits_per_run": round(n_sum / runs, 1), "found_share": found / runs,
                    "mean_agreement": round(agree_sum / runs, 3), "mean_info_bits": round(info_sum / runs, 2)})
    return out


def format_report(rows: list[TechniqueRow]) -> str:
    head = f"  {'technique':22} {'attempts':>8} {'detected':>8} {'refused':>8} {'neutralised':>11} {'leaked':>6}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        lines.append(f"  {r.technique:22} {r.attempts:>8} {r.detected:>8} {r.refused:>8} {r.neutralised:>11} {r.leaked:>6}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ saved runs

# A run directory: what ``edgeward report`` reads. Test artefacts of the *simulated* destinations:
# ``received.jsonl`` holds exactly what each destination (and the on-site vault) decrypted, no more;
# ``truth.jsonl`` holds the secrets the simulator planted. Both are written 0600 in a 0700 directory.
RUN_FILES = {"truth": "truth.jsonl", "received": "received.jsonl", "detections": "detections.jsonl",
             "meta": "meta.json"}


def _private_writer(path: Path) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "w", encoding="utf-8")


def save_run(directory: str | Path, truth: GroundTruth, received: Iterable[Any],
             vault: Iterable[tuple[Any, dict[str, Any]]] = (), audit_records: Iterable[dict[str, Any]] = (),
             meta: dict[str, Any] | None = None) -> Path:
    """Save a run for ``edgeward report``: the ground truth, every envelope the destinations received
    (``Received``: header, decrypted fields, arrival time) and the vault's (``(header, fields)``), and
    the audit log's detections (digest and reason code only). Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    truth_path = d / RUN_FILES["truth"]
    with _private_writer(truth_path):
        pass  # created 0600 before any secret is written into it
    truth.to_jsonl(truth_path)
    with _private_writer(d / RUN_FILES["received"]) as f:
        for r in received:
            h = r.header
            wire = getattr(r, "wire_seq", None)
            f.write(json.dumps({"destination": h.destination, "device": h.device, "stream": h.stream,
                                "seq": h.seq, "ts": h.ts, "topic": r.topic, "arrival": r.arrival or None,
                                "wire_seq": wire.hex() if isinstance(wire, bytes) else wire,
                                "fields": base64.b64encode(msgpack.packb(r.fields, use_bin_type=True)).decode()})
                    + "\n")
        for h, fields in vault:
            f.write(json.dumps({"destination": h.destination, "device": h.device, "stream": h.stream,
                                "seq": h.seq, "ts": h.ts, "topic": "", "arrival": None,
                                "fields": base64.b64encode(msgpack.packb(fields, use_bin_type=True)).decode()})
                    + "\n")
    with _private_writer(d / RUN_FILES["detections"]) as f:
        for rec in audit_records:
            if "digest" in rec and ("reason" in rec or "trailer_cut" in rec):
                keep = {k: rec[k] for k in ("digest", "reason", "trailer_cut") if k in rec}
                f.write(json.dumps(keep) + "\n")
    with _private_writer(d / RUN_FILES["meta"]) as f:
        json.dump(meta or {}, f, indent=1)
    return d


def measure_run(truth: GroundTruth, received: Iterable[Any], vault: Iterable[tuple[Any, dict[str, Any]]] = (),
                audit_records: Iterable[dict[str, Any]] = (), *, save_dir: str | Path | None = None,
                meta: dict[str, Any] | None = None, permutations: int = PERMUTATIONS) -> list[TechniqueRow]:
    """The leak report of a run that just ended: ``received`` are the destinations' ``Received``
    envelopes (with arrival times and header timestamps, so the timing channel is decoded, not
    assumed), ``vault`` the on-site vault's ``(header, fields)``. With ``save_dir`` the run is also
    saved for ``edgeward report``."""
    received, vault, audit_records = list(received), list(vault), list(audit_records)
    got = Delivered()
    for r in received:
        got.add_received(r)
    for h, fields in vault:
        got.add(h.destination, h.device, h.stream, h.seq, fields, "")  # on site: no clock leaves it
    if save_dir is not None:
        save_run(save_dir, truth, received, vault, audit_records, meta)
    return leak_report(truth, got, audit_records, permutations=permutations)


def load_run(directory: str | Path) -> tuple[GroundTruth, Delivered, list[dict[str, Any]], dict[str, Any]]:
    """(truth, what the destinations received, detections, meta) of a directory ``save_run`` wrote."""
    d = Path(directory)
    missing = [n for k, n in RUN_FILES.items() if k != "meta" and not (d / n).exists()]
    if missing:
        raise FileNotFoundError(f"{d}: not a saved run (missing {', '.join(missing)})")
    truth = GroundTruth.from_jsonl(d / RUN_FILES["truth"])
    got = Delivered()
    with open(d / RUN_FILES["received"], encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            o = json.loads(line)
            fields = msgpack.unpackb(base64.b64decode(o["fields"]), raw=False)
            ts = o["ts"] if o["destination"] not in ON_SITE else None
            wire = o.get("wire_seq")
            got.add(o["destination"], o["device"], o["stream"], o["seq"], fields, o["topic"],
                    arrival=o.get("arrival"), ts=ts, wire_seq=bytes.fromhex(wire) if isinstance(wire, str) else wire)
    with open(d / RUN_FILES["detections"], encoding="utf-8") as f:
        detections = [json.loads(line) for line in f if line.strip()]
    meta_path = d / RUN_FILES["meta"]
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    return truth, got, detections, meta
