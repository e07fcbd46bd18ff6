"""One writer step in tests: decide, then fold the events into the ledger (as the writer does)."""

from __future__ import annotations

import copy

from processors.core import Command, Event, SkuLedger, decide, evolve


def step(ledger: SkuLedger, command: Command, log_time_ms: int) -> list[Event]:
    """``decide`` (checked not to change the ledger), then ``evolve`` each event."""
    before = copy.deepcopy(ledger)
    events = decide(ledger, command, log_time_ms)
    assert ledger == before, "decide changed the ledger"
    for event in events:
        evolve(ledger, event)
    return events
