"""Evaluate task: generate the suite for every checkpoint not yet evaluated (the base model's
videos come from the shared store, generated once)."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, retry_unless, run


@task(
    name="evaluate",
    cache_key_fn=cache_key("evaluate"),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless(),
    tags=["gpu"],
)
def evaluate(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Videos, contact sheets and metrics with intervals per checkpoint (and the base model).

    `upstream`: the train, check and filter records, by stage."""
    return run("evaluate", config, upstream)
