"""`flashsale projector`: run the PostgreSQL projector until stopped."""

from __future__ import annotations

import argparse
import dataclasses
import os

from flashsale.settings import Settings, env_int

# Tests only: when set to an offset, the projector records a crash there and exits 70 at start.
FAULT_EXIT_AT_START = "FLASHSALE_FAULT_EXIT_AT_START"


def live_name(settings: Settings) -> str:
    """The tracking name of the namespace's running outcomes projection."""
    ns = settings.namespace
    return "postgres-projector" if ns == "flashsale" else f"{ns}-postgres"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `projector` command to the CLI."""
    p = sub.add_parser("projector", help="project decisions into PostgreSQL until stopped")
    p.add_argument("--batch-size", type=int, default=2000)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the projector against the stack's servers, named after the namespace."""
    if os.environ.get(FAULT_EXIT_AT_START):  # test hook: a projector stuck on one record
        from infra.supervisor import record_crash

        offset = env_int(os.environ, FAULT_EXIT_AT_START, 0, 0)
        record_crash(settings, "projector", partition=0, offset=offset, reason="injected fault")
        return 70
    from infra.stack import Stack
    from projections.postgres import main

    ep = Stack(settings).endpoints()
    resolved = dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap, database_url=ep.dsn)
    main(
        resolved,
        name=live_name(settings),
        group_id=f"{settings.namespace}-projector",
        batch_size=args.batch_size,
    )
    return 0
