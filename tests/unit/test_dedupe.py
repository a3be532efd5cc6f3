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
