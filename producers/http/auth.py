"""Bearer tokens: HS256 JWTs with ``sub`` (user id), ``role``, ``iat`` and ``exp``, and the
key id (``kid``) of the key that signed them.

Keys live in a keyring directory (``<state_dir>/jwt-keys``, or ``FLASHSALE_JWT_KEYS_DIR``):
one 0600 file per key id and ``current`` naming the key that signs. ``flashsale token rotate``
adds a key and makes it current; tokens signed with the previous key stay valid until
``flashsale token retire --kid K`` removes it. App servers notice a change of the keyring
within a second, without a restart: rotation needs no downtime. (``FLASHSALE_JWT_SECRET``
instead gives one fixed key, id ``env``, as the tests use.)"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog

from flashsale.settings import Settings

log = structlog.get_logger(__name__)

ROLES = ("shopper", "admin")
ALGORITHM = "HS256"
SECRET_FILE = "jwt-secret"  # before key ids: imported into the keyring as its first key
KEYS_DIR = "jwt-keys"
RELOAD_EVERY_S = 1.0


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


@dataclass(frozen=True)
class SigningKey:
    kid: str
    secret: str


@dataclass(frozen=True)
class Keyring:
    """Every key a token may be signed with (by id) and the one that signs now."""

    keys: dict[str, str]
    current: str

    @property
    def signing(self) -> SigningKey:
        return SigningKey(self.current, self.keys[self.current])


def keys_dir(state_dir: Path, configured: Path | None = None) -> Path:
    return configured or state_dir / KEYS_DIR


def load_keyring(state_dir: Path, configured: str | None = None,
                 directory: Path | None = None) -> Keyring:  # fmt: skip
    """The keyring (made on first use, with the pre-key-id secret as its first key)."""
    if configured:
        return Keyring({"env": configured}, "env")
    d = keys_dir(state_dir, directory)
    if not (d / "current").exists():
        legacy = state_dir / SECRET_FILE
        first = legacy.read_text().strip() if legacy.exists() else None
        _create(d / "k1.key", first)
        _create(d / "current", "k1")
    return _read_ring(d)


def _read_ring(d: Path) -> Keyring:
    keys = {}
    for f in d.glob("*.key"):
        try:
            keys[f.stem] = _read_key(f)
        except FileNotFoundError:  # retired between the listing and the read
            continue
    current = _read_key(d / "current")
    if current not in keys:
        raise RuntimeError(f"{d}/current names {current!r}, which has no key file")
    return Keyring(keys, current)


def _read_key(path: Path) -> str:
    for _ in range(50):  # another process is writing it right now
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty; delete it to make a new one")


def _write(path: Path, text: str) -> None:
    """Write a 0600 file whole (a reader sees the old or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    tmp.rename(path)


def _create(path: Path, secret: str | None = None) -> None:
    """Create a secret's file once (O_EXCL: app servers starting together agree on one; a
    reader of a half-written file retries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write((secret or secrets.token_urlsafe(48)) + "\n")


def rotate(directory: Path) -> str:
    """Add a key and make it the signing one; the previous keys stay valid. Its id."""
    ring = _read_ring(directory)
    n = 1 + max((int(k[1:]) for k in ring.keys if k[1:].isdigit()), default=0)
    kid = f"k{n}"
    _create(directory / f"{kid}.key")
    _write(directory / "current", kid)
    return kid


def retire(directory: Path, kid: str) -> None:
    """Stop accepting tokens signed with ``kid`` (not the signing key)."""
    ring = _read_ring(directory)
    if kid == ring.current:
        raise ValueError(f"{kid} signs the tokens now: rotate first")
    if kid not in ring.keys:
        raise ValueError(f"no key {kid!r} (the keys: {', '.join(sorted(ring.keys))})")
    (directory / f"{kid}.key").unlink()
    os.utime(directory)  # the servers' reload check looks at the directory's mtime


def receipt_secret(state_dir: Path, configured: str | None = None) -> str:
    """The app servers' key for intent receipts: not rotated with the token keys (a receipt
    outlives a rotation); before key ids it was the token secret, so it starts as that."""
    if configured:
        return configured
    d = keys_dir(state_dir, _env_dir())
    legacy = state_dir / SECRET_FILE
    path = d / "receipts.secret"
    _create(path, legacy.read_text().strip() if legacy.exists() else None)
    return _read_key(path)


def load_secret(state_dir: Path, configured: str | None = None) -> SigningKey:
    """The key that signs tokens now (``token`` puts its id in them)."""
    return load_keyring(state_dir, configured, _env_dir()).signing


def _env_dir() -> Path | None:
    raw = os.environ.get("FLASHSALE_JWT_KEYS_DIR")
    return Path(raw) if raw else None


def token(
    user: str, role: str, ttl: float, secret: str | SigningKey, now: float | None = None
) -> str:
    """A signed token for ``user`` with ``role``, valid for ``ttl`` seconds (with the key's
    id when given a ``SigningKey``)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not user:
        raise ValueError("user must not be empty")
    iat = int(time.time() if now is None else now)
    claims = {"sub": user, "role": role, "iat": iat, "exp": iat + int(ttl)}
    if isinstance(secret, SigningKey):
        return jwt.encode(claims, secret.secret, algorithm=ALGORITHM, headers={"kid": secret.kid})
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(authorization: str | None, secret: str) -> Principal:
    """The caller of an ``Authorization: Bearer <jwt>`` header, or Unauthenticated."""
    return _verified(authorization, Keyring({"env": secret}, "env"))[0]


