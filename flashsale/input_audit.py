"""Every input offset accounted for, computed from the topics alone.

For each record of the command topic (up to the end offsets seen at the start): a purchase
intent whose id appears here for the first time must have exactly one decision in the
committed decision log; a later record with the same intent id is a *repeat* and must add no
decision; a record that cannot be decoded must be in the dead-letter topic under its source
partition and offset; sale commands (open, close, settle, return, the draw's reveal, the
sale clock's ticks) need no decision. An intent queued in a pre-queue (``EntryQueued``) whose
draw has not happened yet is counted as queued (its decision comes with the draw); once the
queue is drawn or expired, it needs its decision like any other. Nothing here
shares code or state with the processor.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from confluent_kafka import TopicPartition

from flashsale.kafka_auth import Consumer
from flashsale.topics import TopicNames
from processors.records import COMMAND_RECORDS, DECISION_RECORDS  # other facts answer no intent
from schemas.codec import SchemaRegistry, UndecodableRecord


@dataclass
class InputAccount:
    """What the log says about every input offset (optionally of one sale only)."""

    inputs: int = 0  # records read from the command topic
    decided: int = 0  # first occurrences of an intent id, each with its one decision
    repeats: int = 0  # later occurrences of a decided intent id, with no decision of their own
    dead_lettered: int = 0
    sale_commands: int = 0
    unaccounted: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    extra_decisions: list[str] = field(default_factory=list)  # intent ids with > 1 decision
    orphan_decisions: list[str] = field(default_factory=list)  # decisions nobody asked for
    undecided: dict[str, tuple[int, int]] = field(default_factory=dict)  # intent -> its offset
    queued: int = 0  # first occurrences queued in a pre-queue, their decision still to come

    @property
    def holds(self) -> bool:
        """Every offset accounted for, exactly one decision per intent id, none invented."""
        return not (self.unaccounted or self.extra_decisions or self.orphan_decisions)


class IncompleteRead(RuntimeError):
    """A topic could not be read to the end offsets seen when the read began."""


def read_topic(bootstrap: str, topic: str, committed_only: bool, timeout: float) -> list:
    """Every record of ``topic`` up to the end offsets seen now (raises IncompleteRead)."""
    tail = TopicTail(bootstrap, topic, committed_only)
    try:
        return tail.read(timeout)
    finally:
        tail.close()


class TopicTail:
    """One consumer reading a topic forward in steps: each ``read`` returns the records
    appended since the last one, up to the end offsets seen when it began. It starts at the
    topic's beginning, or at the first record of each partition stamped at or after
    ``since_ms`` (the broker's index by time), so a tail of one sale does not read the
    facts of every sale before it."""

    def __init__(self, bootstrap: str, topic: str, committed_only: bool,
                 since_ms: int | None = None) -> None:  # fmt: skip
        self.topic = topic
        self.committed_only = committed_only
        self._consumer = Consumer({"bootstrap.servers": bootstrap,
                                   "group.id": f"audit-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "log_level": 3,
                                   # a fetch waiting at the end of the log holds back the
                                   # next end-offset query on its connection (500 ms each)
                                   "fetch.wait.max.ms": 10,
                                   "isolation.level": "read_committed" if committed_only
                                   else "read_uncommitted"})  # fmt: skip
        try:
            meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
            self._next = dict.fromkeys(meta.partitions, 0)  # the next offset to read
            if since_ms is not None:
                # ends first: a record appended after the lookup is past them, never skipped
                ends = {p: self._end(TopicPartition(topic, p)) for p in self._next}
                asked = [TopicPartition(topic, p, since_ms) for p in self._next]
                for tp in self._consumer.offsets_for_times(asked, timeout=10):
                    if tp.error is not None:
                        raise IncompleteRead(f"{topic}[{tp.partition}]: no offset for the "
                                             f"time {since_ms}: {tp.error}")  # fmt: skip
                    # -1: nothing stamped that late yet; start at the end seen before
                    self._next[tp.partition] = tp.offset if tp.offset >= 0 else ends[tp.partition]
            else:
                for p in self._next:
                    self._next[p] = self._start(p)
            self._consumer.assign([TopicPartition(topic, p, o) for p, o in self._next.items()])
        except BaseException:
            self._consumer.close()
            raise

    def _end(self, tp: TopicPartition) -> int:
        return int(self._consumer.get_watermark_offsets(tp, timeout=10)[1])

    def _start(self, p: int) -> int:
        return int(
            self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[0]
        )

    def read(self, timeout: float) -> list:
        """The records from where the last read stopped up to the end offsets seen now
        (raises IncompleteRead if they cannot be read within ``timeout`` seconds; the tail
        is then spent: the records read before the error are not given again)."""
        ends = {p: self._end(TopicPartition(self.topic, p)) for p in self._next}
        pending = {p for p, end in ends.items() if end > self._next[p]}
        out: list = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in self._consumer.consume(5000, 0.1):
                if msg.error():
                    continue
                out.append(msg)
                p = msg.partition() or 0
                self._next[p] = (msg.offset() or 0) + 1
                if self._next[p] >= ends[p]:
                    pending.discard(p)
            if self.committed_only:  # transaction markers: the last offsets are not records
                for p in list(pending):
                    position = self._consumer.position([TopicPartition(self.topic, p)])[0].offset
                    if position >= ends[p]:
                        self._next[p] = position
                        pending.discard(p)
        if pending:  # a partial read would account for fewer offsets than the log holds
            raise IncompleteRead(
                f"{self.topic}: partitions {sorted(pending)} not read to their end offsets "
                f"({ {p: ends[p] for p in sorted(pending)} }) within {timeout:g} s"
            )
        return out

    def close(self) -> None:
        self._consumer.close()


Decoded = tuple[int, int, str, dict]  # (partition, offset, record name or "", record)


def decode_all(registry: SchemaRegistry, msgs: list) -> list[Decoded]:
    """Each message decoded once; an undecodable one as name "" and an empty record."""
    out: list[Decoded] = []
    for msg in msgs:
        try:
            name, record = registry.decode(msg.value() or b"")
        except UndecodableRecord:
            name, record = "", {}
        out.append((msg.partition() or 0, msg.offset() or 0, name, record))
    return out


def dead_letter_sources(names: TopicNames, msgs: list) -> set[tuple[int, int]]:
    """(partition, offset) of every command-topic record in the dead-letter topic."""
    dead = set()
    for msg in msgs:
        h = dict(msg.headers() or [])
        if h.get("dlq.source.topic", b"").decode() == names.sku_commands:
            dead.add((int(h["dlq.source.partition"]), int(h["dlq.source.offset"])))
    return dead


def account(
    bootstrap: str, names: TopicNames, sale_id: str | None = None, timeout: float = 60.0
) -> InputAccount:
    """Account for every command-topic offset against the decisions and dead letters."""
    registry = SchemaRegistry.load_default()
    decisions = decode_all(registry, read_topic(bootstrap, names.decisions, True, timeout))
    dead = dead_letter_sources(names, read_topic(bootstrap, names.dead_letters, True, timeout))
    commands = decode_all(registry, read_topic(bootstrap, names.sku_commands, False, timeout))
    return account_records(commands, decisions, dead, sale_id)


def account_records(
    commands: list[Decoded], decided: list[Decoded], dead: set[tuple[int, int]],
    sale_id: str | None = None,
) -> InputAccount:  # fmt: skip
    """``account`` over decoded command and decision records and the dead-letter sources."""
    decisions: Counter[str] = Counter()
    queued: dict[str, tuple[str, str]] = {}  # intent id -> its (sale, SKU)
    resolved: set[tuple[str, str]] = set()  # pre-queues drawn or expired
    waiting: set[str] = set()  # waitlisted intents: decided when a unit returns or cannot
    for _, _, name, record in decided:
        if sale_id is not None and record.get("sale_id") != sale_id:
            continue
        if name in DECISION_RECORDS:
            decisions[record["intent_id"]] += 1
        elif name == "EntryQueued":
            queued[record["intent_id"]] = (record["sale_id"], record["sku"])
        elif name in ("DrawRevealed", "QueueExpired"):
            resolved.add((record["sale_id"], record["sku"]))
        elif name == "Waitlisted" or name == "IntentDeferred":
            waiting.add(record["intent_id"])
    acc = InputAccount()
    asked: set[str] = set()
    for partition, offset, name, record in commands:
        where = (partition, offset)
        if name and sale_id is not None and record.get("sale_id") != sale_id:
            continue
        acc.inputs += 1
        if where in dead:  # undecodable, or decodable but refused (an unsigned intent)
            acc.dead_lettered += 1
            continue
        if name == "PurchaseIntent":
            intent = record["intent_id"]
            if intent in asked:
                acc.repeats += 1
            elif decisions[intent] >= 1:
                acc.decided += 1
            elif intent in queued and queued[intent] not in resolved:
                acc.queued += 1  # its pre-queue is not drawn yet: its decision comes with it
            elif intent in waiting:
                acc.queued += 1  # waitlisted or deferred by a pause: its decision comes later
            else:
                acc.unaccounted.append(where)
                acc.undecided[intent] = where
            asked.add(intent)
        elif name in COMMAND_RECORDS:  # sale commands, reveals, ticks: no decision of their own
            acc.sale_commands += 1
        else:
            acc.unaccounted.append(where)
    acc.extra_decisions = sorted(i for i, n in decisions.items() if n > 1)
    acc.orphan_decisions = sorted(i for i in decisions if i not in asked)
    return acc
