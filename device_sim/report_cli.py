"""``edgeward report DIR``: the leak report of a saved demo or sim run.

A run directory (written by ``device_sim.report.save_run``, e.g. ``edgeward demo --scenario
all-techniques --save DIR``) holds the simulator's ground truth, what the destinations received and
the gateway's detections. The report is recomputed from those files alone: per technique, what the
hostile firmware sent, what the gateway named, what the broker refused, what was neutralised and
what leaked — byte channels by searching every encoding of each secret, the timing channel by
decoding it from the destinations' arrival times and header timestamps, the burst channel from the
message counts per burst group (``device_sim/report.py`` defines both).

Wiring (in ``gateway/cli.py``): ``from device_sim.report_cli import add_parsers`` and
``add_parsers(sub)`` next to the other sub-commands; the parser's default ``func`` is ``run_report``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parsers", "format_table", "run_report"]


def add_parsers(sub: Any) -> argparse.ArgumentParser:
    """Add the ``report`` sub-command to an ``argparse`` sub-parsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "report", help="the per-technique leak report of a saved demo/sim run directory",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="directory written by --save (truth.jsonl, received.jsonl, detections.jsonl)")
    p.add_argument("--json", action="store_true", help="one JSON object: technique -> figures")
    p.add_argument("--permutations", type=int, default=None,
                   help="permutations of the timing test (default 4999; fewer is faster and coarser)")
    p.set_defaults(func=run_report)
    return p


def format_table(techniques: dict[str, dict[str, Any]]) -> str:
    head = (f"  {'technique':20} {'sent':>6} {'detected':>8} {'refused':>7} {'neutralised':>11} {'leaked':>6}")
    lines = [head, "  " + "-" * (len(head) - 2)]
    for name, r in techniques.items():
        lines.append(f"  {name:20} {r['attempts']:>6} {r['detected']:>8} {r['refused_by_broker']:>7} "
                     f"{r['neutralised']:>11} {r['leaked']:>6}")
    t = techniques.get("timing", {}).get("measure")
    if t:
        if t["measured"]:
            lines.append(f"  timing: {t['bits_sent']} bits sent by {t['devices']} device(s); leaking "
                         f"{len(t['leaking_devices'])}, {t['bits_recovered']} bits recovered beyond chance "
                         f"({t['test']})")
            for d in t["best_decoder"]:
                lines.append(f"    {d['device']} at {d['destination']} ({d['clock']}, {d['decoder']}): "
                             f"{d['agree']}/{d['bits']} bits agree, p {d['p_value']}")
        else:
            lines.append("  timing: not measured (no arrival or header times saved): counted leaked when delivered")
    b = techniques.get("burst", {}).get("measure")
    if b:
        lines.append(f"  burst: {b['groups']} burst groups, {b['intact_at_destination']} arrived whole off site "
                     f"(count readable), {b['cut_by_gateway']} cut by the rate baseline")
    return "\n".join(lines)


def run_report(args: argparse.Namespace) -> int:
    from device_sim.report import PERMUTATIONS, leak_report, load_run

    try:
        truth, got, detections, meta = load_run(args.run_dir)
    except (OSError, ValueError) as exc:
        print(f"edgeward report: {exc}", file=sys.stderr)
        return 2
    perms = args.permutations if getattr(args, "permutations", None) else PERMUTATIONS
    rows = leak_report(truth, got, detections, permutations=perms)
    techniques = {r.technique: r.to_json() for r in rows}
    if args.json:
        print(json.dumps({"run": meta, "sent": truth.sent, "techniques": techniques}, indent=1, default=str))
    else:
        what = meta.get("scenario") or "run"
        print(f"{what}: {truth.sent} messages sent, {len(rows)} hostile techniques")
        print(format_table(techniques))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edgeward")
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