def _verified(authorization: str | None, ring: Keyring) -> tuple[Principal, int]:
    """The caller and the token's ``exp``. A token names its key (``kid``); one without (made
    before key ids) may be signed by the current key only."""
    if not authorization:
        raise Unauthenticated("missing bearer token")
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    try:
        kid = jwt.get_unverified_header(raw.strip()).get("kid")
    except jwt.PyJWTError:
        raise Unauthenticated("invalid token") from None
    if kid is None:  # made before key ids (the first key's), or by a tool with the current
        secrets_ = [ring.keys[k] for k in dict.fromkeys((ring.current, "k1")) if k in ring.keys]
    else:
        secrets_ = [ring.keys[kid]] if kid in ring.keys else []
    if not secrets_:
        raise Unauthenticated("token signed with an unknown or retired key")
    claims = _decode(raw.strip(), secrets_)
    sub, role = claims.get("sub"), claims.get("role")
    if not isinstance(sub, str) or not sub or "\x00" in sub or role not in ROLES:
        raise Unauthenticated("token has no valid sub/role")
    return Principal(sub, str(role)), int(claims["exp"])


def _decode(raw: str, candidates: list[str]) -> dict[str, Any]:
    """The claims of ``raw`` signed by one of ``candidates``, or Unauthenticated."""
    for secret in candidates[:-1]:
        try:
            return _decode(raw, [secret])
        except Unauthenticated:
            continue
    secret = candidates[-1]
    try:
        claims = jwt.decode(
            raw,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token expired") from None
    except jwt.PyJWTError:
        raise Unauthenticated("invalid token") from None
    return dict(claims)


class TokenVerifier:
    """``verify`` with a cache of verified headers (~0.1 µs a hit instead of ~30 µs).

    A hit still honours ``exp``; failures are never cached (each costs a full check). The
    cache is bounded: past ``capacity`` entries it starts again empty. Entries are plain
    tuples of strings and numbers, which the cyclic GC does not track (see ``intake``).
    """

    def __init__(
        self,
        keys: str | Callable[[], Keyring],
        capacity: int = 100_000,
        clock: Callable[[], float] = time.time,
        reload_every_s: float = RELOAD_EVERY_S,
    ) -> None:
        """``keys``: one fixed secret, or a loader of the keyring, called again (at most every
        ``reload_every_s``, on a cache miss) so a rotation or a retirement takes effect."""
        self._load = (lambda: Keyring({"env": keys}, "env")) if isinstance(keys, str) else keys
        self.ring = self._load()
        self._loaded_at = clock()
        self._reload_every_s = reload_every_s
        self.capacity = capacity
        self._clock = clock
        self._cache: dict[str, tuple[str, str, int]] = {}  # header -> (user, role, exp)

    def verify(self, authorization: str | None) -> Principal:
        """The caller of an ``Authorization`` header, or Unauthenticated."""
        now = self._clock()
        if now - self._loaded_at >= self._reload_every_s:
            self._loaded_at = now
            try:
                ring = self._load()
            except (OSError, RuntimeError) as exc:  # mid-rotation: keep the keys we have
                log.warning("keyring.reload_failed", error=str(exc))
                ring = self.ring
            if ring != self.ring:  # a key retired: tokens it signed must be checked again
                self.ring = ring
                self._cache.clear()
        hit = self._cache.get(authorization) if authorization else None
        if hit is not None:
            if now < hit[2]:
                return Principal(hit[0], hit[1])
            del self._cache[authorization]  # type: ignore[arg-type]
        principal, exp = _verified(authorization, self.ring)
        if len(self._cache) >= self.capacity:
            self._cache.clear()
        self._cache[authorization] = (principal.user_id, principal.role, exp)  # type: ignore[index]
        return principal


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale token --user ID [--role admin] [--ttl 3600]`, and `token rotate`,
    `token retire --kid K`, `token keys`."""
    p = sub.add_parser("token", help="print a bearer token for the HTTP edge; manage its keys")
    p.add_argument("action", nargs="?", choices=("issue", "rotate", "retire", "keys"),
                   default="issue", help="issue a token (default), rotate the signing key, "
                   "retire an old key, or list the keys")  # fmt: skip
    p.add_argument("--user", help="user id (the token's sub), to issue")
    p.add_argument("--role", choices=ROLES, default="shopper")
    p.add_argument("--ttl", type=int, default=3600, help="seconds the token is valid")
    p.add_argument("--kid", help="the key to retire")
    p.set_defaults(run=run_token)


def run_token(args: argparse.Namespace, settings: Settings) -> int:
    """Issue a token signed with the current key, or manage the keyring."""
    from producers.http.config import EdgeSettings

    configured = EdgeSettings.from_env().jwt_secret
    ring = load_keyring(settings.state_dir, configured, _env_dir())
    d = keys_dir(settings.state_dir, _env_dir())
    if args.action != "issue" and configured:
        raise SystemExit("FLASHSALE_JWT_SECRET gives one fixed key: there is no keyring to manage")
    if args.action == "rotate":
        print(f"signing with {rotate(d)} now; {ring.current} stays valid until retired")
    elif args.action == "retire":
        if not args.kid:
            raise SystemExit("token retire needs --kid")
        try:
            retire(d, args.kid)
        except ValueError as exc:
            raise SystemExit(f"flashsale: error: {exc}") from None
        print(f"{args.kid} retired: the app servers refuse its tokens within a second")
    elif args.action == "keys":
        for kid in sorted(ring.keys):
            print(kid + (" (signing)" if kid == ring.current else ""))
    else:
        if not args.user:
            raise SystemExit("token needs --user")
        print(token(args.user, args.role, args.ttl, ring.signing))
    return 0
