"""Write sale commands and purchase intents to the SKU-keyed command topic, durably."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME, KafkaError

from flashsale import intent_sig
from flashsale.kafka_auth import Producer
from flashsale.topics import SKU_COMMANDS
from processors.core.model import CURRENT_RULES
from producers.identity import intent_id_for, random_event_id
from schemas.codec import SchemaRegistry


class NotAcknowledged(RuntimeError):
    """Kafka did not confirm the write in time: the outcome is unknown, retry with the same key."""


@dataclass(frozen=True)
class SkuAllocation:
    """One SKU's share of a sale."""

    sku: str
    allocation: int
    per_user_limit: int
    per_order_max: int


def producer_config(bootstrap: str, timeout_ms: int = 10_000, linger_ms: int = 2) -> dict[str, Any]:
    """Settings that lose nothing and partition like the Java client and Faust (murmur2)."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        # librdkafka's default (consistent_random, CRC32) disagrees with Java/aiokafka:
        # one SKU would land on two partitions and get two writers.
        "partitioner": "murmur2_random",
        "linger.ms": linger_ms,
        # No compression: every client (aiokafka without extras included) can read our topics.
        # Bounded: an unacknowledged write is reported as unknown instead of hanging 300 s.
        "message.timeout.ms": timeout_ms,
        "log_level": 3,
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Appended:
    """Where the log put an acknowledged record: partition, offset and the broker's append
    time (None unless the topic stamps LogAppendTime, as the command topic does)."""

    partition: int
    offset: int
    log_time_ms: int | None

    @classmethod
    def of(cls, msg: Any) -> Appended:
        kind, at = msg.timestamp()
        known = kind == TIMESTAMP_LOG_APPEND_TIME and at >= 0
        return cls(msg.partition(), msg.offset(), at if known else None)


def _resolve(
    fut: asyncio.Future[Appended], err: KafkaError | None, msg: Any, intent_id: str
) -> None:
    """On the event loop: settle an intent's acknowledgement (unless its wait was abandoned)."""
    if fut.done():
        return
    if err is not None:
        fut.set_exception(NotAcknowledged(f"intent {intent_id} not acknowledged: {err}"))
    else:
        fut.set_result(Appended.of(msg))


