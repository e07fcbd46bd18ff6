"""The `flashsale` command: one entry point, a sub-command per component."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flashsale import kafka_auth, logs
from flashsale.settings import SettingError, Settings


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser with every command group registered."""
    from flashsale import bench, demo, pseudonyms, replay, report, sale_audit, soak, top, trace
    from infra import autoscale, supervise_command
    from infra import commands as infra_commands
    from processors import commands as processor_commands
    from producers import cli as producer_commands
    from producers import clock, load, payments
    from producers.http import auth as http_auth
    from producers.http import server as http_server
    from projections import analytics, fulfilment
    from projections import commands as projector_commands

    parser = argparse.ArgumentParser(prog="flashsale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    infra_commands.register(sub)
    supervise_command.register(sub)
    producer_commands.register(sub)
    processor_commands.register(sub)
    projector_commands.register(sub)
    demo.register(sub)
    http_auth.register(sub)
    pseudonyms.register(sub)
    http_server.register(sub)
    load.register(sub)
    clock.register(sub)
    payments.register(sub)
    fulfilment.register(sub)
    analytics.register(sub)
    bench.register(sub)
    sale_audit.register(sub)
    replay.register(sub)
    top.register(sub)
    report.register(sub)
    trace.register(sub)
    soak.register(sub)
    autoscale.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, read settings, run; infrastructure errors print one clear line and exit 2."""
    from infra.errors import InfraError

    args = build_parser().parse_args(argv)
    logs.configure(service=f"flashsale-{args.command}")
    try:
        settings = Settings.from_env()
        kafka_auth.log_in(settings, args.command)
        return int(args.run(args, settings))
    except (SettingError, InfraError) as exc:
        print(f"flashsale: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
