"""Filter task: the caption quality gate and curation (no model: re-captioning is upstream)."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(
    name="filter", cache_key_fn=cache_key("filter"), persist_result=True, result_serializer="json"
)
def filter(config: PipelineConfig, recaption: dict, check: dict) -> dict:  # noqa: A001 - the stage's verb
    """Score the (re-)captions, record reasons, curate the good ones."""
    return run("filter", config, recaption=recaption, check=check)
