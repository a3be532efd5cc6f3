"""A private Mosquitto for one Edgeward site, test or demo: config rendered here, process owned here.

Edgeward never uses the system's broker. ``BrokerConfig.render()`` writes every option Edgeward relies
on with a paragraph saying why (Mosquitto's own defaults silently drop QoS-1 messages under bursts, so
the queue and in-flight limits are set deliberately). ``MosquittoBroker`` starts the binary on
loopback, waits until it accepts connections, and stops it; it must never be pointed at a port it did
not choose itself.
"""

from __future__ import annotations

import getpass
import os
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import BrokerError

__all__ = ["BrokerConfig", "MosquittoBroker", "TlsListener", "free_port", "mosquitto_binary", "nofile_target"]

INSTALL_HINT = "install it with: sudo apt-get install -y mosquitto   (Debian/Ubuntu)"


def mosquitto_binary() -> str:
    """Path of the mosquitto binary (PATH, then /usr/sbin), or BrokerError with the install step."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise BrokerError(f"mosquitto not found; {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the caller retries if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class TlsListener:
    """The devices' listener: mutual TLS, the certificate's CN is the MQTT username."""

    port: int
    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    # Address the device listener binds (devices are on the site network in production); None: the
    # broker's ``host`` (loopback), as in tests and the demo. The gateway's listener stays on ``host``.
    host: str | None = None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything Edgeward sets in Mosquitto. ``port`` is the loopback listener (gateway; and devices
    too when ``tls`` is None, i.e. in tests and the plain-text demo)."""

    port: int
    workdir: Path
    host: str = "127.0.0.1"
    tls: TlsListener | None = None
    acl_file: Path | None = None
    password_file: Path | None = None
    persistence: bool = True
    max_queued_messages: int = 1_000_000
    max_queued_bytes: int = 2 * 1024**3
    max_inflight_messages: int = 20_000
    max_inflight_bytes: int = 256 * 1024**2
    max_packet_size: int = 2 * 1024**2
    max_connections: int = -1
    # RLIMIT_NOFILE of the broker process: one descriptor per connection, plus listeners and files.
    max_open_files: int = 65_536
    sys_interval: int = 1
    extra: tuple[str, ...] = field(default=())

    def render(self) -> str:
        user = _current_user()
        lines = [
            "# Rendered by Edgeward; do not edit. Every option Edgeward relies on is set here on purpose.",
            "",
            "# Each listener has its own security settings (the device listener requires certificates,",
            "# the gateway's loopback listener does not).",
            "per_listener_settings true",
            "",
            "# Mosquitto drops privileges to this user when started as root; keep the invoking user so the",
            "# broker can write its persistence file in Edgeward's work directory.",
            f"user {user}",
            "",
            "# Persistent sessions survive a broker restart only with persistence on: the gateway's QoS-1",
            "# session (and every message queued for it) is written here.",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_interval 30",
            "",
            "# Messages queued per client beyond those in flight. Mosquitto's default (1000) silently drops",
            "# QoS-1 messages to a busy subscriber while still acknowledging every publisher; Edgeward's",
            "# gateway is that subscriber, so the queue is sized for bursts and drops are watched through",
            "# $SYS/broker/publish/messages/dropped.",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            "",
            "# QoS-1 messages in flight to one client at a time (default 20): the gateway acknowledges in",
            "# batches, so a deeper window keeps the pipe full.",
            f"max_inflight_messages {self.max_inflight_messages}",
            "# The gateway acknowledges a message only after its re-timed uplink batch (1 s by default) is",
            "# released and acknowledged: the window must cover a period of traffic, bounded in bytes too.",
            f"max_inflight_bytes {self.max_inflight_bytes}",
            "",
            "# The largest MQTT packet accepted, in bytes; the gateway's own payload limits are per device",
            "# type and lower.",
            f"max_packet_size {self.max_packet_size}",
            "",
            "# Publish $SYS statistics every N seconds; the gateway counts drops from them.",
            f"sys_interval {self.sys_interval}",
            "",
            "# Nagle's algorithm adds latency to small QoS-1 acknowledgements.",
            "set_tcp_nodelay true",
            "",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "connection_messages false",
            "",
            "# Connections: every device holds its own, so a site runs 10,000 and more. max_connections -1",
            "# is unlimited; the real bound is the process's open-file limit, which Edgeward raises to",
            f"# {self.max_open_files} when it starts the broker (RLIMIT_NOFILE; Mosquitto has no option for it).",
            "# The listen backlog is Mosquitto's own; devices stagger their connects to stay under it.",
            "",
            "# The gateway's listener: loopback only.",
            f"listener {self.port} {self.host}",
            f"max_connections {self.max_connections}",
        ]
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines += ["allow_anonymous true"]
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        if self.tls is not None:
            t = self.tls
            lines += [
                "",
                "# The devices' listener: mutual TLS; the certificate's CN becomes the MQTT username, so a",
                "# device cannot claim another device's identity.",
                f"listener {t.port} {t.host or self.host}",
                f"max_connections {self.max_connections}",
                f"cafile {t.cafile}",
                f"certfile {t.certfile}",
                f"keyfile {t.keyfile}",
                "require_certificate true",
                "use_identity_as_username true",
                "# ...and the client id too: a device cannot take over another device's session.",
                "use_username_as_clientid true",
                "allow_anonymous false",
            ]
            if t.crlfile is not None:
                lines.append(f"crlfile {t.crlfile}")
            if self.acl_file is not None:
                lines.append(f"acl_file {self.acl_file}")
        lines += list(self.extra)
        return "\n".join(lines) + "\n"


def _current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): numeric uid is not accepted, root is the safe guess
        return "root"


class MosquittoBroker:
    """A Mosquitto process this object started and will stop.

    Use as a context manager (sync; it does no asyncio). ``port`` is the loopback listener.
    """

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = config.workdir / "mosquitto.conf"
        self.log_path = config.workdir / "mosquitto.log"

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.config.host}:{self.config.port}"

    def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config.render())
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_open_files_limit(self.config.max_open_files),  # noqa: PLW1509 - one setrlimit call
            )
        finally:
            log.close()
        probes = [(self.config.host, self.config.port)]
        if self.config.tls is not None:
            tls_host = self.config.tls.host or self.config.host
            probes.append(("127.0.0.1" if tls_host in ("0.0.0.0", "") else tls_host, self.config.tls.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {self._log_tail()}")
            if all(_accepts(h, p) for h, p in probes):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections within {timeout}s: {self._log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, for fault tests: no clean shutdown, no final persistence write."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-600:].strip()
        except OSError:
            return ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nofile_target(want: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE a process can have when it asks for ``want``: past the current
    hard limit only with privilege (root, CAP_SYS_RESOURCE), never below the current soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft == inf or (want != inf and soft >= want):
        return soft, hard
    if hard == inf or want <= hard:
        return want, hard
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
        except (OSError, ValueError):
            ceiling = want
        want = min(want, ceiling)
        return want, want
    return hard, hard


def _open_files_limit(want: int) -> Callable[[], None]:
    """A preexec function raising RLIMIT_NOFILE in the broker's process only (computed here, in the
    parent: the child between fork and exec only makes the one system call)."""
    limits = nofile_target(want)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fallback = (hard, hard) if hard == resource.RLIM_INFINITY or hard < limits[0] else limits

    def apply() -> None:
        for lim in (limits, fallback):  # past the hard limit may be refused (no CAP_SYS_RESOURCE)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, lim)
                return
            except (ValueError, OSError):
                continue

    return apply


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
