from gateway.dedupe import DedupeWindow


def test_repeats_and_old_sequences_are_not_new() -> None:
    d = DedupeWindow(window=10)
    assert d.is_new("a", 1) and d.is_new("a", 3) and d.is_new("a", 2)
    assert not d.is_new("a", 2) and not d.is_new("a", 3)
    assert d.is_new("b", 2)
    for s in range(4, 100):
        assert d.is_new("a", s)
    assert not d.is_new("a", 50)  # beyond the window: treated as seen
    assert not d.is_new("a", 99)
    assert d.is_new("a", 100)


def test_out_of_order_and_jumps_keep_exact_answers_with_bounded_gaps() -> None:
    from gateway.dedupe import DedupeWindow

    d = DedupeWindow(window=8)
    assert [d.is_new("a", s) for s in (1, 4, 2, 4, 3, 2, 5)] == [True, True, True, False, True, False, True]
    assert d._state["a"][1] == 0  # no gaps left: nothing kept beyond the highest sequence
    assert d.is_new("a", 10**12)  # a huge jump records at most `window` gaps
    assert bin(d._state["a"][1]).count("1") == 7
    assert d.is_new("a", 10**12 - 3) and not d.is_new("a", 10**12 - 3)
    assert not d.is_new("a", 10**12 - 8)  # beyond the window: treated as seen


def test_matches_a_brute_force_model_over_random_jumps_and_reorders() -> None:
    import random

    rng = random.Random(1)
    for _ in range(200):
        w = rng.choice([4, 8, 16, 64])
        d, seen, high = DedupeWindow(window=w), set(), None
        for _ in range(300):
            base = 100 if high is None else high
            s = max(1, base + (rng.randint(-2 * w, 3 * w) if rng.random() < 0.9 else rng.randint(0, 10 * w)))
            expected = high is None or s > high or (s > high - w and s not in seen)
            assert d.is_new("a", s) == expected, (w, s, high)
            if expected:
                seen.add(s)
                high = s if high is None or s > high else high

