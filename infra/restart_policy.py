"""When to restart a supervised service, and when to stop: a pure function of its exits.

No processes, clocks or files here: the supervisor feeds each exit in and acts on the
verdict, so the backoff and crash-loop rules are unit-tested on plain sequences of exits.
Its settings (``SupervisorConfig``) are read from a mapping, the environment by default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from flashsale.settings import env_int, env_number


@dataclass(frozen=True)
class CrashRecord:
    """Where a service crashed, as it recorded it just before exiting (see infra.supervisor)."""

    partition: int
    offset: int
    reason: str
    at: int  # epoch milliseconds

    @property
    def position(self) -> tuple[int, int]:
        """(partition, offset): the record the service could not get past."""
        return (self.partition, self.offset)


@dataclass(frozen=True)
class Exit:
    """One exit of a supervised child: its return code, how long it ran, its crash record."""

    code: int  # as subprocess reports it: negative for a signal (-9 after kill -9)
    ran_s: float
    crash: CrashRecord | None = None


@dataclass(frozen=True)
class Verdict:
    """What to do after an exit: restart after delay_s, or stop in a crash loop."""

    restart: bool
    delay_s: float
    repeats: int  # consecutive crashes at the same position, this one included (0: none)
    crash: CrashRecord | None = None

    @property
    def crash_loop(self) -> bool:
        """True when the service must not be restarted again."""
        return not self.restart


class RestartPolicy:
    """Exponential backoff per service, and a stop after crash_limit crashes at one position.

    Backoff is base_s, 2*base_s, 4*base_s ... capped at max_s, and starts over once a
    child has run healthy_s seconds. A crash loop is crash_limit exits in a row that each
    left a crash record for the same (partition, offset): restarting again would fail on
    the same record, and skipping it would lose an input, so the supervisor gives up on the
    service and raises an alert. An exit with no record, or a record at another position,
    ends the streak and is an ordinary restart.
    """

    def __init__(
        self,
        base_s: float = 0.5,
        max_s: float = 30.0,
        healthy_s: float = 30.0,
        crash_limit: int = 5,
    ) -> None:
        if base_s <= 0 or max_s < base_s or crash_limit < 1:
            raise ValueError("need 0 < base_s <= max_s and crash_limit >= 1")
        self.base_s = base_s
        self.max_s = max_s
        self.healthy_s = healthy_s
        self.crash_limit = crash_limit
        self.restarts = 0
        self._failures = 0  # exits since the last healthy run: the backoff exponent
        self._streak: tuple[tuple[int, int], int] | None = None  # (position, count)

    def on_exit(self, exit: Exit) -> Verdict:
        """Record one exit; the verdict says whether and when to start the service again."""
        if exit.ran_s >= self.healthy_s:
            self._failures = 0
        repeats = 0
        if exit.crash is not None:
            position = exit.crash.position
            prev = self._streak
            repeats = prev[1] + 1 if prev is not None and prev[0] == position else 1
            self._streak = (position, repeats)
        else:
            self._streak = None
        if repeats >= self.crash_limit:
            return Verdict(restart=False, delay_s=0.0, repeats=repeats, crash=exit.crash)
        delay = min(self.base_s * 2.0 ** min(self._failures, 64), self.max_s)
        self._failures += 1
        self.restarts += 1
        return Verdict(restart=True, delay_s=delay, repeats=repeats, crash=exit.crash)


@dataclass(frozen=True)
class SupervisorConfig:
    """Backoff and crash-loop settings (``FLASHSALE_SUPERVISE_*``)."""

    backoff_s: float = 0.5
    backoff_max_s: float = 30.0
    healthy_s: float = 30.0
    crash_limit: int = 5

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SupervisorConfig:
        """Read the settings; SettingError naming the variable when one is invalid."""
        e = os.environ if env is None else env
        base = env_number(e, "FLASHSALE_SUPERVISE_BACKOFF_S", 0.5, 0.01, 3600)
        return cls(
            backoff_s=base,
            backoff_max_s=env_number(e, "FLASHSALE_SUPERVISE_BACKOFF_MAX_S", 30.0, base, 3600),
            healthy_s=env_number(e, "FLASHSALE_SUPERVISE_HEALTHY_S", 30.0, 0, 86400),
            crash_limit=env_int(e, "FLASHSALE_SUPERVISE_CRASH_LIMIT", 5, 1, 1000),
        )

    def policy(self) -> RestartPolicy:
        """A fresh policy for one service."""
        return RestartPolicy(self.backoff_s, self.backoff_max_s, self.healthy_s, self.crash_limit)
