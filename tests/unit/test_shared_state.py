"""SharedDeviceState: the same answers as DedupeWindow and RateBaseline, across processes."""

from __future__ import annotations

import multiprocessing
import random
import time
from typing import Any

import pytest

from gateway.catalog import DEVICE_TYPES
from gateway.dedupe import DedupeWindow
from gateway.detect import RateBaseline
from gateway.runtime.shared_state import STATE_FULL, SharedDeviceState


@pytest.fixture
def state() -> Any:
    s = SharedDeviceState(capacity=256, window=64, stripes=8, rate=RateBaseline())
    try:
        yield s
    finally:
        s.close()


def test_dedupe_matches_dedupe_window(state: SharedDeviceState) -> None:
    ref = DedupeWindow(window=64)
    rng = random.Random(3)
    highs = {f"xr-{i:05d}": 1 for i in range(20)}
    for _ in range(20_000):
        dev = rng.choice(list(highs))
        r = rng.random()
        if r < 0.6:
            seq = highs[dev] + rng.randint(1, 3)
        elif r < 0.65:
            seq = highs[dev] + rng.randint(60, 200)  # a jump past the window
        else:
            seq = max(1, highs[dev] - rng.randint(0, 90))  # redeliveries, some beyond the window
        highs[dev] = max(highs[dev], seq)
        assert state.is_new(dev, seq) == ref.is_new(dev, seq), (dev, seq)
    assert len(state) == 20
    assert state.high("xr-00000") == ref.state()["xr-00000"]
    assert state.high("nobody") is None


def test_dedupe_window_unit_cases(state: SharedDeviceState) -> None:
    d = state
    assert d.is_new("a", 1) and d.is_new("a", 3) and d.is_new("a", 2)
    assert not d.is_new("a", 2) and not d.is_new("a", 3)
    assert d.is_new("b", 2)
    for s in range(4, 200):
        assert d.is_new("a", s)
    assert not d.is_new("a", 100)  # beyond the window (64): treated as seen
    assert not d.is_new("a", 199)
    assert d.is_new("a", 200)


def test_rate_matches_rate_baseline(state: SharedDeviceState) -> None:
    ref = RateBaseline()
    rng = random.Random(5)
    types = sorted(DEVICE_TYPES)
    devs = {f"d-{i}": types[i % len(types)] for i in range(12)}
    now = 1000.0
    for _ in range(6000):
        dev = rng.choice(list(devs))
        now += rng.random() * 0.05
        size = rng.randint(10, DEVICE_TYPES[devs[dev]].max_payload)
        t = now - (0.2 if rng.random() < 0.05 else 0.0)  # a worker whose clock read is a little older
        assert state.observe(dev, size, t, device_type=devs[dev]) == ref.observe(dev, size, t, device_type=devs[dev])
    assert state.observe("x", 1, now, device_type="no-such-type") is None


def test_rate_off_without_baseline() -> None:
    s = SharedDeviceState(capacity=16, window=64, stripes=2, rate=None)
    try:
        assert all(s.observe("a", 10**9, 0.0, device_type=next(iter(DEVICE_TYPES))) is None for _ in range(100))
    finally:
        s.close()


def test_full_table_refuses_new_devices_never_grants() -> None:
    s = SharedDeviceState(capacity=4, window=64, stripes=1, rate=RateBaseline())
    try:
        dtype = next(iter(DEVICE_TYPES))
        for i in range(4):
            assert s.is_new(f"d{i}", 1)
        assert not s.is_new("d4", 1) and not s.is_new("d4", 1)  # no slot: refused, both times
        assert s.observe("d4", 10, 0.0, device_type=dtype) == STATE_FULL
        assert s.refused_full == 3
        assert s.observe("d0", 10, 0.0, device_type=dtype) is None  # known devices carry on
        assert s.is_new("d0", 2) and not s.is_new("d0", 1)
    finally:
        s.close()


def _hammer(state: SharedDeviceState, devices: int, seqs: int, seed: int, q: Any, start: Any) -> None:
    rng = random.Random(seed)
    order = [(f"dev-{d:04d}", s) for d in range(devices) for s in range(1, seqs + 1)]
    rng.shuffle(order)  # within the window: every sequence is judged, whatever the order
    start.wait(30)  # both processes up before either starts
    won = [key for key in order if state.is_new(*key)]
    t0 = time.perf_counter()
    for i in range(20_000):
        state.is_new("bench", i + 1)
    q.put((won, (time.perf_counter() - t0) / 20_000))
    state.close()


