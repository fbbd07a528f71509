"""Precompute task: VAE latents and T5 embeddings into safetensors shards."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe.precompute import SpotCheckError
from cogpipe_tasks.common import cache_key, retry_unless, run


@task(
    name="precompute",
    cache_key_fn=cache_key("precompute"),
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless(SpotCheckError),
    tags=["gpu"],
)
def precompute(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Encode the selected clips and captions; committed shards are skipped on retry."""
    return run("precompute", config, upstream)
