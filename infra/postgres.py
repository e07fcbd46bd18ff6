"""A real PostgreSQL cluster from the system's server binaries, in the project's state dir."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from infra import processes
from infra.errors import CorruptState, InfraError, MissingBinary
from infra.processes import find_binary

INSTALL_HINT = "apt-get install -y postgresql-15"
DB_NAME = "flashsale"
DB_USER = "flashsale"
DB_PASSWORD = "flashsale"  # loopback-only development cluster; see README


def _bindir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (FileNotFoundError, subprocess.CalledProcessError):
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
        return candidates[0] if candidates else None


def pg_binary(name: str) -> str:
    """Locate a PostgreSQL server program (``FLASHSALE_PG_BINDIR`` overrides the search)."""
    override = os.environ.get("FLASHSALE_PG_BINDIR")
    if override:
        candidate = Path(override) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
        raise MissingBinary(
            f"PostgreSQL's '{name}' is not in FLASHSALE_PG_BINDIR={override}; "
            f"install the server with: {INSTALL_HINT}"
        )
    bindir = _bindir()
    return find_binary(
        name, "FLASHSALE_PG_" + name.upper(), INSTALL_HINT, [bindir] if bindir else []
    )


def _searchable_by_others(path: Path) -> bool:
    """True when every existing ancestor of path lets other users pass through it."""
    return all(
        os.stat(parent).st_mode & 0o001 for parent in path.resolve().parents if parent.exists()
    )


@dataclass(frozen=True)
class LocalPostgres:
    """Cluster files live under ``state_dir/postgres``."""

    state_dir: Path
    port: int

    @property
    def home(self) -> Path:
        """``state_dir/postgres``, or a stand-in under /var/tmp the postgres user can reach.

        As root the server runs as the ``postgres`` user, which must be able to walk down to
        its data directory. A checkout under a private directory (``mktemp -d`` makes 0700
        ones, and /root is 0700) does not allow that, so the cluster then lives in
        ``/var/tmp/flashsale-postgres-<hash of the state dir>`` instead: one per checkout,
        kept across reboots, removed by ``make clean``.
        """
        preferred = self.state_dir / "postgres"
        if os.geteuid() != 0 or _searchable_by_others(preferred):
            return preferred
        digest = hashlib.sha256(str(self.state_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"flashsale-postgres-{digest}"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def sockets(self) -> Path:
        return self.home / "run"

    @property
    def logfile(self) -> Path:
        return self.home / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{DB_NAME}"

    # The Debian binaries refuse to run as root: run them as the `postgres` user then.
    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise MissingBinary(
                f"running as root needs the 'postgres' system user; install with: {INSTALL_HINT}"
            ) from None
        return ["runuser", "-u", "postgres", "--", *argv]

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self._as_owner(argv), capture_output=True, text=True)
        if result.returncode != 0:
            raise InfraError(f"{what} failed:\n{result.stdout}{result.stderr}")
        return result

    def _psql(self, sql: str) -> str:
        argv = [pg_binary("psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", str(self.sockets), "-p", str(self.port), "-U", "postgres", "-d", "postgres"]
        return self._run([*argv, "-c", sql], "psql").stdout.strip()

    def initialised(self) -> bool:
        """True when the cluster exists; raise CorruptState when it is half-there."""
        if not self.data.exists() or not any(self.data.iterdir()):
            return False
        version = self.data / "PG_VERSION"
        if not version.exists() or not (self.data / "global").is_dir():
            raise CorruptState(
                f"PostgreSQL state in {self.data} is corrupted (PG_VERSION or global/ missing); "
                "wipe it with `make clean` (or `flashsale infra down --wipe`) and run `make up`"
            )
        return True

    def _initdb(self) -> None:
        initdb = pg_binary("initdb")
        for d in (self.home, self.data, self.sockets):
            d.mkdir(parents=True, exist_ok=True)
            self._chown(d)
        os.chmod(self.data, 0o700)
        self._run(
            [initdb, "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--locale=C.UTF-8",
             "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions"],
            "initdb",
        )  # fmt: skip
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                "max_connections = 200\n"
                "shared_buffers = '256MB'\n"
                "wal_level = 'replica'\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
            )

    def pid(self) -> int | None:
        """The postmaster's pid when our cluster runs."""
        return processes.read_pid(self.data / "postmaster.pid")

    def answers(self) -> bool:
        """True when the server accepts connections."""
        argv = [pg_binary("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        return subprocess.run(argv, capture_output=True).returncode == 0

    def start(self) -> bool:
        """Start the cluster unless it runs; create the project's role and database."""
        if self.pid() is not None and self.answers():
            return False
        pg_ctl = pg_binary("pg_ctl")
        if self.pid() is None:
            processes.require_free_port(self.port, "PostgreSQL", "FLASHSALE_PG_PORT")
        if not self.initialised():
            self._initdb()
        self._await_dead_postmaster()
        self.sockets.mkdir(parents=True, exist_ok=True)
        self._chown(self.sockets)
        self.logfile.touch()
        self._chown(self.logfile)
        opts = f"-p {self.port} -k {self.sockets}"
        argv = [pg_ctl, "-D", str(self.data), "-l", str(self.logfile), "-o", opts, "-w", "-t", "60"]
        result = subprocess.run(self._as_owner([*argv, "start"]), capture_output=True, text=True)
        if result.returncode != 0:
            raise InfraError(
                f"PostgreSQL did not start:\n{result.stdout}{result.stderr}\n"
                + processes.log_tail(self.logfile)
            )
        self._ensure_database()
        return True

    def _await_dead_postmaster(self) -> None:
        """After an unclean kill, wait until the old postmaster is fully gone (reaped).

        PostgreSQL refuses to start while the pid in postmaster.pid still exists, and a
        killed postmaster lingers as a zombie until its parent reaps it.
        """
        try:
            old = int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError, PermissionError):
            return

        def gone() -> bool:
            try:
                os.kill(old, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False

        processes.wait_until(gone, 15.0, 0.1)

    def _ensure_database(self) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{DB_USER}'")
        if not exists:
            self._psql(f"CREATE ROLE {DB_USER} LOGIN PASSWORD '{DB_PASSWORD}'")
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"):
            self._psql(f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}")

    def stop(self) -> bool:
        """Stop the cluster (fast shutdown). True if one was running."""
        if self.pid() is None:
            return False
        argv = [pg_binary("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"]
        result = subprocess.run(self._as_owner(argv), capture_output=True, text=True)
        if result.returncode != 0 and self.pid() is not None:
            processes.terminate(self.pid() or 0, grace=30.0)
        return True
