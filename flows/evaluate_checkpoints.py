"""Nightly evaluation: the checkpoints of every training run under the workspace's
`train/` that are not yet in `evaluate/index.parquet`, with the base model as reference at
the same seeds.

Each run is evaluated as it was trained: its own base model, train and precompute sections
come from its `run.json` (the resolved config the trainer wrote), the eval settings, data
stages and workspace from the nightly config. So runs of different base models each meet
their own base (its videos generated once, in evaluate's shared store). One run's failure
(a broken checkpoint, a run.json that no longer validates) is logged and listed in the
`evaluate-checkpoints` artifact and the others go on; the flow fails at the end if any run
failed. A failed run is not retried within the night: the next night tries it again.

A checkpoint being written is a hidden temporary folder until it is renamed into place,
so a run never sees it half-done; the next run picks it up. Checkpoints already
evaluated are never generated again, so a night with no new checkpoints costs seconds.

    cogpipe evaluate-checkpoints CONFIG   # in-process (python -m cogpipe_flows.evaluate_checkpoints CONFIG)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cogpipe import evaluate as evaluation
from cogpipe.config import PipelineConfig, load_config
from cogpipe.evaluate import BASE
from cogpipe.pipeline import UPSTREAM, finished, stage_keys, stage_path
from cogpipe.workspace import StageNotReady, StageResult, Workspace
from cogpipe_flows.submit import run_config as config_of
from cogpipe_tasks.evaluate import evaluate
from cogpipe_tasks.gpu import gpu_slots
from cogpipe_tasks.secrets import use_hub_token


class RunsFailed(RuntimeError):
    """At least one run's evaluation failed (the others were evaluated)."""


def training_runs(ws: Workspace) -> dict[str, dict[str, Any]]:
    """{run folder name: its run.json record} of every run under `train/`."""
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((ws.root / "train").glob("*/run.json"))
    }


def run_config(config: PipelineConfig, run: str, record: dict[str, Any]) -> PipelineConfig:
    """The config a run is evaluated with: its own `model`, `train` and `precompute` (from
    run.json), the nightly config's everything else, and `name` = the run's folder (which
    places its evaluation under evaluate/<ekey>/<run>/; keys ignore it).

    Raises:
        pydantic.ValidationError: the run's recorded sections no longer validate.
    """
    raw = config.model_dump(mode="json")
    resolved = record.get("config", {})
    raw |= {k: resolved[k] for k in ("model", "train", "precompute") if k in resolved}
    return PipelineConfig.model_validate(raw | {"name": run})


def evaluated(ws: Workspace, ekey: str, run: str) -> int:
    """LoRA checkpoints of `run` in the index under `ekey` (the base excluded)."""
    index = evaluation.read_index(ws)
    rows = index[(index.ekey == ekey) & (index.run == run) & (index.checkpoint != BASE)]
    return rows.checkpoint.nunique()


def data_stages(ws: Workspace, config: PipelineConfig) -> dict[str, StageResult]:
    """The check result (finished) and the filter result (finished when a held-out suite
    reads it; otherwise its planned key and folder are enough).

    Raises:
        StageNotReady: check (or, for prompts: heldout, filter) is not finished.
    """
    keys = stage_keys(config, "filter")
    out = {}
    for stage in ("check", "filter"):
        inputs = {up: keys[up] for up in UPSTREAM[stage]}
        done = finished(ws, config, stage, keys[stage], inputs)
        if done is None and (stage == "check" or config.evaluate.heldout):
            raise StageNotReady(
                f"evaluate-checkpoints needs the {stage} stage finished for this config; run "
                f"`cogpipe {stage} CONFIG` first (workspace {ws.root})"
            )
        path = stage_path(ws, config, stage, keys[stage], inputs)
        out[stage] = done or StageResult(stage, keys[stage], str(path))
    return out


def evaluate_run(
    ws: Workspace, config: PipelineConfig, run: str, record: dict, data: dict[str, StageResult]
) -> int:
    """Evaluate one run's new checkpoints; returns how many were evaluated now."""
    cfg = run_config(config, run, record)
    train = StageResult("train", record["key"], str(ws.root / "train" / run))
    ekey = evaluation.eval_key(cfg, {"filter": data["filter"].key})
    before = evaluated(ws, ekey, run)
    evaluate.with_options(task_run_name=f"evaluate-{run}", retries=0)(
        cfg, {"train": train.to_dict()} | {s: data[s].to_dict() for s in ("check", "filter")}
    )
    return evaluated(ws, ekey, run) - before


@flow(name="evaluate-checkpoints", log_prints=True)
def evaluate_checkpoints(
    config: PipelineConfig | None = None, config_file: str = ""
) -> dict[str, int]:
    """Evaluate what is new in every training run; returns {run: checkpoints evaluated now}.

    Args:
        config: The whole nightly config (or give config_file instead).
        config_file: The YAML config, a path every worker sees (relative: to the checkout).

    Raises:
        ConfigError: neither or both of config and config_file, or a missing file.
        StageNotReady: the config's check stage is not finished (its split is the
            held-out reference).
        RunsFailed: after every run was tried, naming the runs that failed and why.
    """
    logger = get_run_logger()
    logger.info("hub token: %s", use_hub_token())
    config = config_of(config_file, config)
    ws = Workspace(config.workspace)
    data = data_stages(ws, config)
    new, failed = {}, {}
    with gpu_slots():  # on a `cogpipe worker` of the gpu pool: its GPUs, one job at a time
        for run, record in training_runs(ws).items():
            try:
                new[run] = evaluate_run(ws, config, run, record, data)
            except Exception as e:  # one run's failure must not stop the others
                failed[run] = (
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                )
                logger.error("evaluate-checkpoints: run %s failed: %s", run, failed[run])
    create_markdown_artifact(summary(new, failed), key="evaluate-checkpoints")
    print(f"checkpoints evaluated: {new}" + (f"; failed: {failed}" if failed else ""))
    if failed:
        raise RunsFailed(f"{len(failed)} of {len(new) + len(failed)} runs failed: {failed}")
    return new


def summary(new: dict[str, int], failed: dict[str, str]) -> str:
    """The flow's result artifact: one row per run, evaluated or failed with why."""
    lines = ["| run | checkpoints evaluated now | status |", "| --- | ---: | --- |"]
    lines += [f"| {run} | {n} | ok |" for run, n in new.items()]
    lines += [f"| {run} | - | failed: {why} |" for run, why in failed.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m cogpipe_flows.evaluate_checkpoints CONFIG")
    evaluate_checkpoints(load_config(Path(sys.argv[1])))
