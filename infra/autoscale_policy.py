"""The autoscaler's policy, pure: from a sample of the system, whether to add or remove an
app server or a writer worker.

* **App servers** on CPU and request rate: one is added when their mean CPU (cores per
  server) is above ``cpu_high`` *or* the requests per server per second above ``rps_high``;
  one is removed when both are below the low marks (``cpu_low``, ``rps_low``).
* **Writer workers** on the writer group's consumer lag (records not yet decided): one is
  added above ``lag_high``, one removed below ``lag_low``.
* **Only into idle cores**: nothing is added unless the host has ``headroom`` cores idle. On
  one host another process does not add a core: measured on two (``flashsale bench --only
  autoscale``), a third app server on a saturated host made the burst's p99 ten times worse,
  since every server also reads the whole decision feed and batches its own produce requests.
  (A cluster scheduler has the same rule in another form: a pod that fits no node waits for
  the cluster autoscaler to add one.)

Hysteresis three ways: the high and low marks are far apart; a condition must hold for
``sustain`` samples in a row; after a change of a kind, that kind waits ``cooldown_s`` (a new
server or worker needs time to take load before it can be judged). Bounds are hard: never
fewer than ``min`` nor more than ``max``. The same rules, given to a cluster scheduler, are a
Kubernetes HorizontalPodAutoscaler on CPU and a requests-per-pod metric for the app servers
(``behavior.scaleUp/scaleDown.stabilizationWindowSeconds`` = sustain x interval, a
``periodSeconds`` policy of one pod = one step, ``minReplicas``/``maxReplicas`` = bounds) and
a KEDA Kafka scaler on the writer group's lag (``lagThreshold``; ``maxReplicaCount`` at most
the partition count, past which a worker has no partition to take).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Bounds:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"bounds {self.low}..{self.high}: need 1 <= min <= max")


@dataclass(frozen=True)
class Policy:
    servers: Bounds = Bounds(1, 4)
    workers: Bounds = Bounds(1, 2)
    cpu_high: float = 0.70  # cores per app server
    cpu_low: float = 0.20
    rps_high: float = 600.0  # requests per app server per second
    rps_low: float = 100.0
    lag_high: int = 5_000  # records behind in the writer group
    lag_low: int = 200
    sustain: int = 3  # samples in a row
    cooldown_s: float = 20.0
    headroom: float = 0.5  # idle cores on the host, to add anything

    def __post_init__(self) -> None:
        if not (self.cpu_low < self.cpu_high and self.rps_low < self.rps_high
                and self.lag_low < self.lag_high):  # fmt: skip
            raise ValueError("each low mark must be below its high mark (hysteresis)")
        if self.sustain < 1 or self.cooldown_s < 0 or self.headroom < 0:
            raise ValueError(
                "sustain must be at least 1 sample; cooldown and headroom not negative"
            )


@dataclass(frozen=True)
class Sample:
    """The system at one moment (``at``: monotonic seconds)."""

    at: float
    servers: int
    workers: int
    server_cpu: float  # mean cores per app server since the last sample
    requests_per_s: float  # through all app servers
    lag: int  # the writer group's records not yet decided
    host_idle: float = 0.0  # cores idle on the host since the last sample


@dataclass(frozen=True)
class Decision:
    kind: str  # "servers" or "workers"
    step: int  # +1 or -1
    to: int  # how many there will be
    reason: str


@dataclass
class _Streak:
    up: int = 0
    down: int = 0
    changed_at: float | None = None


@dataclass
class Autoscaler:
    """Streaks and cooldowns between samples; ``decide`` is called once per sample."""

    policy: Policy
    _streaks: dict[str, _Streak] = field(
        default_factory=lambda: {"servers": _Streak(), "workers": _Streak()}
    )

    def decide(self, s: Sample, complete: bool = True) -> list[Decision]:
        """``complete``: every process answered. A figure missing reads as zero (a saturated
        server answers ``/metrics`` late), so an incomplete sample may add, never remove."""
        p = self.policy
        per_server = s.requests_per_s / max(1, s.servers)
        room = s.host_idle >= p.headroom
        servers_up = room and (s.server_cpu > p.cpu_high or per_server > p.rps_high)
        servers_down = complete and s.server_cpu < p.cpu_low and per_server < p.rps_low
        why = f"cpu {s.server_cpu:.2f}/server, {per_server:.0f} req/s/server"
        lag_up, lag_down = room and s.lag > p.lag_high, complete and s.lag < p.lag_low
        out = [
            self._judge("servers", s.at, s.servers, p.servers, servers_up, servers_down, why),
            self._judge("workers", s.at, s.workers, p.workers, lag_up, lag_down, f"lag {s.lag}"),
        ]
        return [d for d in out if d is not None]

    def changed(self, kind: str, at: float) -> None:
        """A change of ``kind`` was made at ``at`` (also by hand): its cooldown starts."""
        streak = self._streaks[kind]
        streak.up = streak.down = 0
        streak.changed_at = at

    def _judge(self, kind: str, at: float, now: int, bounds: Bounds, up: bool, down: bool,
               why: str) -> Decision | None:  # fmt: skip
        streak, p = self._streaks[kind], self.policy
        streak.up = streak.up + 1 if up else 0
        streak.down = streak.down + 1 if down else 0
        if now < bounds.low:  # below the floor (one exited): back up at once
            return Decision(kind, +1, now + 1, f"below the minimum {bounds.low}")
        if now > bounds.high:
            return Decision(kind, -1, now - 1, f"above the maximum {bounds.high}")
        if streak.changed_at is not None and at - streak.changed_at < p.cooldown_s:
            return None
        if streak.up >= p.sustain and now < bounds.high:
            return Decision(kind, +1, now + 1, f"{why} for {streak.up} samples")
        if streak.down >= p.sustain and now > bounds.low:
            return Decision(kind, -1, now - 1, f"{why} for {streak.down} samples")
        return None
