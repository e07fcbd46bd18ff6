"""`flashsale projector`: run the PostgreSQL projector until stopped."""

from __future__ import annotations

import argparse
import dataclasses

from flashsale.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `projector` command to the CLI."""
    p = sub.add_parser("projector", help="project decisions into PostgreSQL until stopped")
    p.add_argument("--batch-size", type=int, default=500)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the projector against the stack's servers, named after the namespace."""
    from infra.stack import Stack
    from projections.postgres import main

    ep = Stack(settings).endpoints()
    resolved = dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap, database_url=ep.dsn)
    ns = settings.namespace
    main(
        resolved,
        name="postgres-projector" if ns == "flashsale" else f"{ns}-postgres",
        group_id=f"{ns}-projector",
        batch_size=args.batch_size,
    )
    return 0
