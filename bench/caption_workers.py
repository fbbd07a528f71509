"""Captioning with N GPU workers against one, through the production stack: a real Prefect
server, `cogpipe worker` processes (one per GPU, each holding its GPU's slot), and the
pipeline deployment started through the API with `until: caption` and `caption.shards: N`.

Each case gets a fresh server, database and workspace; the same clips and the same model
folder. Ingest and check run on the CPU worker and are not timed: the caption time is the
pipeline's caption task from start to end (Prefect's own record of the task run): it
starts the N shard runs, waits while the workers take them (each run's process start and
model load included, as in production) and merges.

The model is LLaVA-NeXT-Video-7B at full size with random bf16 weights, saved to a local
folder (no hub). Its special tokens' output rows are zeroed, so greedy decoding never
emits </s> and every caption is `--new-tokens` long: the work per clip is fixed.

Lines (one JSON object each): `clips_per_hour` per worker count, the 1-worker case the
reference (ratio = speed-up; the issue's goal is >= 1.8 on 2 GPUs), with `seconds` and the
per run its start, span and parts' commit times in `extra`.

    python bench/caption_workers.py --gpus 2 [--clips 512] [--batch-size 32]
        [--out bench/results/caption_workers-nvidia-h200-x2-DATE.jsonl] [--commit SHA]
    python bench/caption_workers.py --dry   # CPU: tiny captioner, 2 CPU-backed workers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import Bench, commit  # noqa: E402


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower().replace(" ", "-")
        return f"{name}-x{torch.cuda.device_count()}"
    return f"cpu-{platform.machine()}"


def write_model(folder: Path, dry: bool) -> Path:
    """A captioner folder: the tiny one of the tests (dry) or full-size random 7B."""
    if dry:
        from cogpipe.samples import write_tiny_captioner

        return write_tiny_captioner(folder, "llava_next_video")
    import torch
    from caption import build_config, build_model, build_processor, build_tokenizer

    tok = build_tokenizer()
    config = build_config("7b", tok, tiny=False)
    model = build_model(config, "cuda:0")
    with torch.no_grad():  # no </s>, <pad>, <image>, <video>: captions run to the budget
        specials = [tok.convert_tokens_to_ids(t) for t in ("</s>", "<pad>", "<unk>", "<s>")]
        specials += [config.image_token_index, config.video_token_index]
        model.lm_head.weight[specials] = 0.0
    model.save_pretrained(folder)
    build_processor(tok, config).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def write_clips(folder: Path, n: int, dry: bool) -> Path:
    """`n` distinct clips (distinct content, so the check stage keeps every one)."""
    from caption import make_clips

    folder.mkdir(parents=True, exist_ok=True)
    size, seconds = ((96, 64), 2) if dry else ((854, 480), 4)
    make_clips(folder, n, size, seconds)
    return folder


def pipeline_config(ws: Path, videos: Path, model: Path, shards: int, args):
    from cogpipe.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "workspace": str(ws),
            "ingest": {"source": str(videos)},
            # phash_bits 0: only identical frame hashes are duplicates (the synthetic clips are
            # alike enough that the default 4 bits drops about 40% of 512 of them).
            "check": {
                "min_duration": 1.0,
                "min_size": 32,
                "heldout_fraction": 0.0,
                "phash_bits": 0,
            },
            # check rejects clips shorter than a training window (49 frames at 8 fps by
            # default: 6 s); windows of 9 frames keep the 2 s (dry) and 4 s clips.
            "precompute": {"frames": 9},
            "caption": {
                "model": str(model),
                "shards": shards,
                "batch_size": args.batch_size,
                "max_new_tokens": args.new_tokens,
                "num_frames": 4 if args.dry else 8,
            },
        }
    )


def caption_span(client, parent, out: Path) -> tuple[float, dict[str, list]]:
    """Seconds the pipeline's caption task took (starting the shard runs, waiting for the
    workers, the runs, the merge), and for each caption run: when it started (seconds after
    the task), how long it ran, and when each of its parts in `out` was committed."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )

    flt = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent]))
    runs = [r for r in client.read_flow_runs(flow_run_filter=flt) if r.name.startswith("caption")]
    if not runs or not all(r.state.is_completed() for r in runs):
        raise RuntimeError(
            f"caption runs did not all complete: {[(r.name, r.state.name) for r in runs]}"
        )
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[parent])))
    (task,) = [t for t in tasks if t.name == "caption-on-gpu"]
    spans = {  # [seconds after the caption task started, seconds it ran]
        r.name: [
            round((t - task.start_time).total_seconds(), 2) for t in (r.start_time, r.end_time)
        ]
        for r in runs
    }
    spans = {name: [start, round(end - start, 2)] for name, (start, end) in spans.items()}
    t0 = task.start_time.timestamp()
    for name in spans:
        parts = sorted(out.glob(f"part-{int(name.rsplit('-', 1)[1]):03d}-*.parquet"))
        spans[name].append([round(p.stat().st_mtime - t0, 1) for p in parts])
    return (task.end_time - task.start_time).total_seconds(), spans


