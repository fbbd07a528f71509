"""Caption tasks: LLaVA captions, committed batch by batch; a retry resumes where it stopped.

`caption_shard` captions one shard (a GPU worker's share) and commits its parts; `caption`
captions whatever shard is still missing, merges the parts and marks the stage done.
"""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, retry_unless, run, run_shard


@task(
    name="caption",
    cache_key_fn=cache_key("caption"),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(),
    tags=["gpu"],
)
def caption(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Caption every kept clip; committed parts survive a crash and are skipped on retry."""
    return run("caption", config, upstream)


@task(
    name="caption-shard",
    task_run_name="caption-shard-{shard}",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(),
    tags=["gpu"],
)
def caption_shard(config: PipelineConfig, upstream: dict[str, dict], shard: int) -> int:
    """Commit every part of one shard (no merge); returns the shard."""
    return run_shard("caption", config, upstream, shard)
