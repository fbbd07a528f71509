"""Training sweeps: a grid over config fields (e.g. learning rate x LoRA rank), one training
run per cell, every cell evaluated, and a report that ranks the cells.

    grid = {"train.learning_rate": [1e-4, 5e-4, 1e-3], "train.rank": [64, 128, 256]}
    for name, cfg in cells(base, grid): ...          # nine configs, run names from values
    table = results(ws, base, names, "clip_score")   # best checkpoint of each cell, ranked

Cells share everything up to precompute (training fields are not in its key); each cell
is its own run folder `train/<sweep>-<values>/`, so a re-run of a sweep trains and
evaluates only the cells that are not done. The flow is `flows/train_sweep.py`.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from cogpipe.config import ConfigError, PipelineConfig
from cogpipe.evaluate import BASE, METRICS, eval_key, read_index
from cogpipe.workspace import Workspace, atomic_path, write_table

HIGHER_IS_BETTER = {"clip_score": True, "temporal_consistency": True, "dynamic_degree": True,
                    "fvd": False}  # fmt: skip


def _value_text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def cell_name(sweep: str, values: dict[str, Any]) -> str:
    """A run name from the cell's values: 'sweep-learning_rate0.0005-rank128'."""
    parts = [f"{path.rsplit('.', 1)[-1]}{_value_text(v)}" for path, v in values.items()]
    return "-".join([sweep, *parts])


def with_values(cfg: PipelineConfig, values: dict[str, Any], name: str) -> PipelineConfig:
    """`cfg` with dotted fields set (validated) and the run name `name`.

    Raises:
        ConfigError: a path names no field, or a value does not validate (field and why).
    """
    raw = cfg.model_dump(mode="json")
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"sweep grid: {path!r} is not a config field")
        node[leaf] = value
    raw["name"] = name
    try:
        return PipelineConfig.model_validate(raw)
    except ValueError as e:
        raise ConfigError(f"sweep grid {values}: {e}") from None


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
        out.append((name, with_values(cfg, values, name)))
    return out


def results(
    ws: Workspace, cfg: PipelineConfig, grid: dict[str, list[Any]], metric: str,
    sweep: str | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per cell: its values, its best checkpoint by `metric` and that checkpoint's
    metrics, best cell first; cells not evaluated yet come last with NaN.

    Raises:
        ConfigError: `metric` is not one of the evaluate metrics.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"sweep metric {metric!r} is not one of {', '.join(METRICS)}")
    index = read_index(ws)
    index = index[(index.ekey == eval_key(cfg)) & (index.checkpoint != BASE)]
    rows = []
    for name, cell in cells(cfg, grid, sweep):
        evaluated = index[index.run == name].dropna(subset=[metric])
        row: dict[str, Any] = {"run": name}
        row |= {path: v for path, v in zip(grid, _values(cell, grid), strict=True)}
        if len(evaluated):
            pick = (
                evaluated[metric].idxmax()
                if HIGHER_IS_BETTER[metric]
                else evaluated[metric].idxmin()
            )
            best = evaluated.loc[pick]
            row |= {"checkpoint": best.checkpoint, "step": int(best.step)}
            row |= {m: float(best[m]) for m in METRICS}
        else:
            row |= {"checkpoint": None, "step": None} | {m: math.nan for m in METRICS}
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(
        metric, ascending=not HIGHER_IS_BETTER[metric], na_position="last", kind="stable"
    ).reset_index(drop=True)


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
    order = "highest" if HIGHER_IS_BETTER[metric] else "lowest"
    lines = [f"# Training sweep: {len(table)} cells, ranked by {metric} ({order} first)", ""]
    if len(table) and not math.isnan(table[metric].iloc[0]):
        best = table.iloc[0]
        values = ", ".join(f"{p} = {best[p]}" for p in grid)
        lines += [
            f"Best: **{best.run}** ({values}) at {best.checkpoint}: {metric} {best[metric]:.4f}",
            "",
        ]
    columns = ["run", *grid, "checkpoint", *METRICS]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in table.to_dict("records"):
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) and c in METRICS else str(row[c])
                 for c in columns]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(markdown)
    return markdown
