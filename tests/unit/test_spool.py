"""The store-and-forward spool: order, acks, bounds, crash recovery, corruption, disk full, secrecy."""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import gateway.runtime.spool as spool_mod
from gateway.errors import ConfigError, CryptoError, StorageFull
from gateway.runtime.spool import OVERHEAD, Spool, SpoolDiskFull, SpoolFull, SpoolItem

KEY = bytes(range(32))


def make(d: Path, key: bytes = KEY, name: str = "dst-a", **kw: object) -> Spool:
    return Spool(d, key, name=name, **kw)  # type: ignore[arg-type]


def topic(i: int) -> str:
    return f"site/lane-{i % 4}/xray"


def payload(i: int, size: int = 40) -> bytes:
    return f"payload-{i:06d}:".encode().ljust(size, b"#")


def fill(sp: Spool, start: int, n: int, *, batch: int = 7, size: int = 40) -> None:
    for i in range(start, start + n):
        sp.append(topic(i), payload(i, size))
        if (i - start) % batch == batch - 1:
            sp.flush()
    sp.flush()


def take_all(sp: Spool, *, ack: bool = False) -> list[SpoolItem]:
    out: list[SpoolItem] = []
    while batch := sp.next_batch(13):
        out += batch
        if ack:
            for it in batch:
                sp.consumed(it.id)
    return out


def numbers(items: list[SpoolItem]) -> list[int]:
    return [int(it.payload[8:14]) for it in items]


def crash(sp: Spool) -> None:
    """What kill -9 leaves: written (flushed) bytes, nothing buffered, no state written."""
    sp._close_files()


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("spool-*.seg"))


