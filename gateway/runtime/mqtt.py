"""The gateway's MQTT 5 client: the ``mqtt5`` codec (sans-I/O, Rust) driven by an asyncio Protocol.

Chosen by measurement (docs/ingest-choice.md, benchmarks/ingest_compare.py): client libraries, not
the gateway's work, dominated the per-message cost. Here the codec parses and writes packets; this
module only moves bytes and keeps MQTT's bookkeeping:

- every ``data_received`` parses all complete packets and hands the PUBLISHes to the owner in chunks
  of at most ``chunk`` (64), writing what each chunk produced (PUBACKs, uplink PUBLISHes) in one
  ``write`` before the next chunk is worked on: a read of hundreds of messages costs a few writes,
  and the first of them does not wait for the last;
- outgoing QoS-1 publishes get packet ids, respect the broker's receive maximum (a window; the rest
  waits in order), and are re-sent with the DUP flag after a reconnect until acknowledged;
- asyncio flow control: while the socket's buffer is past its high-water mark (``pause_writing``),
  publishes wait in order as their payloads and are encoded and written when it drains, so a large
  release (a re-timed batch of images) is not held four times over as packets, a joined write and a
  socket buffer;
- keepalive PINGREQs; CONNACK/SUBACK reason codes checked; a broken connection is reported, and
  the owner reconnects (``connect`` may be called again on the same object);
- with ``ordered_acks``, PUBACKs leave strictly in the order the broker sent the messages. The
  gateway holds acknowledgements for seconds (re-timing, burst holds) and acknowledges vault-only
  messages at once, and out of order that breaks Mosquitto (2.0) twice over, both measured
  (BENCHMARKS.md §4): it keeps a client's in-flight messages in a list, oldest first, and walks it on
  every PUBACK (``db__message_delete_outgoing``: 96 % of the broker's CPU), and it gives a queued
  message its packet id when it is queued, counting up without skipping ids still in flight, so with
  more than 65,535 messages queued for a client a new one arrives under the id of one still
  unacknowledged (eclipse-mosquitto/mosquitto#2431; 15,855 times in one re-timed 100,000-message run). Each
  QoS-1 message therefore gets an ``ack_id`` of its own, the owner acknowledges by it, and PUBACKs
  leave in arrival order: for two messages under one id the broker deletes the older first, which is
  then the one acknowledged. A message unacknowledged for longer than ``ack_wait_s`` (10 s: beyond
  the longest re-timing batch, e.g. a burst hold of 30 s) stops holding back those after it: it is
  set aside and acknowledged on its own when it is done, so one held device cannot fill the window
  and stall the site's ingest. PUBLISHes under an id still unacknowledged are counted in
  ``reused_ids``.

No other module imports ``mqtt5``; aiomqtt is used by the device simulator only.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import mqtt5

from gateway.errors import BrokerError

__all__ = ["Message", "MqttClient"]

_SubAck = mqtt5.SubAckPacket | mqtt5.UnsubAckPacket

_WRITE_AT = 1 << 20  # encoded publish bytes collected before they are written (and flow control asked)


@dataclass(slots=True)
class Message:
    """One received PUBLISH. ``packet_id`` is None at QoS 0. ``has_properties`` is true when the
    sender attached MQTT 5 properties (never passed on; a guard may flag them). Not frozen: a frozen
    dataclass sets each field through ``object.__setattr__`` (1.3 µs against 0.3 µs a message)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int | None
    duplicate: bool
    has_properties: bool
    ack_id: int | None = None  # with ordered_acks: this message's own handle for ``MqttClient.ack``


OnMessages = Callable[[list[Message]], None]
OnAck = Callable[[int], None]


