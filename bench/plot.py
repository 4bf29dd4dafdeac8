"""One PNG per suite: TFLOP/s per provider against shape, one panel per (panel keys, mode).

Draws from the result dict that `bench.harness.run_suite` returns (the same as the JSON
file), so a saved result can be drawn again: `python -m bench.plot bench/results/X.json`.

A suite may choose another y axis through its header's `plot` entry:
`{"metric": "us", "yscale": "log", "floor": "floor_us"}` draws the median time per call in
µs (log scale) and, where the rows carry it, the row field `floor` as a dashed black
marker per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["plot_lines", "plot_result"]


def _panel_title(panel: dict[str, Any], mode: str) -> str:
    return ", ".join([*(f"{k}={v}" for k, v in panel.items()), mode])


def plot_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write the suite's plot to `path` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, rows = result["header"], result["rows"]
    settings = header.get("plot") or {}
    time_axis = settings.get("metric") == "us"
    floor_key = settings.get("floor")

    def y_of(row: dict[str, Any]) -> float | None:
        if time_axis:
            return row["ms"] * 1e3 if row["ms"] else None
        return row["tflops"]

    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (json.dumps(row["panel"], sort_keys=True), row["mode"])
        panels.setdefault(key, []).append(row)
    panel_values = list(dict.fromkeys(k[0] for k in panels))
    # Only the (panel, mode) pairs that have rows get an axis (suites mix modes per panel).
    modes_of = {p: [m for q, m in panels if q == p] for p in panel_values}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}

    nrows = max(1, len(panel_values))
    ncols = max([1, *(len(m) for m in modes_of.values())])
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.5 * ncols, 4.0 * nrows), squeeze=False, sharey=False
    )
    for i, panel in enumerate(panel_values):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(modes_of[panel]):
                ax.axis("off")
                continue
            mode = modes_of[panel][j]
            prows = panels.get((panel, mode), [])
            xs = list(dict.fromkeys(r["x"] for r in prows))
            ax.set_title(_panel_title(json.loads(panel), mode), fontsize=10)
            drawn = False
            for provider in providers:
                pts = [
                    (xs.index(r["x"]), y_of(r))
                    for r in prows
                    if r["provider"] == provider and r["status"] == "ok" and y_of(r)
                ]
                if pts:
                    ax.plot(
                        *zip(*pts, strict=True), marker="o", color=colors[provider], label=provider
                    )
                    drawn = True
            if floor_key and drawn:
                floors = {xs.index(r["x"]): r.get(floor_key) for r in prows if r.get(floor_key)}
                for n, (x, floor) in enumerate(sorted(floors.items())):
                    ax.hlines(
                        floor,
                        x - 0.3,
                        x + 0.3,
                        colors="k",
                        linestyles="dashed",
                        label=floor_key if n == 0 else None,
                    )
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels(xs, fontsize=7)
            if time_axis:
                ax.set_ylabel("time per call (µs)")
                ax.set_yscale(settings.get("yscale", "log"))
            else:
                ax.set_ylabel("TFLOP/s")
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if drawn:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no timed rows", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(
        f"{header['suite']} — {header['gpu']} ({header['compute_capability']}), {header['dtype']}, "
        f"torch {header['torch']}, triton {header['triton']}, {header['git_commit'][:12]}, "
        f"{header['date'][:10]}",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lines(
    path: Path, draw, header: dict[str, Any], title: str, *, size, xlabel: str, ylabel: str
) -> None:
    """One axes drawn by `draw(ax)`, with labels, grid, legend and a small title that ends
    with where the figures were taken (the header's GPU, torch and commit), as PNG (the
    studies' curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    where = f"{header['gpu']}, torch {header['torch']}, {header['git_commit'][:12]}"
    ax.set_title(f"{title} — {where}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m bench.plot RESULT.json [...]  (writes RESULT.png beside it)")
        return 2
    for name in args:
        src = Path(name)
        print(plot_result(json.loads(src.read_text()), src.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
