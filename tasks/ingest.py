"""Ingest task: scan the source folder into the manifest."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe_tasks.common import cache_key, run


@task(
    name="ingest", cache_key_fn=cache_key("ingest"), persist_result=True, result_serializer="json"
)
def ingest(config: PipelineConfig, upstream: dict[str, dict] | None = None) -> dict:
    """Hash and probe every file under `ingest.source`; bad files become rejected rows."""
    return run("ingest", config, upstream)
