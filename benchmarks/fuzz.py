"""Coverage-guided fuzzing of the decoder and the policy loader (atheris / libFuzzer), for a bounded time.

Each target's harness (fuzz/fuzz_<target>.py) runs in a subprocess on a scratch copy of its seed
corpus (fuzz/corpus/<target>/, kept in the repository); a crash, a hang past ``--timeout`` or an
allocation past ``--rss-limit-mb`` is saved under fuzz/artifacts/<target>/ and the run resumes until
the time is spent. Faults already reported in tests/property/test_found_bugs.py are counted apart
("known"), unless ``--strict``. Prints one row per target: seconds, inputs tried (execs), crashes,
corpus size::

    python benchmarks/fuzz.py                      # 60 s per target (the benchmark)
    python benchmarks/fuzz.py --seconds 10         # CI
    python benchmarks/fuzz.py --seconds 3600 --update-corpus --json --record fuzz/runs.jsonl

Exit status 1 when any target crashed (new faults), so CI fails on them.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "fuzz"
TARGETS = ("decode", "policy")
_EXECS = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_RSS = re.compile(r"stat::peak_rss_mb:\s*(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s", re.M)


@dataclass
class Result:
    target: str
    seconds: float
    execs: int = 0
    crashes: int = 0
    known_faults: dict[str, int] = field(default_factory=dict)
    seed_files: int = 0
    corpus_files: int = 0
    restarts: int = 0
    peak_rss_mb: int = 0
    artifacts: list[str] = field(default_factory=list)

    @property
    def execs_per_s(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0


def run_target(target: str, seconds: float, *, timeout: int, rss_limit_mb: int, strict: bool,
               update_corpus: bool, max_restarts: int = 50) -> Result:
    harness = FUZZ / f"fuzz_{target}.py"
    seeds = FUZZ / "corpus" / target
    artifacts = FUZZ / "artifacts" / target
    artifacts.mkdir(parents=True, exist_ok=True)
    before = set(artifacts.iterdir())
    res = Result(target, 0.0, seed_files=sum(1 for _ in seeds.iterdir()))
    with tempfile.TemporaryDirectory(prefix=f"edgeward-fuzz-{target}-") as tmp:
        work = Path(tmp) / "corpus"
        work.mkdir()
        known_file = Path(tmp) / "known.json"
        env = {**os.environ, "FUZZ_KNOWN_FILE": str(known_file), "PYTHONPATH": str(ROOT)}
        if strict:
            env["FUZZ_STRICT"] = "1"
        t0 = time.monotonic()
        deadline = t0 + seconds
        while (remaining := deadline - time.monotonic()) >= 1 and res.restarts <= max_restarts:
            cmd = [sys.executable, str(harness), f"-max_total_time={int(remaining)}", f"-timeout={timeout}",
                   f"-rss_limit_mb={rss_limit_mb}", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
                   str(work), str(seeds)]
            # the child's own limits end it; this only catches a wedged interpreter
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=remaining + timeout + 60)
                out, rc = proc.stderr + proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
                rc = -1
            execs = [int(x) for x in _EXECS.findall(out)] or [int(x) for x in _PROGRESS.findall(out)[-1:]]
            res.execs += execs[-1] if execs else 0
            res.peak_rss_mb = max([res.peak_rss_mb, *(int(x) for x in _RSS.findall(out))])
            if rc == 0:
                break
            res.crashes += 1
            res.restarts += 1
            tail = "\n".join(out.strip().splitlines()[-25:])
            print(f"[{target}] crash (exit {rc}):\n{tail}\n", file=sys.stderr)
        res.seconds = round(time.monotonic() - t0, 1)
        res.corpus_files = len(set(p.name for p in work.iterdir()) | set(p.name for p in seeds.iterdir()))
        if known_file.exists():
            res.known_faults = json.loads(known_file.read_text())
        if update_corpus:
            # keep only inputs that add coverage to the committed seeds (libFuzzer's merge minimises)
            subprocess.run([sys.executable, str(harness), "-merge=1", f"-timeout={timeout}", str(seeds), str(work)],
                           cwd=ROOT, env=env, capture_output=True, timeout=600)
    res.artifacts = sorted(str(p.relative_to(ROOT)) for p in set(artifacts.iterdir()) - before)
    if not any(artifacts.iterdir()):
        shutil.rmtree(artifacts)
    return res


def table(results: list[Result]) -> str:
    head = f"{'target':<8} {'seconds':>8} {'execs':>11} {'execs/s':>9} {'crashes':>8} {'known≥':>7} {'corpus':>13} {'rss MB':>7}"
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.target:<8} {r.seconds:>8.1f} {r.execs:>11,} {r.execs_per_s:>9,.0f} {r.crashes:>8} "
            f"{sum(r.known_faults.values()):>7} {f'{r.seed_files}->{r.corpus_files}':>13} {r.peak_rss_mb:>7}"
        )
    for r in results:
        for a in r.artifacts:
            rows.append(f"  {r.target}: {a}")
        if r.known_faults:
            rows.append(f"  {r.target}: known faults (tests/property/test_found_bugs.py): {r.known_faults}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target (default 60; CI: 10)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    ap.add_argument("--rss-limit-mb", type=int, default=2048, help="memory one run may use before it counts as a crash")
    ap.add_argument("--strict", action="store_true", help="known faults crash too (to confirm their fixes)")
    ap.add_argument("--update-corpus", action="store_true", help="merge new coverage into fuzz/corpus/<target>/")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--record", type=Path, help="append this run (JSON line, with the command) to a file")
    args = ap.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        ap.error(f"unknown target(s): {', '.join(bad)}")
    results = [
        run_target(t, args.seconds, timeout=args.timeout, rss_limit_mb=args.rss_limit_mb, strict=args.strict,
                   update_corpus=args.update_corpus)
        for t in targets
    ]
    doc = {
        "command": " ".join(["python", "benchmarks/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "results": [{**asdict(r), "execs_per_s": round(r.execs_per_s)} for r in results],
    }
    if args.record:
        with args.record.open("a", encoding="utf-8") as f:
            f.write(json.dumps(doc) + "\n")
    print(json.dumps(doc, indent=2) if args.json else table(results))
    return 1 if any(r.crashes for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
