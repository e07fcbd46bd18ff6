"""`flashsale sale open|close|settle|pause|resume|add-units|cancel` and `flashsale intent post`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

from flashsale.settings import Settings
from producers.commands import CommandProducer, SkuAllocation
from producers.sales import Opening


def _sku_spec(text: str) -> SkuAllocation:
    parts = text.split(":")
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(
            f"--sku {text!r} must be SKU:ALLOCATION:PER_USER_LIMIT:PER_ORDER_MAX"
        )
    try:
        allocation, limit, order_max = (int(p) for p in parts[1:])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sku {text!r}: the three numbers must be integers"
        ) from None
    if allocation < 0 or limit < 1 or order_max < 1:
        raise argparse.ArgumentTypeError(f"--sku {text!r}: allocation must be >= 0, limits >= 1")
    return SkuAllocation(parts[0], allocation, limit, order_max)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `sale` and `intent` command groups."""
    sale = sub.add_parser("sale", help="open or close a flash sale")
    cmds = sale.add_subparsers(dest="sale_cmd", required=True)
    op = cmds.add_parser("open", help="open a sale for one or more SKUs")
    op.add_argument("--sale", required=True, help="sale id")
    op.add_argument("--sku", required=True, action="append", type=_sku_spec,
                    metavar="SKU:ALLOCATION:PER_USER_LIMIT:PER_ORDER_MAX")  # fmt: skip
    op.add_argument("--starts-in", type=float, default=0.0, help="seconds from now")
    op.add_argument("--duration", type=_positive, default=3600, help="seconds")
    op.add_argument("--prequeue", type=_positive, metavar="SECONDS",
                    help="a pre-queue opening this long before the start, drawn at it")  # fmt: skip
    op.add_argument("--hold", type=_positive, metavar="SECONDS",
                    help="hold each accepted order this long for its owner to pay")  # fmt: skip
    op.add_argument("--pay-grace", type=float, default=0.0, metavar="SECONDS",
                    help="with --hold: a payment begun in time may end this late")  # fmt: skip
    op.add_argument("--waitlist", type=int, default=0, metavar="DEPTH",
                    help="with --hold: this many intents may wait for a unit")  # fmt: skip
    cl = cmds.add_parser("close", help="close a sale's SKUs now")
    cl.add_argument("--sale", required=True)
    cl.add_argument("--sku", required=True, action="append")
    st = cmds.add_parser("settle", help="settle a closed sale: its writer forgets per-intent state")
    st.add_argument("--sale", required=True)
    st.add_argument("--sku", required=True, action="append")
    for name, helped in (
        ("pause", "pause a sale: intents arriving meanwhile wait, none lost"),
        ("resume", "resume a paused sale: what waited is decided in order"),
        ("cancel", "cancel a sale: holds released, paid orders refunded"),
    ):
        c = cmds.add_parser(name, help=helped)
        c.add_argument("--sale", required=True)
        c.add_argument("--sku", required=True, action="append")
        if name == "cancel":
            c.add_argument("--reason", default="cancelled by admin")
    add = cmds.add_parser("add-units", help="add units to a SKU's allocation")
    add.add_argument("--sale", required=True)
    add.add_argument("--sku", required=True, action="append")
    add.add_argument("--quantity", required=True, type=_positive)
    add.add_argument("--ref", help="idempotency reference (the same ref again adds nothing)")
    sale.set_defaults(run=run_sale)

    intent = sub.add_parser("intent", help="post purchase intents")
    icmds = intent.add_subparsers(dest="intent_cmd", required=True)
    post = icmds.add_parser("post", help="post one intent; prints its id once Kafka acked it")
    post.add_argument("--sale", required=True)
    post.add_argument("--sku", required=True)
    post.add_argument("--user", required=True)
    post.add_argument("--quantity", type=int, default=1)
    post.add_argument("--key", help="idempotency key (a retry with the same key is one intent)")
    intent.set_defaults(run=run_intent)


_OPERATOR = {"pause": "PauseSale", "resume": "ResumeSale", "add-units": "AddUnits",
             "cancel": "CancelSale"}  # fmt: skip


def _producer(settings: Settings, name: str) -> CommandProducer:
    from flashsale.topics import TopicNames
    from infra.stack import Stack

    return CommandProducer(
        Stack(settings).endpoints().bootstrap,
        producer_name=name,
        topic=TopicNames.of(settings).sku_commands,
    )


