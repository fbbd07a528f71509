"""Nightly evaluation: the checkpoints of every training run under the workspace's
`train/` that are not yet in `evaluate/index.parquet` for the config's eval settings,
with the base model as reference at the same seeds.

A checkpoint being written is a hidden temporary folder until it is renamed into place,
so a run never sees it half-done; the next run picks it up. Checkpoints already
evaluated are never generated again, so a night with no new checkpoints costs seconds.

    python -m cogpipe_flows.evaluate_checkpoints CONFIG
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from cogpipe import evaluate as evaluation
from cogpipe.config import PipelineConfig, load_config
from cogpipe.evaluate import BASE
from cogpipe.pipeline import finished, plan
from cogpipe.workspace import StageNotReady, StageResult, Workspace
from cogpipe_tasks.evaluate import evaluate
from cogpipe_tasks.gpu import gpu_slots
from cogpipe_tasks.secrets import use_hub_token


def training_runs(ws: Workspace) -> dict[str, str]:
    """{run folder name: train key} of every run under `train/` (those with a run.json)."""
    runs = {}
    for run_json in sorted((ws.root / "train").glob("*/run.json")):
        runs[run_json.parent.name] = json.loads(run_json.read_text())["key"]
    return runs


def evaluated(ws: Workspace, cfg: PipelineConfig) -> dict[str, int]:
    """{run: LoRA checkpoints in the index for this config's eval key} (the base excluded)."""
    index = evaluation.read_index(ws)
    index = index[(index.ekey == evaluation.eval_key(cfg)) & (index.checkpoint != BASE)]
    return index.groupby("run").checkpoint.nunique().to_dict()


@flow(name="evaluate-checkpoints", log_prints=True)
def evaluate_checkpoints(config: PipelineConfig) -> dict[str, int]:
    """Evaluate what is new in every training run; returns {run: checkpoints evaluated now}.

    Raises:
        StageNotReady: the config's check stage is not finished (its split is the
            held-out reference).
    """
    get_run_logger().info("hub token: %s", use_hub_token())
    ws = Workspace(config.workspace)
    keys = plan(config, "check")
    check = finished(ws, config, "check", keys["check"], {"ingest": keys["ingest"]})
    if check is None:
        raise StageNotReady(
            f"evaluate-checkpoints needs the check stage finished for this config; run "
            f"`cogpipe check CONFIG` first (workspace {ws.root})"
        )
    before = evaluated(ws, config)
    with gpu_slots():  # on a `cogpipe worker` of the gpu pool: its GPUs, one job at a time
        for run, key in training_runs(ws).items():
            train = StageResult("train", key, str(ws.root / "train" / run))
            # `name` places the run's evaluation under evaluate/<ekey>/<run>/ (keys ignore it)
            run_config = config.model_copy(update={"name": run})
            evaluate.with_options(task_run_name=f"evaluate-{run}")(
                run_config, train.to_dict(), check.to_dict()
            )
    after = evaluated(ws, config)
    new = {run: after.get(run, 0) - before.get(run, 0) for run in training_runs(ws)}
    print(f"checkpoints evaluated: {new}")
    return new


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cogpipe_flows.evaluate_checkpoints CONFIG")
    evaluate_checkpoints(load_config(Path(sys.argv[1])))
