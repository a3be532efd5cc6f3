"""How many simulated devices (each its own aiomqtt MQTT 5 connection) one process sustains.

Starts a private Mosquitto, then for each fleet size runs the fleet against it and prints one row:
devices connected, connect time, offered and achieved messages per second in the steady phase (after
every device connected), the simulator process's CPU% (one core = 100 %), and RSS per device.
Nobody subscribes, so the broker only acknowledges; the numbers are the simulator's own cost.

    python benchmarks/sim_scale.py --devices 100 1000 --seconds 15 --rate-scale 1
    python benchmarks/sim_scale.py --devices 500 --rate-scale 20 --types body_scanner trace_detector
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

from device_sim import Fleet, make_fleet
from gateway.runtime.broker import BrokerConfig, MosquittoBroker, free_port


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def one(port: int, n: int, seconds: float, rate_scale: float, types: list[str] | None) -> dict[str, float]:
    specs = make_fleet(n, types=types)
    fleet = Fleet(specs, port=port, rate_scale=rate_scale, drop_every_s=None)
    rss0 = rss_bytes()
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int, int, float, int]] = []  # (t, connected, sent, cpu_s, rss)

    async def sample() -> None:
        while True:
            samples.append((loop.time(), len(fleet.truth.connects), fleet.truth.sent, time.process_time(),
                            rss_bytes()))
            await asyncio.sleep(0.5)

    t0 = loop.time()
    sampler = asyncio.create_task(sample(), name="bench:sample")
    truth = await fleet.run(seconds)
    sampler.cancel()
    full = next((s for s in samples if s[1] >= n), None)
    end = samples[-1]
    if full is None or end[0] - full[0] < 1.0:
        return {"devices": n, "connected": max(s[1] for s in samples), "connect_s": float("nan"),
                "offered": fleet.offered_rate, "msgs_s": float("nan"), "cpu": float("nan"),
                "rss_dev_kb": float("nan"), "failed": len(truth.failed),
                "refused": fleet.connect_failures}
    dt = end[0] - full[0]
    return {
        "devices": n,
        "connected": full[1],
        "connect_s": full[0] - t0,
        "offered": fleet.offered_rate,
        "msgs_s": (end[2] - full[2]) / dt,
        "cpu": 100 * (end[3] - full[3]) / dt,
        "rss_dev_kb": (full[4] - rss0) / n / 1024,
        "mb_s": sum(r.size for r in truth.sent_records if r.t_sent >= 0) / 1e6 / max(1e-9, seconds),
        "failed": len(truth.failed),
        "refused": fleet.connect_failures,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--types", nargs="*", default=None)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per device
    with tempfile.TemporaryDirectory() as tmp:
        broker = MosquittoBroker(BrokerConfig(port=free_port(), workdir=Path(tmp), persistence=False))
        with broker:
            print(f"{'devices':>8} {'conn_s':>7} {'offered/s':>10} {'msgs/s':>8} {'MB/s':>6} {'CPU%':>6} "
                  f"{'RSS/dev KB':>10} {'failed':>6}")
            for n in args.devices:
                run = one(broker.port, n, args.seconds, args.rate_scale, args.types)
                if args.uvloop:
                    import uvloop

                    r = uvloop.run(run)
                else:
                    r = asyncio.run(run)
                print(f"{r['devices']:>8} {r['connect_s']:>7.1f} {r['offered']:>10.0f} {r['msgs_s']:>8.0f} "
                      f"{r.get('mb_s', float('nan')):>6.1f} {r['cpu']:>6.0f} {r['rss_dev_kb']:>10.1f} "
                      f"{r['failed']:>6}  connected={r['connected']:.0f} refused={r['refused']:.0f}", flush=True)


if __name__ == "__main__":
    main()