class _Protocol(asyncio.Protocol):
    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = self.client._transport = cast(asyncio.Transport, transport)  # a stream protocol's
        self.client._write_paused = False

    def pause_writing(self) -> None:
        """The socket's buffer is past its high-water mark: publishes wait, unencoded, in order."""
        self.client._write_paused = True

    def resume_writing(self) -> None:
        c = self.client
        c._write_paused = False
        if c.connected and c._waiting:
            c._pump()
            c.flush()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        batch: list[Message] = []
        c = self.client
        c.rx_bytes += len(data)
        order = c._order if c.ordered_acks else None
        now = time.monotonic() if order is not None else 0.0
        with memoryview(buf) as mv:
            n_total = len(buf)
            while pos < n_total:
                try:
                    pkt, n = mqtt5.read(mv[pos:])
                except IndexError:  # incomplete packet: wait for more bytes
                    break
                except ValueError as exc:  # malformed from the broker: drop the connection
                    c._fail(BrokerError(f"malformed packet from broker: {exc}"))
                    return
                pos += n
                if type(pkt) is mqtt5.PublishPacket:
                    aid = None
                    if order is not None and pkt.packet_id is not None:
                        c._next_ack_id += 1
                        aid = c._next_ack_id
                        order.append((aid, pkt.packet_id, now))
                        n_in = c._in_flight_ids.get(pkt.packet_id, 0)
                        if n_in:
                            c.reused_ids += 1
                        c._in_flight_ids[pkt.packet_id] = n_in + 1
                    batch.append(
                        Message(
                            pkt.topic,
                            pkt.payload,
                            int(pkt.qos),
                            pkt.retain,
                            pkt.packet_id,
                            pkt.duplicate,
                            bool(
                                pkt.user_properties
                                or pkt.correlation_data
                                or pkt.response_topic
                                or pkt.content_type
                            ),
                            aid,
                        )
                    )
                else:
                    c._on_control(pkt)
        if pos:
            del buf[:pos]
        if batch:
            c.received += len(batch)
            if len(batch) <= c.chunk:
                c._on_messages(batch)
            else:
                # One read can hold hundreds of messages. Handing them over in chunks, each committed and
                # written out (uplink publishes, PUBACKs) before the next is worked on, keeps the first
                # message of a read from waiting for the last: the chunk bounds the added latency.
                for i in range(0, len(batch), c.chunk):
                    c._on_messages(batch[i : i + c.chunk])
                    c.flush()
                    if c._transport is None or c._transport.is_closing():
                        break
        c.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client._transport is self.transport:  # not a connection `connect` has replaced
            self.client._lost(exc)