def run_case(workers: int, shards: int, videos: Path, model: Path, tmp: Path, args) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cogpipe_flows.serve import free_port, serve

    logs = tmp / f"serve-{workers}"
    server = serve(
        port=free_port(),
        logs=logs,
        gpus=[str(i) for i in range(workers)],
        database=logs / "prefect.db",
        worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2"},
    )
    try:
        cfg = pipeline_config(tmp / f"ws-{workers}", videos, model, shards, args)
        params = {"config": cfg.model_dump(mode="json"), "until": "caption", "gpu_pool": "gpu"}
        with (
            temporary_settings({PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as c,
        ):
            deployment = c.read_deployment_by_name("cogpipe-pipeline/pipeline")
            run = c.create_flow_run_from_deployment(deployment.id, parameters=params)
            while not (run := c.read_flow_run(run.id)).state.is_final():
                time.sleep(2)
            if not run.state.is_completed():
                raise RuntimeError(
                    f"{workers} workers: pipeline ended {run.state.name}: {run.state.message}"
                )
            done = next((Path(cfg.workspace) / "caption").glob("*/_SUCCESS.json"))
            seconds, spans = caption_span(c, run.id, done.parent)
        status = json.loads(done.read_text())
        return {"seconds": seconds, "clips": status["counts"]["clips"], "spans": spans}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2, help="workers of the parallel case")
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--dry", action="store_true", help="CPU: tiny model, few clips")
    parser.add_argument("--out", help="also append the lines to this file")
    parser.add_argument("--commit", default=None, help="default: env COMMIT, else git's HEAD")
    args = parser.parse_args()
    if args.dry:
        args.clips, args.batch_size, args.new_tokens = min(args.clips, 8), 2, 8
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    bench = Bench("caption_workers", device_name(), commit(args.commit), args.out)

    with tempfile.TemporaryDirectory(prefix="caption-workers-") as tmp:
        tmp = Path(tmp)
        os.environ["PREFECT_HOME"] = str(tmp / "prefect-home")
        model = write_model(tmp / "model", args.dry)
        videos = write_clips(tmp / "videos", args.clips, args.dry)
        from cogpipe_flows.serve import cpu_threads

        ref = None  # the 1-worker case, run first; each line printed as its case ends
        for workers in (1, args.gpus):
            r = run_case(workers, args.gpus, videos, model, tmp, args)
            value = r["clips"] / r["seconds"] * 3600
            ref = ref or value
            line = {
                "bench": "caption_workers",
                "case": f"{workers}-workers",
                "metric": "clips_per_hour",
                "value": round(value, 1),
                "reference": round(ref, 1),
                "ratio": round(value / ref, 3),
                "extra": {
                    "seconds": round(r["seconds"], 2),
                    "clips": r["clips"],
                    "shards": args.gpus,
                    "batch_size": args.batch_size,
                    "new_tokens": args.new_tokens,
                    "runs": r["spans"],
                    "dry": args.dry,
                    "omp_threads": os.environ.get("OMP_NUM_THREADS", cpu_threads(workers)),
                },
            }
            bench.print(line)


if __name__ == "__main__":
    main()
