"""Instructions a message through the gateway's core, counted by Valgrind: compiled against pure Python.

Wall-clock and CPU-time figures on this shared machine move by 20-30 % between runs (BENCHMARKS.md),
which hides any change smaller than that. An instruction count does not move with the neighbours: this
runs the in-process core (``Pipeline.process``, the audit append and the vault append, a group-commit
flush every 64 messages, as one ingest batch does) under ``valgrind --tool=callgrind`` for N and for
3N messages (taken from one pool of 3N), and reports (count(3N) - count(N)) / 2N, so start-up and
message generation cancel out.
It does so twice: with the compiled core, and with ``EDGEWARD_PURE_PYTHON=1`` (the same sources run
by the interpreter). The MQTT adapter is not in it (``e2e.py`` measures the whole process, in time).

Caveats: Valgrind's CPU has no SHA extensions, so OpenSSL hashes with its scalar code under it and
the digest's share is larger than on the real CPU; instructions are not time (a compiled core saves
more of the interpreter's dispatch, whose instructions are cheap, than of C library calls).

    python benchmarks/icount.py [--messages N] [--json]   # ~2 min; needs valgrind (apt-get install valgrind)
    python benchmarks/icount.py --time 8 [--json]          # the same core timed (CPU time), 8 paired rounds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, log, print_table  # noqa: E402


def child(n: int, pool: int, timed: bool = False) -> None:
    from _e2e_profile import _fresh
    from e2e import MessageMaker

    from gateway.policy import load_policy

    msgs = MessageMaker(devices=2000).make(pool, "small")[:n]  # the same pool at N and 3N: generation cancels
    with tempfile.TemporaryDirectory(prefix="icount-") as td:
        p, audit, vault = _fresh(Path(td), load_policy(REPO / "policies"))
        c0 = time.process_time()
        for i, (topic, payload) in enumerate(msgs):
            out = p.process(topic, payload)
            if out.reason:
                raise SystemExit(f"message {i} was refused ({out.reason}): the count would not be the core's")
            audit.append(out.record)
            for d in out.deliveries:
                if d.transport == "vault":
                    vault.append(d.envelope)
            if i % 64 == 63:
                vault.flush()
                audit.flush()
        vault.flush()
        audit.flush()
        cpu_us = (time.process_time() - c0) / n * 1e6
        audit.close()
        vault.close()
    from gateway import _native

    print(json.dumps({**_native.status(), "cpu_us_per_msg": cpu_us if timed else None}))


def count(n: int, pool: int, pure: bool) -> tuple[int, str]:
    env = {**os.environ, "EDGEWARD_PURE_PYTHON": "1" if pure else "0"}
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, __file__, "--child", str(n), "--pool", str(pool)],
                         env=env, capture_output=True, text=True, timeout=1800)
    m = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"valgrind run failed ({out.returncode}): {out.stderr[-2000:]}")
    mode = json.loads(out.stdout.strip().splitlines()[-1])["mode"]
    return int(m.group(1)), mode


def timed(n: int, rounds: int) -> dict[str, object]:
    """CPU time a message, compiled and pure in alternating child processes (same messages): each
    round's ratio is taken within the round, so the machine's drift between rounds cancels."""
    pairs = []
    for r in range(rounds):
        got = {}
        for pure in (False, True):
            env = {**os.environ, "EDGEWARD_PURE_PYTHON": "1" if pure else "0"}
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--pool", str(n), "--timed"],
                                 env=env, capture_output=True, text=True, timeout=600, check=True)
            got[pure] = json.loads(out.stdout.strip().splitlines()[-1])
        pairs.append((got[False]["cpu_us_per_msg"], got[True]["cpu_us_per_msg"], got[False]["mode"]))
        log(f"  round {r + 1}/{rounds}: compiled {pairs[-1][0]:.1f} µs, pure {pairs[-1][1]:.1f} µs a message")
    ratios = sorted(c / p for c, p, _ in pairs)
    return {"messages": n, "rounds": [{"compiled_us": round(c, 1), "pure_us": round(p, 1), "mode": m}
                                      for c, p, m in pairs],
            "median_ratio": round(statistics.median(ratios), 3), "min_ratio": round(ratios[0], 3),
            "max_ratio": round(ratios[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int,
                    help="N: each build is counted at N and 3N messages (default 1000); "
                         "with --time, the messages a run (default 20000)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--time", type=int, metavar="ROUNDS",
                    help="instead of counting: CPU time a message, compiled then pure, "
                         "ROUNDS times (no valgrind)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child, a.pool, a.timed)
        return
    if a.time:
        n = a.messages or 20000
        res = timed(n, a.time)
        if a.json:
            print(json.dumps(res))
            return
        print(f"\nCPU time a message through the core ({n} messages a run, small mix, process_time)\n")
        print_table(["round", "compiled µs/msg", "pure µs/msg", "compiled / pure"],
                    [[str(i + 1), f"{r['compiled_us']:.1f}", f"{r['pure_us']:.1f}",
                      f"{r['compiled_us'] / r['pure_us']:.2f}"] for i, r in enumerate(res["rounds"])])
        print(f"\ncompiled / pure: median {res['median_ratio']:.2f} "
              f"(rounds {res['min_ratio']:.2f}-{res['max_ratio']:.2f})")
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    n = a.messages or 1000
    rows = []
    t0 = time.monotonic()
    for pure in (False, True):
        small, mode = count(n, 3 * n, pure)
        log(f"  {'pure' if pure else 'compiled'}: {n} messages counted ({time.monotonic() - t0:.0f}s)")
        big, _ = count(3 * n, 3 * n, pure)
        log(f"  {'pure' if pure else 'compiled'}: {3 * n} messages counted ({time.monotonic() - t0:.0f}s)")
        rows.append({"build": "pure Python" if pure else "compiled (mypyc)", "mode": mode,
                     "instructions_per_msg": round((big - small) / (2 * n))})
    compiled, pure_row = rows
    if compiled["mode"] != "compiled":
        log(f"note: the compiled row ran {compiled['mode']} (not installed compiled: run `make install`)")
    ratio = compiled["instructions_per_msg"] / pure_row["instructions_per_msg"]
    result = {"messages": [n, 3 * n], "rows": rows, "compiled_vs_pure": round(ratio, 3)}
    if a.json:
        print(json.dumps(result))
        return
    print(f"\nInstructions a message through the core (Valgrind callgrind, small mix, "
          f"{n} and {3 * n} messages)\n")
    print_table(["build", "ran as", "instructions/msg", "vs pure"],
                [[r["build"], r["mode"], f"{r['instructions_per_msg']:,}",
                  f"{r['instructions_per_msg'] / pure_row['instructions_per_msg']:.2f}"] for r in rows])
    print(f"\ncompiled / pure = {ratio:.3f} ({(1 - ratio) * 100:.0f} % fewer instructions a message)")


if __name__ == "__main__":
    main()
