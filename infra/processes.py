"""Detached server processes tracked by pid files in the state directory."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from infra.errors import MissingBinary, PortInUse


def find_binary(name: str, env_var: str, install_hint: str, search: Sequence[Path] = ()) -> str:
    """Locate a program (override with ``env_var``) or raise naming the install command."""
    override = os.environ.get(env_var)
    if override:
        if os.access(override, os.X_OK):
            return override
        raise MissingBinary(f"{env_var}={override} is not an executable file")
    for directory in search:
        candidate = directory / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise MissingBinary(f"'{name}' was not found on PATH; install it with: {install_hint}")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def require_free_port(port: int, what: str, env_var: str, grace: float = 5.0) -> None:
    """Raise PortInUse naming the port, the server and the setting that moves it.

    A port held by a process that was just killed is released within moments, so wait
    ``grace`` seconds before calling it taken.
    """
    if not wait_until(lambda: port_is_free(port), grace, 0.2):
        raise PortInUse(
            f"port {port} (for {what}) is already in use by another process; stop that "
            f"process or choose another port with {env_var}=<port>"
        )


def read_pid(pidfile: Path) -> int | None:
    """The pid recorded in pidfile if that process is still alive, else None."""
    try:
        pid = int(pidfile.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:  # a zombie or a recycled pid is not our server
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
    except (FileNotFoundError, IndexError):
        return None
    return pid


# Who a process is (its Kafka login, the intent key): never inherited, only given.
IDENTITY_VARS = ("FLASHSALE_KAFKA_USER", "FLASHSALE_KAFKA_PASSWORD_FILE",
                 "FLASHSALE_INTENT_KEY_FILE")  # fmt: skip


def base_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (this process's environment by default) without the identity variables: a
    child gets its own login added, never its parent's (an operator's ``admin``)."""
    source = os.environ if env is None else env
    return {k: v for k, v in source.items() if k not in IDENTITY_VARS}


def spawn(argv: list[str], logfile: Path, pidfile: Path, env: dict[str, str] | None = None) -> int:
    """Start argv in its own session, output to logfile, pid to pidfile."""
    proc = _popen(argv, logfile, env)
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


def _popen(
    argv: list[str],
    logfile: Path,
    env: dict[str, str] | None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
            env=base_env() if env is None else env,
        )


def spawn_child(argv: list[str], logfile: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start argv as a child that dies with this process: own session, output to logfile.

    The child gets SIGTERM when its parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG),
    so a killed supervisor leaves no orphans. The signal follows the *thread* that forked,
    so call this from the thread that lives as long as the process (the main thread).
    """
    parent = os.getpid()
    prctl = _prctl()

    def die_with_parent() -> None:  # runs in the child between fork and exec
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
            os._exit(1)

    return _popen(argv, logfile, env, die_with_parent)


_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up before fork; None where there is none (not Linux)."""
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll check() until it is true or timeout seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def signal_group(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to pid's process group (to pid alone where the group is not ours);
    False when the group is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, sig)
    return True


def terminate(pid: int, grace: float = 30.0) -> None:
    """SIGTERM the process group, wait for exit, SIGKILL after grace seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not signal_group(pid, sig):
            return
        if wait_until(lambda: not alive(pid), wait, 0.1):
            _reap(pid)
            return


def stop_tracked(pid: int | None, pidfile: Path, grace: float) -> bool:
    """Terminate a pid-file-tracked process (if running) and drop its pid file.

    True if it was running.
    """
    if pid is not None:
        terminate(pid, grace=grace)
    pidfile.unlink(missing_ok=True)
    return pid is not None


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def log_tail(logfile: Path, lines: int = 25) -> str:
    """Last lines of a server log, for error messages."""
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


def cpu_ticks(pid: int, reaped: bool = False) -> int | None:
    """User + system CPU of a process so far in clock ticks, None when it is gone (also while
    its /proc entry is read: ESRCH); with ``reaped``, plus those of its children it has
    waited for (a server's exited workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def cpu_seconds(pid: int | None, reaped: bool = False) -> float:
    """``cpu_ticks`` in seconds, 0 when the process is gone (or ``pid`` is None)."""
    ticks = None if pid is None else cpu_ticks(pid, reaped)
    return (ticks or 0) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free port below Linux's ephemeral range, so client sockets never take it later."""
    import random

    while True:
        port = random.randrange(20_000, 32_000)
        if port_is_free(port):
            return port


def children(pid: int) -> list[int]:
    """The direct children of a process (none when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def pss_mb(pids: Sequence[int]) -> float:
    """Proportional set size of processes together, MiB: each shared page counted once,
    split among its sharers (a server's forked workers do not count its shared memory N
    times, as summed RSS would)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:  # gone meanwhile
            continue
    return round(total_kb / 1024, 1)


class PeakMemory:
    """The peak of ``pss_mb(pids())`` sampled every ``interval`` s on a thread, between
    ``with`` entry and exit (``pids`` is asked each time: workers come and go)."""

    def __init__(self, pids: Callable[[], Sequence[int]], interval: float = 0.25) -> None:
        import threading

        self._pids, self._interval = pids, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_mb = 0.0

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, pss_mb(self._pids()))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, pss_mb(self._pids()))
