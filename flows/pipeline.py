"""The full pipeline as one Prefect flow: ingest → check → caption → recaption → filter →
precompute → train → evaluate. Each task is cached by its stage key, so a re-run of a finished
pipeline costs seconds and a changed config recomputes only what it touches.

    cogpipe run configs/demo.yaml            # CLI, on Prefect's embedded local server
    python -m cogpipe_flows.pipeline CONFIG  # the same, without the CLI

Deployed (deployments/prefect.yaml) it runs on the `cpu` pool with `gpu_pool: gpu`: the
GPU stages become runs of `cogpipe-stage/gpu` on GPU workers (flows/stage.py).
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cogpipe.config import STAGES, PipelineConfig, Stage, load_config
from cogpipe.summary import pipeline_markdown
from cogpipe.workspace import StageResult
from cogpipe_tasks.caption import caption, caption_shard
from cogpipe_tasks.check import check
from cogpipe_tasks.evaluate import evaluate
from cogpipe_tasks.filter import filter
from cogpipe_tasks.ingest import ingest
from cogpipe_tasks.precompute import precompute
from cogpipe_tasks.recaption import recaption, recaption_shard
from cogpipe_tasks.remote import remote_stage
from cogpipe_tasks.secrets import use_hub_token
from cogpipe_tasks.train import train

GPU_STAGES = ("caption", "recaption", "precompute", "train", "evaluate")


@flow(name="cogpipe-pipeline", log_prints=True)
def pipeline(
    config: PipelineConfig, until: Stage = "evaluate", gpu_pool: str | None = None
) -> dict[str, dict]:
    """Run every stage up to `until`; returns each stage's result record.

    With `gpu_pool`, caption, recaption, precompute, train and evaluate run as flow runs of
    the deployment `cogpipe-stage/<gpu_pool>` on that pool's workers (caption and
    recaption shards as separate runs, N at once on N workers); the rest runs here.
    """
    get_run_logger().info("hub token: %s", use_hub_token())
    last = STAGES.index(until)
    done: dict[str, dict] = {}

    def gpu(stage: str, local, *upstream: str) -> dict:
        records = {up: done[up] for up in upstream}
        if gpu_pool:
            return remote_stage(config, stage, gpu_pool, records)
        return local(config, *records.values())

    done["ingest"] = ingest(config)
    if last >= 1:
        done["check"] = check(config, done["ingest"])
    if last >= 2:
        if config.caption.shards > 1 and not gpu_pool:
            run_shards(caption_shard, config, done["check"])
        done["caption"] = gpu("caption", caption, "check")
    if last >= 3:
        if config.caption.shards > 1 and not gpu_pool:
            run_shards(recaption_shard, config, done["caption"], done["check"])
        done["recaption"] = gpu("recaption", recaption, "caption", "check")
    if last >= 4:
        done["filter"] = filter(config, done["recaption"], done["check"])
    if last >= 5:
        done["precompute"] = gpu("precompute", precompute, "filter", "check")
    if last >= 6:
        done["train"] = gpu("train", train, "precompute")
    if last >= 7:
        done["evaluate"] = gpu("evaluate", evaluate, "train", "check", "filter")
    results = [StageResult.from_dict(r) for r in done.values()]
    where = {s: f"pool `{gpu_pool}`" for s in done if gpu_pool and s in GPU_STAGES}
    create_markdown_artifact(pipeline_markdown(results, where), key="pipeline-summary")
    return done


def run_shards(shard_task, config: PipelineConfig, *upstream: dict) -> None:
    """Run a stage's caption shards (`caption_shard`, `recaption_shard`) as separate task
    runs, as many at once as this host has GPUs (shard k runs on GPU k mod count); the
    stage's own task then merges them."""
    import torch

    lanes = max(torch.cuda.device_count(), 1)
    shards = list(range(config.caption.shards))
    for wave in (shards[i : i + lanes] for i in range(0, len(shards), lanes)):
        for future in [shard_task.submit(config, *upstream, k) for k in wave]:
            future.result()  # waits; a shard that failed after its retries fails the flow


if __name__ == "__main__":
    pipeline(load_config(sys.argv[1]))
