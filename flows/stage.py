"""One stage (or one shard of it) as its own flow run: what a GPU worker runs.

The full pipeline, given a `gpu_pool`, starts caption, recaption, precompute, train and
evaluate as runs of the deployment `cogpipe-stage/<gpu_pool>` (deployments/prefect.yaml)
instead of in its own process, one run per caption or recaption shard and per precompute
part, so N GPU workers take N at once.
The stage reads its inputs from the shared workspace and holds every GPU slot of its
worker while it runs (cogpipe_tasks.gpu.gpu_slots); a retried run resumes from what the
crashed one committed.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from cogpipe.config import PipelineConfig, Stage
from cogpipe.pipeline import run_stage, upstream_results
from cogpipe.stages import STAGE_SPECS
from cogpipe_tasks.common import ProgressArtifact, run
from cogpipe_tasks.gpu import gpu_slots
from cogpipe_tasks.remote import logging_loads
from cogpipe_tasks.secrets import use_hub_token


def _run_name() -> str:
    params = flow_run.parameters
    shard = params.get("shard")
    return params["stage"] if shard is None else f"{params['stage']}-shard-{shard}"


@flow(name="cogpipe-stage", flow_run_name=_run_name, log_prints=True)
def stage(
    config: PipelineConfig,
    stage: Stage = "caption",
    shard: int | None = None,
    category_order: list[str] | None = None,
) -> dict:
    """Run `stage` (its inputs must be done); with `shard`, commit only that caption or
    recaption shard's parts or that precompute part's shards (no merge, no index).
    `category_order`: filter.categories' names in the config's order (a server on
    PostgreSQL returns parameters with object keys sorted).
    Returns the stage's result record ({} for a shard)."""
    if category_order:
        cats = config.filter.categories
        ordered = {name: cats[name] for name in category_order}
        config = config.model_copy(
            update={"filter": config.filter.model_copy(update={"categories": ordered})}
        )
    get_run_logger().info("hub token: %s", use_hub_token())
    with gpu_slots():
        if shard is None:
            upstream = upstream_results(config, stage)
            return run(stage, config, {up: r.to_dict() for up, r in upstream.items()})
        option = STAGE_SPECS[stage].shard_option
        if option is None:
            raise ValueError(
                f"{stage} is not split into shards (caption, recaption and precompute are)"
            )
        progress = logging_loads(ProgressArtifact(f"{stage}-shard-{shard}"))
        run_stage(config, stage, progress=progress, **{option: shard})
        return {}
