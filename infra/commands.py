"""`flashsale infra ...`: up, down, status, topics, migrate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from flashsale.settings import Settings
from flashsale.topics import catalogue
from infra import migrate, provision
from infra.edge import Edge
from infra.services import SupervisorProcess, all_services, extra_workers
from infra.stack import Stack


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `infra` command group to the CLI."""
    infra = sub.add_parser("infra", help="start, stop and inspect Kafka and PostgreSQL")
    cmds = infra.add_subparsers(dest="infra_cmd", required=True)
    up = cmds.add_parser("up", help="start the servers (no-op when running), create topics, tables")
    up.add_argument(
        "--services",
        action="store_true",
        help="also start the HTTP edge and `flashsale supervise` (processor and projector)",
    )
    down = cmds.add_parser("down", help="stop the servers this project started")
    down.add_argument("--wipe", action="store_true", help="also delete their data")
    status = cmds.add_parser("status", help="where the servers are and whether they answer")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    cmds.add_parser("topics", help="create missing topics; report drift from the catalogue")
    cmds.add_parser("migrate", help="apply pending database migrations")
    infra.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Execute one infra command; returns the exit code."""
    stack = Stack(settings)
    cmd = args.infra_cmd
    if cmd == "up":
        t0 = time.monotonic()
        started = stack.up()
        if args.services:
            supervisor = SupervisorProcess(settings)
            word = "started" if supervisor.start() else "running"
            print(f"{'supervise':9} {word:8} pid {supervisor.pid()} log {supervisor.logfile}")
            for service in all_services(settings):
                pid = service.pid()  # None: exited at once, the supervisor retries (see status)
                word = "running" if pid else "down"
                print(f"{service.name:9} {word:8} pid {pid or '-'} log {service.logfile}")
            edge = Edge(settings)
            started_edge = edge.up()
            word = "started" if any(started_edge.values()) else "running"
            print(f"{'http':9} {word:8} {edge.url} ({len(edge.servers)} app servers behind nginx)")
        st = stack.status()
        for name in ("kafka", "postgres"):
            where = st[name]["bootstrap_servers"] if name == "kafka" else st[name]["dsn"]
            word = "started" if started[name] else "running"
            print(f"{name:9} {word:8} {where}")
        print(f"ready in {time.monotonic() - t0:.1f}s (mode: {settings.infra_mode})")
        return 0
    if cmd == "down":
        for name, was in Edge(settings).down().items():
            print(f"{name:9} {'stopped' if was else 'not running'}")
        # The supervisor first, or it would restart what is stopped; it stops its children.
        was = SupervisorProcess(settings).stop()
        print(f"{'supervise':9} {'stopped' if was else 'not running'}")
        for service in reversed(all_services(settings)):  # leftovers started without it
            print(f"{service.name:9} {'stopped' if service.stop() else 'not running'}")
        for worker in extra_workers(settings):  # added by hand or by the autoscaler
            word = "stopped" if worker.stop() else "not running"
            print(f"{'w' + str(worker.worker_id):9} {word}")
        stopped = stack.down(wipe=args.wipe)
        for name, was in stopped.items():
            print(f"{name:9} {'stopped' if was else 'not running'}")
        return 0
    if cmd == "status":
        st = stack.status()
        if args.json:
            json.dump(st, sys.stdout)
            print()
        else:
            for name in ("kafka", "postgres"):
                where = st[name].get("bootstrap_servers") or st[name].get("dsn")
                print(f"{name:9} {'up' if st[name]['up'] else 'down':5} {where}")
            _print_services(st)
        return 0 if st["kafka"]["up"] and st["postgres"]["up"] else 1
    if cmd == "topics":
        created, drift = provision.ensure_topics(stack.endpoints().bootstrap, catalogue(settings))
        for name in created:
            print(f"created  {name}")
        for problem in drift:
            print(f"DRIFT    {problem}", file=sys.stderr)
        if not created and not drift:
            print("all topics match the catalogue")
        return 1 if drift else 0
    if cmd == "migrate":
        applied = migrate.apply(stack.endpoints().dsn)
        print(f"applied {applied}" if applied else "schema is up to date")
        return 0
    raise AssertionError(cmd)


def _print_services(st: dict[str, Any]) -> None:
    sup = st["supervisor"]
    print(f"{'supervise':9} {'up' if sup['up'] else 'down':5} pid {sup['pid'] or '-'}")
    for name, svc in st["services"].items():
        restarts = "" if svc["restarts"] is None else f" restarts {svc['restarts']}"
        state = f" ({svc['state']})" if svc["state"] else ""
        print(
            f"{name:9} {'up' if svc['up'] else 'down':5} pid {svc['pid'] or '-'}{restarts}{state}"
        )
        alert = svc["alert"]
        if alert:
            print(
                f"ALERT     {name} crash loop: {alert.get('count')} crashes in a row at partition "
                f"{alert.get('partition')} offset {alert.get('offset')}: {alert.get('reason')}"
            )
