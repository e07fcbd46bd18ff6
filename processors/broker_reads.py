"""The writer's own reads of the broker, outside Faust: probes of committed and end offsets
(patient while a cluster moves leaders) and the replay of a partition that rebuilds lost state."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from flashsale.kafka_auth import Consumer
from processors.writer import Replayed

log = structlog.get_logger(__name__)

T = TypeVar("T")
# refusals that waiting does not change (a lost leader or a timeout does)
NEVER_RETRIED = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
}  # fmt: skip
PROBE_PATIENCE_S = 30.0  # how long a broker query is retried while leaders move (5 s tries)
REPLAY_STALL_S = 60.0  # a rebuild that reads nothing for this long fails (and is retried)


def patient(
    what: str,
    call: Callable[..., T],
    *args: Any,
    refresh: Callable[[], object] | None = None,
    **kwargs: Any,
) -> T:
    """``call`` (a broker query, run in a thread), retried while a cluster moves leaders: a
    node lost or shutting down leaves its partitions unknown or unreachable until the others
    lead them (a dead node's broker session is 9 s). Past ``PROBE_PATIENCE_S`` it raises.

    ``refresh`` runs before each retry: a metadata request, so the client asks the new
    leader (a query that timed out against a dead one left its cached leader as it was)."""
    deadline = time.monotonic() + PROBE_PATIENCE_S
    while True:
        try:
            return call(*args, **kwargs)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            fatal = error is not None and error.code() in NEVER_RETRIED
            if fatal or time.monotonic() > deadline:
                raise
            log.warning("probe.retrying", what=what, error=str(exc))
            time.sleep(0.5)
            if refresh is not None:
                with contextlib.suppress(KafkaException):
                    refresh()


def replay(bootstrap: str, topic: str, partition: int, end: int) -> Any:
    """Input records of one partition from offset 0 up to ``end`` (exclusive), all of them.

    Raises if the log no longer starts at 0, skips an offset, errs or stalls: a rebuild from
    part of the log would be a wrong state, not a slow one.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-replay",
                         "enable.auto.commit": False, "auto.offset.reset": "error",
                         "log_level": 3})  # fmt: skip
    low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
    if low != 0:
        raise RuntimeError(f"{topic}[{partition}] starts at {low}, not 0: cannot rebuild")
    consumer.assign([TopicPartition(topic, partition, 0)])
    expected, idle_since = 0, time.monotonic()
    try:
        while expected < end:
            msgs = consumer.consume(5000, 1.0)
            if not msgs and time.monotonic() - idle_since > REPLAY_STALL_S:
                raise RuntimeError(f"replay of {topic}[{partition}] stalled at {expected}")
            for m in msgs:
                if m.error():
                    raise RuntimeError(f"replay of {topic}[{partition}]: {m.error()}")
                offset = m.offset()
                if offset is None or offset >= end:
                    continue
                if offset != expected:
                    raise RuntimeError(f"replay of {topic}[{partition}] got {offset}, "
                                       f"expected {expected}")  # fmt: skip
                yield Replayed(offset, m.key(), m.value(), m.timestamp()[1], m.headers())
                expected, idle_since = offset + 1, time.monotonic()
    finally:
        consumer.close()
