"""Check task: score, deduplicate and split the accepted videos into clips."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(name="check", cache_key_fn=cache_key("check"), persist_result=True, result_serializer="json")
def check(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Black, frozen, too-short and duplicate checks; a train / held-out split."""
    return run("check", config, upstream)
