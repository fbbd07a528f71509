"""Evaluate: every checkpoint of a training run, and the base model, on one prompt suite.

A unit of work is one checkpoint: each prompt x seed is generated with that LoRA loaded
on the base pipeline (loaded once per call; a full fine-tune's checkpoint replaces the
pipeline's transformer with its `transformer/` instead), written as an mp4, scored with
CLIP against its prompt, and summarised in `metrics.parquet` and a contact sheet. The
unit's folder is written under a temporary name and renamed into place, then appended to
`evaluate/index.parquet`; the checkpoints listed there are never generated again. The
base model is evaluated as checkpoint `base` with the same seeds, so every LoRA has an
A/B reference.

Two keys. `eval_key(cfg)` hashes the eval settings and the base model only, so one
`<ekey>` folder collects every run and checkpoint evaluated the same way:

    evaluate/index.parquet               ekey, run, checkpoint, step, clip_score, videos, evaluated_at
    evaluate/<ekey>/<run>/report.md      CLIP score per checkpoint vs base
    evaluate/<ekey>/<run>/_SUCCESS.json  key_of(...) and the checkpoints it covers
    evaluate/<ekey>/<run>/<checkpoint>/  p00-s42.mp4 ..., contact_sheet.png, metrics.parquet

`key_of(cfg, inputs)` adds the train and check keys: it is this pipeline's evaluate step.
A training run keeps adding checkpoints under the same train key, so the done marker
alone cannot say "done": it also records the checkpoints it covers, and a call that
finds new ones on disk evaluates just those and rewrites the marker.

    cogpipe evaluate configs/demo.yaml
"""

from __future__ import annotations

import fcntl
import gc
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.metrics import clip_score, frechet_distance, video_metrics
from cogpipe.models.cogvideox import FULL_FOLDER, LORA_FILE, transformer_config, weight_dtype
from cogpipe.video import even_indices, even_times, read_frames, window_times, write_mp4
from cogpipe.workspace import (
    Progress,
    StageResult,
    Workspace,
    atomic_path,
    clean_stale_tmp,
    model_fingerprint,
    no_progress,
    read_table,
    resolve_device,
    stage_key,
    write_table,
)

VERSION = 2  # 2: temporal consistency, dynamic degree, Fréchet distance, A/B grids
BASE = "base"  # the checkpoint name of the base model (step 0: an untrained LoRA is the base)
CHECKPOINT = re.compile(r"^checkpoint-(\d{6})$")
METRICS = ["clip_score", "temporal_consistency", "dynamic_degree", "fvd"]  # per checkpoint
INDEX_COLUMNS = ["ekey", "run", "checkpoint", "step", *METRICS, "videos", "evaluated_at"]
SHEET_FRAMES = 8  # frames across each contact-sheet row
THUMB_WIDTH = 160  # pixels per contact-sheet frame (never upscaled)


def eval_key(cfg: PipelineConfig) -> str:
    """The eval settings and base model only: one `<ekey>` covers every run and checkpoint."""
    config = cfg.evaluate.key_fields() | {"model_fp": model_fingerprint(cfg.model)}
    return stage_key("evaluate", VERSION, config, {})


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    """This pipeline's evaluate step: the eval key plus the train and check keys."""
    return stage_key("evaluate", VERSION, {"ekey": eval_key(cfg)}, inputs)


def output_dir(ws: Workspace, cfg: PipelineConfig, key: str, inputs: dict[str, str]) -> Path:
    """`evaluate/<ekey>/<run>/`, where `<run>` is the train run's folder name."""
    return ws.root / "evaluate" / eval_key(cfg) / (cfg.name or inputs["train"])


