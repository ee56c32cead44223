"""The Kafka source connector (``tally consume``, CONTRACT §1; issue 12): a real
Kafka-protocol broker (tansu, tests/kafka_broker.py), the real ``tally`` processes, the real
store. Every event of the topic is stored once, whatever the faults; every message that is no
event is quarantined with its reason and never blocks its partition; offsets are committed
only once the events are durable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from tally.config_values import KafkaUrlError, parse_kafka_url
from tests.conftest import make_event
from tests.kafka_broker import KafkaBroker
from tests.server import TALLY, VERIFY, Server, cli, free_port
from tests.stores import rows

ENV = {"TALLY_REGIONS": "EU,UK,LATAM", "TALLY_LOG_LEVEL": "WARNING"}


# -- the address ------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "bootstrap", "topic"), [
    ("kafka://127.0.0.1:9092/events", "127.0.0.1:9092", "events"),
    ("kafka://a.example:9092,b.example:9093/casino.bets-v1", "a.example:9092,b.example:9093",
     "casino.bets-v1"),
    ("kafka://[::1]:9092/t_1", "[::1]:9092", "t_1"),
])
def test_a_kafka_address_names_its_brokers_and_topic(url: str, bootstrap: str,
                                                     topic: str) -> None:
    address = parse_kafka_url(url)
    assert (address.bootstrap, address.topic) == (bootstrap, topic)
    assert address.url == url


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:9092/events", "expected kafka://"),
    ("kafka://127.0.0.1/events", "is not HOST:PORT"),
    ("kafka://127.0.0.1:0/events", "is not HOST:PORT"),
    ("kafka://127.0.0.1:70000/events", "is not HOST:PORT"),
    ("kafka:///events", "no broker"),
    ("kafka://127.0.0.1:9092/", "is not a topic name"),
    ("kafka://127.0.0.1:9092/a/b", "is not a topic name"),
    ("kafka://127.0.0.1:9092/ev ents", "is not a topic name"),
    ("kafka://127.0.0.1:9092/..", "is not a topic name"),
    ("kafka://u:p@127.0.0.1:9092/events", "no query, fragment or credentials"),
    ("kafka://127.0.0.1:9092/events?x=1", "no query, fragment or credentials"),
    ("kafka://127.0.0.1:9092/" + "t" * 250, "is not a topic name"),
])
def test_a_bad_kafka_address_is_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(KafkaUrlError) as refused:
        parse_kafka_url(url)
    assert why in str(refused.value)


def test_bad_options_and_an_unreachable_broker_are_one_line_errors(tmp_path: Path) -> None:
    bad = cli("consume", "--from", "kafka://nohost/t", "--group", "g", data_dir=tmp_path / "d")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("tally: ")
    assert "is not HOST:PORT" in bad.stderr
    port = free_port()  # nothing listens there
    down = cli("consume", "--from", f"kafka://127.0.0.1:{port}/t", "--group", "g",
               data_dir=tmp_path / "d", env=ENV)
    assert down.returncode == 2
    assert f"tally: cannot consume kafka://127.0.0.1:{port}/t" in down.stderr
    assert "Traceback" not in down.stderr


@pytest.mark.slow
def test_a_topic_that_does_not_exist_is_a_clear_error(kafka_broker: KafkaBroker,
                                                      tmp_path: Path) -> None:
    out = cli("consume", "--from", f"kafka://{kafka_broker.bootstrap}/no-such-topic",
              "--group", "g", data_dir=tmp_path / "d", env=ENV)
    assert out.returncode == 2
    assert "tally: cannot consume" in out.stderr and "no-such-topic" in out.stderr


# -- a consumer process and what it says -------------------------------------------------------
_running: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_consumer_left() -> Iterator[None]:
    """A test that failed midway leaves no ``tally consume`` running."""
    yield
    while _running:
        proc = _running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


class Consume:
    """``tally consume`` as a process, with its metrics port to watch it."""

    def __init__(self, data_dir: Path, bootstrap: str, topic: str, group: str,
                 env: dict[str, str] | None = None) -> None:
        self.metrics_port = free_port()
        self.log = data_dir.parent / f"consume-{self.metrics_port}.log"
        self.topic = topic
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [TALLY, "consume", "--from", f"kafka://{bootstrap}/{topic}", "--group", group,
                 "--data-dir", str(data_dir), "--metrics-port", str(self.metrics_port),
                 "--json"],
                stdout=subprocess.PIPE, stderr=log, env={**os.environ, **ENV, **(env or {})})
        _running.append(self.proc)

    def metrics(self) -> dict[str, float]:
        """The connector's series: ``name`` (totals) and ``lag:<partition>``."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2,
                         verify=VERIFY).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name.startswith("tally_kafka_consumer_"):  # counts are counters
                assert family.type == ("gauge" if family.name.endswith("lag_messages")
                                       else "counter"), family
            for sample in family.samples:
                if sample.name == "tally_kafka_consumer_lag_messages":
                    values[f"lag:{sample.labels['partition']}"] = sample.value
                else:
                    values[sample.name] = sample.value
        return values

    def wait(self, done: Callable[[dict[str, float]], bool],
             within: float = 90) -> dict[str, float]:
        deadline = time.monotonic() + within
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"consume exited {self.proc.returncode}: "
                                     f"{self.log.read_text()[-2000:]}")
            try:
                seen = self.metrics()
            except httpx.TransportError:
                seen = {}
            if seen and done(seen):
                return seen
            time.sleep(0.1)
        raise AssertionError(f"not done within {within} s: {seen}")

    def wait_committed(self, bootstrap: str, group: str, ends: dict[int, int],
                       within: float = 120) -> None:
        """Until the group's committed offsets are the topic's ends (all consumed)."""
        deadline = time.monotonic() + within
        seen: dict[int, int] = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            seen = committed(bootstrap, self.topic, group, len(ends))
            if seen == ends:
                return
            time.sleep(0.5)
        raise AssertionError(f"committed {seen}, the topic ends at {ends}")

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, self.log.read_text()[-2000:]
        summary: dict[str, Any] = json.loads(out)
        return summary

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=10)


