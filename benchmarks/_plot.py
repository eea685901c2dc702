"""Bar charts of measured ratios, written by the benchmark scripts (`--plot PATH`) for the docs."""

from __future__ import annotations

import datetime
import os
import platform


def ratio_bars(
    path: str,
    title: str,
    bars: dict[str, dict[str, float]],
    ylabel: str,
    floor: float | None = None,
) -> None:
    """Writes a PNG: one group of bars per entry of ``bars`` (label -> series -> ratio), a line at
    1 (the reference) and, if given, a dashed line at ``floor``; the machine and date in the
    caption. Imports matplotlib here: only a script asked to plot needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(bars)
    series = list(dict.fromkeys(s for v in bars.values() for s in v))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    for i, s in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ys = [bars[lab].get(s, float("nan")) for lab in labels]
        rects = ax.bar(xs, ys, width, label=s)
        ax.bar_label(rects, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", linewidth=0.8, label="floor")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    fig.text(0.01, 0.01, f"{machine}, {datetime.date.today().isoformat()}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
