"""Settings of the HTTP edge, read from the environment (prefix ``FLASHSALE_``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flashsale.settings import env_int, env_number
from producers.sales import progress_every_from_env


@dataclass(frozen=True)
class EdgeSettings:
    """Knobs of one app server; defaults work locally."""

    ack_timeout_ms: int = 5000  # FLASHSALE_KAFKA_ACK_TIMEOUT_MS
    linger_ms: int = 2  # FLASHSALE_KAFKA_LINGER_MS: how long intents wait to share a request
    rate_per_s: float = 5.0  # FLASHSALE_RATE_PER_S
    rate_burst: float = 10.0  # FLASHSALE_RATE_BURST
    read_rate_per_s: float = 20.0  # FLASHSALE_READ_RATE_PER_S (GET status and sale reads)
    read_rate_burst: float = 40.0  # FLASHSALE_READ_RATE_BURST
    jwt_secret: str | None = None  # FLASHSALE_JWT_SECRET: one fixed key (else the keyring)
    jwt_keys_dir: Path | None = None  # FLASHSALE_JWT_KEYS_DIR (else <state_dir>/jwt-keys)
    heartbeat_s: float = 15.0  # FLASHSALE_SSE_HEARTBEAT_S
    server_id: str = ""  # FLASHSALE_HTTP_SERVER_ID, sent as X-Served-By
    pool_size: int = 10  # FLASHSALE_PG_POOL_SIZE
    lean_intents: bool = True  # FLASHSALE_HTTP_LEAN_INTENTS (0: the FastAPI route serves it)
    recent_intents: int = 200_000  # FLASHSALE_RECENT_INTENTS: retries answered from memory
    feed_window: int = 20_000  # FLASHSALE_FEED_WINDOW: decisions kept per partition to resume
    # FLASHSALE_FEED_CATCH_UP_S: how long an unknown sale waits for this server's feed to read
    # the log's end before the answer (404, or 503 when still not sure)
    catch_up_s: float = 2.0
    progress_every: int | None = 1000  # FLASHSALE_PROGRESS_EVERY: sales opened here (0: none)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> EdgeSettings:
        """Read the edge's settings; an invalid one fails naming its variable."""
        e = dict(os.environ if env is None else env)
        return cls(
            ack_timeout_ms=env_int(e, "FLASHSALE_KAFKA_ACK_TIMEOUT_MS", 5000, 100, 300_000),
            linger_ms=env_int(e, "FLASHSALE_KAFKA_LINGER_MS", 2, 0, 1000),
            rate_per_s=env_number(e, "FLASHSALE_RATE_PER_S", 5.0, 0.001, 1e9),
            rate_burst=env_number(e, "FLASHSALE_RATE_BURST", 10.0, 1, 1e9),
            read_rate_per_s=env_number(e, "FLASHSALE_READ_RATE_PER_S", 20.0, 0.001, 1e9),
            read_rate_burst=env_number(e, "FLASHSALE_READ_RATE_BURST", 40.0, 1, 1e9),
            jwt_secret=e.get("FLASHSALE_JWT_SECRET") or None,
            jwt_keys_dir=Path(e["FLASHSALE_JWT_KEYS_DIR"])
            if e.get("FLASHSALE_JWT_KEYS_DIR")
            else None,
            heartbeat_s=env_number(e, "FLASHSALE_SSE_HEARTBEAT_S", 15.0, 0.05, 3600),
            server_id=e.get("FLASHSALE_HTTP_SERVER_ID", ""),
            pool_size=env_int(e, "FLASHSALE_PG_POOL_SIZE", 10, 1, 200),
            lean_intents=env_int(e, "FLASHSALE_HTTP_LEAN_INTENTS", 1, 0, 1) == 1,
            recent_intents=env_int(e, "FLASHSALE_RECENT_INTENTS", 200_000, 1, 10_000_000),
            feed_window=env_int(e, "FLASHSALE_FEED_WINDOW", 20_000, 1, 10_000_000),
            catch_up_s=env_number(e, "FLASHSALE_FEED_CATCH_UP_S", 2.0, 0.0, 60.0),
            progress_every=progress_every_from_env(e),
        )
