"""Evaluation report: markdown and CSV tables, results.json, and the ZAPBench-like figure (matplotlib Agg).

The figure has one panel per condition (the training-condition average first, then the holdout, then
each training condition): MAE vs steps ahead, all models overlaid in the same colour on every panel,
baselines dashed, one shared legend.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Panel = tuple[str, dict[str, np.ndarray]]
FILES = {"markdown": "table.md", "csv": "table.csv", "long": "mae_per_step.csv", "json": "results.json",
         "figure": "figure.png"}


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """GitHub markdown of uniform dict rows; floats to 4 decimals, NaN as n/a."""
    cols = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """CSV with a header row; NaN written as an empty field."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})


def long_rows(panels: Sequence[Panel]) -> list[dict[str, Any]]:
    """One row per (condition, model, step ahead)."""
    return [{"condition": title, "model": m, "step": h + 1, "mae": float(v[h])}
            for title, curves in panels for m, v in curves.items() for h in range(len(v))]


class Report(Protocol):
    """What write_report needs of an evaluation result (offline_training.eval.harness.EvalResult)."""

    @property
    def baselines(self) -> frozenset[str]: ...

    @property
    def meta(self) -> dict[str, Any]: ...

    def table(self) -> list[dict[str, Any]]: ...

    def panels(self) -> list[Panel]: ...

    def to_json(self) -> dict[str, Any]: ...


def write_report(result: Report, out: Path) -> dict[str, Path]:
    """Write every output file of `result` into `out`; returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in FILES.items()}
    rows, panels = result.table(), result.panels()
    paths["markdown"].write_text(markdown_table(rows))
    write_csv(paths["csv"], rows)
    write_csv(paths["long"], long_rows(panels))
    paths["json"].write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    plot_panels(panels, paths["figure"], dashed=result.baselines,
                title=str(result.meta.get("title", "MAE vs steps ahead (test split)")))
    return paths


def plot_panels(panels: Sequence[Panel], path: Path, dashed: Collection[str] = (),
                title: str = "", ncols: int = 4) -> Path:
    """One subplot per (title, {model: (H,) MAE}) panel; saved as PNG at `path`."""
    from matplotlib.lines import Line2D
    plt = pyplot()

    models = list(dict.fromkeys(m for _, curves in panels for m in curves))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows + 0.6), squeeze=False)
    for ax, (name, curves) in zip(axes.flat, panels):
        for m, curve in curves.items():
            steps = np.arange(1, len(curve) + 1)
            ax.plot(steps, curve, color=colours[m], linestyle="--" if m in dashed else "-", lw=1.4)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("MAE")
    for i, ax in enumerate(axes.flat[:len(panels)]):
        if i + ncols >= len(panels):  # nothing below it
            ax.set_xlabel("steps ahead")
    handles = [Line2D([], [], color=colours[m], linestyle="--" if m in dashed else "-") for m in models]
    fig.legend(handles, models, loc="lower center", ncol=min(len(models), 4), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(models) / 4), 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (figures are only written to files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: Path, title: str | None = None) -> Path:
    """Title (if given), tighten, write at 120 dpi (making the directory) and close a figure."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