def frame_spans(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    spans, pos = [], 0
    while pos < len(data):
        end = pos + 12 + int.from_bytes(data[pos + 4 : pos + 8], "big")
        spans.append((pos, end))
        pos = end
    return spans


def size_of(i: int, size: int = 40) -> int:
    return OVERHEAD + len(topic(i).encode()) + size


# ---------------------------------------------------------------------------------------- order


def test_order_preserved_across_restarts_and_segment_rollover(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=600)
    fill(sp, 0, 200)
    sp.close()
    assert len(segments(tmp_path)) > 5
    sp = make(tmp_path, segment_bytes=600)
    assert sp.backlog == 200
    items = take_all(sp)
    assert numbers(items) == list(range(200))
    assert [it.topic for it in items] == [topic(i) for i in range(200)]
    assert [it.payload for it in items] == [payload(i) for i in range(200)]
    ids = [it.id for it in items]
    assert ids == sorted(set(ids))
    for it in items[:120]:
        sp.consumed(it.id)
    sp.close()

    sp = make(tmp_path, segment_bytes=600)
    fill(sp, 200, 30)
    items = take_all(sp)
    assert numbers(items) == list(range(120, 230))
    assert items[80].id > ids[-1]  # ids keep increasing across restarts
    sp.close()


def test_ids_survive_restart_when_everything_was_consumed(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=300)
    fill(sp, 0, 40)
    last = take_all(sp, ack=True)[-1].id
    assert sp.backlog == 0 and sp.backlog_bytes == 0
    sp.sync()
    assert len(segments(tmp_path)) == 1  # fully consumed segments are deleted
    sp.close()
    sp = make(tmp_path, segment_bytes=300)
    assert sp.backlog == 0 and sp.next_batch(10) == []
    fill(sp, 40, 1)
    assert sp.next_batch(10)[0].id > last
    sp.close()


def test_next_batch_hands_out_each_entry_once(tmp_path: Path) -> None:
    sp = make(tmp_path)
    fill(sp, 0, 10)
    assert numbers(sp.next_batch(4)) == [0, 1, 2, 3]
    assert numbers(sp.next_batch(4)) == [4, 5, 6, 7]
    assert numbers(sp.next_batch(4)) == [8, 9]
    assert sp.next_batch(4) == []
    assert sp.backlog == 10  # handed out is not consumed
    sp.append(topic(10), payload(10))
    assert sp.next_batch(4) == []  # not flushed yet
    assert sp.backlog == 11
    sp.flush()
    assert numbers(sp.next_batch(4)) == [10]
    assert sp.next_batch(0) == []
    sp.close()


def test_out_of_order_acks_advance_the_persisted_prefix_only_over_the_contiguous_part(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=200)
    fill(sp, 0, 10)
    items = sp.next_batch(10)
    for it in items[1:]:
        sp.consumed(it.id)
    assert sp.backlog == 1
    assert sp.backlog_bytes == size_of(0)
    sp.close()
    sp = make(tmp_path, segment_bytes=200)
    # Nothing was contiguous from the oldest: at-least-once offers all ten again.
    items = take_all(sp)
    assert numbers(items) == list(range(10))
    for it in reversed(items[:6]):
        sp.consumed(it.id)
    assert sp.backlog == 4
    sp.consumed(items[0].id)  # again: ignored
    sp.consumed(10_000)  # never handed out: ignored
    assert sp.backlog == 4
    sp.close()
    sp = make(tmp_path, segment_bytes=200)
    assert numbers(take_all(sp)) == [6, 7, 8, 9]
    sp.close()


def test_fully_consumed_segments_are_deleted_once_synced(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=250)
    for i in range(30):
        sp.append(topic(i), payload(i))
        sp.flush()  # one frame per write: a segment every few entries
    before = len(segments(tmp_path))
    items = take_all(sp)
    for it in reversed(items[:20]):
        sp.consumed(it.id)
    sp.sync()
    after = segments(tmp_path)
    assert len(after) < before
    assert all(int(p.stem.split("-")[1]) > items[0].id for p in after)
    sp.close()
    sp = make(tmp_path, segment_bytes=250)
    assert numbers(take_all(sp)) == list(range(20, 30))
    sp.close()


def test_rewind_offers_again_what_was_not_consumed(tmp_path: Path) -> None:
    sp = make(tmp_path)
    fill(sp, 0, 8)
    first = sp.next_batch(5)
    sp.consumed(first[1].id)
    sp.consumed(first[3].id)
    sp.rewind()
    assert numbers(sp.next_batch(100)) == [0, 2, 4, 5, 6, 7]
    assert sp.next_batch(100) == []
    sp.consumed(first[0].id)  # an ack from before the rewind still counts
    assert sp.backlog == 5
    sp.rewind()
    assert numbers(sp.next_batch(100)) == [2, 4, 5, 6, 7]
    sp.close()


# ---------------------------------------------------------------------------------------- bounds


def test_drop_oldest_keeps_the_newest_within_the_bound(tmp_path: Path) -> None:
    cap = 10 * size_of(0)
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest", segment_bytes=400)
    drops = []
    for i in range(25):
        drops.append(sp.append(topic(i), payload(i)))
        if i % 3 == 0:
            sp.flush()
        assert sp.backlog_bytes <= cap
    sp.flush()
    assert sum(drops) == 15 and drops[:10] == [0] * 10 and set(drops[10:]) == {1}
    assert sp.dropped == 15 and sp.dropped_total == 15
    assert sp.backlog == 10
    assert numbers(take_all(sp)) == list(range(15, 25))
    sp.close()
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest", segment_bytes=400)
    assert sp.dropped == 0 and sp.dropped_total == 15  # persisted
    assert numbers(take_all(sp)) == list(range(15, 25))
    sp.close()


def test_drop_oldest_of_entries_in_flight_and_bigger_entries(tmp_path: Path) -> None:
    cap = 6 * size_of(0)
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest")
    fill(sp, 0, 6)
    inflight = sp.next_batch(3)
    # One entry three times as big needs three slots: the three oldest go, although handed out.
    assert sp.append(topic(6), payload(6, size=40 + 2 * size_of(0))) == 3
    sp.flush()
    for it in inflight:
        sp.consumed(it.id)  # too late: ignored, they were dropped
    assert sp.backlog == 4 and sp.dropped == 3
    assert numbers(sp.next_batch(10)) == [3, 4, 5, 6]
    sp.rewind()
    assert numbers(sp.next_batch(10)) == [3, 4, 5, 6]
    sp.close()


def test_drop_oldest_moves_past_entries_acknowledged_out_of_order(tmp_path: Path) -> None:
    cap = 4 * size_of(0)
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest")
    fill(sp, 0, 4)
    sp.consumed(sp.next_batch(4)[1].id)
    assert sp.append(topic(4), payload(4)) == 0  # the acknowledged one does not count
    assert sp.append(topic(5), payload(5)) == 1  # entry 0 goes, and the prefix moves past entry 1
    assert sp.append(topic(6), payload(6)) == 1  # then entry 2, not entry 1 again
    sp.flush()
    assert (sp.backlog, sp.dropped, sp.backlog_bytes) == (4, 2, cap)
    sp.close()
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest")
    assert numbers(take_all(sp)) == [3, 4, 5, 6]
    sp.close()


def test_drop_oldest_of_entries_still_buffered(tmp_path: Path) -> None:
    cap = 3 * size_of(0)
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest")
    assert [sp.append(topic(i), payload(i)) for i in range(5)] == [0, 0, 0, 1, 1]
    sp.flush()
    assert numbers(take_all(sp)) == [2, 3, 4]
    sp.close()
    sp = make(tmp_path, max_bytes=cap, on_full="drop_oldest")
    assert numbers(take_all(sp)) == [2, 3, 4]
    assert sp.dropped_total == 2
    sp.close()


def test_refuse_new_raises_and_keeps_what_it_has(tmp_path: Path) -> None:
    cap = 5 * size_of(0)
    sp = make(tmp_path, max_bytes=cap)
    fill(sp, 0, 5)
    with pytest.raises(SpoolFull):
        sp.append(topic(5), payload(5))
    assert sp.backlog == 5 and sp.backlog_bytes == cap and sp.dropped == 0
    first = sp.next_batch(1)[0]
    sp.consumed(first.id)
    assert sp.append(topic(5), payload(5)) == 0
    sp.flush()
    assert numbers(take_all(sp)) == [1, 2, 3, 4, 5]
    sp.close()


@pytest.mark.parametrize("on_full", ["refuse_new", "drop_oldest"])
def test_an_entry_larger_than_the_spool_is_always_refused(tmp_path: Path, on_full: str) -> None:
    sp = make(tmp_path, max_bytes=1000, on_full=on_full)
    fill(sp, 0, 3)
    with pytest.raises(SpoolFull):
        sp.append("t", b"x" * 1000)
    assert sp.backlog == 3 and sp.dropped == 0
    sp.close()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        make(tmp_path, on_full="block")
    with pytest.raises(CryptoError):
        make(tmp_path, key=b"short")


# ---------------------------------------------------------------------------------------- crashes


def test_crash_offers_again_what_was_flushed_and_not_known_consumed(tmp_path: Path) -> None:
    sp = make(tmp_path)
    fill(sp, 0, 5)
    sp.append(topic(5), payload(5))  # buffered only: lost with the process (never flushed)
    items = sp.next_batch(3)
    sp.consumed(items[0].id)
    sp.consumed(items[1].id)
    sp.sync()
    sp.consumed(items[2].id)  # acknowledged after the last sync: not yet persisted
    crash(sp)
    sp = make(tmp_path)
    assert numbers(take_all(sp)) == [2, 3, 4]
    sp.close()


def _one_segment_of_five(d: Path) -> tuple[Path, list[tuple[int, int]]]:
    sp = make(d)
    fill(sp, 0, 5)
    sp.close()
    (seg,) = segments(d)
    return seg, frame_spans(seg)


def test_torn_tail_at_every_byte_of_the_last_frame(tmp_path: Path) -> None:
    src = tmp_path / "src"
    seg, spans = _one_segment_of_five(src)
    start, end = spans[-1]
    for cut in range(start, end):
        d = tmp_path / f"cut-{cut}"
        shutil.copytree(src, d)
        with open(d / seg.name, "r+b") as f:
            f.truncate(cut)
        sp = make(d)
        assert sp.torn_bytes == cut - start
        assert sp.backlog == 4 and sp.corrupt == 0
        assert numbers(take_all(sp)) == [0, 1, 2, 3]
        fill(sp, 5, 1)  # appends go right after the last complete frame
        sp.close()
        sp = make(d)
        assert numbers(take_all(sp)) == [0, 1, 2, 3, 5]
        assert sp.torn_bytes == 0
        sp.close()
        shutil.rmtree(d)


def test_garbage_tail_and_torn_earlier_segment(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=300)
    for i in range(12):
        sp.append(topic(i), payload(i))
        sp.flush()
    sp.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    # A power cut: the first segment lost its last frame's end, the last one got zeros appended.
    first_spans = frame_spans(segs[0])
    with open(segs[0], "r+b") as f:
        f.truncate(first_spans[-1][0] + 7)
    with open(segs[-1], "ab") as f:
        f.write(b"\0" * 100)
    sp = make(tmp_path, segment_bytes=300)
    lost = len(first_spans) - 1
    assert numbers(take_all(sp)) == [i for i in range(12) if i != lost]
    assert sp.corrupt == 0 and sp.torn_bytes == 7 + 100
    sp.close()


@pytest.mark.parametrize("where", [0, 5, 9, 14, 30, -1])  # magic, length, CRC, id, ciphertext, tag
def test_a_damaged_frame_in_the_middle_is_cut_out_and_counted(tmp_path: Path, where: int) -> None:
    seg, spans = _one_segment_of_five(tmp_path)
    start, end = spans[2]
    data = bytearray(seg.read_bytes())
    data[start + where if where >= 0 else end + where] ^= 0x40
    seg.write_bytes(bytes(data))
    sp = make(tmp_path)
    assert sp.corrupt == 1
    assert sp.backlog == 4
    assert numbers(take_all(sp, ack=True)) == [0, 1, 3, 4]
    assert sp.backlog == 0
    sp.close()
    assert len(frame_spans(seg)) == 4  # the segment was rewritten without it
    sp = make(tmp_path)
    assert sp.corrupt == 0 and sp.backlog == 0
    sp.close()


def test_a_damaged_last_frame_is_a_torn_tail(tmp_path: Path) -> None:
    seg, spans = _one_segment_of_five(tmp_path)
    data = bytearray(seg.read_bytes())
    data[spans[-1][0] + 30] ^= 1
    seg.write_bytes(bytes(data))
    sp = make(tmp_path)
    assert (sp.corrupt, sp.torn_bytes) == (0, spans[-1][1] - spans[-1][0])
    assert numbers(take_all(sp)) == [0, 1, 2, 3]
    sp.close()


def _rewrite_frame(seg: Path, span: tuple[int, int], body: bytes) -> None:
    data = seg.read_bytes()
    lb = struct.pack(">I", len(body))
    frame = b"EwSp" + lb + struct.pack(">I", zlib.crc32(body, zlib.crc32(lb))) + body
    seg.write_bytes(data[: span[0]] + frame + data[span[1] :])


def test_a_frame_that_does_not_authenticate_is_skipped_and_counted(tmp_path: Path) -> None:
    seg, spans = _one_segment_of_five(tmp_path)
    start, end = spans[1]
    body = bytearray(seg.read_bytes()[start + 12 : end])
    body[-3] ^= 1  # tampered with, CRC recomputed: only the AEAD tag notices
    _rewrite_frame(seg, spans[1], bytes(body))
    sp = make(tmp_path)
    assert sp.corrupt == 0 and sp.backlog == 5
    assert numbers(take_all(sp, ack=True)) == [0, 2, 3, 4]
    assert sp.corrupt == 1 and sp.backlog == 0
    sp.close()
    sp = make(tmp_path)
    assert sp.backlog == 0  # the prefix went past it
    sp.close()


def test_frames_cannot_be_moved_between_spools_or_reordered(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, name in ((a, "dst-a"), (b, "dst-b")):
        sp = make(d, name=name)
        fill(sp, 0, 5)
        sp.close()
    (seg_a,), (seg_b,) = segments(a), segments(b)
    shutil.copyfile(seg_b, seg_a)  # same key, same ids, another spool's frames
    sp = make(a, name="dst-a")
    assert take_all(sp) == [] and sp.corrupt == 5 and sp.backlog == 0
    sp.close()

    sp = make(b, name="dst-b")
    sp.close()
    spans = frame_spans(seg_b)
    data = seg_b.read_bytes()
    (s1, e1), (s2, e2) = spans[1], spans[2]
    seg_b.write_bytes(data[:s1] + data[s2:e2] + data[s1:e1] + data[e2:])  # swap entries 1 and 2
    sp = make(b, name="dst-b")
    assert numbers(take_all(sp)) == [0, 2, 3, 4]  # the one out of order is refused
    assert sp.corrupt == 1
    sp.close()


def test_wrong_key_or_name_is_a_clear_error(tmp_path: Path) -> None:
    sp = make(tmp_path)
    fill(sp, 0, 3)
    sp.close()
    with pytest.raises(CryptoError, match="key does not match"):
        make(tmp_path, key=bytes(32))
    with pytest.raises(ConfigError, match="another spool"):
        make(tmp_path, name="dst-b")
    (tmp_path / "state.json").unlink()  # even without the state file
    with pytest.raises(CryptoError, match="key does not match"):
        make(tmp_path, key=bytes(32))
    sp = make(tmp_path)
    assert numbers(take_all(sp)) == [0, 1, 2]
    sp.close()


def test_no_plaintext_reaches_the_disk(tmp_path: Path) -> None:
    rng = random.Random(7)
    entries = [(f"site/secret-topic-{i}/lane", rng.randbytes(64)) for i in range(50)]
    sp = make(tmp_path, name="dst-confidential", segment_bytes=1000)
    for t, p in entries:
        sp.append(t, p)
    sp.flush()
    for it in sp.next_batch(20):
        sp.consumed(it.id)
    sp.close()
    sp = make(tmp_path, name="dst-confidential", segment_bytes=1000)
    assert [(it.topic, it.payload) for it in take_all(sp)] == entries[20:]
    sp.close()
    blob = b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()))
    assert len(blob) > 30 * 64
    assert b"secret-topic" not in blob and b"dst-confidential" not in blob
    for t, p in entries:
        assert t.encode() not in blob
        assert not any(p[i : i + 6] in blob for i in range(len(p) - 5))


