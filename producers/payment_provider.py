"""The payment provider behind a small interface, and a stub with a durable ledger.

``charge`` and ``refund`` are idempotent per payment attempt: asking again returns what
happened the first time and never charges or refunds twice. That is what lets the payment
service redo anything after a crash (``producers.payments``).

The stub keeps its own ledger in PostgreSQL (``stub_payment_ledger``, per namespace) and
picks each attempt's outcome from the person's id, so tests choose it (the log carries
pseudonyms: the stub finds the person behind one in ``user_keys``, as a real provider knows
the card holder): an id containing ``decline`` is declined; ``timeout`` is charged but the
first answer is lost (the caller sees ``ProviderTimeout`` and asks again); ``slow`` is
answered after ``slow_s``.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Protocol

import psycopg

from flashsale.pseudonyms import is_pseudonym, pseudonym


class ProviderTimeout(Exception):
    """The provider did not answer: the charge may or may not have happened (ask again)."""


class PaymentProvider(Protocol):
    def charge(self, attempt_id: str, order_id: str, user_id: str) -> bool:
        """Charge the attempt once: True when charged, False when declined."""
        ...

    def refund(self, attempt_id: str) -> bool:
        """Refund a charged attempt once; False when there is nothing to refund."""
        ...


class StubProvider:
    """A provider for tests and the demo: outcomes chosen by the user id, ledger in PG."""

    def __init__(self, dsn: str, namespace: str, slow_s: float = 0.5) -> None:
        self.dsn, self.namespace, self.slow_s = dsn, namespace, slow_s
        self._conn: psycopg.Connection[Any] | None = None
        self._lost: set[str] = set()  # attempts whose first answer was "lost" (timeout)
        self._people: dict[str, str] = {}  # pseudonym -> user id
        self._since = datetime.fromtimestamp(0, UTC)  # user_keys read up to here

    def _db(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _person(self, user_id: str) -> str:
        """The id behind a pseudonym (the pseudonym itself when its key is gone, or for the
        synthetic ids load generators write)."""
        if not is_pseudonym(user_id) or user_id in self._people:
            return self._people.get(user_id, user_id)
        rows = (
            self._db()
            .execute(  # only the keys made since the last look
                "SELECT user_id, key, created_at FROM user_keys WHERE namespace = %s "
                "AND created_at >= %s - interval '10 seconds' ORDER BY created_at",  # late commits
                (self.namespace, self._since),
            )
            .fetchall()
        )
        for user, key, made in rows:
            self._people[pseudonym(bytes(key), user)] = user
            self._since = made
        return self._people.get(user_id, user_id)

    def charge(self, attempt_id: str, order_id: str, user_id: str) -> bool:
        user_id = self._person(user_id)
        outcome = "declined" if "decline" in user_id else "succeeded"
        db = self._db()
        db.execute(
            "INSERT INTO stub_payment_ledger (namespace, attempt_id, order_id, outcome) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (self.namespace, attempt_id, order_id, outcome),
        )
        row = db.execute(
            "SELECT outcome FROM stub_payment_ledger WHERE namespace = %s AND attempt_id = %s",
            (self.namespace, attempt_id),
        ).fetchone()
        if "slow" in user_id:
            time.sleep(self.slow_s)
        if "timeout" in user_id and attempt_id not in self._lost:
            self._lost.add(attempt_id)
            raise ProviderTimeout(f"no answer for {attempt_id} (it was charged)")
        return bool(row and row[0] == "succeeded")

    def refund(self, attempt_id: str) -> bool:
        row = (
            self._db()
            .execute(
                "UPDATE stub_payment_ledger SET refunded = true, refunded_at = now() "
                "WHERE namespace = %s AND attempt_id = %s AND outcome = 'succeeded' "
                "AND NOT refunded RETURNING attempt_id",
                (self.namespace, attempt_id),
            )
            .fetchone()
        )
        return row is not None

    def totals(self) -> dict[str, int]:
        """Charged, declined and refunded attempts in the ledger (for checks and reports)."""
        row = (
            self._db()
            .execute(
                "SELECT count(*) FILTER (WHERE outcome = 'succeeded'), "
                "count(*) FILTER (WHERE outcome = 'declined'), count(*) FILTER (WHERE refunded) "
                "FROM stub_payment_ledger WHERE namespace = %s",
                (self.namespace,),
            )
            .fetchone()
        )
        assert row is not None
        return {"charged": row[0], "declined": row[1], "refunded": row[2]}