class MqttClient:
    """One MQTT 5 connection. Keyword-only options; see the module docstring for the behaviour."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        clean_start: bool = False,
        session_expiry: int = 7 * 24 * 3600,
        keepalive: int = 30,
        receive_max: int = 65535,
        username: str | None = None,
        password: bytes | None = None,
        ssl: _ssl.SSLContext | None = None,
        on_messages: OnMessages | None = None,
        on_ack: OnAck | None = None,
        chunk: int = 64,
        ordered_acks: bool = False,
        ack_wait_s: float = 10.0,
    ) -> None:
        self.host, self.port, self.client_id = host, port, client_id
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.receive_max = receive_max
        self.username, self.password, self.ssl = username, password, ssl
        self._on_messages = on_messages or (lambda batch: None)
        self._on_ack = on_ack or (lambda pid: None)
        self.chunk = max(1, chunk)  # at most this many PUBLISHes handed over per on_messages call
        self.ordered_acks = ordered_acks
        self.reused_ids = 0  # PUBLISHes that came under a packet id still unacknowledged (ordered_acks)
        self.ack_wait_s = ack_wait_s
        self._order: deque[tuple[int, int, float]] = deque()  # (ack_id, packet id, arrival), oldest first
        self._set_aside: dict[int, int] = {}  # ack_id -> packet id: held past ack_wait_s, acked on its own
        self._in_flight_ids: dict[int, int] = {}  # packet id -> how many of _order carry it
        self._acked_early: set[int] = set()  # ack_ids acknowledged by the owner, written once older ones are
        self._next_ack_id = 0
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._connack: asyncio.Future[mqtt5.ConnAckPacket] | None = None
        self._subacks: dict[int, asyncio.Future[_SubAck]] = {}
        self._next_id = 0
        # Outgoing QoS-1 publishes: in flight (sent, awaiting PUBACK) and waiting (beyond the window).
        self._inflight: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self._waiting: deque[tuple[int, str, bytes]] = deque()
        self._window = 20
        # Set while the transport's buffer is past its high-water mark (asyncio flow control): _pump
        # stops, so a large release waits as its payloads (one copy) instead of as encoded packets, a
        # joined write and a socket buffer (three more). Resent publishes keep their DUP flag meanwhile.
        self._write_paused = False
        self._dup_ids: set[int] = set()
        self._out_bytes = 0  # encoded publishes in _out, not yet written
        self._ping_task: asyncio.Task[None] | None = None
        self._pong: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[Exception | None] | None = None
        self.connected = False
        self.session_present = False
        self.received = 0
        self.rx_bytes = 0  # bytes read from the broker: a SUBACK queued behind a backlog is still coming
        self.acked_out = 0
        self.pending_out_bytes = 0  # payload bytes of the QoS-1 publishes not yet acknowledged
        self.refused_out = 0  # outgoing publishes the broker acknowledged with an error reason (e.g. ACL)

    # ---------------------------------------------------------------- connection
    async def connect(self, timeout: float = 10.0) -> bool:
        loop = asyncio.get_running_loop()
        old = self._transport
        if old is not None:  # still open (e.g. a caller retrying after a timeout): this one replaces it
            self._lost(BrokerError("replaced by a new connection"))  # its futures fail, its state goes
            old.abort()  # its connection_lost, later, leaves the new connection alone
        self.closed = loop.create_future()
        self._connack = loop.create_future()
        self._out.clear()  # nothing written for an earlier connection goes out on this one
        self._out_bytes = 0
        self._forget_acks()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: _Protocol(self), self.host, self.port, ssl=self.ssl), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise BrokerError(f"cannot reach broker {self.host}:{self.port}: {exc}") from exc
        self._write_now(
            mqtt5.ConnectPacket(
                self.client_id,
                clean_start=self.clean_start,
                session_expiry_interval=self.session_expiry,
                keep_alive=self.keepalive,
                receive_max=self.receive_max,
                username=self.username,
                password=self.password,
            ).write()
        )
        try:
            ack = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except asyncio.TimeoutError as exc:
            self.abort()
            raise BrokerError("broker did not answer CONNECT") from exc
        if ack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            self.abort()
            raise BrokerError(f"broker refused the connection: {ack.reason_code.name}")
        self.connected = True
        self.session_present = ack.session_present
        self._window = max(1, ack.receive_max)
        # After a reconnect, everything unacknowledged goes again (DUP set), oldest first. What _out
        # holds now was written for this connection: a resumed session redelivers together with the
        # CONNACK, before `connected` is set, and the owner's PUBACKs for those messages wait here.
        self._resend_inflight()
        if self.keepalive:
            self._ping_task = asyncio.create_task(self._pinger(), name=f"mqtt-ping-{self.client_id}")
        return ack.session_present

    async def subscribe(self, *filters: tuple[str, int], timeout: float = 10.0) -> list[int]:
        pid = self._alloc_id()
        fut: asyncio.Future[_SubAck]  # _on_control: both kinds, by id
        fut = asyncio.get_running_loop().create_future()
        self._subacks[pid] = fut
        tfs = [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS(q)) for f, q in filters]
        self._write_now(mqtt5.SubscribePacket(pid, tfs).write())
        ack = await self._await_ack(fut, timeout)
        codes = [int(c) for c in ack.reason_codes]
        if any(c >= 0x80 for c in codes):
            raise BrokerError(f"subscription refused: {[mqtt5.SubAckReasonCode(c).name for c in codes]}")
        return codes

    async def _await_ack(self, fut: asyncio.Future[_SubAck], timeout: float) -> _SubAck:
        """The (UN)SUBACK, or TimeoutError after ``timeout`` seconds in which nothing at all came.

        A resumed session's backlog comes first: Mosquitto sends up to ``max_inflight_messages``
        (20,000 in Edgeward's config) together with the CONNACK, and answers the SUBSCRIBE after them.
        A restarted gateway working through them for longer than ``timeout`` is not a dead broker
        (measured: a restart after 60 s down, 1,000 devices, failed here with a fixed 10 s wait)."""
        seen = -1
        try:
            while seen != self.rx_bytes:
                seen = self.rx_bytes
                done, _ = await asyncio.wait((fut,), timeout=timeout)
                if done:
                    return fut.result()
        finally:
            fut.cancel()  # no-op once answered; as wait_for did on a timeout or when cancelled
        raise TimeoutError(f"no answer from the broker for {timeout:g} s")

    async def unsubscribe(self, *filters: str, timeout: float = 10.0) -> list[int]:
        pid = self._alloc_id()
        fut: asyncio.Future[_SubAck]  # _on_control: both kinds, by id
        fut = asyncio.get_running_loop().create_future()
        self._subacks[pid] = fut
        self._write_now(mqtt5.UnsubscribePacket(pid, list(filters)).write())
        ack = await self._await_ack(fut, timeout)
        return [int(c) for c in ack.reason_codes]

    async def disconnect(self) -> None:
        """Clean shutdown: everything queued is written, and a PINGREQ/PINGRESP round trip proves the
        broker has processed our PUBACKs before DISCONNECT (measured: without it Mosquitto can still be
        working through them, and redelivers those messages to the persistent session)."""
        if self._transport is not None and self.connected:
            self.flush()
            self._pong = asyncio.get_running_loop().create_future()
            self._write_now(mqtt5.PingReqPacket().write())
            try:
                await asyncio.wait_for(asyncio.shield(self._pong), 5)
            except (asyncio.TimeoutError, BrokerError):
                pass
            if self._transport is not None:
                self._write_now(mqtt5.DisconnectPacket().write())
                self._transport.close()
        self._stop_ping()
        if self.closed is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 5)
            except asyncio.TimeoutError:
                pass

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # ---------------------------------------------------------------- sending
    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> int | None:
        """Queue a publish (written at the next ``flush``). QoS 1 returns its packet id; the owner's
        ``on_ack(pid)`` is called when the broker acknowledges it."""
        if qos == 0:
            self._out.append(mqtt5.PublishPacket(topic, payload).write())
            return None
        pid = self._alloc_id()
        self._waiting.append((pid, topic, payload))
        self.pending_out_bytes += len(payload)
        if self.connected and len(self._inflight) < self._window and not self._write_paused:
            self._pump()
        return pid

    def ack(self, packet_id: int, ack_id: int | None = None) -> None:
        """PUBACK a received QoS-1 message (written at the next ``flush``). With ``ordered_acks`` and the
        message's ``ack_id``: once every message received before it is acknowledged too."""
        if ack_id is None or not self.ordered_acks:
            self._out.append(mqtt5.PubAckPacket(packet_id).write())
            return
        order = self._order
        if not order or ack_id < order[0][0]:
            pid = self._set_aside.pop(ack_id, None)
            if pid is not None:  # held long and set aside: acknowledged on its own
                self._write_ack(pid)
            return  # else older than every message in flight: its connection is gone (redelivered)
        if order[0][0] != ack_id:
            self._acked_early.add(ack_id)
            too_old = time.monotonic() - self.ack_wait_s
            if order[0][2] >= too_old:
                return
            # the oldest has waited too long (a burst hold): it and any like it stop holding the rest back
            while order and order[0][0] not in self._acked_early and order[0][2] < too_old:
                aid, pid, _ = order.popleft()
                self._set_aside[aid] = pid
        else:
            self._write_ack(order.popleft()[1])
        early = self._acked_early
        while early and order and order[0][0] in early:
            aid, pid, _ = order.popleft()
            early.discard(aid)
            self._write_ack(pid)

    def _forget_acks(self) -> None:
        """A new or lost connection: acknowledgements owed on the old one are meaningless (redelivered)."""
        self._order.clear()
        self._in_flight_ids.clear()
        self._acked_early.clear()
        self._set_aside.clear()

    def _write_ack(self, pid: int) -> None:
        self._out.append(mqtt5.PubAckPacket(pid).write())
        n = self._in_flight_ids.pop(pid, 1) - 1
        if n > 0:
            self._in_flight_ids[pid] = n

    def release_acks(self) -> None:
        """Write every acknowledgement still waiting for older messages, in arrival order (when the
        gateway stops: what it finished is acknowledged, the rest is redelivered next time)."""
        early = self._acked_early
        if not early:
            return
        order, keep = self._order, []
        for item in order:
            if item[0] in early:
                self._write_ack(item[1])
            else:
                keep.append(item)
        order.clear()
        order.extend(keep)
        early.clear()

    @property
    def write_buffer_bytes(self) -> int:
        """Bytes written and not yet taken by the socket (a second copy of what is in flight while the
        broker reads slower than we write)."""
        t = self._transport
        return t.get_write_buffer_size() if t is not None and not t.is_closing() else 0

    @property
    def acks_waiting(self) -> int:
        """Acknowledgements given by the owner and not yet written (older messages are unacknowledged)."""
        return len(self._acked_early)

    @property
    def acks_set_aside(self) -> int:
        """Messages unacknowledged past ``ack_wait_s``, no longer holding the others back."""
        return len(self._set_aside)

    def flush(self) -> None:
        if self._out and self._transport is not None and self.connected:
            out = self._out
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            self._out_bytes = 0

    def take_pending(self) -> list[tuple[int, str, bytes]]:
        """Hand back every unacknowledged QoS-1 publish, oldest first, and forget them: the owner
        stores them elsewhere (a destination declared down). One sent before the connection broke
        may have reached the broker, so whoever re-sends them may deliver it twice."""
        out = [(pid, t, p) for pid, (t, p) in self._inflight.items()] + list(self._waiting)
        self._inflight.clear()
        self._waiting.clear()
        self._dup_ids.clear()
        self.pending_out_bytes = 0
        return out

    @property
    def pending_out(self) -> int:
        """Outgoing QoS-1 publishes not yet acknowledged (in flight or waiting)."""
        return len(self._inflight) + len(self._waiting)

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def _resend_inflight(self) -> None:
        """On a new connection: what was in flight goes again with DUP set, oldest first, ahead of what
        still waits. A resend that has to wait for the socket keeps its DUP flag, across another
        reconnect too."""
        resend = list(self._inflight.items())
        self._inflight.clear()
        # in their original order, ahead of anything still waiting (extendleft reverses, hence reversed)
        self._waiting.extendleft(reversed([(pid, topic, payload) for pid, (topic, payload) in resend]))
        self._dup_ids |= {pid for pid, _ in resend}
        self._pump()
        self.flush()

    def _pump(self) -> None:
        window, inflight, waiting, out = self._window, self._inflight, self._waiting, self._out
        dup_ids = self._dup_ids
        while waiting and len(inflight) < window and not self._write_paused:
            pid, topic, payload = waiting.popleft()
            inflight[pid] = (topic, payload)
            dup = bool(dup_ids) and pid in dup_ids
            if dup:
                dup_ids.discard(pid)
            pkt = mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=pid, duplicate=dup)
            data = pkt.write()
            out.append(data)
            self._out_bytes += len(data)
            if self._out_bytes >= _WRITE_AT:  # written now: the transport may ask us to pause
                self.flush()

    def _alloc_id(self) -> int:
        # Publishes leave in order, so every id handed out after one still waiting waits too: with
        # 65,535 outstanding the next id could be one that waits (only _inflight is searched below).
        if len(self._inflight) + len(self._waiting) >= 65535:
            raise BrokerError("no free MQTT packet id (65535 publishes outstanding)")
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            pid = self._next_id
            if pid not in self._inflight and pid not in self._subacks:
                return pid
        raise BrokerError("no free MQTT packet id (65535 in flight)")

    def _write_now(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    # ---------------------------------------------------------------- receiving
    def _on_control(self, pkt: mqtt5.Packet) -> None:
        # `type(pkt) is X` in each test (mypy narrows pkt by it): a PUBACK, the usual packet here,
        # still costs one type() call
        if type(pkt) is mqtt5.PubAckPacket:
            pid = pkt.packet_id
            done = self._inflight.pop(pid, None)
            if done is not None:
                self.pending_out_bytes -= len(done[1])
                self.acked_out += 1
                if int(pkt.reason_code) >= 0x80:
                    self.refused_out += 1
                if self._waiting and self.connected:
                    self._pump()
                self._on_ack(pid)
        elif type(pkt) is mqtt5.ConnAckPacket:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(pkt)
        elif type(pkt) is mqtt5.SubAckPacket or type(pkt) is mqtt5.UnsubAckPacket:
            fut = self._subacks.pop(pkt.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(pkt)
        elif type(pkt) is mqtt5.DisconnectPacket:
            self._fail(BrokerError(f"broker disconnected us: {pkt.reason_code.name}"))
        elif type(pkt) is mqtt5.PingRespPacket:
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        # PUBREC/PUBREL never occur (QoS 2 is not used).

    def _fail(self, exc: Exception) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(exc)
        self.abort()

    def _lost(self, exc: Exception | None) -> None:
        self.connected = False
        self._transport = None
        self._out.clear()  # PUBACKs for a dead connection are meaningless; the broker redelivers
        self._forget_acks()
        self._stop_ping()
        err = exc or BrokerError("connection closed")
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(BrokerError(f"connection lost during CONNECT: {err}"))
        if self._pong is not None and not self._pong.done():
            self._pong.set_exception(BrokerError("connection lost"))
        for fut in self._subacks.values():
            if not fut.done():
                fut.set_exception(BrokerError("connection lost during SUBSCRIBE"))
        self._subacks.clear()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(exc)

    async def _pinger(self) -> None:
        ping = mqtt5.PingReqPacket().write()
        while self.connected:
            await asyncio.sleep(self.keepalive / 2)
            self._write_now(ping)

    def _stop_ping(self) -> None:
        if self._ping_task is not None:
            self._ping_task.cancel()
            self._ping_task = None
