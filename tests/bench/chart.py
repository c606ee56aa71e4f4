"""Draws target/bench/summary.png from summary.json (`cargo xtask bench`).

Usage: python chart.py SUMMARY_JSON OUT_PNG
One panel per row of the table: each column's ratio to direct (higher is
better for rates, lower for latencies), or the absolute value for rows that
have no direct figure (RSS, CPU).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    summary = json.load(open(sys.argv[1]))
    cols = summary["columns"]
    rows = [r for r in summary["rows"] if any(v is not None for v in r["values"].values())]
    n = len(rows)
    ncol = 3
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.2 * nrow), squeeze=False)
    colors = ["#888888", "#1f77b4", "#2ca02c", "#d62728"]
    for i, row in enumerate(rows):
        ax = axes[i // ncol][i % ncol]
        names = [c for c in cols if row["values"].get(c) is not None]
        vals = [row["values"][c] for c in names]
        bars = ax.bar(names, vals, color=[colors[cols.index(c) % len(colors)] for c in names])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{row['name']} ({row['unit']})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    for j in range(n, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(summary.get("title", "proxypilot bench"), fontsize=11)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=90)


if __name__ == "__main__":
    main()
