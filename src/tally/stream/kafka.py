"""The Kafka source connector: an operator's topic of events into the one ingestion path.

``tally consume --from kafka://host:9092/topic --group G`` (CONTRACT §1) reads a topic whose
messages are events in the envelope of CONTRACT §2, one JSON object a message. Every message
takes the path of ``POST /v1/events:batch``: the same decode and validation, quarantine,
residency, pseudonymisation and dedup by ``event_id`` (``IngestService.prepare``, the single
writer's durable group commit). Offsets are committed only once the events of the messages
below them are durable in the journal, so a consumer killed at any point re-reads at most
what was not yet committed, and dedup makes the re-read count once.

A message that is no event at all (no value, not UTF-8, not JSON, not one JSON object, over
the byte limit) is a *poison message*: it is quarantined with its reason and its topic,
partition and offset, and its offset committed like any other: it never blocks its partition.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tally.config_values import KafkaAddress
from tally.errors import ServiceUnavailable, UserError
from tally.events.envelope import ValidationContext
from tally.ingest.batch import PreparedBatch, Rejection
from tally.ingest.service import IngestService
from tally.storage.schema import EVENTS_SCHEMA

log = logging.getLogger(__name__)

KEPT_BYTES = 4096  # of a poison message over the byte limit: its first bytes only
RETRY_MAX_SECONDS = 30.0  # the longest wait before taking a refused batch again
LAG_EVERY_SECONDS = 1.0


@dataclass
class SourceStats:
    """What the connector did since it started (``/metrics``, ``tally consume``'s summary)."""

    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0  # events refused by validation or residency, poison messages included
    poison: int = 0
    commits: int = 0
    refused_writes: int = 0  # groups the journal or the backlog bound refused for a while
    lag: dict[int, int] = field(default_factory=dict)  # partition → messages not consumed


class KafkaSource:
    """One consumer of a consumer group, feeding one ingestion service.

    Synchronous on purpose: a group of messages is prepared, made durable, then its offsets
    committed before the next group is taken, so a rebalance (which runs inside ``consume``)
    never finds a group in flight and the offsets committed are always durable ones."""

    def __init__(self, ingest: IngestService, address: KafkaAddress, group: str, *,
                 served_regions: frozenset[str], max_events: int, max_bytes: int,
                 poll_seconds: float = 0.5) -> None:
        self.ingest = ingest
        self.address = address
        self.group = group
        self.client_id = f"kafka:{address.topic}"  # the quarantine's "who sent it"
        self._served = served_regions
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._poll = poll_seconds
        self.stats = SourceStats()
        self._last_error: int | None = None
        self._closing = False
        self._committed: dict[int, int] = {}  # partition → offset committed (lag, below)
        self._lag_at = 0.0
        self._lock = threading.Lock()
        self._consumer = Consumer({
            "bootstrap.servers": address.bootstrap,
            "group.id": group,
            "client.id": f"tally-consume-{group}",
            "enable.auto.commit": False,  # committed by hand, after the journal's fsync
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",  # a new group reads the topic from its start
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            # bounded memory: what librdkafka prefetches, and the largest message it takes
            "queued.max.messages.kbytes": 32 * 1024,
            "fetch.max.bytes": max(max_bytes, 1 << 20) * 2,
            "max.partition.fetch.bytes": max(max_bytes, 1 << 20),
            "session.timeout.ms": 10_000,
            "max.poll.interval.ms": 600_000,  # a journal refusing writes may hold a group
            # librdkafka's own log is silenced: its errors come to _on_error, once per change
            "log_level": 0,
            "error_cb": self._on_error,
        })

    def _on_error(self, error: KafkaError) -> None:
        """Broker errors (unreachable, authentication, …), logged when they change; librdkafka
        retries by itself, and a fatal one stops :meth:`run`."""
        if self._closing or error.code() == self._last_error:
            return
        self._last_error = error.code()
        log.warning("kafka: %s", error.str(), extra={"topic": self.address.topic,
                                                  "fatal": error.fatal()})

    # -- the loop ---------------------------------------------------------------------------
    def check(self, timeout: float = 10.0) -> int:
        """The topic's partition count; KafkaException or LookupError when the brokers do not
        answer within ``timeout`` seconds or have no such topic (a clear start-up error)."""
        metadata = self._consumer.list_topics(self.address.topic, timeout=timeout)
        topic = metadata.topics.get(self.address.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            why = topic.error.str() if topic is not None and topic.error else "no partitions"
            raise LookupError(f"topic {self.address.topic!r} at {self.address.bootstrap}: {why}")
        return len(topic.partitions)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; what was not committed is re-read next time."""
        self._consumer.subscribe([self.address.topic], on_assign=self._assigned)
        while not stop.is_set():
            messages = [m for m in self._consumer.consume(self._max_events, self._poll)
                        if self._usable(m)]
            for group in self._groups(messages):
                if not self._store(group, stop):
                    break  # stopping: the rest is re-read next time, like this group
                self._commit(group)
            self._measure_lag()

    def close(self) -> None:
        """Leave the group (its partitions go to the other members at once)."""
        self._closing = True  # errors queued before the close are no news any more
        self._consumer.close()

    def _groups(self, messages: list[Message]) -> Iterator[list[Message]]:
        """The messages in groups of at most ``max_bytes`` (one message over it is a group
        alone, and poison): a group is bounded like a request's body."""
        group: list[Message] = []
        size = 0
        for message in messages:
            length = len(message.value() or b"")
            if group and size + length > self._max_bytes:
                yield group
                group, size = [], 0
            group.append(message)
            size += length
        if group:
            yield group

    def _usable(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return True
        if error.fatal():
            raise KafkaException(error)
        log.warning("kafka: %s", error.str(), extra={"topic": self.address.topic,
                                                      "partition": message.partition()})
        return False

    # -- one group of messages ----------------------------------------------------------------
    def _store(self, messages: list[Message], stop: threading.Event) -> bool:
        """Make the group's events durable (True), retrying while the journal or the backlog
        refuses them; False when asked to stop first (nothing committed: re-read later)."""
        batch = self.prepare(messages)
        first = messages[0]
        trace_id = f"tr_kafka_{first.partition()}_{first.offset()}"
        wait = 0.0
        while True:
            try:
                self.ingest.applier.refuse_if_behind()
                receipt = self.ingest.submit_prepared(batch, trace_id).result()
                break
            except ServiceUnavailable as exc:
                with self._lock:
                    self.stats.refused_writes += 1
                wait = min(RETRY_MAX_SECONDS, max(float(exc.extra.get("retry_after", 1)),
                                                  wait * 2))
                log.warning("kafka: ingestion refused a group, retrying",
                            extra={"detail": exc.detail, "retry_in_s": wait})
                if stop.wait(wait):
                    return False
        with self._lock:
            stats = self.stats
            stats.messages += len(messages)
            stats.accepted += int(receipt["accepted"])
            stats.duplicates += int(receipt["duplicates"])
            stats.rejected += int(receipt["rejected"])
        return True

    def prepare(self, messages: list[Message]) -> PreparedBatch:
        """The group as one prepared batch: its events, and a rejection for every event
        validation refused and every poison message (index = the message's place)."""
        ctx = ValidationContext(received_at=datetime.now(UTC), served_regions=self._served)
        poison: list[Rejection] = []
        values: list[tuple[int, bytes]] = []
        for i, message in enumerate(messages):
            problem = self._unreadable(message)
            if problem is None:
                values.append((i, message.value() or b""))
            else:
                poison.append(self._poison(i, message, problem))
        try:
            batches = [self._prepare_values(values, ctx)]
        except _NotOnePerMessage:  # find the message(s) at fault one by one
            batches = []
            for i, value in values:
                try:
                    batches.append(self._prepare_values([(i, value)], ctx))
                except _NotOnePerMessage as exc:
                    poison.append(self._poison(i, messages[i], exc.reason))
        with self._lock:
            self.stats.poison += len(poison)
        return _combined(batches, poison, ctx.received_at, self.client_id)

    def _prepare_values(self, values: list[tuple[int, bytes]],
                        ctx: ValidationContext) -> PreparedBatch:
        """One batch of message values (each must be exactly one JSON value)."""
        body = b"[" + b",".join(value for _, value in values) + b"]"
        try:
            batch = self.ingest.prepare(body, ctx, self.client_id, max_events=len(values))
        except UserError as exc:
            raise _NotOnePerMessage(exc.detail.replace("body item 0", "the message")
                                    .replace("body", "the message")) from None
        if batch.table.num_rows + len(batch.rejections) != len(values):
            # a value like `{…},{…}` joins into more than one item: never guess which
            raise _NotOnePerMessage("the message is not one JSON object")
        for rejection in batch.rejections:
            rejection.index = values[rejection.index][0]
        return batch

    def _unreadable(self, message: Message) -> str | None:
        value = message.value()
        if value is None:
            return "the message has no value (a tombstone is no event)"
        if len(value) > self._max_bytes:
            return f"the message has {len(value):,} bytes; the limit is {self._max_bytes:,}"
        stripped = value.lstrip(b" \t\r\n")
        if not stripped.startswith(b"{"):
            return "the message is not a JSON object (CONTRACT §2: one event a message)"
        return None

    def _poison(self, index: int, message: Message, reason: str) -> Rejection:
        """A message kept in the quarantine as JSON whatever it holds: its text as a JSON
        string, or base64 when it is not UTF-8; with pseudonymisation on, only its size and
        digest (its text may name a player and cannot be parsed to replace the id)."""
        value = message.value() or b""
        where = f"{self.address.topic}[{message.partition()}]@{message.offset()}"
        kept: dict[str, Any]
        if self.ingest.pseudonymiser is not None:
            kept = {"redacted": True}
        elif len(value) > self._max_bytes:
            kept = {"value_base64_prefix": base64.b64encode(value[:KEPT_BYTES]).decode()}
        else:
            try:
                kept = {"value": value.decode()}
            except UnicodeDecodeError:
                kept = {"value_base64": base64.b64encode(value).decode()}
        kept = {"kafka": {"topic": self.address.topic, "partition": message.partition(),
                          "offset": message.offset()},
                "bytes": len(value), "sha256": hashlib.sha256(value).hexdigest(), **kept}
        return Rejection(index, None, f"{where}: {reason}", raw=msgspec.json.encode(kept))

    # -- offsets and lag ----------------------------------------------------------------------
    def _commit(self, messages: list[Message]) -> None:
        """Commit past the last message of each partition (all durable now). A commit the
        group refuses (a rebalance took the partition) only means its next owner re-reads
        these messages, and dedup counts them once."""
        last: dict[int, int] = {}
        for message in messages:
            partition, offset = _position(message)
            last[partition] = max(last.get(partition, -1), offset)
        offsets = [TopicPartition(self.address.topic, p, o + 1) for p, o in sorted(last.items())]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("kafka: offsets not committed (re-read and deduplicated later)",
                        extra={"detail": kafka_error_text(exc)})
            return
        self._committed.update({tp.partition: tp.offset for tp in offsets})
        with self._lock:
            self.stats.commits += 1

    def _assigned(self, _consumer: Consumer, _partitions: list[TopicPartition]) -> None:
        self._committed.clear()  # partitions that moved may have been committed elsewhere

    def _measure_lag(self) -> None:
        """Per assigned partition: its high watermark (as last fetched, else as the broker
        says) less where this consumer is: its position, or before any message was consumed
        the group's committed offset (or the earliest offset when none is committed: it reads
        from there). At most once a second: it may ask the broker."""
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_SECONDS:
            return
        self._lag_at = now
        lag: dict[int, int] = {}
        try:
            positions = self._consumer.position(self._consumer.assignment())
            unknown = [TopicPartition(tp.topic, tp.partition) for tp in positions
                       if tp.offset < 0 and tp.partition not in self._committed]
            if unknown:
                for tp in self._consumer.committed(unknown, timeout=5):
                    self._committed[tp.partition] = tp.offset
            for tp in positions:
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:  # nothing fetched from it yet: ask the broker
                    low, high = self._consumer.get_watermark_offsets(tp, timeout=2)
                at = tp.offset if tp.offset >= 0 else self._committed.get(tp.partition, -1)
                lag[tp.partition] = max(0, high - (at if at >= 0 else max(low, 0)))
        except KafkaException:
            return
        with self._lock:
            self.stats.lag = lag

    def gauges(self) -> Iterator[tuple[str, str, dict[str, str], float]]:
        """The connector's values for ``/metrics`` (see ``observability.metrics``)."""
        with self._lock:
            stats = SourceStats(**{**self.stats.__dict__, "lag": dict(self.stats.lag)})
        labels = {"topic": self.address.topic, "group": self.group}
        for partition, lag in sorted(stats.lag.items()):
            yield ("tally_kafka_consumer_lag_messages",
                   "Messages of the topic's partition not yet consumed by this consumer.",
                   {**labels, "partition": str(partition)}, float(lag))
        for name, value in (("messages", stats.messages), ("poison", stats.poison),
                            ("commits", stats.commits), ("refused_writes", stats.refused_writes)):
            yield (f"tally_kafka_consumer_{name}_total",
                   f"Kafka source connector: {name.replace('_', ' ')} since start.",
                   labels, float(value))


def kafka_error_text(exc: KafkaException) -> str:
    """The message of a Kafka error, without librdkafka's ``KafkaError{code=…}`` wrapping."""
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)


def _position(message: Message) -> tuple[int, int]:
    """(partition, offset) of a consumed message (librdkafka sets both on every one)."""
    partition, offset = message.partition(), message.offset()
    if partition is None or offset is None:
        raise KafkaException(KafkaError(KafkaError._BAD_MSG, "a message without a position"))
    return partition, offset


class _NotOnePerMessage(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _combined(batches: list[PreparedBatch], poison: list[Rejection], received: datetime,
              client_id: str) -> PreparedBatch:
    tables = [b.table for b in batches if b.table.num_rows]
    table = pa.concat_tables(tables) if tables else EVENTS_SCHEMA.empty_table()
    rejections = sorted([r for b in batches for r in b.rejections] + poison,
                        key=lambda r: r.index)
    return PreparedBatch(received.astimezone(UTC).replace(tzinfo=None), client_id, table,
                         rejections)
