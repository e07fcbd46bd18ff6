"""`flashsale supervise`: run the services in the foreground and restart them when they exit."""

from __future__ import annotations

import argparse

import structlog

from flashsale.settings import Settings
from infra.restart_policy import SupervisorConfig
from infra.services import SERVICES
from infra.signals import stop_on_signals

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `supervise` command to the CLI."""
    p = sub.add_parser(
        "supervise",
        help="run the services, restart them when they exit; stop them on SIGTERM/SIGINT",
    )
    p.add_argument(
        "--services",
        nargs="+",
        choices=SERVICES,
        default=list(SERVICES),
        metavar="NAME",
        help=f"the services to run (default: all of {', '.join(SERVICES)})",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Composition root: read the settings, supervise until SIGTERM or SIGINT."""
    from infra.supervisor import Supervisor

    config = SupervisorConfig.from_env()
    names = list(dict.fromkeys(args.services))  # in the order given, each once
    stop = stop_on_signals(log, "supervisor.signal")
    return Supervisor(settings, names, config).run(stop)