def _settle_offset(fut: Future[int], label: str) -> Callable[[Any, Any], None]:
    """A delivery callback resolving ``fut`` to the record's offset."""

    def done(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            fut.set_exception(NotAcknowledged(f"{label} not acknowledged: {err}"))
        else:
            fut.set_result(msg.offset())

    return done


def _settle_log_time(fut: Future[int], label: str) -> Callable[[Any, Any], None]:
    """A delivery callback resolving ``fut`` to the record's log append time (ms)."""

    def done(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            fut.set_exception(NotAcknowledged(f"{label} not acknowledged: {err}"))
            return
        kind, at = msg.timestamp()
        if kind != TIMESTAMP_LOG_APPEND_TIME or at < 0:
            fut.set_exception(NotAcknowledged(f"{label}: the topic does not stamp log time"))
        else:
            fut.set_result(at)

    return done


class CommandProducer:
    """Produces the SKU commands (OpenSale, CloseSale, SettleSale, ReturnUnits, PurchaseIntent)."""

    def __init__(
        self,
        bootstrap: str,
        producer_name: str = "flashsale-producer",
        timeout_ms: int = 10_000,
        registry: SchemaRegistry | None = None,
        topic: str = SKU_COMMANDS,
        linger_ms: int = 2,
    ) -> None:
        self._producer = Producer(producer_config(bootstrap, timeout_ms, linger_ms))
        self._registry = registry or SchemaRegistry.load_default()
        self._name = producer_name
        self._timeout_s = timeout_ms / 1000
        self.topic = topic
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # -- low level ------------------------------------------------------------------------
    def _produce(
        self,
        sku: str,
        record_name: str,
        record: dict[str, Any],
        done: Callable[[Any, Any], None],
        serve: bool = True,
    ) -> None:
        value = self._registry.encode(record_name, record)
        signed = intent_sig.headers(value) if record_name == "PurchaseIntent" else None
        while True:
            try:
                self._producer.produce(self.topic, value, key=sku.encode(), on_delivery=done,
                                       headers=signed)  # fmt: skip
                break
            except BufferError:  # local queue full
                if not serve:  # on an event loop: never block it, the caller answers 503
                    raise NotAcknowledged("the producer's local queue is full") from None
                self._producer.poll(0.05)  # let deliveries drain
        if serve:
            self._producer.poll(0)

    def _envelope(self, correlation_id: str | None) -> dict[str, Any]:
        return {
            "event_id": random_event_id(),
            "correlation_id": correlation_id,
            "producer": self._name,
            "occurred_at": _now_ms(),
        }

    def serve_acks_on(self, loop: asyncio.AbstractEventLoop, interval_s: float = 0.002) -> None:
        """Serve delivery reports on ``loop`` (call it from the loop's thread), for servers.

        No poll thread: ``submit_intent_async`` serves the reports that are ready after each
        produce, and a timer every ``interval_s`` serves the rest, so an acknowledgement
        settles its future on the loop directly. (A poll thread handing acks to the loop cost
        ~25% more CPU per intent here: GIL hand-offs and a loop wake-up per poll.)
        """
        if self._loop is not None:
            raise RuntimeError("already serving acks on a loop")
        self._loop = loop
        self._loop_thread = threading.get_ident()

        def tick() -> None:
            if not self._stopping.is_set():
                self._producer.poll(0)
                loop.call_later(interval_s, tick)

        loop.call_later(interval_s, tick)

    # -- intents --------------------------------------------------------------------------
    def _intent(
        self, sale_id: str, sku: str, user_id: str, quantity: int, idempotency_key: str
    ) -> dict[str, Any]:
        """The PurchaseIntent record; its id derives from (user, sale, SKU, key)."""
        intent_id = intent_id_for(user_id, sale_id, sku, idempotency_key)
        return {**self._envelope(intent_id), "intent_id": intent_id,
                "idempotency_key": idempotency_key, "user_id": user_id, "sale_id": sale_id,
                "sku": sku, "quantity": quantity}  # fmt: skip

    def submit_intent(
        self,
        sale_id: str,
        sku: str,
        user_id: str,
        quantity: int,
        idempotency_key: str | None = None,
    ) -> tuple[str, Future[int]]:
        """Queue an intent; the future resolves (to its offset) once Kafka acknowledged it."""
        record = self._intent(sale_id, sku, user_id, quantity, idempotency_key or uuid.uuid4().hex)
        intent_id = record["intent_id"]
        return intent_id, self._ack_future(sku, "PurchaseIntent", record, intent_id)

    def submit_intent_async(
        self, sale_id: str, sku: str, user_id: str, quantity: int, idempotency_key: str
    ) -> tuple[str, asyncio.Future[Appended]]:
        """Like ``submit_intent``, for the event loop given to ``serve_acks_on``; the future
        resolves to where the log put the intent.

        The future is settled on the loop; a report served by another thread (``flush`` in
        ``close``, or ``wait`` of a blocking call run in a thread) is handed over to it.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("serve_acks_on(loop) first")
        record = self._intent(sale_id, sku, user_id, quantity, idempotency_key)
        intent_id = record["intent_id"]
        fut: asyncio.Future[Appended] = loop.create_future()
        on_loop = self._loop_thread

        def done(err: KafkaError | None, msg: Any) -> None:
            if threading.get_ident() == on_loop:
                _resolve(fut, err, msg, intent_id)
            else:
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                    loop.call_soon_threadsafe(_resolve, fut, err, msg, intent_id)

        self._produce(sku, "PurchaseIntent", record, done, serve=False)
        self._producer.poll(0)  # settle the reports that are ready (on this loop)
        return intent_id, fut

    def encode_intent(
        self, sale_id: str, sku: str, user_id: str, quantity: int, idempotency_key: str
    ) -> bytes:
        """The PurchaseIntent record as it would be produced (for load generators)."""
        record = self._intent(sale_id, sku, user_id, quantity, idempotency_key)
        return self._registry.encode("PurchaseIntent", record)

    def post_intent(
        self,
        sale_id: str,
        sku: str,
        user_id: str,
        quantity: int,
        idempotency_key: str | None = None,
    ) -> str:
        """Write one intent and return its id only after Kafka acknowledged it (acks=all)."""
        intent_id, fut = self.submit_intent(sale_id, sku, user_id, quantity, idempotency_key)
        self.wait([fut])
        return intent_id

    def wait(self, futures: Iterable[Future[Any]]) -> None:
        """Block until every future is resolved; raise NotAcknowledged on the first failure."""
        futures = list(futures)
        deadline = time.monotonic() + self._timeout_s + 5
        while not all(f.done() for f in futures):
            if time.monotonic() > deadline:
                raise NotAcknowledged("Kafka did not acknowledge in time; outcome unknown")
            self._producer.poll(0.05)
        for f in futures:
            f.result()

    # -- sales ----------------------------------------------------------------------------
    def open_sale(
        self,
        sale_id: str,
        skus: Iterable[SkuAllocation],
        starts_at_ms: int,
        ends_at_ms: int,
        rules_version: int = CURRENT_RULES,
        prequeue_opens_at_ms: int | None = None,
        draw_commitment: str | None = None,
        progress_every: int | None = None,
        hold_ms: int | None = None,
        pay_grace_ms: int = 0,
        waitlist_depth: int = 0,
    ) -> None:
        """Publish one OpenSale per SKU (each to its own writer) and wait for all acks.

        The sale is decided under ``rules_version`` (this build's current one unless told):
        the command names it, so a rebuild after a rules change still applies it. With
        ``prequeue_opens_at_ms`` and ``draw_commitment`` (hex SHA-256 of the draw's seed) the
        sale has a pre-queue (``processors.core.prequeue``); with ``progress_every`` the writer
        writes a ``QueueProgress`` every that many of its events (``processors.core.progress``).
        """
        futures = []
        for item in skus:
            record = {
                **self._envelope(None),
                "sale_id": sale_id,
                "sku": item.sku,
                "allocation": item.allocation,
                "per_user_limit": item.per_user_limit,
                "per_order_max": item.per_order_max,
                "starts_at": starts_at_ms,
                "ends_at": ends_at_ms,
                "rules_version": rules_version,
                "prequeue_opens_at": prequeue_opens_at_ms,
                "draw_commitment": draw_commitment,
                "progress_every": progress_every,
                "hold_ms": hold_ms,
                "pay_grace_ms": pay_grace_ms,
                "waitlist_depth": waitlist_depth,
            }
            futures.append(self._ack_future(item.sku, "OpenSale", record))
        self.wait(futures)

    def reveal_draw(self, sale_id: str, skus: Iterable[str], seed: str) -> None:
        """Publish the draw's seed to each SKU's writer (the sale clock does, at the start)."""
        record = {**self._envelope(None), "sale_id": sale_id, "seed": seed}
        self.wait([self._ack_future(sku, "RevealDraw", {**record, "sku": sku}) for sku in skus])

    def tick(self, partitions: Iterable[int]) -> int:
        """Publish a sale-clock tick to each of ``partitions`` (no key), wait for the acks;
        the earliest log append time the broker gave them (its clock, the writers' clock)."""
        futures: list[Future[int]] = []
        for partition in partitions:
            fut: Future[int] = Future()
            futures.append(fut)
            value = self._registry.encode(
                "ClockTick", {**self._envelope(None), "partition": partition}
            )
            self._producer.produce(self.topic, value, partition=partition,
                                   on_delivery=_settle_log_time(fut, "ClockTick"))  # fmt: skip
        self._producer.poll(0)
        self.wait(futures)
        return min(f.result() for f in futures)

    def close_sale(
        self, sale_id: str, skus: Iterable[str], reason: str = "closed by admin"
    ) -> None:
        """Publish one CloseSale per SKU and wait for all acks."""
        futures = [
            self._ack_future(
                sku,
                "CloseSale",
                {**self._envelope(None), "sale_id": sale_id, "sku": sku, "reason": reason},
            )
            for sku in skus
        ]
        self.wait(futures)

    def settle_sale(self, sale_id: str, skus: Iterable[str]) -> None:
        """Publish one SettleSale per SKU (after close) and wait for all acks."""
        futures = [
            self._ack_future(
                sku, "SettleSale", {**self._envelope(None), "sale_id": sale_id, "sku": sku}
            )
            for sku in skus
        ]
        self.wait(futures)

    def sale_command(self, name: str, sale_id: str, skus: Iterable[str], **fields: Any) -> None:
        """Publish one operator command (PauseSale, ResumeSale, AddUnits, CancelSale) per SKU
        and wait for all acks."""
        record = {**self._envelope(None), "sale_id": sale_id, **fields}
        self.wait([self._ack_future(sku, name, {**record, "sku": sku}) for sku in skus])

    def order_command(self, name: str, sale_id: str, sku: str, **fields: Any) -> None:
        """Publish an order command (StartPayment, RecordPayment, CancelHold) to the SKU's
        writer and wait for its ack."""
        record = {**self._envelope(None), "sale_id": sale_id, "sku": sku, **fields}
        self.wait([self._ack_future(sku, name, record)])

    def return_units(self, sale_id: str, sku: str, quantity: int, ref: str) -> None:
        """Publish one ReturnUnits (idempotent per ``ref``) and wait for its ack."""
        record = {**self._envelope(None), "sale_id": sale_id, "sku": sku,
                  "quantity": quantity, "ref": ref}  # fmt: skip
        self.wait([self._ack_future(sku, "ReturnUnits", record)])

    def _ack_future(
        self, sku: str, name: str, record: dict[str, Any], what: str | None = None
    ) -> Future[int]:
        """Produce one record; the future resolves to its offset once Kafka acknowledged it."""
        fut: Future[int] = Future()
        self._produce(sku, name, record, _settle_offset(fut, what or f"{name} for {sku}"))
        return fut

    def reachable(self, timeout: float = 2.0) -> bool:
        """True when a broker answers a metadata request for the command topic."""
        try:
            md = self._producer.list_topics(self.topic, timeout=timeout)
        except Exception:  # KafkaException: no broker answered in time
            return False
        return bool(md.brokers) and self.topic in md.topics

    def flush(self, timeout: float = 30.0) -> int:
        """Deliver everything queued; returns how many records are still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        """Flush (serving the last reports) and stop serving them on the loop."""
        self.flush()
        self._stopping.set()
