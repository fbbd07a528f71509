"""Training sweeps: a grid over config fields (e.g. learning rate x LoRA rank), one training
run per cell, every cell evaluated, and a report that ranks the cells.

    grid = {"train.learning_rate": [1e-4, 5e-4, 1e-3], "train.rank": [64, 128, 256]}
    for name, cfg in cells(base, grid): ...          # nine configs, run names from values
    table = results(ws, base, names, "clip_score")   # best checkpoint of each cell, ranked

Cells share everything up to precompute (training fields are not in its key); each cell
is its own run folder `train/<sweep>-<values>/`, so a re-run of a sweep trains and
evaluates only the cells that are not done. Every cell is evaluated on the same suite and
base model, so the base videos come from evaluate's shared store: generated once per
sweep, not once per cell. The flow is `flows/train_sweep.py`.

The table carries each metric's 95% interval (`<metric>_low`, `<metric>_high`). The report
names a best cell only when its interval does not overlap the runner-up's (and says
whether it beats the base model the same way); overlapping intervals read "no winner".
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from cogpipe.config import ConfigError, PipelineConfig, with_fields
from cogpipe.evaluate import BASE, eval_key, higher_is_better, metric_names, read_index
from cogpipe.workspace import Workspace, atomic_path, write_table


def _value_text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def cell_name(sweep: str, values: dict[str, Any]) -> str:
    """A run name from the cell's values: 'sweep-learning_rate0.0005-rank128'."""
    parts = [f"{path.rsplit('.', 1)[-1]}{_value_text(v)}" for path, v in values.items()]
    return "-".join([sweep, *parts])


def cells(
    cfg: PipelineConfig, grid: dict[str, list[Any]], sweep: str | None = None
) -> list[tuple[str, PipelineConfig]]:
    """Every combination of the grid's values, in grid order: (run name, config).

    Raises:
        ConfigError: an empty grid or value list, a path that is not a field, a bad value.
    """
    if not grid or any(len(v) == 0 for v in grid.values()):
        raise ConfigError(f"sweep grid needs at least one value per field, got {grid}")
    sweep = sweep or cfg.name or "sweep"
    out = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        name = cell_name(sweep, values)
        out.append((name, with_fields(cfg, values | {"name": name}, what="sweep grid")))
    return out


def results(
    ws: Workspace,
    cfg: PipelineConfig,
    grid: dict[str, list[Any]],
    metric: str,
    sweep: str | None = None,
) -> pd.DataFrame:
    """One row per cell: its values, its best checkpoint by `metric` and that checkpoint's
    metrics with their intervals, then the base model's `metric` and interval (`base_*`),
    best cell first; cells not evaluated yet come last with NaN.

    Raises:
        ConfigError: `metric` is not one of the evaluate metrics.
    """
    names = metric_names(cfg.evaluate)
    if metric not in names:
        raise ConfigError(f"sweep metric {metric!r} is not one of {', '.join(names)}")
    index = read_index(ws)
    index = index[index.ekey == eval_key(cfg)]
    columns = [c for m in names for c in (m, f"{m}_low", f"{m}_high")]
    rows = []
    for name, cell in cells(cfg, grid, sweep):
        run = index[index.run == name]
        row: dict[str, Any] = {"run": name}
        row |= {path: v for path, v in zip(grid, _values(cell, grid), strict=True)}
        row |= _best(run[run.checkpoint != BASE].dropna(subset=[metric]), metric, columns)
        base = run[run.checkpoint == BASE]
        for c in (metric, f"{metric}_low", f"{metric}_high"):
            row[f"base_{c}"] = float(base[c].iloc[-1]) if len(base) else math.nan
        rows.append(row)
    return (
        pd.DataFrame(rows)
        .sort_values(
            metric, ascending=not higher_is_better(metric), na_position="last", kind="stable"
        )
        .reset_index(drop=True)
    )


def _best(evaluated: pd.DataFrame, metric: str, columns: list[str]) -> dict[str, Any]:
    """The best checkpoint's name, step and metric columns (NaN when none is evaluated)."""
    if not len(evaluated):
        return {"checkpoint": None, "step": None} | {c: math.nan for c in columns}
    values = evaluated[metric].astype(float)
    best = evaluated.loc[values.idxmax() if higher_is_better(metric) else values.idxmin()]
    return {"checkpoint": best.checkpoint, "step": int(best.step)} | {
        c: float(best[c]) for c in columns
    }


def verdict(table: pd.DataFrame, metric: str) -> str:
    """Whether the first (best) cell beats the runner-up and the base model on `metric`:
    yes only when the 95% intervals do not overlap."""
    best = table.iloc[0]
    lines = []
    if len(table) > 1 and not math.isnan(table[metric].iloc[1]):
        second = table.iloc[1]
        apart = _apart(best, second, metric, metric)
        lines.append(
            f"**{best.run}** beats every other cell (its 95% interval does not overlap "
            f"{second.run}'s)"
            if apart
            else f"No winner: the 95% intervals of {best.run} and {second.run} overlap"
        )
    if not math.isnan(best[f"base_{metric}"]):
        apart = _apart(best, best, metric, f"base_{metric}")
        lines.append(
            "it beats the base model (intervals apart)"
            if apart
            else "it does not beat the base model (intervals overlap)"
        )
    return "; ".join(lines)


def _apart(a: pd.Series, b: pd.Series, metric: str, other: str) -> bool:
    """Whether a's interval on `metric` lies on the better side of b's interval on `other`."""
    if higher_is_better(metric):
        return bool(a[f"{metric}_low"] > b[f"{other}_high"])
    return bool(a[f"{metric}_high"] < b[f"{other}_low"])


def _values(cell: PipelineConfig, grid: dict[str, list[Any]]) -> list[Any]:
    out = []
    for path in grid:
        node: Any = cell
        for part in path.split("."):
            node = getattr(node, part)
        out.append(node)
    return out


def write_report(out: Path, table: pd.DataFrame, metric: str, grid: dict[str, list[Any]]) -> str:
    """`results.parquet`, `results.csv` and `report.md` under `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_table(out / "results.parquet", table)
    with atomic_path(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    order = "highest" if higher_is_better(metric) else "lowest"
    lines = [f"# Training sweep: {len(table)} cells, ranked by {metric} ({order} first)", ""]
    if len(table) and not math.isnan(table[metric].iloc[0]):
        best = table.iloc[0]
        values = ", ".join(f"{p} = {best[p]}" for p in grid)
        lines += [
            f"Best: **{best.run}** ({values}) at {best.checkpoint}: {metric} {best[metric]:.4f}"
            f" [{best[f'{metric}_low']:.4f}, {best[f'{metric}_high']:.4f}]",
            "",
            f"Verdict (95% intervals over videos, non-overlap): {verdict(table, metric)}.",
            "",
        ]
    metrics = [
        m for m in table.columns if f"{m}_low" in table.columns and not m.startswith("base_")
    ]
    columns = ["run", *grid, "checkpoint", *metrics]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in table.to_dict("records"):
        cells = [_cell(row, c) if c in metrics else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    return markdown


def _cell(row: dict[str, Any], metric: str) -> str:
    value, low, high = row[metric], row[f"{metric}_low"], row[f"{metric}_high"]
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" + ("" if math.isnan(low) else f" [{low:.4f}, {high:.4f}]")
