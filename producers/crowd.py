"""A simulated flash-sale crowd: many users, a few greedy ones, and retries."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class PlannedIntent:
    """One request the crowd will send (a retry repeats an earlier idempotency key)."""

    user_id: str
    sku: str
    quantity: int
    idempotency_key: str
    retry: bool = False


@dataclass(frozen=True)
class CrowdPlan:
    """The whole crowd, in send order, and what stress it contains."""

    intents: list[PlannedIntent]
    retries: int
    over_limit_users: int
    invalid_quantity: int


def plan_crowd(
    skus: list[str],
    intents: int = 20_000,
    users: int = 5_000,
    per_user_limit: int = 2,
    per_order_max: int = 2,
    retry_share: float = 0.05,
    seed: int = 7,
) -> CrowdPlan:
    """Plan ``intents`` requests from ``users`` users over ``skus``, deterministically."""
    rng = random.Random(seed)
    planned: list[PlannedIntent] = []
    asked: dict[tuple[str, str], int] = {}
    invalid = 0
    fresh = int(intents * (1 - retry_share))
    for n in range(fresh):
        user = f"user-{rng.randrange(users):05d}"
        sku = rng.choice(skus)
        roll = rng.random()
        if roll < 0.01:
            quantity = rng.choice([0, -1, per_order_max + 1])  # rule faults
            invalid += 1
        else:
            quantity = 1 if roll < 0.7 else per_order_max
            asked[(user, sku)] = asked.get((user, sku), 0) + quantity
        planned.append(PlannedIntent(user, sku, quantity, f"k{n}"))
    retries = 0
    while len(planned) < intents:
        original = planned[rng.randrange(fresh)]
        position = rng.randrange(len(planned) + 1)
        planned.insert(
            position,
            PlannedIntent(original.user_id, original.sku, original.quantity,
                          original.idempotency_key, retry=True),
        )  # fmt: skip
        retries += 1
    over = sum(1 for total in asked.values() if total > per_user_limit)
    return CrowdPlan(planned, retries, over, invalid)
