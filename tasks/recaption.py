"""Recaption tasks: clips the caption gate rejects, captioned again in resumable parts.

`recaption_shard` runs every round of one shard (a GPU worker's share) and commits its
parts; `recaption` runs whatever shard is still missing, merges and marks the stage done.
With nothing rejected (or `filter.retries: 0`) neither loads a model.
"""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, retry_unless, run, run_shard


@task(
    name="recaption",
    cache_key_fn=cache_key("recaption"),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(),
    tags=["gpu"],
)
def recaption(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Caption rejected clips again with the stricter prompt; a retry resumes committed parts."""
    return run("recaption", config, upstream)


@task(
    name="recaption-shard",
    task_run_name="recaption-shard-{shard}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(),
    tags=["gpu"],
)
def recaption_shard(config: PipelineConfig, upstream: dict[str, dict], shard: int) -> int:
    """Commit every round's parts of one shard (no merge); returns the shard."""
    return run_shard("recaption", config, upstream, shard)