def test_two_processes_accept_each_key_exactly_once() -> None:
    ctx = multiprocessing.get_context("spawn")
    state = SharedDeviceState(capacity=1024, window=4096, stripes=16, rate=None)
    try:
        q, start = ctx.Queue(), ctx.Barrier(2)
        procs = [ctx.Process(target=_hammer, args=(state, 50, 400, seed, q, start)) for seed in (1, 2)]
        for p in procs:
            p.start()
        results = [q.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        won_a, won_b = results[0][0], results[1][0]
        assert not set(won_a) & set(won_b)
        assert len(won_a) + len(won_b) == 50 * 400
        assert min(len(won_a), len(won_b)) > 500  # both really raced for the same keys
        per_call_us = max(r[1] for r in results) * 1e6
        assert per_call_us < 200, per_call_us  # measured ~3-6 µs; generous for a loaded machine
        assert state.high("dev-0000") == 400
    finally:
        state.close()


def test_restarted_worker_gets_back_what_it_accepted_and_others_do_not() -> None:
    s = SharedDeviceState(capacity=64, window=64, stripes=4, rate=None, workers=2)
    try:
        w0 = s.for_worker(0)
        assert w0.is_new("a", 1) and w0.is_new("a", 2) and w0.is_new("b", 7)
        assert not w0.is_new("a", 1)
        # worker 0 dies before acknowledging; the broker redelivers its messages to it alone
        w0 = s.for_worker(0)
        w1 = s.for_worker(1)
        assert not w1.is_new("a", 1)  # another worker: a duplicate
        assert w0.is_new("a", 1) and w0.is_new("b", 7)  # its own unacknowledged messages: accepted again
        assert not w0.is_new("a", 1)  # ...once
        assert w0.reaccepted == 2
        w0 = s.for_worker(0)  # and again after a second crash: the re-acceptance was noted too
        assert w0.is_new("a", 1) and not w0.is_new("a", 3 - 3 + 1)
    finally:
        s.close()


def _hold_lock(name: str, ready: Any) -> None:
    import fcntl
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=name)
    fcntl.lockf(shm._fd, fcntl.LOCK_EX, 1, 0)
    ready.set()
    time.sleep(60)


def test_a_worker_killed_holding_a_lock_does_not_wedge_the_others() -> None:
    ctx = multiprocessing.get_context("spawn")
    s = SharedDeviceState(capacity=8, window=64, stripes=1, rate=None)
    try:
        ready = ctx.Event()
        p = ctx.Process(target=_hold_lock, args=(s.name, ready))
        p.start()
        assert ready.wait(30)
        p.kill()
        p.join(10)
        t0 = time.monotonic()
        assert s.is_new("a", 1)
        assert time.monotonic() - t0 < 1.0
    finally:
        s.close()


def test_outage_and_restart_credit_match_rate_baseline(state: SharedDeviceState) -> None:
    """The backlog after an outage (no device seen for outage_gap_s) or a restart (catch_up) is credited
    exactly as RateBaseline credits it: without it, workers refuse honest backlog as bursts."""
    ref = RateBaseline()
    types = sorted(DEVICE_TYPES)
    devs = {f"d-{i}": types[i % len(types)] for i in range(12)}
    now = 1000.0
    refused = 0

    def send(dev: str, n: int) -> None:
        nonlocal refused
        for _ in range(n):
            size = 10 + len(dev)
            got = state.observe(dev, size, now, device_type=devs[dev])
            assert got == ref.observe(dev, size, now, device_type=devs[dev]), (dev, now)
            refused += got is not None

    for _ in range(50):
        for dev in list(devs)[:8]:
            send(dev, 1)
        now += 1.0
    refused = 0  # (a cargo scanner at 1 message/s is beyond its baseline: that is not the point here)
    now += 400.0  # an outage: the first message after it finds everything silent since
    for dev in devs:  # every device's backlog at once, the last four first seen now
        rate = ref.limits(devs[dev])[0] / ref.headroom
        send(dev, int(rate * 400.0))
    assert refused == 0, "an outage's backlog is credited"
    fresh = RateBaseline()
    assert any(fresh.observe("d-0", 20, now, device_type=devs["d-0"]) for _ in range(int(
        fresh.limits(devs["d-0"])[0] / fresh.headroom * 400.0))), "the same backlog, uncredited, trips"
    now += 1.0
    state.catch_up(300.0, now)
    ref.catch_up(300.0, now)
    now += 1.0
    for dev in devs:
        rate = ref.limits(devs[dev])[0] / ref.headroom
        send(dev, int(rate * 300.0))
    assert refused == 0, "a restarted worker's downtime is credited"


def test_hold_allowance_is_one_bucket_credited_once_per_outage() -> None:
    s = SharedDeviceState(capacity=16, window=64, stripes=2, rate=None, workers=2)
    try:
        a, b = s.for_worker(0), s.for_worker(1)
        assert a.hold_allowance("d", 100.0, 0.5, 5.0, charge=1.0, start=1.0) == 0.0  # first seen: start - 1
        assert b.hold_allowance("d", 100.0, 0.5, 5.0, charge=1.0, start=1.0) == -1.0  # one bucket, not two
        assert a.hold_allowance("d", 104.0, 0.5, 5.0) == 1.0  # refilled at 0.5/s
        assert a.hold_allowance("d", 200.0, 0.5, 5.0) == 5.0  # up to the slack
        # an outage from 200 to 260 s: both workers notice it, the device is credited once
        assert a.hold_allowance("d", 260.0, 0.5, 5.0, credit=60.0, unless_since=200.0) == 65.0
        assert b.hold_allowance("d", 260.5, 0.5, 5.0, credit=60.0, unless_since=200.5) == 65.0
        assert a.hold_allowance("d", 261.0, 0.5, 5.0, charge=1.0) == 64.0  # a credit is kept until spent
        s.hold_allowance("e", 300.0, 0.5, 5.0, charge=3.0, start=1.0)  # owes 2 for what it holds
        assert s.hold_allowance("e", 360.0, 0.01, 5.0, credit=60.0, unless_since=300.5) == pytest.approx(-1.4)
    finally:
        s.close()