# ---------------------------------------------------------------------------------------- disk full


def _disk_fills_after(monkeypatch: pytest.MonkeyPatch, budget: int, err: int = errno.ENOSPC) -> list[int]:
    left = [budget]
    real = os.write

    def write(fd: int, data: memoryview) -> int:
        if left[0] <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(data[: left[0]]))
        left[0] -= n
        return n

    monkeypatch.setattr(spool_mod, "_write", write)
    return left


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_on_flush_cuts_back_and_retries_the_same_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    sp = make(tmp_path, segment_bytes=10_000)
    fill(sp, 0, 3)
    (seg,) = segments(tmp_path)
    good = seg.stat().st_size
    for i in range(3, 8):
        sp.append(topic(i), payload(i))
    left = _disk_fills_after(monkeypatch, size_of(3) + 50)  # one frame and a half fit
    with pytest.raises(SpoolDiskFull) as exc_info:
        sp.flush()
    assert isinstance(exc_info.value, StorageFull)
    assert seg.stat().st_size == good  # back to the last complete frame
    assert sp.backlog == 8  # the buffered entries are kept
    assert numbers(take_all(sp)) == [0, 1, 2]
    with pytest.raises(SpoolDiskFull):
        sp.flush()
    left[0] = 10**9  # space again
    sp.flush()
    assert numbers(take_all(sp)) == [3, 4, 5, 6, 7]
    sp.close()
    sp = make(tmp_path, segment_bytes=10_000)
    assert (sp.torn_bytes, sp.corrupt) == (0, 0)
    assert numbers(take_all(sp)) == list(range(8))
    sp.close()