def is_full(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds a full fine-tune's transformer (not a LoRA)."""
    return (Path(checkpoint) / FULL_FOLDER / "config.json").is_file()


def list_checkpoints(run_dir: Path) -> dict[str, Path]:
    """Committed checkpoints of a run, by step: {"checkpoint-000500": folder}.

    Only folders named exactly `checkpoint-{step:06d}` that hold the LoRA weights or a
    full fine-tune's transformer count, so a checkpoint still being written
    (`.tmp-checkpoint-...`) is never picked up.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    found = [p for p in run_dir.iterdir()
             if CHECKPOINT.match(p.name) and ((p / LORA_FILE).is_file() or is_full(p))]  # fmt: skip
    return {p.name: p for p in sorted(found)}  # zero-padded: name order is step order


def step_of(checkpoint: str) -> int:
    m = CHECKPOINT.match(checkpoint)
    return int(m.group(1)) if m else 0  # base: step 0


def is_current(ws: Workspace, cfg: PipelineConfig, record: dict[str, Any]) -> bool:
    """Whether a done marker still covers every checkpoint in its run folder.

    The key stays the same while a run adds checkpoints, so "done for this key" needs
    this too (for `pipeline.finished` and the Prefect cache key).
    """
    stats = record.get("stats", {})
    if "run_dir" not in stats:
        return False
    return stats.get("checkpoints") == [BASE, *list_checkpoints(Path(stats["run_dir"]))]


# --------------------------------------------------------------------------- models


class Clip(NamedTuple):
    model: Any  # transformers.CLIPModel
    tokenizer: Any
    processor: Any  # image processor
    device: str


def load_clip(name: str, device: str) -> Clip:
    """CLIP model, tokenizer and image processor from a hub id or a local folder (fp32)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(name).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(name)
    return Clip(model, AutoTokenizer.from_pretrained(name), processor, device)


def load_pipeline(model: str, device: str):
    """The base CogVideoXPipeline at its weight dtype (fp16 2B / bf16 5B on GPU, fp32 on CPU)."""
    from diffusers import CogVideoXPipeline

    dtype = weight_dtype("auto", transformer_config(model), device)
    # torch_dtype works across the pinned diffusers range (0.42 prefers `dtype` and warns).
    pipe = CogVideoXPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()  # 49x480x720 decodes in tiles; a no-op below the tile size
    return pipe


def sampler_args(ec: EvaluateConfig, seed: int, device) -> dict[str, Any]:
    """The pipeline arguments of one video besides its prompt: size, steps, guidance, generator.

    Shared with `cogpipe.validation`, so videos made during training use the same settings.
    """
    import torch

    return dict(
        num_frames=ec.frames,
        height=ec.height,
        width=ec.width,
        num_inference_steps=ec.steps,
        guidance_scale=ec.guidance,
        generator=torch.Generator(device).manual_seed(seed),
    )


def to_uint8(video: np.ndarray, prompt: str, seed: int) -> np.ndarray:
    """[F, H, W, 3] float pixels in [0, 1] -> uint8.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    if not np.isfinite(video).all():  # would be written as black frames and scored
        raise FloatingPointError(
            f"non-finite pixels for prompt {prompt[:40]!r}, seed {seed}: precision overflow?"
        )
    return (video * 255).round().clip(0, 255).astype(np.uint8)


def video_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}-s{seed}.mp4"


def generate(pipe, ec: EvaluateConfig, prompt: str, seed: int, device: str) -> np.ndarray:
    """One video for (prompt, seed) with whatever adapter is loaded. Returns [F, H, W, 3] uint8.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    video = pipe(
        prompt=prompt,
        **sampler_args(ec, seed, device),
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        output_type="np",
    ).frames[0]  # [F, H, W, 3] float in [0, 1]
    return to_uint8(video, prompt, seed)


@contextmanager
def full_weights(pipe, checkpoint: Path):
    """Put a full fine-tune checkpoint's transformer (in the pipeline's dtype) in the
    pipeline for the block, then the base one back; on a GPU the base waits on the CPU."""
    from diffusers import CogVideoXTransformer3DModel

    base = pipe.transformer
    device, dtype = base.device, base.dtype
    loaded = CogVideoXTransformer3DModel.from_pretrained(
        str(Path(checkpoint) / FULL_FOLDER), torch_dtype=dtype
    )
    if device.type == "cuda":
        base.to("cpu")  # one transformer on the GPU at a time
    pipe.transformer = loaded.to(device).eval()
    try:
        yield pipe
    finally:
        pipe.transformer = base.to(device)
        del loaded
        release_memory(str(device))


@contextmanager
def lora(pipe, checkpoint: Path | None, adapter_name: str):
    """Load a checkpoint's LoRA for the block, then unload it; None is the base model, and
    a full fine-tune's checkpoint swaps in its transformer (`full_weights`)."""
    if checkpoint is not None and is_full(checkpoint):
        with full_weights(pipe, checkpoint):
            yield pipe
        return
    if checkpoint is not None:
        pipe.load_lora_weights(str(checkpoint), weight_name=LORA_FILE, adapter_name=adapter_name)
    try:
        yield pipe
    finally:
        if checkpoint is not None:
            pipe.unload_lora_weights()  # restores the original modules, not just disables
            left = [n for n, _ in pipe.transformer.named_modules() if "lora_" in n]
            if left:
                raise RuntimeError(f"LoRA layers left after unloading {checkpoint}: {left[:3]}")


# --------------------------------------------------------------------------- outputs


def sheet_row(frames: np.ndarray, label: str) -> np.ndarray:
    """[F, H, W, 3] -> one contact-sheet row [h, n * w, 3]: n frames spread over the video."""
    from PIL import Image, ImageDraw

    f, h, w, _ = frames.shape
    tw = min(THUMB_WIDTH, w)
    th = max(round(h * tw / w), 1)
    indices = even_indices(0, f, min(SHEET_FRAMES, f))
    picks = [Image.fromarray(frames[i]).resize((tw, th)) for i in indices]
    row = Image.fromarray(np.concatenate([np.asarray(x) for x in picks], axis=1))  # [th, n * tw, 3]
    ImageDraw.Draw(row).text((2, 2), label, fill=(255, 255, 255))
    return np.asarray(row)


def scores(clip: Clip, frames: np.ndarray, prompt: str) -> dict[str, float]:
    """CLIP score, temporal consistency and dynamic degree of one video (NaN for the two
    motion metrics of a one-frame video)."""
    if len(frames) < 2:
        nan = float("nan")
        return {"clip_score": clip_score(clip, frames, prompt), "temporal_consistency": nan,
                "dynamic_degree": nan}  # fmt: skip
    return video_metrics(clip, frames, prompt)


def real_features(ws: Workspace, cfg: PipelineConfig, check: StageResult, features) -> np.ndarray:
    """VideoMAE features [N, D] of the check stage's held-out clips (the first
    `real_clips` by clip_id), cut like the generated videos: `frames` at `fps` from the
    clip's start (spread over the clip when it is shorter). Cached per eval and check key.

    Raises:
        ValueError: fewer than two held-out clips decode.
    """
    ec = cfg.evaluate
    cache = ws.root / "evaluate" / eval_key(cfg) / f"real-features-{check.key}.npy"
    if cache.is_file():
        return np.load(cache)
    clips = read_table(Path(check.path) / "clips.parquet")
    clips = clips[clips.keep & (clips.split == "heldout")].sort_values("clip_id")
    videos = []
    for r in clips.head(ec.real_clips).itertuples():
        times = window_times(r.start, r.end, ec.fps, ec.frames) or even_times(
            r.start, r.end, ec.frames
        )
        try:
            videos.append(read_frames(r.path, times))
        except Exception:  # a clip check accepted can still fail further in; skip it
            continue
    if len(videos) < 2:
        raise ValueError(
            f"the Fréchet distance needs 2 or more held-out clips; {check.path}/clips.parquet "
            f"gives {len(videos)} (raise check.heldout_fraction or set evaluate.video_features: null)"
        )
    feats = features(videos)
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats)
    return feats


