"""PNG charts of `flashsale bench --only compare`, written next to its JSON (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write(figures: dict[str, Any], json_path: Path) -> list[Path]:
    """Throughput, latency and cost charts as ``<json stem>-<chart>.png``; their paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    systems = figures["systems"]
    names = list(systems)
    x = range(len(names))
    paths = []

    def save(fig: Any, chart: str) -> None:
        path = json_path.with_name(f"{json_path.stem}-{chart}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def values(key: str) -> list[float]:
        return [float(systems[n].get(key) or 0) for n in names]

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.4
    ax.bar([i - width / 2 for i in x], values("decisions_per_s"), width, label="one hot SKU")
    ax.bar([i + width / 2 for i in x], values("decisions_per_s_1000_skus"), width,
           label="1,000 SKUs")  # fmt: skip
    ax.set_ylabel("decisions / s (accept-heavy)")
    ax.set_title("Throughput, same machine, same run")
    _labels(ax, names)
    ax.legend()
    save(fig, "throughput")

    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.27
    for j, (q, label) in enumerate((("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))):
        ax.bar([i + (j - 1) * width for i in x], values(f"latency_ms_{q}"), width, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title("Latency at an open-loop rate of half each system's maximum")
    _labels(ax, names)
    ax.legend()
    save(fig, "latency")

    fig, (cpu, mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    cpu.bar(list(x), values("cpu_ms_per_1000"), color="tab:orange")
    cpu.set_ylabel("CPU ms per 1,000 decisions (servers)")
    mem.bar(list(x), values("peak_pss_mb"), color="tab:green")
    mem.set_ylabel("peak memory, MiB (PSS of the servers)")
    for ax in (cpu, mem):
        _labels(ax, names)
    fig.suptitle("Cost per decision and memory")
    save(fig, "cost")
    return paths


def _labels(ax: Any, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", "\n", 1) for n in names], fontsize=8)
