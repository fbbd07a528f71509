"""Train task: LoRA training that resumes from its latest checkpoint."""

from prefect import task

from cogpipe.config import PipelineConfig
from cogpipe.train import RunFolderTaken, TrainingDiverged
from cogpipe_tasks.common import cache_key, retry_unless, run


@task(
    name="train",
    cache_key_fn=cache_key("train"),
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless(TrainingDiverged, RunFolderTaken),
    tags=["gpu"],
)
def train(config: PipelineConfig, upstream: dict[str, dict]) -> dict:
    """Train the LoRA; a retry continues from the latest full checkpoint."""
    return run("train", config, upstream)