def ab_grid(base: Path, frames: np.ndarray, video: str, name: str, fps: int) -> np.ndarray | None:
    """One row of the A/B grid: the base model's video (same prompt and seed) beside this
    checkpoint's, SHEET_FRAMES frames each; None while the base has no such video."""
    if not (base / video).is_file():
        return None
    picks = even_indices(0, len(frames), min(SHEET_FRAMES, len(frames)))
    base_frames = read_frames(base / video, [(i + 0.5) / fps for i in picks])
    left = sheet_row(base_frames, f"base {video[:-4]}")
    right = sheet_row(frames[picks], f"{name} {video[:-4]}")
    return np.concatenate([left, right], axis=1)


def _evaluate_unit(pipe, clip: Clip, cfg: PipelineConfig, device: str, name: str,
                   checkpoint: Path | None, folder: Path, tick, features=None,
                   real: np.ndarray | None = None) -> pd.DataFrame:  # fmt: skip
    """Generate, write and score every prompt x seed of one checkpoint into `folder`:
    the videos, metrics.parquet, a contact sheet and, beside the base model's videos of
    the same prompts and seeds, ab_grid.png. With `features` and `real` (held-out clip
    features), every row carries the unit's Fréchet distance to the held-out clips."""
    from PIL import Image

    ec, rows, sheet, grid, feats = cfg.evaluate, [], [], [], []
    with atomic_path(folder) as tmp, lora(pipe, checkpoint, f"step_{step_of(name):06d}"):
        tmp.mkdir()
        for p, prompt in enumerate(ec.prompts):
            for seed in ec.seeds:
                t0 = time.time()
                frames = generate(pipe, ec, prompt, seed, device)  # [F, H, W, 3] uint8
                seconds = round(time.time() - t0, 3)
                video = video_name(p, seed)
                write_mp4(tmp / video, frames, ec.fps)
                rows.append({"checkpoint": name, "prompt_index": p, "prompt": prompt, "seed": seed,
                             "video": video, **scores(clip, frames, prompt), "seconds": seconds})  # fmt: skip
                sheet.append(sheet_row(frames, f"{name} {video[:-4]}"))
                if (
                    name != BASE
                    and (row := ab_grid(folder.parent / BASE, frames, video, name, ec.fps))
                    is not None
                ):
                    grid.append(row)
                if features is not None:
                    feats.append(features([frames])[0])
                tick(f"{name} {video}")
        Image.fromarray(np.concatenate(sheet, 0)).save(tmp / "contact_sheet.png")
        if grid:
            Image.fromarray(np.concatenate(grid, 0)).save(tmp / "ab_grid.png")
        metrics = pd.DataFrame(rows)
        fvd = (
            frechet_distance(np.stack(feats), real) if real is not None and len(feats) > 1 else None
        )
        metrics["fvd"] = float("nan") if fvd is None else fvd
        write_table(tmp / "metrics.parquet", metrics)
    return metrics


