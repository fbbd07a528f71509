"""Filter task: the caption quality gate and curation (no model: re-captioning is upstream).

Named `filter_task` (its Prefect name is `filter`), so the builtin `filter` stays itself."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(
    name="filter", cache_key_fn=cache_key("filter"), persist_result=True, result_serializer="json"
)
def filter_task(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Score the (re-)captions, record reasons, curate the good ones."""
    return run("filter", config, upstream)
