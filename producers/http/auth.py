"""Bearer tokens: HS256 JWTs with ``sub`` (user id), ``role``, ``iat`` and ``exp``."""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt

from flashsale.settings import Settings

ROLES = ("shopper", "admin")
ALGORITHM = "HS256"
SECRET_FILE = "jwt-secret"


class Unauthenticated(Exception):
    """No usable bearer token: missing, malformed, expired or forged (HTTP 401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling, as the token says."""

    user_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def load_secret(state_dir: Path, configured: str | None = None) -> str:
    """The signing secret: ``configured`` or one generated once into ``state_dir/jwt-secret``.

    The file is created with O_EXCL and 0600, so concurrent first starts agree on one secret
    and every local server (and `flashsale token`) signs with the same key.
    """
    if configured:
        return configured
    path = state_dir / SECRET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process is writing it right now
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty; delete it to generate a new secret") from None
    with os.fdopen(fd, "w") as out:
        secret = secrets.token_urlsafe(48)
        out.write(secret + "\n")
    return secret


def token(user: str, role: str, ttl: float, secret: str, now: float | None = None) -> str:
    """A signed token for ``user`` with ``role``, valid for ``ttl`` seconds."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not user:
        raise ValueError("user must not be empty")
    iat = int(time.time() if now is None else now)
    claims = {"sub": user, "role": role, "iat": iat, "exp": iat + int(ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(authorization: str | None, secret: str) -> Principal:
    """The caller of an ``Authorization: Bearer <jwt>`` header, or Unauthenticated."""
    return _verified(authorization, secret)[0]


def _verified(authorization: str | None, secret: str) -> tuple[Principal, int]:
    """The caller and the token's ``exp``."""
    if not authorization:
        raise Unauthenticated("missing bearer token")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    try:
        claims = jwt.decode(
            raw.strip(),
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.PyJWTError:
        raise Unauthenticated("invalid token") from None
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub or role not in ROLES:
        raise Unauthenticated("token has no valid sub/role")
    return Principal(sub, str(role)), int(claims["exp"])


class TokenVerifier:
    """``verify`` with a cache of verified headers (~0.1 µs a hit instead of ~30 µs).

    A hit still honours ``exp``; failures are never cached (each costs a full check). The
    cache is bounded: past ``capacity`` entries it starts again empty. Entries are plain
    tuples of strings and numbers, which the cyclic GC does not track (see ``intake``).
    """

    def __init__(
        self, secret: str, capacity: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.secret = secret
        self.capacity = capacity
        self._clock = clock
        self._cache: dict[str, tuple[str, str, int]] = {}  # header -> (user, role, exp)

    def verify(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header, or Unauthenticated."""
        hit = self._cache.get(authorization) if authorization else None
        if hit is not None:
            if self._clock() < hit[2]:
                return Principal(hit[0], hit[1])
            del self._cache[authorization]  # type: ignore[arg-type]
        principal, exp = _verified(authorization, self.secret)
        if len(self._cache) >= self.capacity:
            self._cache.clear()
        self._cache[authorization] = (principal.user_id, principal.role, exp)  # type: ignore[index]
        return principal


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale token --user ID [--role admin] [--ttl 3600]`."""
    p = sub.add_parser("token", help="print a bearer token for the HTTP edge")
    p.add_argument("--user", required=True, help="user id (the token's sub)")
    p.add_argument("--role", choices=ROLES, default="shopper")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid")
    p.set_defaults(run=run_token)


def run_token(args: argparse.Namespace, settings: Settings) -> int:
    """Print one token signed with the edge's secret."""
    from producers.http.config import EdgeSettings

    secret = load_secret(settings.state_dir, EdgeSettings.from_env().jwt_secret)
    print(token(args.user, args.role, args.ttl, secret))
    return 0
