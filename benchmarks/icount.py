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

    python benchmarks/icount.py [--messages N] [--json]      # ~1-2 min; needs valgrind (apt-get install valgrind)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, log, print_table  # noqa: E402


def child(n: int, pool: int) -> None:
    from _e2e_profile import _fresh
    from e2e import MessageMaker

    from gateway.policy import load_policy

    msgs = MessageMaker(devices=2000).make(pool, "small")[:n]  # the same pool at N and 3N: generation cancels
    with tempfile.TemporaryDirectory(prefix="icount-") as td:
        p, audit, vault = _fresh(Path(td), load_policy(REPO / "policies"))
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
        audit.close()
        vault.close()
    from gateway import _native

    print(json.dumps(_native.status()))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000, help="N: each build is counted at N and 3N messages")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child, a.pool)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    n = a.messages
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
    print(f"\nInstructions a message through the core (Valgrind callgrind, small mix, {n} and {3 * n} messages)\n")
    print_table(["build", "ran as", "instructions/msg", "vs pure"],
                [[r["build"], r["mode"], f"{r['instructions_per_msg']:,}",
                  f"{r['instructions_per_msg'] / pure_row['instructions_per_msg']:.2f}"] for r in rows])
    print(f"\ncompiled / pure = {ratio:.3f} ({(1 - ratio) * 100:.0f} % fewer instructions a message)")


if __name__ == "__main__":
    main()