def consumed(count: int) -> Callable[[dict[str, float]], bool]:
    """All ``count`` messages consumed and committed, no lag left."""
    def done(m: dict[str, float]) -> bool:
        lags = [v for k, v in m.items() if k.startswith("lag:")]
        return m.get("tally_kafka_consumer_messages_total", 0) >= count and bool(lags) \
            and not any(lags)
    return done


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                     timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        consumer.close()


def partition_ends(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """Per partition, the offset after its last message, found by reading the whole topic
    (the offset a group that has consumed everything commits; -1001: an empty partition)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader",
                         "enable.auto.commit": False})
    ends = dict.fromkeys(range(partitions), -1001)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        idle = time.monotonic() + 3
        while time.monotonic() < idle:
            for message in consumer.consume(1000, 0.5):
                if message.error() is None:
                    ends[message.partition()] = max(ends[message.partition()],
                                                    message.offset() + 1)
                    idle = time.monotonic() + 3
        return ends
    finally:
        consumer.close()


# -- the rules of ingestion, from a topic -------------------------------------------------------
@pytest.mark.slow
def test_a_topic_is_ingested_once_with_every_bad_message_quarantined(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = kafka_broker.topic(partitions=3)
    data = tmp_path / "data"
    events = [make_event(event_id=f"k-{i}", player_id=f"p-{i % 17}") for i in range(300)]
    resent = events[::10]  # 30 re-sent later: duplicates, at any delay
    invalid = make_event(event_id="bad-amount")
    invalid["payload"]["stake_minor"] = "five"
    elsewhere = make_event(event_id="apac-1", region="APAC")  # not served here: residency
    poison: list[bytes | None] = [
        b"not json at all", b"\xff\xfe\x00binary", b"[1, 2]", b'{"a": 1},{"b": 2}', None, b"",
        b'{"event_id": "x", "n": 1e400}',  # JSON no client decodes again
        b"{" + b'"pad": "' + b"x" * 2000 + b'"}',  # over the 1,024-byte limit set below
    ]
    values: list[bytes | None] = [encode(e) for e in events[:150]] + poison[:4] \
        + [encode(invalid), encode(elsewhere)] + [encode(e) for e in events[150:]] \
        + poison[4:] + [encode(e) for e in resent]
    kafka_broker.produce(topic, values, keys=[str(i % 7).encode() for i in range(len(values))])

    run = Consume(data, kafka_broker.bootstrap, topic, "tally-a",
                  env={"TALLY_MAX_BATCH_BYTES": "1024", "TALLY_MAX_BATCH_EVENTS": "64"})
    run.wait(consumed(len(values)))
    summary = run.stop()
    assert summary["messages"] == len(values)
    assert (summary["accepted"], summary["duplicates"]) == (300, 30)
    assert summary["poison"] == len(poison)
    assert summary["rejected"] == len(poison) + 2
    assert summary["applied"] is True

    stored = rows(data, "SELECT event_id FROM events")
    assert sorted(r[0] for r in stored) == sorted(e["event_id"] for e in events)  # once each
    quarantined = rows(data, "SELECT event_id, reason, event FROM quarantine")
    assert len(quarantined) == len(poison) + 2
    by_id = {r[0]: r for r in quarantined if r[0] is not None}
    assert "stake_minor" in by_id["bad-amount"][1]
    assert json.loads(by_id["bad-amount"][2])["payload"]["stake_minor"] == "five"  # as sent
    assert "region" in by_id["apac-1"][1] and json.loads(by_id["apac-1"][2])["redacted"]
    unreadable = [r for r in quarantined if r[0] is None]
    assert len(unreadable) == len(poison)
    kept = [json.loads(r[2]) for r in unreadable]
    for (_, reason, _), item in zip(unreadable, kept, strict=True):
        where = item["kafka"]
        assert reason.startswith(f"{topic}[{where['partition']}]@{where['offset']}: ")
    texts = {item.get("value") for item in kept}
    assert {"not json at all", "[1, 2]", '{"a": 1},{"b": 2}', ""} <= texts
    assert any(item.get("value_base64") for item in kept)  # not UTF-8: kept as base64
    assert any(item.get("value_base64_prefix") for item in kept)  # over the limit
    assert sum(item["bytes"] for item in kept) == sum(len(v or b"") for v in poison)

    # every offset committed: a restart of the group reads nothing again...
    marks = partition_ends(kafka_broker.bootstrap, topic, 3)
    assert committed(kafka_broker.bootstrap, topic, "tally-a", 3) == marks
    # ...and resumes where it stopped: new events, and old ones sent again
    later = [make_event(event_id=f"k-late-{i}") for i in range(40)]
    more = [encode(e) for e in later] + [encode(e) for e in events[:25]]
    kafka_broker.produce(topic, more)
    again = Consume(data, kafka_broker.bootstrap, topic, "tally-a")
    again.wait(consumed(len(more)))
    second = again.stop()
    assert (second["messages"], second["accepted"], second["duplicates"]) == (65, 40, 25)
    stored = rows(data, "SELECT count(*), count(DISTINCT event_id) FROM events")
    assert stored == [(340, 340)]


@pytest.mark.slow
def test_kill_9_mid_stream_loses_nothing_and_doubles_nothing(kafka_broker: KafkaBroker,
                                                             tmp_path: Path) -> None:
    """Jepsen-style set check: killed while consuming, restarted from the committed offsets;
    every event of the topic is stored exactly once (lost = 0, unexpected = 0)."""
    topic = kafka_broker.topic(partitions=4)
    data = tmp_path / "data"
    events = [make_event(event_id=f"e-{i}", player_id=f"p-{i % 101}") for i in range(12_000)]
    values = [encode(e) for e in events] + [encode(e) for e in events[::7]]  # + re-sent
    kafka_broker.produce(topic, values, keys=[e["event_id"].encode() for e in events]
                         + [e["event_id"].encode() for e in events[::7]])
    small_groups = {"TALLY_MAX_BATCH_EVENTS": "200"}
    def read_or_caught_up(n: int) -> Callable[[dict[str, float]], bool]:
        """``n`` messages read by this run, or none left to read: a busy machine may let a
        run read past the next kill point before its metrics are scraped."""
        def done(m: dict[str, float]) -> bool:
            lags = [v for k, v in m.items() if k.startswith("lag:")]
            return m.get("tally_kafka_consumer_messages_total", 0) >= n or \
                (len(lags) == 4 and not any(lags))
        return done

    for kill_after in (1_500, 6_000):  # killed twice, at different points
        run = Consume(data, kafka_broker.bootstrap, topic, "tally-k", env=small_groups)
        run.wait(read_or_caught_up(kill_after))
        run.kill()
    ends = partition_ends(kafka_broker.bootstrap, topic, 4)
    last = Consume(data, kafka_broker.bootstrap, topic, "tally-k", env=small_groups)
    last.wait_committed(kafka_broker.bootstrap, "tally-k", ends)
    # the lag gauges follow (measured at most once a second): every partition reaches 0
    lags = last.wait(lambda m: any(k.startswith("lag:") for k in m)
                     and not any(v for k, v in m.items() if k.startswith("lag:")), within=10)
    assert sorted(k for k in lags if k.startswith("lag:")) == [f"lag:{p}" for p in range(4)]
    last.stop()
    stored = [r[0] for r in rows(data, "SELECT event_id FROM events")]
    expected = {e["event_id"] for e in events}
    assert len(stored) == len(set(stored)), "an event stored twice"
    assert set(stored) - expected == set(), "an event that was never sent"
    assert expected - set(stored) == set(), "an event of the topic lost"


@pytest.mark.slow
def test_the_server_consumes_a_topic_and_says_so_in_its_metrics(kafka_broker: KafkaBroker,
                                                                tmp_path: Path) -> None:
    """``TALLY_CONSUME_FROM``: the API process itself consumes (one process owns an embedded
    store), its lag per partition in ``/metrics``, the events answered by the API."""
    topic = kafka_broker.topic(partitions=2)
    data = tmp_path / "data"
    events = [make_event(event_id=f"s-{i}", player_id=f"p-{i % 9}") for i in range(120)]
    server = Server(data, env={**ENV, "TALLY_CONSUME_FROM":
                               f"kafka://{kafka_broker.bootstrap}/{topic}",
                               "TALLY_CONSUME_GROUP": "api"})
    try:
        kafka_broker.produce(topic, [encode(e) for e in events])
        deadline = time.monotonic() + 90
        seen: dict[str, float] = {}
        while time.monotonic() < deadline:
            seen = {}
            for family in text_string_to_metric_families(
                    httpx.get(f"{server.url}/metrics", timeout=5).text):
                for s in family.samples:
                    if s.name.startswith("tally_kafka_consumer"):
                        key = s.labels.get("partition", "")
                        seen[f"{s.name}{key}"] = s.value
            if seen.get("tally_kafka_consumer_messages_total") == len(events) and not any(
                    v for k, v in seen.items() if k.startswith("tally_kafka_consumer_lag")):
                break
            time.sleep(0.2)
        assert seen.get("tally_kafka_consumer_messages_total") == len(events), seen
        assert {"tally_kafka_consumer_lag_messages0", "tally_kafka_consumer_lag_messages1"} \
            <= set(seen)
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    finally:
        server.stop()
    assert rows(data, "SELECT count(*), sum(stake_minor) FROM events") == [
        (len(events), sum(e["payload"]["stake_minor"] for e in events))]


@pytest.mark.slow
def test_a_full_journal_disk_holds_the_group_and_commits_nothing_until_it_has_room(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """The journal cannot take the group (its disk is full): nothing is committed, the group is
    retried with backoff, and once there is room every event is stored once and the offsets
    committed — no restart, nothing lost."""
    from tests.fs import fill, tmpfs

    topic = kafka_broker.topic(partitions=2)
    data = tmp_path / "data"
    data.mkdir()
    with tmpfs(data / "journal", "8m") as journal:
        run = Consume(data, kafka_broker.bootstrap, topic, "tally-f")
        run.wait(lambda m: "tally_kafka_consumer_messages_total" in m)
        filler = fill(journal)
        events = [make_event(event_id=f"f-{i}") for i in range(500)]
        kafka_broker.produce(topic, [encode(e) for e in events])
        run.wait(lambda m: m.get("tally_kafka_consumer_refused_writes_total", 0) >= 1)
        time.sleep(2)
        assert committed(kafka_broker.bootstrap, topic, "tally-f", 2) == {0: -1001, 1: -1001}
        assert run.metrics()["tally_kafka_consumer_messages_total"] == 0
        filler.unlink()
        run.wait_committed(kafka_broker.bootstrap, "tally-f",
                           partition_ends(kafka_broker.bootstrap, topic, 2))
        summary = run.stop()
    assert (summary["accepted"], summary["duplicates"]) == (500, 0)
    assert rows(data, "SELECT count(*), count(DISTINCT event_id) FROM events") == [(500, 500)]


@pytest.mark.slow
def test_pseudonymisation_holds_for_a_topic_unreadable_messages_included(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    """With ``TALLY_PSEUDONYMISE_KEY`` no raw player id is stored from a topic: not in the
    events, not in a rejected event, not in a message that is no event (only its digest)."""
    topic = kafka_broker.topic(partitions=1)
    data = tmp_path / "data"
    good = make_event(event_id="pz-1", player_id="alice@example.com")
    bad = make_event(event_id="pz-2", player_id="bob@example.com", occurred_at="yesterday")
    poison = b'player carol@example.com said {"not": "an event"}'
    kafka_broker.produce(topic, [encode(good), encode(bad), poison])
    run = Consume(data, kafka_broker.bootstrap, topic, "tally-p",
                  env={"TALLY_PSEUDONYMISE_KEY": "k" * 40})
    run.wait(consumed(3))
    assert run.stop()["poison"] == 1
    [(player,)] = rows(data, "SELECT player_id FROM events")
    assert player not in {"alice@example.com", ""} and "@" not in player
    kept = " ".join(str(r) for r in rows(data, "SELECT event_id, reason, event FROM quarantine"))
    assert "pz-2" in kept and "redacted" in kept
    for raw in ("alice", "bob", "carol"):
        assert raw not in kept


def test_a_broker_that_dies_mid_run_does_not_stop_a_clean_shutdown(tmp_path: Path) -> None:
    """The broker goes away while ``tally consume`` runs: it keeps running (librdkafka
    retries), and SIGTERM still applies what it acknowledged and exits 0 in bounded time."""
    (tmp_path / "broker").mkdir()
    broker = KafkaBroker(tmp_path / "broker")  # its own: this test stops it
    data = tmp_path / "data"
    try:
        topic = broker.topic(partitions=1)
        broker.produce(topic, [encode(make_event(event_id=f"d-{i}")) for i in range(50)])
        run = Consume(data, broker.bootstrap, topic, "tally-d")
        run.wait(consumed(50))
    finally:
        broker.stop()
    time.sleep(3)  # a few reconnection attempts against nothing
    assert run.proc.poll() is None, "tally consume died with its broker"
    started = time.monotonic()
    summary = run.stop()
    assert time.monotonic() - started < 30
    assert (summary["accepted"], summary["applied"]) == (50, True)
    assert rows(data, "SELECT count(*) FROM events") == [(50,)]
