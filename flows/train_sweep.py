"""A training sweep as one flow: the shared stages once, then one training run per grid
cell and its evaluation, then a report that ranks the cells.

With `gpu_pool`, every cell's train and evaluate are runs of `cogpipe-stage/<gpu_pool>`
started at once, so N GPU workers train N cells in parallel; without it they run here one
after another. Cells already trained and evaluated are reused, so a grid can grow, and the
base model's videos are generated once for all cells (evaluate's shared base store). A
best cell is named only when its 95% interval clears the runner-up's.

    cogpipe sweep-train CONFIG   # the default grid, in-process (python -m cogpipe_flows.train_sweep CONFIG)
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cogpipe import train_sweep as sweeps
from cogpipe.config import PipelineConfig, load_config
from cogpipe.workspace import Workspace
from cogpipe_flows.pipeline import pipeline
from cogpipe_flows.submit import run_config
from cogpipe_tasks.evaluate import evaluate
from cogpipe_tasks.remote import remote_stage
from cogpipe_tasks.secrets import use_hub_token
from cogpipe_tasks.train import train

DEFAULT_GRID = {"train.learning_rate": [1e-4, 5e-4, 1e-3], "train.rank": [64, 128, 256]}
Metric = Literal["clip_score", "temporal_consistency", "dynamic_degree", "fd_videomae"]


@flow(name="train-sweep", log_prints=True)
def train_sweep(
    config: PipelineConfig | None = None,
    grid: dict[str, list[Any]] = DEFAULT_GRID,
    metric: Metric = "clip_score",
    gpu_pool: str | None = None,
    config_file: str = "",
) -> list[dict[str, Any]]:
    """Train and evaluate every cell of `grid` (dotted config fields -> values); returns
    the cells ranked by `metric`, best first (also the `train-sweep-report` artifact and
    `sweeps/train/<sweep>/report.md` in the workspace).

    Args:
        config: The whole config (or give config_file instead).
        grid: Dotted config fields -> the values to try, e.g. {"train.rank": [64, 128]}.
        metric: The evaluation metric that ranks the cells.
        gpu_pool: The work pool of the cells' train and evaluate runs (empty: run here).
        config_file: The YAML config, a path every worker sees (relative: to the checkout).
    """
    logger = get_run_logger()
    logger.info("hub token: %s", use_hub_token())
    config = run_config(config_file, config)
    cells = sweeps.cells(config, grid)  # a bad grid fails here, before anything runs
    shared = pipeline(config=config, until="precompute", gpu_pool=gpu_pool)
    check, filtered, precompute = shared["check"], shared["filter"], shared["precompute"]

    if gpu_pool:  # every cell at once; each evaluation waits for its own training
        evaluations = []
        for name, cell in cells:
            trained = remote_stage.with_options(task_run_name=f"{name}-train").submit(
                cell, "train", gpu_pool, {"precompute": precompute}
            )
            evaluations.append(
                remote_stage.with_options(task_run_name=f"{name}-evaluate").submit(
                    cell,
                    "evaluate",
                    gpu_pool,
                    {"train": trained, "check": check, "filter": filtered},
                )
            )
        for future in evaluations:
            future.result()
    else:
        for name, cell in cells:
            trained = train.with_options(task_run_name=f"{name}-train")(
                cell, {"precompute": precompute}
            )
            upstream = {"train": trained, "check": check, "filter": filtered}
            evaluate.with_options(task_run_name=f"{name}-evaluate")(cell, upstream)

    ws = Workspace(config.workspace)
    table = sweeps.results(ws, config, grid, metric)
    out = ws.root / "sweeps" / "train" / (config.name or "sweep")
    markdown = sweeps.write_report(out, table, metric, grid)
    create_markdown_artifact(markdown, key="train-sweep-report")
    print(markdown)
    return table.to_dict("records")


if __name__ == "__main__":
    train_sweep(load_config(sys.argv[1]))
