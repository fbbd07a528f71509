"""The full pipeline as one Prefect flow: ingest → check → caption → recaption → filter →
precompute → train → evaluate. Each task is cached by its stage key, so a re-run of a finished
pipeline costs seconds and a changed config recomputes only what it touches.

    cogpipe run demo/demo.yaml            # CLI, on a temporary server of its own
    python -m cogpipe_flows.pipeline CONFIG  # the same on Prefect's ephemeral server
    cogpipe submit demo/demo.yaml         # a run of the deployed pipeline (cogpipe serve)

Deployed (deployments/prefect.yaml) it runs on the `cpu` pool with `gpu_pool: gpu`: the
GPU stages become runs of `cogpipe-stage/gpu` on GPU workers (flows/stage.py). Its Run
form takes `config_file` (a YAML path the workers see) and a few common overrides; the
whole config stays available as `config`.

A run the CLI starts carries tags naming its process (`cli_tags`): the next CLI run on
the same Prefect home marks Crashed those whose process was killed and left them Running
(`crash_killed_runs`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cogpipe.config import STAGES, PipelineConfig, Stage
from cogpipe.disk import in_use
from cogpipe.stages import STAGE_SPECS
from cogpipe.summary import pipeline_markdown
from cogpipe.workspace import StageResult, Workspace
from cogpipe_flows.submit import COMMON, run_config
from cogpipe_tasks.caption import caption, caption_shard
from cogpipe_tasks.check import check
from cogpipe_tasks.evaluate import evaluate
from cogpipe_tasks.filter import filter_task
from cogpipe_tasks.ingest import ingest
from cogpipe_tasks.precompute import precompute
from cogpipe_tasks.recaption import recaption, recaption_shard
from cogpipe_tasks.remote import remote_stage
from cogpipe_tasks.secrets import use_hub_token
from cogpipe_tasks.train import train


@flow(name="cogpipe-pipeline", log_prints=True)
def pipeline(
    config_file: str = "",
    until: Stage = "evaluate",
    workspace: str = "",
    source: str = "",
    name: str = "",
    max_steps: int = 0,
    overrides: dict[str, Any] | None = None,
    config: PipelineConfig | None = None,
    gpu_pool: str | None = None,
) -> dict[str, dict]:
    """Run every stage up to `until`; returns each stage's result record.

    With `gpu_pool`, caption, recaption, precompute, train and evaluate run as flow runs of
    the deployment `cogpipe-stage/<gpu_pool>` on that pool's workers (caption and
    recaption shards as separate runs, N at once on N workers); the rest runs here.

    Args:
        config_file: The YAML config, a path every worker sees (relative: to the checkout,
            e.g. demo/demo.yaml). Its relative paths are relative to the file.
        until: The last stage to run.
        workspace: Set the config's workspace (empty: the file's).
        source: Set ingest.source, the videos (empty: the file's).
        name: Set the training run's name (empty: the file's).
        max_steps: Set train.max_steps (0: the file's).
        overrides: Any other fields, dotted, e.g. {"train.learning_rate": 0.0005}.
        config: The whole config instead of config_file (not both).
        gpu_pool: The work pool of the GPU stages (empty: run them here).
    """
    common = {"workspace": workspace, "source": source, "name": name, "max_steps": max_steps}
    fields = {COMMON[k]: v for k, v in common.items() if v} | (overrides or {})
    config = run_config(config_file, config, fields)  # a missing file fails here, naming it
    get_run_logger().info("hub token: %s", use_hub_token())
    publish_estimate(config, until)
    with in_use(Workspace(config.workspace)):  # `cogpipe gc` waits for the whole run
        done = run_stages(config, STAGES.index(until), gpu_pool)
    results = [StageResult.from_dict(r) for r in done.values()]
    where = {s: f"pool `{gpu_pool}`" for s in done if gpu_pool and STAGE_SPECS[s].gpu}
    create_markdown_artifact(pipeline_markdown(results, where), key="pipeline-summary")
    return done


# The task of each stage: each takes (config, upstream records by stage name).
STAGE_TASKS = {
    "ingest": ingest,
    "check": check,
    "caption": caption,
    "recaption": recaption,
    "filter": filter_task,
    "precompute": precompute,
    "train": train,
    "evaluate": evaluate,
}
SHARD_TASKS = {"caption": caption_shard, "recaption": recaption_shard}


def run_stages(config: PipelineConfig, last: int, gpu_pool: str | None) -> dict[str, dict]:
    """The stage tasks up to STAGES[last], each given its upstream records by name; GPU
    stages on `gpu_pool`'s workers when one is named."""
    done: dict[str, dict] = {}
    for stage in STAGES[: last + 1]:
        spec = STAGE_SPECS[stage]
        records = {up: done[up] for up in spec.upstream}
        if gpu_pool and spec.gpu:
            done[stage] = remote_stage(config, stage, gpu_pool, records)
            continue
        if stage in SHARD_TASKS and config.caption.shards > 1:
            run_shards(SHARD_TASKS[stage], config, records)
        done[stage] = STAGE_TASKS[stage](config, records)
    return done


def publish_estimate(config: PipelineConfig, until: str) -> None:
    """The run's first artifact: each stage's predicted work, time, GPU-hours and disk
    (`cogpipe.estimate`), also written where the stages' done markers pick it up to
    record predicted against actual. An estimate that fails is a warning, not a failure."""
    from cogpipe.estimate import estimate, save_predictions

    try:
        est = estimate(config, stages=list(STAGES[: STAGES.index(until) + 1]))
        save_predictions(config, est)
    except Exception as e:  # a broken measurement file must not cost the run
        get_run_logger().warning("no estimate: %s: %s", type(e).__name__, e)
        return
    create_markdown_artifact(est.markdown(), key="pipeline-estimate")


def run_shards(shard_task, config: PipelineConfig, upstream: dict[str, dict]) -> None:
    """Run a stage's caption shards (`caption_shard`, `recaption_shard`) as separate task
    runs, as many at once as this host has GPUs (shard k runs on GPU k mod count); the
    stage's own task then merges them."""
    import torch

    lanes = max(torch.cuda.device_count(), 1)
    shards = list(range(config.caption.shards))
    for wave in (shards[i : i + lanes] for i in range(0, len(shards), lanes)):
        for future in [shard_task.submit(config, upstream, k) for k in wave]:
            future.result()  # waits; a shard that failed after its retries fails the flow


CLI_TAG = "cogpipe-cli"  # flow runs started by `cogpipe run` / `demo`, with its process's tag


def cli_tags() -> list[str]:
    """Tags for a flow run this process starts: CLI_TAG and `cogpipe-cli:<host>:<pid>:<start>`,
    so a later run on this host can tell whether the process still runs (`crash_killed_runs`)."""
    return [CLI_TAG, f"{CLI_TAG}:{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"]


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc; '' elsewhere): with the
    pid, it names one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _gone(tag: str) -> bool:
    """Whether the process a `cli_tags` tag names, on this host, has ended."""
    _, host, pid, started = (tag.split(":") + ["", "", ""])[:4]
    if host != socket.gethostname() or not pid.isdigit() or not started:
        return False  # another host's, or unknowable here: leave it
    return _started(int(pid)) != started


def crash_killed_runs() -> list[str]:
    """Mark Crashed the flow runs of `cogpipe run`s on this host that were killed (SIGKILL,
    a lost terminal) and so never reported their end; returns their names. Runs of live
    processes, of other hosts and of workers are left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    live = FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
    wanted = FlowRunFilter(
        tags=FlowRunFilterTags(all_=[CLI_TAG]), state=FlowRunFilterState(type=live)
    )
    crashed = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=wanted, limit=200):
            owner = next((t for t in run.tags if t.startswith(f"{CLI_TAG}:")), "")
            if _gone(owner):
                message = "Its `cogpipe run` process was killed; run it again to resume."
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                crashed.append(run.name)
    return crashed


if __name__ == "__main__":
    pipeline(sys.argv[1])