def index_path(ws: Workspace) -> Path:
    return ws.root / "evaluate" / "index.parquet"


def read_index(ws: Workspace) -> pd.DataFrame:
    """Every evaluated (ekey, run, checkpoint); empty with the right columns before the first."""
    path = index_path(ws)
    return read_table(path) if path.is_file() else pd.DataFrame(columns=INDEX_COLUMNS)


def _evaluated(ws: Workspace, ekey: str, run: str) -> pd.DataFrame:
    """The index rows of one run under one eval key."""
    index = read_index(ws)
    return index[(index.ekey == ekey) & (index.run == run)]


@contextmanager
def _index_lock(ws: Workspace):
    """Serialise read-append-write of the shared index between evaluations of other runs."""
    path = ws.root / "evaluate" / ".index.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def _append_index(ws: Workspace, ekey: str, run: str, name: str, metrics: pd.DataFrame) -> None:
    means = {m: float(metrics[m].mean()) if m in metrics else float("nan") for m in METRICS}
    row = {"ekey": ekey, "run": run, "checkpoint": name, "step": step_of(name), **means,
           "videos": len(metrics), "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    with _index_lock(ws):
        index = read_index(ws)
        rows = pd.DataFrame([row], columns=INDEX_COLUMNS)
        index = pd.concat([index, rows], ignore_index=True) if len(index) else rows
        write_table(index_path(ws), index)


def plot_metrics(scores: pd.DataFrame, path: Path) -> None:
    """One panel per metric against the training step; the base model is step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if scores[m].notna().any()]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        ax.plot(scores.step, scores[metric], marker="o")
        ax.set_xlabel("step")
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(out: Path, cfg: PipelineConfig, ekey: str, run: str, scores: pd.DataFrame) -> None:
    """`report.md`: every metric per checkpoint, CLIP score against the base model, links
    to the contact sheets and A/B grids, and `metrics_vs_step.png`."""
    ec = cfg.evaluate
    base = scores.clip_score[scores.checkpoint == BASE]
    ref = float(base.iloc[0]) if len(base) else None
    fvd = "Fréchet distance to held-out clips" if ec.video_features else "Fréchet distance (off)"
    lines = [
        f"# Evaluation of run `{run}`", "",
        f"Eval key `{ekey}`, model `{cfg.model}`, CLIP `{ec.clip_model}`: {len(ec.prompts)} prompts "
        f"x {len(ec.seeds)} seeds, {ec.frames} frames {ec.height}x{ec.width}, {ec.steps} steps, "
        f"guidance {ec.guidance}. {fvd}.", "",
        "![metrics against step](metrics_vs_step.png)", "",
        "| checkpoint | step | CLIP score | vs base | temporal consistency | dynamic degree | FVD "
        "| videos | contact sheet | A/B |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]  # fmt: skip
    for r in scores.itertuples(index=False):
        delta = "" if ref is None or r.checkpoint == BASE else f"{r.clip_score - ref:+.2f}"
        ab = (
            f"[png]({r.checkpoint}/ab_grid.png)"
            if (out / r.checkpoint / "ab_grid.png").is_file()
            else ""
        )
        cells = [r.checkpoint, r.step, f"{r.clip_score:.2f}", delta, f"{r.temporal_consistency:.4f}",
                 f"{r.dynamic_degree:.4f}", f"{r.fvd:.2f}", r.videos,
                 f"[png]({r.checkpoint}/contact_sheet.png)", ab]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)).replace("nan", "-") + " |")
    lines += ["", "Prompts:", ""] + [f"{i}. {p}" for i, p in enumerate(ec.prompts)]
    plot_metrics(scores, out / "metrics_vs_step.png")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def release_memory(device: str) -> None:
    """Collect garbage and, on a GPU, hand cached blocks back to the driver."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _evaluate_pending(ws: Workspace, cfg: PipelineConfig, ekey: str, out: Path,
                      pending: dict[str, Path | None], check: StageResult,
                      progress: Progress) -> int:  # fmt: skip
    """Evaluate each pending checkpoint as one committed unit. Returns videos written."""
    from cogpipe.metrics import VideoMAEFeatures

    device = resolve_device(cfg.evaluate.device)
    features = real = None
    if cfg.evaluate.video_features:  # before the pipeline: a missing split fails in seconds
        features = VideoMAEFeatures(cfg.evaluate.video_features, device)
        real = real_features(ws, cfg, check, features)
    pipe = load_pipeline(cfg.model, device)  # once; each LoRA is loaded and unloaded on it
    clip = load_clip(cfg.evaluate.clip_model, device)
    total = len(pending) * len(cfg.evaluate.prompts) * len(cfg.evaluate.seeds)
    done = 0

    def tick(note: str) -> None:
        nonlocal done
        done += 1
        progress(done, total, note)

    for name, checkpoint in pending.items():
        metrics = _evaluate_unit(pipe, clip, cfg, device, name, checkpoint, out / name, tick,
                                 features, real)  # fmt: skip
        _append_index(ws, ekey, out.name, name, metrics)
    return done


