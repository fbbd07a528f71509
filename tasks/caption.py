"""Caption task: LLaVA captions, committed batch by batch; a retry resumes where it stopped."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(
    name="caption",
    cache_key_fn=cache_key("caption"),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    tags=["gpu"],
)
def caption(config: PipelineConfig, check: dict) -> dict:
    """Caption every kept clip; committed parts survive a crash and are skipped on retry."""
    return run("caption", config, check=check)
