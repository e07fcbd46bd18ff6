"""Kafka clients that log in as this process's principal when the cluster asks for SASL.

Import ``Consumer``, ``Producer`` and ``AdminClient`` from here, not from confluent_kafka:
they are confluent-kafka's own, given the SASL settings of the principal named by
``FLASHSALE_KAFKA_USER`` (its password read from ``FLASHSALE_KAFKA_PASSWORD_FILE``; never
from the environment or the command line, so ``ps`` and ``/proc/*/environ`` show no secret).
Without ``FLASHSALE_KAFKA_USER`` they connect unauthenticated, as on a one-node stack.

Service principals log in with SCRAM-SHA-512 (credentials the provisioning principal keeps in
the cluster's metadata, rotatable without a restart of the brokers); the provisioning
principal ``admin`` logs in with PLAIN, configured statically in the brokers (it exists
before any SCRAM credential can be stored). See ``infra/kafka_acl.py`` for who may do what.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path
from typing import Any

import confluent_kafka
import confluent_kafka.admin

from flashsale.settings import SettingError, Settings

ENV_USER = "FLASHSALE_KAFKA_USER"
ENV_PASSWORD_FILE = "FLASHSALE_KAFKA_PASSWORD_FILE"
SCRAM = "SCRAM-SHA-512"
ADMIN = "admin"  # provisioning and the operator's commands; a PLAIN user of the brokers
# The principal each long-running command logs in as (any other command: the operator's).
PRINCIPALS = {"processor": "writer", "projector": "projector", "analytics": "analytics",
              "clock": "clock", "payments": "payments", "http": "edge",
              "fulfilment": "downstream"}  # fmt: skip
NO_LOGIN = ("supervise",)  # reads no topic; its children log in as themselves
SIGNERS = ("edge", "writer", ADMIN)  # hold the intent key: sign intents, or check them


@functools.cache
def credentials() -> tuple[str, str] | None:
    """(user, password) of this process, or None when it connects unauthenticated."""
    user = os.environ.get(ENV_USER)
    if not user:
        return None
    path = os.environ.get(ENV_PASSWORD_FILE)
    if not path:
        raise SettingError(f"{ENV_USER}={user} needs {ENV_PASSWORD_FILE} (the password's file)")
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingError(f"{ENV_PASSWORD_FILE}={path} cannot be read: {exc.strerror}") from None
    if not password:
        raise SettingError(f"{ENV_PASSWORD_FILE}={path} is empty")
    return user, password


def with_auth(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` plus this process's SASL settings (unchanged when it has none)."""
    creds = credentials()
    if creds is None or "sasl.username" in conf:
        return conf
    user, password = creds
    return {**conf, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN" if user == ADMIN else SCRAM,
            "sasl.username": user, "sasl.password": password}  # fmt: skip


class Consumer(confluent_kafka.Consumer):
    def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(with_auth(conf), **kwargs)


class Producer(confluent_kafka.Producer):
    def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(with_auth(conf), **kwargs)


class AdminClient(confluent_kafka.admin.AdminClient):
    def __init__(self, conf: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(with_auth(conf), **kwargs)


# -- secrets on disk --------------------------------------------------------------------------
def secrets_dir(settings: Settings) -> Path:
    return settings.secrets_dir / "kafka"


def password_file(directory: Path, user: str) -> Path:
    """The file in ``directory`` holding ``user``'s password, made (0600, random) on first use."""
    path = directory / user
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
        path.with_suffix(".tmp").rename(path)
    return path


def password(directory: Path, user: str) -> str:
    return password_file(directory, user).read_text().strip()


def admin_conf(directory: Path) -> dict[str, str]:
    """The SASL settings of the provisioning principal, whose password is in ``directory``."""
    return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
            "sasl.username": ADMIN, "sasl.password": password(directory, ADMIN)}  # fmt: skip


def login_env(settings: Settings, user: str) -> dict[str, str]:
    """The environment that makes a child process log in as ``user`` (nothing without auth)."""
    if settings.kafka_auth != "scram":
        return {}
    return {ENV_USER: user, ENV_PASSWORD_FILE: str(password_file(secrets_dir(settings), user))}


def log_in(settings: Settings, command: str) -> None:
    """A command run without a user in its environment logs in as its own principal (a
    service's), or as the operator; nothing without auth."""
    if settings.kafka_auth == "scram" and not os.environ.get(ENV_USER):
        from flashsale import intent_sig

        if command in NO_LOGIN:
            return
        user = PRINCIPALS.get(command, ADMIN)
        os.environ.update(login_env(settings, user))
        if user in SIGNERS:  # the operator may post intents by hand (`flashsale intent`)
            os.environ.update(intent_sig.key_env(settings))
        credentials.cache_clear()