def run_evaluate(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Evaluate the base model and every checkpoint of the run not yet in the index.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model` and `evaluate`).
        upstream: {"train": StageResult whose path is the run folder, "check": StageResult}.
            Check's held-out clips are the reference of the Fréchet distance
            (with `evaluate.video_features`).
        progress: called as (videos done, videos to generate, checkpoint and video).

    Returns:
        The stage result. counts: checkpoints_evaluated (LoRA checkpoints generated by the
        call that wrote the marker), checkpoints_total (LoRA checkpoints in the run),
        videos (written by that call, base included). stats: clip_score per checkpoint,
        base included, and the checkpoints the marker covers.
    """
    started = time.time()
    ec = cfg.evaluate
    train, check = upstream["train"], upstream["check"]
    inputs = {"train": train.key, "check": check.key}
    key = key_of(cfg, inputs)
    ekey, run_dir = eval_key(cfg), Path(train.path)
    out = output_dir(ws, cfg, key, inputs)
    checkpoints = list_checkpoints(run_dir)
    wanted = [BASE, *checkpoints]
    record = ws.read_success(out) or {}
    if record.get("key") == key and is_current(ws, cfg, record):
        return ws.result("evaluate", out)

    clean_stale_tmp(out)
    for name in set(wanted) - set(_evaluated(ws, ekey, out.name).checkpoint):
        # A unit committed just before a crash, whose index row was never appended.
        if (out / name / "metrics.parquet").is_file():
            _append_index(ws, ekey, out.name, name, read_table(out / name / "metrics.parquet"))
    done = set(_evaluated(ws, ekey, out.name).checkpoint)
    pending = {n: checkpoints.get(n) for n in wanted if n not in done}
    videos = 0
    if pending:
        try:
            videos = _evaluate_pending(ws, cfg, ekey, out, pending, check, progress)
        finally:
            release_memory(resolve_device(ec.device))

    scores = (
        _evaluated(ws, ekey, out.name)
        .query("checkpoint in @wanted")
        .drop_duplicates("checkpoint", keep="last")
        .assign(order=lambda d: d.checkpoint.map(wanted.index))
        .sort_values("order")
    )
    write_report(out, cfg, ekey, out.name, scores)
    counts = {
        "checkpoints_evaluated": len([n for n in pending if n != BASE]),
        "checkpoints_total": len(checkpoints),
        "videos": videos,
    }
    pairs = zip(scores.checkpoint, scores.clip_score, strict=True)
    stats = {
        "clip_score": {c: round(float(s), 4) for c, s in pairs},
        "checkpoints": wanted,
        "run_dir": str(run_dir),
    }
    return ws.finish(StageResult("evaluate", key, str(out), counts, stats=stats), started)
