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
