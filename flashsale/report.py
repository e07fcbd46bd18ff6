"""`flashsale report <sale>`: a post-sale report, one static HTML file with its charts inline.

Everything comes from the projections: the analytics projection's per-second series,
intents per person and latency buckets (all rebuilt alike by a replay of the log); the
outcomes projection's rows (who won; when each row was written, which a replay does not
reproduce: it is the live projection's own timing); the sale's terms. The
probe client's file (``flashsale.probe``), when the demo ran one, adds what only a client
sees: the POST until its ``202``, and the decision's event reaching a connected client.

Charts (matplotlib, SVG inline): arrivals vs decisions, decision latency p50/p99, success
rate and stock over time, intents per person, and where an intent's time went.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from flashsale.probe import ProbeResult
from flashsale.settings import Settings
from projections.analytics_series import read_series

_USERS_SQL = """
SELECT intents, count(*) FROM analytics_users WHERE sale_id = %s GROUP BY intents ORDER BY intents
"""
_WINNERS_SQL = """
SELECT count(DISTINCT user_id) FILTER (WHERE outcome = 'accepted'),
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
           (ORDER BY extract(epoch FROM projected_at - decided_at) * 1000)
FROM intent_outcomes WHERE sale_id = %s
"""


def reports_dir(settings: Settings) -> Path:
    """Where reports (and the demo's probe files) are written by default."""
    return settings.state_dir / "reports"


def probe_path(settings: Settings, sale_id: str) -> Path:
    """The probe client's measurements for ``sale_id``."""
    return reports_dir(settings) / f"{sale_id}.probe.json"


def gather(dsn: str, sale_id: str) -> dict[str, Any]:
    """Everything the report shows, from PostgreSQL."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = read_series(conn, sale_id)
        per_user = conn.execute(_USERS_SQL, (sale_id,)).fetchall()
        winners, projected = conn.execute(_WINNERS_SQL, (sale_id,)).fetchone() or (0, None)
    if found is None or not found["t"]:
        raise LookupError(f"no analytics for sale {sale_id!r} (is `flashsale analytics` running?)")
    return {"series": found, "per_user": per_user, "winners": winners,
            "log_to_row_ms": projected or [None, None]}  # fmt: skip


def planning(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The numbers an operator plans the next sale with."""
    s, totals = data["series"], data["series"]["totals"]
    allocation = sum(t["allocation"] or 0 for t in totals.values())
    received = sum(t["received"] for t in totals.values())
    accepted = sum(t["accepted"] for t in totals.values())
    users = sum(n for _, n in data["per_user"])
    first = next((i for i, v in enumerate(s["received"]) if v), 0)
    sold_out = {}
    for sku, values in s["remaining"].items():
        at = next((i for i, v in enumerate(values) if v == 0), None)
        sold_out[sku] = None if at is None else at - first
    busy = [v for v in s["decided"] if v]
    mean = statistics.fmean(busy) if busy else 0
    sustained = f"{mean:,.0f}/s (mean over {len(busy)} busy seconds)"
    out = [
        ("intents received", f"{received:,}"),
        ("people", f"{users:,} ({received / max(users, 1):.2f} intents each)"),
        ("units on sale", f"{allocation:,}"),
        ("demand", f"{received / max(allocation, 1):.1f} intents per unit"),
        ("accepted intents", f"{accepted:,} ({accepted / max(received, 1):.1%} of intents)"),
        ("people who won", f"{data['winners']:,} ({data['winners'] / max(users, 1):.1%})"),
        ("peak arrivals", f"{max(s['received'], default=0):,}/s"),
        ("peak decisions", f"{max(s['decided'], default=0):,}/s"),
        ("sustained decisions", sustained),
    ]
    for sku, seconds in sorted(sold_out.items()):
        out.append((f"sold out: {sku}", "not sold out" if seconds is None
                    else f"{seconds} s after the first intent"))  # fmt: skip
    return out


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def charts(data: dict[str, Any], probe: ProbeResult | None) -> dict[str, str]:
    """The report's charts as inline SVG, by title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["series"]
    t: Any = [datetime.fromtimestamp(x, UTC) for x in s["t"]]
    out = {}
    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(t, s["received"], label="received/s")
    ax.plot(t, s["decided"], label="decided/s")
    ax.set_ylabel("intents / s")
    ax.legend()
    out["Arrivals vs decisions"] = _svg(fig)

    fig, ax = plt.subplots(figsize=(9, 3.4))
    ax.plot(t, [v if v is not None else float("nan") for v in s["p50_ms"]], label="p50")
    ax.plot(t, [v if v is not None else float("nan") for v in s["p99_ms"]], label="p99")
    ax.set_ylabel("ms, log time to decision")
    ax.legend()
    out["Decision latency over time"] = _svg(fig)

    fig, (rate, stock) = plt.subplots(1, 2, figsize=(11, 3.4))
    share = [a / (a + r) if a + r else float("nan")
             for a, r in zip(s["accepted"], s["rejected"], strict=True)]  # fmt: skip
    rate.plot(t, share, color="tab:green")
    rate.set_ylim(0, 1.05)
    rate.set_ylabel("accepted share of decisions")
    for sku, values in s["remaining"].items():
        stock.plot(t, [v if v is not None else float("nan") for v in values], label=sku)
    stock.set_ylabel("units remaining")
    stock.legend(fontsize=7)
    fig.autofmt_xdate()
    out["Success rate and stock"] = _svg(fig)

    fig, ax = plt.subplots(figsize=(9, 3))
    ax.bar([str(k) for k, _ in data["per_user"]], [n for _, n in data["per_user"]])
    ax.set_xlabel("intents sent by one person")
    ax.set_ylabel("people")
    out["Intents per person"] = _svg(fig)

    stages = time_breakdown(data, probe)
    fig, ax = plt.subplots(figsize=(9, 3))
    names = [n for n, _, _ in stages]
    y = range(len(stages))
    ax.barh([i - 0.2 for i in y], [p50 or 0 for _, p50, _ in stages], 0.4, label="p50")
    ax.barh([i + 0.2 for i in y], [p99 or 0 for _, _, p99 in stages], 0.4, label="p99")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.legend()
    out["Where an intent's time went"] = _svg(fig)
    return out


def _quantiles(values: list[float]) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (None, None)
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[98]


def time_breakdown(
    data: dict[str, Any], probe: ProbeResult | None
) -> list[tuple[str, float | None, float | None]]:
    """(stage, p50 ms, p99 ms): the client's POST, then times from the intent's log time."""
    lat = _merged_latency(data)
    probe = probe or ProbeResult()
    row = data["log_to_row_ms"]
    return [
        ("POST to 202: edge + Kafka ack (probe)", *_quantiles(probe.ack_ms)),
        ("log time to decision (analytics)", lat["p50"], lat["p99"]),
        ("log time to projected row (orders)", row[0], row[1]),
        ("log time to client's SSE event (probe)", *_quantiles(probe.log_to_client_ms)),
    ]


def _merged_latency(data: dict[str, Any]) -> dict[str, float | None]:
    from projections.analytics_rows import percentile

    merged: list[int] = []
    for t in data["series"]["totals"].values():
        b = t["latency_buckets"]
        merged = [x + y for x, y in zip(merged, b, strict=True)] if merged else list(b)
    return {f"p{q}": percentile(merged, q / 100) for q in (50, 90, 99)} if merged else {}


def render(sale_id: str, data: dict[str, Any], probe: ProbeResult | None) -> str:
    """The report as one HTML document."""
    e = html.escape
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in planning(data))
    skus = "".join(
        f"<tr><td>{e(k)}</td><td>{t['allocation'] or 0:,}</td><td>{t['received']:,}</td>"
        f"<td>{t['accepted']:,}</td><td>{t['rejected']:,}</td>"
        f"<td>{e(', '.join(f'{r} {n:,}' for r, n in t['rejected_by_reason'].items()))}</td>"
        f"<td>{t['held']:,}</td><td>{t['paid']:,}</td><td>{t['expired']:,}</td>"
        f"<td>{_ms(t['latency_ms']['p50'])}</td><td>{_ms(t['latency_ms']['p99'])}</td></tr>"
        for k, t in data["series"]["totals"].items()
    )
    stages = "".join(f"<tr><th>{e(n)}</th><td>{_ms(a)}</td><td>{_ms(b)}</td></tr>"
                     for n, a, b in time_breakdown(data, probe))  # fmt: skip
    figures = "".join(f"<h2>{e(title)}</h2>{svg}" for title, svg in charts(data, probe).items())
    failures = (probe.failures if probe else []) or []
    note = (f"<p>{len(failures)} probe(s) failed: {e('; '.join(failures[:5]))}</p>"
            if failures else "")  # fmt: skip
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flashsale report: {e(sale_id)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:8px 0 16px}}th,td{{padding:3px 10px;border-bottom:1px
solid #eee;text-align:right}}th:first-child,td:first-child{{text-align:left}}svg{{max-width:100%;
height:auto}}</style></head><body>
<h1>Post-sale report: {e(sale_id)}</h1><p>made {made} from the projections of the log</p>
<h2>For the next sale</h2><table>{rows}</table>
<p>Intents received are those that reached the log; what the edge refused before writing
(sold out, limits, bad requests, 429s) is in the app servers' metrics.</p>
<h2>Per SKU</h2><table><tr><th>sku</th><th>units</th><th>received</th><th>accepted</th>
<th>rejected</th><th>why rejected</th><th>held</th><th>paid</th><th>expired</th>
<th>p50 ms</th><th>p99 ms</th></tr>{skus}</table>
<h2>Time, stage by stage</h2><table><tr><th>stage</th><th>p50 ms</th><th>p99 ms</th></tr>
{stages}</table>{note}
{figures}
</body></html>
"""


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def write_report(settings: Settings, dsn: str, sale_id: str, out: Path | None = None) -> Path:
    """Make ``sale_id``'s report; its path."""
    data = gather(dsn, sale_id)
    probe = ProbeResult.load(probe_path(settings, sale_id))
    path = out or reports_dir(settings) / f"{sale_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(sale_id, data, probe))
    return path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `flashsale report`."""
    p = sub.add_parser("report", help="write a sale's post-sale report (static HTML)")
    p.add_argument("sale_id")
    p.add_argument("--out", type=Path, help="the HTML file (default .state/reports/<sale>.html)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Write the report (starting the servers if they are down, and stopping them again)."""
    from infra.stack import Stack

    stack = Stack(settings)
    started = stack.up()
    try:
        ep = stack.endpoints()
        resolved = dataclasses.replace(settings, kafka_bootstrap=ep.bootstrap)
        try:
            path = write_report(resolved, ep.dsn, args.sale_id, args.out)
        except LookupError as exc:
            print(f"flashsale: error: {exc}")
            return 1
    finally:
        if any(started.values()):
            stack.down()
    print(f"report: {path}")
    return 0
