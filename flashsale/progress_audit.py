"""The sale audit's check of ``QueueProgress``: recomputed from the sale's facts and the
command topic, so a writer that leaves one out, adds one, or names the wrong place in its
input is caught (``processors.core.progress`` says where they belong)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from processors.core import progress_due

Fact = tuple[str, dict[str, Any]]


def expected_progress(events: list[Fact]) -> dict[tuple[str, int], tuple[int, bool, int]]:
    """(SKU, the sequence it follows) -> (remaining, sold out, log time) of every progress
    fact the sale's events call for."""
    by_sku: dict[str, list[dict[str, Any]]] = defaultdict(list)
    opened: dict[str, int | None] = {}
    for name, rec in events:
        by_sku[rec["sku"]].append(rec)
        if name == "SaleOpened":
            opened[rec["sku"]] = rec.get("progress_every")
    due: dict[tuple[str, int], tuple[int, bool, int]] = {}
    for sku, recs in by_sku.items():
        every = opened.get(sku)
        if not every:
            continue
        remaining: int | None = None  # no book before the sale opened: nothing is due
        for rec in sorted(recs, key=lambda r: r["sequence"]):
            before = remaining
            if "allocation" in rec:  # SaleOpened
                remaining = rec["allocation"]
            elif "remaining" in rec and remaining is not None:
                remaining = rec["remaining"]
            if remaining is None:
                continue
            was = 0 if before is None else before
            if progress_due(every, rec["sequence"], was, remaining):
                due[sku, rec["sequence"]] = (remaining, was > 0 >= remaining, rec["decided_at"])
    return due


def check_progress(
    events: list[Fact], progress: list[dict[str, Any]], appended: dict[tuple[int, int], int]
) -> list[tuple[str, str]]:
    """(kind, detail) of each way the progress facts differ from what the events call for:
    each must be in the log once, with the right remaining count, naming an input offset
    whose append time is its own log time; none other."""
    found: list[tuple[str, str]] = []
    due = expected_progress(events)
    seen: set[tuple[str, int]] = set()
    for rec in progress:
        key = (rec["sku"], rec["after_sequence"])
        where = f"{key[0]} after #{key[1]}"
        want = due.get(key)
        if want is None or key in seen:
            found.append(("progress-unexpected", f"{where}: no progress fact belongs here"))
            continue
        seen.add(key)
        got = (rec["remaining"], rec["sold_out"], rec["decided_at"])
        if got != want:
            found.append(("progress-mismatch", f"{where}: says {got}, the events say {want}"))
        at = appended.get((rec["input_partition"], rec["input_offset"]))
        if at != rec["decided_at"]:
            found.append(
                (
                    "progress-offset",
                    f"{where}: input {rec['input_partition']}:{rec['input_offset']} was appended "
                    f"at {at}, the fact says {rec['decided_at']}",
                )
            )
    for key in sorted(set(due) - seen):
        found.append(("progress-missing", f"{key[0]} after #{key[1]}: no progress fact"))
    return found
