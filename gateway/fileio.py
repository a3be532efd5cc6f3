"""Appending to the gateway's own files so that a full disk never leaves half a write behind.

The audit chain, the vault segments and the done log are append-only and framed: a partial write
would leave a torn frame in the middle of the file once later writes succeed. ``append_all``
writes everything or, on failure, cuts the file back to where it was and raises; a full disk
(ENOSPC, EDQUOT) becomes :class:`gateway.errors.StorageFull`, which the gateway answers by pausing
intake (the broker holds messages for its session), alerting, and retrying the same bytes.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

from gateway.errors import StorageFull

__all__ = ["open_append", "append_all", "close_first", "sync_and_close", "FULL_ERRNOS"]

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def open_append(path: Path) -> io.FileIO:
    """An unbuffered append handle: every ``append_all`` is one or more write(2) calls, no copy."""
    return open(path, "ab", buffering=0)


def append_all(fh: io.FileIO, data: bytes, what: str) -> None:
    """Write all of ``data`` at the end of ``fh`` or nothing at all."""
    start = fh.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            n = fh.write(view)
            if n is None:  # pragma: no cover - only non-blocking files return None
                continue
            view = view[n:]
    except OSError as exc:
        try:
            os.ftruncate(fh.fileno(), start)
            fh.seek(start)
        except OSError:  # the cut itself failed: the torn tail is cut on the next open
            pass
        if exc.errno in FULL_ERRNOS:
            raise StorageFull(f"{what}: no space left ({exc.strerror})") from exc
        raise


def close_first(files: list[io.FileIO], n: int) -> None:
    """Close and forget the ``n`` oldest of a writer's retired files (its owner has fsynced them)."""
    for fh in files[:n]:
        fh.close()
    del files[:n]


def sync_and_close(files: list[io.FileIO]) -> None:
    """fsync and close every retired file (a writer's ``close``)."""
    for fh in files:
        os.fsync(fh.fileno())
    close_first(files, len(files))
