"""`flashsale processor`: run one inventory worker."""

from __future__ import annotations

import argparse
import os

from flashsale.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `processor` command to the CLI."""
    p = sub.add_parser("processor", help="run one inventory worker (Faust) until stopped")
    p.add_argument(
        "--loglevel",
        default=os.environ.get("FLASHSALE_FAUST_LOGLEVEL", "warn"),
        choices=["crit", "error", "warn", "info", "debug"],
        help="Faust's own log level (FLASHSALE_FAUST_LOGLEVEL)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Start the worker with the stack's Kafka."""
    from infra.stack import Stack
    from processors.app import main

    main(settings, Stack(settings).endpoints().bootstrap, args.loglevel)
    return 0
