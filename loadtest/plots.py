"""PNG plots of a load test: latency CDFs per level, and throughput against offered load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

from loadtest.driver import LevelRun
from loadtest.stats import LevelSummary


def latency_cdfs(runs: list[LevelRun], path: Path) -> None:
    """e2e latency and TTFT CDFs, one line per load level."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{'rate' if run.mode == 'open' else 'c'}={run.level:g}"
        ok = [r for r in run.results if r.ok]
        for ax, values in (
            (axes[0], [r.e2e * 1000 for r in ok]),
            (axes[1], [r.ttft * 1000 for r in ok if r.ttft is not None]),
        ):
            if values:
                xs = np.sort(np.asarray(values))
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
    for ax, title in zip(axes, ("end-to-end latency", "time to first token"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def throughput(levels: list[LevelSummary], path: Path) -> None:
    """Achieved RPS and goodput (left axis) and output tokens/s (right) against load."""
    xs = [lv.level for lv in levels]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(xs, [lv.rps for lv in levels], "o-", label="RPS (ok)")
    ax.plot(xs, [lv.goodput_rps for lv in levels], "s--", label="goodput RPS")
    mode = levels[0].mode if levels else "closed"
    if mode == "open":
        ax.plot(xs, xs, ":", color="grey", label="offered")
    ax.set_xlabel("offered rate (req/s)" if mode == "open" else "concurrency")
    ax.set_ylabel("requests / s")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(xs, [lv.output_tokens_per_s for lv in levels], "^-", color="tab:green")
    right.set_ylabel("output tokens / s", color="tab:green")
    ax.legend(loc="upper left")
    ax.set_title("throughput vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
