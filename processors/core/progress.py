"""When the writer says how far it is: a ``QueueProgress`` fact after some events of a sale.

For a sale opened with ``progress_every = N``: after every event whose sequence is a multiple
of N, and after the event that takes the last unit (remaining from above zero to zero). Both
are functions of the sale's events alone, never of batches or timing, so a replay of the log
emits the same progress facts at the same places and the audit recomputes them.
"""

from __future__ import annotations

MAX_PROGRESS_EVERY = 1_000_000


def progress_due(every: int | None, sequence: int, before: int, after: int) -> bool:
    """Whether a progress fact follows the event ``sequence`` of a sale opened with
    ``progress_every = every``, which took its remaining units from ``before`` to ``after``."""
    if not every:
        return False
    return sequence % every == 0 or before > 0 >= after


def progress_problem(every: int | None) -> str | None:
    """Why ``every`` cannot be a sale's progress cadence, or None."""
    if every is not None and not 1 <= every <= MAX_PROGRESS_EVERY:
        return f"progress_every must be between 1 and {MAX_PROGRESS_EVERY}"
    return None
