"""Filter task: the caption quality gate."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(
    name="filter", cache_key_fn=cache_key("filter"), persist_result=True, result_serializer="json"
)
def filter(config: PipelineConfig, caption: dict, check: dict) -> dict:  # noqa: A001 - the stage's verb
    """Score captions, re-caption rejected clips, record reasons, curate the good ones."""
    return run("filter", config, caption=caption, check=check)