def run_sale(args: argparse.Namespace, settings: Settings) -> int:
    """Open or close a sale."""
    producer = _producer(settings, "flashsale-cli")
    if args.sale_cmd == "open":
        if args.waitlist and args.hold is None:
            print(
                "error: --waitlist needs --hold (only a held unit can come back)", file=sys.stderr
            )
            return 2
        starts = int((time.time() + args.starts_in) * 1000)
        prequeue = None if args.prequeue is None else starts - int(args.prequeue * 1000)
        ends = starts + int(args.duration * 1000)
        holds = None if args.hold is None else (int(args.hold * 1000),
                                                int(args.pay_grace * 1000),
                                                args.waitlist)  # fmt: skip
        opening = asyncio.run(open_sale(settings, producer, args.sale, args.sku, starts, ends,
                                        prequeue, holds))  # fmt: skip
        if opening is None:
            return 1
        print(f"opened sale {args.sale} for {', '.join(sorted(opening.opened))}")
        return 0
    elif args.sale_cmd == "close":
        producer.close_sale(args.sale, args.sku)
        print(f"closed sale {args.sale} for {', '.join(args.sku)}")
    elif args.sale_cmd in _OPERATOR:
        name = _OPERATOR[args.sale_cmd]
        fields: dict[str, object] = {}
        if name == "CancelSale":
            fields["reason"] = args.reason
        elif name == "AddUnits":
            fields = {"quantity": args.quantity, "ref": args.ref or f"add-{uuid.uuid4().hex}"}
        producer.sale_command(name, args.sale, args.sku, **fields)
        ref = f" (ref {fields['ref']})" if "ref" in fields else ""
        print(f"{name} written for sale {args.sale}, {', '.join(args.sku)}{ref}: its writer "
              "decides it (flashsale audit sale shows the facts)")  # fmt: skip
    else:
        producer.settle_sale(args.sale, args.sku)
        print(f"settled sale {args.sale} for {', '.join(args.sku)}")
    return 0


async def open_sale(
    settings: Settings,
    producer: CommandProducer,
    sale_id: str,
    skus: list[SkuAllocation],
    starts_ms: int,
    ends_ms: int,
    prequeue_ms: int | None = None,
    holds: tuple[int, int, int] | None = None,
) -> Opening | None:
    """The admin API's service: claim, write, wait for every SKU's fact (reported)."""
    from psycopg_pool import AsyncConnectionPool

    from flashsale.topics import TopicNames
    from infra.stack import Stack
    from producers.clock import DrawSeeds
    from producers.http.livefeed import DecisionFeed
    from producers.http.rules import Refused
    from producers.sales import PostgresClaims, SaleService, progress_every_from_env
    from schemas.codec import SchemaRegistry

    endpoints = Stack(settings).endpoints()
    names = TopicNames.of(settings)
    feed = DecisionFeed(endpoints.bootstrap, names.decisions, SchemaRegistry.load_default(), 1)
    await feed.start()
    try:
        async with AsyncConnectionPool(endpoints.dsn, min_size=1, max_size=1) as pool:
            service = SaleService(PostgresClaims(pool), producer, feed,
                                  seeds=DrawSeeds(endpoints.dsn, settings.namespace),
                                  progress_every=progress_every_from_env(os.environ))  # fmt: skip
            opening = await service.open_sale(sale_id, skus, starts_ms, ends_ms, "cli",
                                              prequeue_opens_at_ms=prequeue_ms,
                                              holds=holds)  # fmt: skip
    except Refused as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return None
    finally:
        await feed.stop()
    if not opening.complete:
        for d in opening.details():
            print(f"error: {d['sku']}: {d['outcome']} {d.get('reason', '')}", file=sys.stderr)
        return None
    return opening


def run_intent(args: argparse.Namespace, settings: Settings) -> int:
    """Post one intent, under the user's pseudonym (``flashsale.pseudonyms``), as the edge
    writes it."""
    from flashsale.pseudonyms import KeyStore
    from infra.stack import Stack

    alias = KeyStore(Stack(settings).endpoints().dsn, settings.namespace).pseudonyms([args.user])
    producer = _producer(settings, "flashsale-cli")
    print(producer.post_intent(args.sale, args.sku, alias[args.user], args.quantity, args.key))
    return 0
