"""What has been delivered, per destination, so a crash never delivers anything twice.

QoS 1 is at-least-once: after a crash (``kill -9``) the broker redelivers every message whose PUBACK
it had not processed, and the in-memory dedupe window is gone. Some of those messages had already
reached some destinations. The done log records each (device, sequence, destination) once that
destination has it — the vault when its frame is written, an MQTT uplink when the broker PUBACKs the
envelope — and a restarted gateway skips exactly those deliveries. Lines are written per batch (an
OS write: it survives the process; the syncer's fsync covers the machine), ``device<TAB>seq<TAB>dest``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from gateway.fileio import append_all, open_append, sync_and_close

__all__ = ["DoneLog"]


class DoneLog:
    def __init__(self, directory: Path, *, max_file_bytes: int = 4 * 1024 * 1024, keep_files: int = 2) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.keep_files = keep_files
        files = self._files()
        self._n = int(files[-1].stem.split("-")[1]) if files else 1
        self._buf: list[str] = []
        self.retired: list[io.FileIO] = []  # full files, fsynced and closed by the owner (as VaultWriter's)
        self._fh = open_append(self._path())

    def _files(self) -> list[Path]:
        return sorted(self.directory.glob("done-*.log"))

    def _path(self) -> Path:
        return self.directory / f"done-{self._n:06d}.log"

    def load(self) -> dict[tuple[str, int], set[str]]:
        """Everything recorded in the files kept: (device, seq) -> destinations that have it."""
        out: dict[tuple[str, int], set[str]] = {}
        for path in self._files()[-self.keep_files:]:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 3 or not parts[1].isdigit():
                        continue  # a torn last line after a crash
                    out.setdefault((parts[0], int(parts[1])), set()).add(parts[2])
        return out

    def add(self, device: str, seq: int, destination: str) -> None:
        self._buf.append(f"{device}\t{seq}\t{destination}\n")

    def flush(self) -> None:
        if not self._buf:
            return
        append_all(self._fh, "".join(self._buf).encode(), "done log")
        self._buf.clear()
        if self._fh.tell() >= self.max_file_bytes:
            self.retired.append(self._fh)
            self._n += 1
            self._fh = open_append(self._path())
            for old in self._files()[: -self.keep_files]:
                old.unlink(missing_ok=True)

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        sync_and_close(self.retired)
