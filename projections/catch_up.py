"""Has a running projection projected everything committed to its topics so far?

A projection's tracked offsets (``projection_offsets``) point past its last projected
record; the log's end offsets also count transaction markers, which are never delivered,
so comparing the two says "behind" forever. Instead a read_committed consumer is assigned
at the tracked offsets and asked for one record per partition: a partition that reaches its
end (``_PARTITION_EOF``) first has nothing left to project.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import psycopg
from confluent_kafka import KafkaError, TopicPartition

from flashsale.kafka_auth import Consumer
from projections.runner import read_offsets


def wait_until_projected(
    bootstrap: str, dsn: str, projection: str, topics: Sequence[str], timeout: float = 60.0
) -> None:
    """Return once ``projection`` has projected every committed record of ``topics`` that
    was in the log at this call; ``TimeoutError`` after ``timeout`` seconds."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"catch-up-{uuid.uuid4().hex}",
                      "isolation.level": "read_committed", "enable.auto.commit": False,
                      "enable.partition.eof": True, "log_level": 3})  # fmt: skip
    try:
        meta = probe.list_topics(timeout=10)
        partitions = [(t, p) for t in topics for p in sorted(meta.topics[t].partitions)]
        targets: dict[tuple[str, int], int] = {}  # the first record past the tracked offset
        for t, p in partitions:
            _, high = probe.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            targets[(t, p)] = high
        deadline = time.monotonic() + timeout
        while True:
            with psycopg.connect(dsn, autocommit=True) as conn:
                tracked = read_offsets(conn, projection, topics)
            if not _unprojected(probe, partitions, tracked, targets):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"projection {projection!r} not caught up in {timeout:.0f}s")
            time.sleep(0.25)
    finally:
        probe.close()


def _unprojected(
    probe: Consumer,
    partitions: list[tuple[str, int]],
    tracked: dict[tuple[str, int], int],
    targets: dict[tuple[str, int], int],
) -> bool:
    """True when some partition holds a committed record at or past its tracked offset (and
    before the end it had when the wait began)."""
    pending = {tp for tp in partitions if tracked.get(tp, 0) < targets[tp]}
    if not pending:
        return False
    probe.assign([TopicPartition(t, p, tracked.get((t, p), 0)) for t, p in pending])
    try:
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            for msg in probe.consume(len(pending), 0.5):
                tp = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    continue
                offset = msg.offset()
                if err is None and offset is not None and offset < targets.get(tp, 0):  # type: ignore[arg-type]
                    return True  # a record the projection has not reached
                pending.discard(tp)
        return bool(pending)
    finally:
        probe.unassign()
