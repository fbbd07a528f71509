"""A stage run on a GPU pool: the pipeline's task that starts `cogpipe-stage/<pool>` runs
and waits for them.

A split stage (caption and recaption shards, precompute parts) starts one run per shard
at once, then merges here, in the pipeline's own process: the merge loads no model, so a
GPU run for it would only add a worker's process start and hold a GPU. Should a shard
have left work undone, the merge refuses and a final GPU run does that work and merges.
Recaption tries the merge first: with no caption rejected it starts no GPU run at all.

Cached like the in-process stage tasks (by stage key, once done on disk), and before it
starts anything it looks for the stage's done marker, so a re-run of a finished pipeline
starts no GPU run. A run that crashed (its worker died) fails this task, whose retry
starts a new run; that run resumes from what the crashed one committed.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from cogpipe.config import PipelineConfig
from cogpipe.pipeline import finished, run_stage
from cogpipe.stages import STAGE_SPECS
from cogpipe.workspace import Progress, ShardsIncomplete, Workspace, no_progress
from cogpipe_tasks.common import cache_key, publish, retry_unless

POLL_S = 2.0
STAGE_FLOW = "cogpipe-stage"  # deployment `cogpipe-stage/<pool>` runs one stage on <pool>
# Stages often with nothing for a model to do (no caption rejected, retries 0): the merge is
# tried here first, and GPU runs start only when it finds work undone.
MERGE_FIRST = ("recaption",)


class StageRunFailed(RuntimeError):
    """A stage's flow run on the GPU pool ended in a state other than Completed."""


def shards(config: PipelineConfig, stage: str) -> int:
    """How many runs a stage is split into before its final run."""
    split = {"caption": config.caption.shards, "recaption": config.caption.shards}
    return (split | {"precompute": config.precompute.workers}).get(stage, 1)


@task(
    name="on-gpu-pool",
    task_run_name="{stage}-on-{pool}",
    cache_key_fn=lambda ctx, params: cache_key(params["stage"])(ctx, params["upstream"] | params),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(),
)
def remote_stage(config: PipelineConfig, stage: str, pool: str, upstream: dict[str, dict]) -> dict:
    """Run `stage` as flow runs of `cogpipe-stage/<pool>`: its shards at once, then the
    merge here (or the stage itself as one more run); returns its result record as the
    workspace holds it."""
    logger = get_run_logger()
    ws, inputs = Workspace(config.workspace), {up: r["key"] for up, r in upstream.items()}
    key = STAGE_SPECS[stage].key(config, inputs)
    if (done := finished(ws, config, stage, key, inputs)) is not None:
        logger.info("%s %s: done on disk, no %s run", stage, key, pool)
        return done.to_dict()
    if stage in MERGE_FIRST and (record := merge_here(config, stage)) is not None:
        logger.info("%s: nothing for a model to do, merged here with no %s run", stage, pool)
        return record
    deployment = f"{STAGE_FLOW}/{pool}"
    n = shards(config, stage)
    if n > 1:
        wait([start(deployment, config, stage, k) for k in range(n)])
        if (record := merge_here(config, stage)) is not None:
            logger.info("%s: %d runs on %s, merged here", stage, n, pool)
            return record
        logger.warning("%s: a shard left work undone; its final run goes to %s", stage, pool)
    wait([start(deployment, config, stage, None)])
    done = finished(ws, config, stage, key, inputs)
    if done is None:
        raise StageRunFailed(f"{stage}: its {pool} run completed but {ws.root} has no done marker")
    return done.to_dict() | {"reused": False}  # computed by the runs started here


def logging_loads(progress: Progress = no_progress) -> Progress:
    """`progress`, also logging the library's notes that a model was loaded (which, where,
    how long): a run's logs say whether it loaded a model."""

    def report(done: int, total: int, note: str = "") -> None:
        if " loaded " in note:
            get_run_logger().info("%s", note)
        progress(done, total, note)

    return report


def merge_here(config: PipelineConfig, stage: str) -> dict | None:
    """The stage merged in this process from its committed shards (the merge loads no
    model: here it takes no worker, process start or GPU slot) and published; None while
    a shard has work left."""
    try:
        return publish(stage, run_stage(config, stage, progress=logging_loads(), merge_only=True))
    except ShardsIncomplete as e:
        get_run_logger().info("%s: not merged here: %s", stage, e)
        return None


def start(deployment: str, config: PipelineConfig, stage: str, shard: int | None) -> UUID:
    """Schedule one run of the stage deployment now; returns its flow run id."""
    params = {"config": config.model_dump(mode="json"), "stage": stage, "shard": shard}
    # a server on PostgreSQL stores parameters as jsonb, which sorts object keys: the
    # categories' order (it breaks ties, and is in the filter key) travels as a list
    params["category_order"] = list(config.filter.categories)
    run = run_deployment(deployment, parameters=params, timeout=0)
    get_run_logger().info("%s: started flow run %s on %s", stage, run.name, deployment)
    return run.id


def wait(ids: list[UUID]) -> None:
    """Wait for every run to end.

    Raises:
        StageRunFailed: a run ended Failed, Crashed or Cancelled (the message names it and
            its state's message).
    """
    pending, failed = set(ids), []
    with get_client(sync_client=True) as client:
        while pending:  # all of them, so a retry never runs a shard twice at once
            for run_id in list(pending):
                run = client.read_flow_run(run_id)
                if run.state is None or not run.state.is_final():
                    continue
                pending.discard(run_id)
                if not run.state.is_completed():
                    message = run.state.message or "no message"
                    failed.append(
                        f"flow run {run.name} ({run_id}) ended {run.state.name}: {message}"
                    )
            if pending:
                time.sleep(POLL_S)
    if failed:
        raise StageRunFailed("; ".join(failed))