def test_disk_full_when_append_must_write_refuses_that_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_mod, "_BUF_LIMIT", 3 * size_of(0))
    sp = make(tmp_path)
    for i in range(3):
        sp.append(topic(i), payload(i))
    left = _disk_fills_after(monkeypatch, 0)
    with pytest.raises(SpoolDiskFull):
        sp.append(topic(3), payload(3))  # the buffer is full and cannot be written
    assert sp.backlog == 3
    left[0] = 10**9
    sp.append(topic(3), payload(3))
    sp.flush()
    assert numbers(take_all(sp)) == [0, 1, 2, 3]
    sp.close()


def test_disk_full_while_writing_the_state_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sp = make(tmp_path)
    fill(sp, 0, 4)
    for it in sp.next_batch(2):
        sp.consumed(it.id)
    left = _disk_fills_after(monkeypatch, 0)
    with pytest.raises(SpoolDiskFull):
        sp.sync()
    assert not list(tmp_path.glob("*.tmp"))
    left[0] = 10**9
    sp.sync()
    crash(sp)
    sp = make(tmp_path)
    assert numbers(take_all(sp)) == [2, 3]
    sp.close()


# ---------------------------------------------------------------------------------------- figures, threads


def test_oldest_age_follows_the_oldest_unconsumed_entry(tmp_path: Path) -> None:
    now = [1000.0]
    sp = make(tmp_path, clock=lambda: now[0])
    assert sp.oldest_age_s is None
    sp.append(topic(0), payload(0))
    now[0] = 1004.0
    sp.append(topic(1), payload(1))
    now[0] = 1010.0
    assert sp.oldest_age_s == 10.0  # still buffered
    sp.flush()
    assert sp.oldest_age_s == 10.0
    a, b = sp.next_batch(2)
    sp.consumed(b.id)
    assert sp.oldest_age_s == 10.0
    sp.consumed(a.id)
    assert sp.oldest_age_s is None
    sp.append(topic(2), payload(2))
    sp.close()
    now[0] = 1100.0
    sp = make(tmp_path, clock=lambda: now[0])
    assert sp.oldest_age_s == 90.0  # the append time is stored with the entry
    sp.close()


