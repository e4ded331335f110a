"""Small PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "end-to-end"))


def plot_rate_sweep(rates: list[float], summaries: list[dict], out: Path, title: str = "",
                    xlabel: str = "offered rate (req/s)") -> Path:
    """Latency percentiles (p50/p90/p99) of TTFT, TPOT, ITL, e2e and throughput against the offered load."""
    if len(rates) != len(summaries) or not rates:
        raise ValueError("one summary per rate, at least one")
    fig, axes = plt.subplots(1, len(LATENCIES) + 1, figsize=(4 * (len(LATENCIES) + 1), 3.4), dpi=80)
    for ax, (key, label) in zip(axes, LATENCIES, strict=False):
        for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
            ax.plot(rates, [s[key][q] for s in summaries], style, label=q)
        ax.set(title=label, xlabel=xlabel, ylabel="ms")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    ax.plot(rates, [s["output_token_throughput"] for s in summaries], "o-", label="output tok/s")
    ax.set(title="throughput", xlabel=xlabel, ylabel="output tokens/s")
    twin = ax.twinx()
    twin.plot(rates, [s["goodput_rps"] for s in summaries], "s--", color="tab:green", label="goodput")
    twin.plot(rates, [s["request_throughput"] for s in summaries], "^:", color="tab:orange", label="req/s")
    twin.set_ylabel("requests/s")
    twin.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_bars(labels: list[str], values: list[float], out: Path, xlabel: str, title: str = "") -> Path:
    """A horizontal bar chart (e.g. tokens/s per peer), values printed on the bars."""
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.2), dpi=80)
    bars = ax.barh(labels, values, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_scaling(counts: list[int], throughput: list[float], p99_ttft_ms: list[float], out: Path,
                 title: str = "") -> Path:
    """Throughput and p99 TTFT against the number of registered adapters (log x)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=80)
    ax.plot(counts, throughput, "o-", label="output tok/s")
    ax.set(xscale="log", xlabel="registered adapters", ylabel="output tokens/s", title=title)
    twin = ax.twinx()
    twin.plot(counts, p99_ttft_ms, "s--", color="tab:red", label="p99 TTFT")
    twin.set_ylabel("p99 TTFT (ms)")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
