"""Process settings, read from the environment (prefix ``FLASHSALE_``) with local defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


class SettingError(ValueError):
    """A setting is missing or invalid; the message names it."""


def env_number(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    """A number setting within lo..hi; SettingError naming the variable otherwise."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingError(f"{name}={raw} is outside {lo:g}..{hi:g}")
    return value


def env_int(env: Mapping[str, str], name: str, default: int, lo: int = 1, hi: int = 2**31) -> int:
    """An integer setting within lo..hi; SettingError naming the variable otherwise."""
    value = env_number(env, name, default, lo, hi)
    if value != int(value):
        raise SettingError(f"{name}={env.get(name)!r} is not an integer")
    return int(value)


INFRA_MODES = ("local", "containers", "external")


@dataclass(frozen=True)
class Settings:
    """Everything a process needs to find its servers and its state."""

    infra_mode: str
    state_dir: Path
    kafka_port: int
    kafka_controller_port: int
    kafka_heap: str
    kafka_bootstrap: str
    pg_port: int
    database_url: str
    partitions: int
    replication_factor: int
    http_port: int
    namespace: str = "flashsale"
    kafka_nodes: int = 1  # FLASHSALE_CLUSTER: local Kafka nodes forming one cluster
    kafka_auth: str = "none"  # FLASHSALE_KAFKA_AUTH: "scram" (SASL and ACLs) or "none"
    secrets_override: Path | None = None  # FLASHSALE_SECRETS_DIR
    https_port: int = 0  # FLASHSALE_HTTPS_PORT: nginx also terminates TLS there (0: not)

    @property
    def secrets_dir(self) -> Path:
        """Passwords and keys (0700; each file 0600): the state dir's unless set."""
        return self.secrets_override or self.state_dir / "secrets"

    @property
    def destructive_tests_allowed(self) -> bool:
        """Tests that kill or wipe servers run only against servers this project owns."""
        return self.infra_mode == "local"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Read settings; fail with the variable's name when one is invalid."""
        e = dict(os.environ if env is None else env)
        external = bool(e.get("KAFKA_BOOTSTRAP_SERVERS") or e.get("DATABASE_URL"))
        mode = e.get("FLASHSALE_INFRA") or ("external" if external else "local")
        if mode not in INFRA_MODES:
            raise SettingError(f"FLASHSALE_INFRA={mode!r} must be one of {', '.join(INFRA_MODES)}")
        if mode == "external" and not (e.get("KAFKA_BOOTSTRAP_SERVERS") and e.get("DATABASE_URL")):
            raise SettingError(
                "FLASHSALE_INFRA=external needs both KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL"
            )
        kafka_port = env_int(e, "FLASHSALE_KAFKA_PORT", 19092, 1024, 65535)
        nodes = env_int(e, "FLASHSALE_CLUSTER", 1, 1, 5)
        auth = e.get("FLASHSALE_KAFKA_AUTH") or ("scram" if nodes > 1 else "none")
        if auth not in ("scram", "none"):
            raise SettingError(f"FLASHSALE_KAFKA_AUTH={auth!r} must be scram or none")
        local_bootstrap = ",".join(f"127.0.0.1:{kafka_port + 2 * i}" for i in range(nodes))
        pg_port = env_int(e, "FLASHSALE_PG_PORT", 15432, 1024, 65535)
        namespace = e.get("FLASHSALE_NAMESPACE", "flashsale")
        if not namespace.replace("-", "").replace("_", "").isalnum():
            raise SettingError(f"FLASHSALE_NAMESPACE={namespace!r} must be letters, digits, - or _")
        state_dir = Path(e.get("FLASHSALE_STATE_DIR") or REPO_ROOT / ".state").resolve()
        return cls(
            infra_mode=mode,
            state_dir=state_dir,
            kafka_port=kafka_port,
            kafka_controller_port=env_int(e, "FLASHSALE_KAFKA_CONTROLLER_PORT", 19093, 1024, 65535),
            kafka_heap=e.get("FLASHSALE_KAFKA_HEAP", "1g"),
            kafka_bootstrap=e.get("KAFKA_BOOTSTRAP_SERVERS") or local_bootstrap,
            pg_port=pg_port,
            database_url=e.get("DATABASE_URL")
            or f"postgresql://flashsale:flashsale@127.0.0.1:{pg_port}/flashsale",
            partitions=env_int(e, "FLASHSALE_PARTITIONS", 6, 1, 256),
            replication_factor=env_int(e, "FLASHSALE_REPLICATION_FACTOR", min(3, nodes), 1, 5),
            http_port=env_int(e, "FLASHSALE_HTTP_PORT", 18080, 1024, 65535),
            namespace=namespace,
            kafka_nodes=nodes,
            kafka_auth=auth,
            https_port=env_int(e, "FLASHSALE_HTTPS_PORT", 0, 0, 65535),
            # resolved now: a copy with another state dir (an edge of the bench's own) keeps
            # the stack's secrets
            secrets_override=Path(
                e.get("FLASHSALE_SECRETS_DIR") or state_dir / "secrets"
            ).resolve(),
        )
