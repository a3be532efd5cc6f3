"""The local vault: encrypted envelopes in append-only segment files on the site's own disk.

A segment ``vault-NNNNNN.seg`` is a sequence of frames: a 4-byte big-endian length, then one
envelope (``gateway.crypto.envelope``). The vault holds only ciphertext; reading it back needs the
site's keyring. A crash can leave a partial last frame; readers report it and stop there.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from gateway.errors import EdgewardError
from gateway.fileio import append_all, open_append, sync_and_close

__all__ = ["VaultWriter", "read_vault"]

_LEN = struct.Struct(">I")


class VaultWriter:
    def __init__(self, directory: Path, *, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        existing = sorted(directory.glob("vault-*.seg"))
        self._seg = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        self._buf: list[bytes] = []
        # Full segments, still open: whoever fsyncs this writer (the gateway's syncer thread, within a
        # second) fsyncs and closes them (``fileio.close_first``). Closing one unsynced would leave its
        # last frames, acknowledged already, to the kernel's writeback whenever it comes.
        self.retired: list[io.FileIO] = []
        self._open()

    def _open(self) -> None:
        # A new segment per process start: never append after a possibly torn tail.
        self._path = self.directory / f"vault-{self._seg:06d}.seg"
        self._fh = open_append(self._path)
        self._size = self._fh.tell()

    def append(self, envelope: bytes) -> None:
        self._buf.append(_LEN.pack(len(envelope)))
        self._buf.append(envelope)
        self._size += 4 + len(envelope)

    def flush(self, *, sync: bool = False) -> None:
        if self._buf:
            append_all(self._fh, b"".join(self._buf), f"vault {self.directory.name}")
            self._buf.clear()
        if sync:
            os.fsync(self._fh.fileno())
        if self._size >= self.segment_bytes:
            self.retired.append(self._fh)
            self._seg += 1
            self._open()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush(sync=True)
            self._fh.close()
        sync_and_close(self.retired)


def read_vault(directory: Path, *, strict: bool = False) -> Iterator[bytes]:
    """Every envelope in the vault, oldest first.

    A segment whose writer crashed can end in a partial frame. That frame was never acknowledged (the
    acknowledgement waits for the write), so its message was redelivered and written again later: it
    is skipped, or with ``strict`` raised as an error."""
    for path in sorted(directory.glob("vault-*.seg")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            n = _LEN.unpack_from(data, pos)[0] if pos + 4 <= len(data) else None
            if n is None or pos + 4 + n > len(data):
                if strict:
                    raise EdgewardError(f"{path.name}: partial frame at byte {pos}")
                break
            yield data[pos + 4 : pos + 4 + n]
            pos += 4 + n