def test_sync_from_a_worker_thread_while_the_loop_appends_and_acks(tmp_path: Path) -> None:
    sp = make(tmp_path, segment_bytes=2000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def syncer() -> None:
        try:
            while not stop.is_set():
                sp.sync()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t = threading.Thread(target=syncer)
    t.start()
    try:
        for round_ in range(40):
            fill(sp, round_ * 25, 25)
            for it in sp.next_batch(20):
                sp.consumed(it.id)
    finally:
        stop.set()
        t.join()
    assert not errors
    assert sp.backlog == 1000 - 800
    expected = numbers(take_all(sp))
    sp.close()
    sp = make(tmp_path, segment_bytes=2000)
    assert numbers(take_all(sp)) == expected
    sp.close()


# ---------------------------------------------------------------------------------------- property


class SpoolMachine(RuleBasedStateMachine):
    """Random appends, flushes, hand-outs, acks, rewinds, syncs, clean restarts and kill -9s against
    a list-and-set model."""

    ON_FULL = "refuse_new"
    CAP = 2**30

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.sp = self.open()
        self.dropped = 0
        self.n = 0
        self.log: list[bytes] = []  # flushed, in order
        self.pending: list[bytes] = []  # appended, not flushed
        self.consumed: set[bytes] = set()
        self.handed: list[bytes] = []  # handed out since open/rewind, not consumed
        self.ids: dict[bytes, int] = {}
        self.synced_prefix = 0

    def prefix(self) -> int:
        i = 0
        while i < len(self.log) and self.log[i] in self.consumed:
            i += 1
        return i

    def reopened(self, prefix: int) -> None:
        self.consumed = set(self.log[:prefix])
        self.handed = []
        self.synced_prefix = prefix
        self.dropped = 0
        self.sp = self.open()
        assert self.sp.corrupt == 0

    def open(self) -> Spool:
        return make(self.dir, segment_bytes=256, max_bytes=self.CAP, on_full=self.ON_FULL)

    @rule(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=4))
    def append(self, sizes: list[int]) -> None:
        for size in sizes:
            self.append_one(size)

    def append_one(self, size: int) -> None:
        p = b"%06d" % self.n + b"x" * size
        self.n += 1
        t = topic(self.n)
        need = OVERHEAD + len(t) + len(p)
        live = [q for q in self.log + self.pending if q not in self.consumed]
        used = sum(OVERHEAD + len(topic(int(q[:6]) + 1)) + len(q) for q in live)
        assert self.sp.backlog_bytes == used
        if used + need > self.CAP and self.ON_FULL == "refuse_new":
            with pytest.raises(SpoolFull):
                self.sp.append(t, p)
            return
        expect = 0
        while used + need > self.CAP:  # drop_oldest: the oldest unconsumed go first
            q = live.pop(0)
            used -= OVERHEAD + len(topic(int(q[:6]) + 1)) + len(q)
            if q in self.pending:
                self.pending.remove(q)  # never written
            else:
                self.consumed.add(q)
                if q in self.handed:
                    self.handed.remove(q)
            expect += 1
        assert self.sp.append(t, p) == expect
        self.dropped += expect
        assert self.sp.dropped == self.dropped
        self.pending.append(p)

    @rule()
    def flush(self) -> None:
        self.sp.flush()
        self.log += self.pending
        self.pending = []

    @rule(n=st.integers(1, 6))
    def next_batch(self, n: int) -> None:
        got = self.sp.next_batch(n)
        expected = [p for p in self.log if p not in self.consumed and p not in self.handed][:n]
        assert [it.payload for it in got] == expected
        for it in got:
            assert self.ids.setdefault(it.payload, it.id) == it.id
        self.handed += expected

    @precondition(lambda self: self.handed)
    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.handed))
        self.sp.consumed(self.ids[p])
        self.handed.remove(p)
        self.consumed.add(p)

    @precondition(lambda self: len(self.handed) > 1)
    @rule()
    def consume_newest(self) -> None:  # acks out of order, more often than a uniform pick would
        p = self.handed.pop()
        self.sp.consumed(self.ids[p])
        self.consumed.add(p)

    @rule()
    def rewind(self) -> None:
        self.sp.rewind()
        self.handed = []

    @rule()
    def sync(self) -> None:
        self.sp.sync()
        self.synced_prefix = self.prefix()

    @rule()
    def restart(self) -> None:
        self.sp.close()
        self.log += self.pending
        self.pending = []
        self.reopened(self.prefix())

    @rule()
    def kill(self) -> None:
        crash(self.sp)
        self.pending = []
        self.reopened(self.synced_prefix)

    @invariant()
    def figures_agree(self) -> None:
        backlog = len(self.log) + len(self.pending) - len(self.consumed)
        assert self.sp.backlog == backlog
        assert (self.sp.oldest_age_s is None) == (backlog == 0)
        known = [self.ids[p] for p in self.log if p in self.ids]
        assert known == sorted(set(known))

    def teardown(self) -> None:
        self.sp.close()
        self.tmp.cleanup()


class BoundedDropOldest(SpoolMachine):
    ON_FULL = "drop_oldest"
    CAP = 450


class BoundedRefuseNew(SpoolMachine):
    CAP = 450


_settings = settings(max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SpoolMachine.TestCase.settings = _settings
BoundedDropOldest.TestCase.settings = _settings
BoundedRefuseNew.TestCase.settings = _settings
test_spool_against_a_model = SpoolMachine.TestCase
test_drop_oldest_spool_against_a_model = BoundedDropOldest.TestCase
test_refuse_new_spool_against_a_model = BoundedRefuseNew.TestCase
