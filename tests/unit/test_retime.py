"""Re-timing's pure parts: a released batch keeps each device's order but says nothing about when,
within the batch, a message arrived; boundaries are drawn by the gateway, not by traffic."""

from __future__ import annotations

from gateway.runtime.service import _interleave


def _batch(spec: str) -> list[tuple[str, bytes, tuple[object, ...]]]:
    return [(f"t/{dev}", b"", (1, i, dev, i, "customs_nl")) for i, dev in enumerate(spec)]


def test_interleave_keeps_each_devices_order_and_every_message() -> None:
    batch = _batch("aabacbbca")
    for _ in range(50):
        out = _interleave(batch)
        assert sorted(out) == sorted(batch)
        for dev in "abc":
            assert [x for x in out if x[2][2] == dev] == [x for x in batch if x[2][2] == dev]


def test_interleave_hides_arrival_order_between_devices() -> None:
    # Arrival order a..a b: where b lands must not tell when it arrived (uniform over the 6 places).
    batch = _batch("aaaaab")
    places = [next(i for i, x in enumerate(_interleave(batch)) if x[2][2] == "b") for _ in range(3000)]
    counts = [places.count(i) for i in range(6)]
    assert min(counts) > 350, counts  # ~500 each; arrival order kept would put all 3000 at place 5
