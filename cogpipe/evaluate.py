"""Evaluate: every checkpoint of a training run, and the base model, on one prompt suite.

A unit of work is one checkpoint: each (prompt, seed) request of the suite is sampled
(`sample`) with that LoRA loaded on the base pipeline (loaded once per call, and only when
something must be generated; a full fine-tune's checkpoint swaps in its `transformer/`),
written as an mp4, then scored from the mp4 as written (CLIP score, temporal consistency,
dynamic degree, features for the Fréchet distance), drawn (contact sheet; A/B grid beside
the base at the same prompt and seed) and committed: the unit's folder is written under a
temporary name and renamed into place, then appended to `evaluate/index.parquet`; the
checkpoints listed there are never generated again.

What is notable:
- The base model's videos are generated once per (model fingerprint, video settings,
  prompt, seed) into a shared content-keyed store, `cache/evaluate-base/<key>.mp4` (+
  `<key>.json`, a record), under a per-video lock; every run, sweep cell and nightly pass
  hard-links them into its own `base/` unit (a copy across filesystems) and scores them.
- The suite is the configured prompt list, or (`prompts: heldout`) the captions of the
  first `heldout_clips` accepted held-out clips, whose real videos are then exactly the
  Fréchet reference.
- Every metric carries a seeded 95% bootstrap interval over videos (`<metric>_low`,
  `<metric>_high`); the Fréchet distance is named after its features (`fd_videomae`) and
  refused (NaN and the reason in `fd_note`) below `fd_min_samples` videos per set. The
  report says a checkpoint beats another only when a paired bootstrap of the difference
  over the same (prompt, seed) videos excludes 0 (the Fréchet distance: when the two
  intervals do not overlap).

Two keys. `eval_key(cfg)` hashes the eval settings and the base model (and, for a held-out
suite, the filter key its captions come from), so one `<ekey>` folder collects every run
and checkpoint evaluated the same way:

    evaluate/index.parquet               ekey, run, checkpoint, step, <metric>[_low|_high], fd_note, videos, evaluated_at
    evaluate/<ekey>/<run>/report.md      metrics with intervals per checkpoint, verdicts vs base
    evaluate/<ekey>/<run>/_SUCCESS.json  key_of(...) and the checkpoints it covers
    evaluate/<ekey>/<run>/<checkpoint>/  p00-s42.mp4 ..., metrics.parquet, summary.json,
                                         features.npy, contact_sheet.png, ab_grid.png
    cache/evaluate-base/<key>.mp4        the base model's video of one request (+ .json)

`key_of(cfg, inputs)` adds the train and check keys: it is this pipeline's evaluate step.
A training run keeps adding checkpoints under the same train key, so the done marker
alone cannot say "done": it also records the checkpoints it covers, and a call that
finds new ones on disk evaluates just those and rewrites the marker.

    cogpipe evaluate configs/demo.yaml
"""

from __future__ import annotations

import fcntl
import gc
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cogpipe import metrics as stats
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.metrics import clip_score, features_name, video_metrics
from cogpipe.models.cogvideox import FULL_FOLDER, LORA_FILE, transformer_config, weight_dtype
from cogpipe.ratings import ratings_section
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
    sha256_json,
    stage_key,
    write_json,
    write_table,
)

VERSION = 3  # 3: shared base store, held-out suites, intervals, fd_<features>, mp4 scored; 2: A/B
BASE = "base"  # the checkpoint name of the base model (step 0: an untrained LoRA is the base)
CHECKPOINT = re.compile(r"^checkpoint-(\d{6})$")
PER_VIDEO = ["clip_score", "temporal_consistency", "dynamic_degree"]  # one value per video
METRICS = [*PER_VIDEO, "fd_videomae"]  # per checkpoint; the last follows evaluate.feature_extractor
INDEX_COLUMNS = [
    "ekey", "run", "checkpoint", "step",
    *[c for m in METRICS for c in (m, f"{m}_low", f"{m}_high")],
    "fd_note", "videos", "evaluated_at",
]  # fmt: skip
VIDEO_FIELDS = ("frames", "height", "width", "steps", "guidance", "fps")  # what changes a video
BASE_STORE = "evaluate-base"  # cache/<this>/<key>.mp4: the base model's videos
BASE_VERSION = 1  # of the base store's keys
BOOTSTRAP_SEED = 0
SHEET_FRAMES = 8  # frames across each contact-sheet row
THUMB_WIDTH = 160  # pixels per contact-sheet frame (never upscaled)
LABEL_CHARS = 48  # of a prompt in a sheet or grid label


def fd_name(ec: EvaluateConfig) -> str:
    """The Fréchet distance's column: `fd_<features>` (fd_videomae)."""
    return f"fd_{features_name(ec.feature_extractor)}"


def metric_names(ec: EvaluateConfig) -> list[str]:
    return [*PER_VIDEO, fd_name(ec)]


def higher_is_better(metric: str) -> bool:
    """Every per-video metric grows with quality; a Fréchet distance (fd_*) shrinks."""
    return not metric.startswith("fd_") and metric != "fvd"


def eval_key(cfg: PipelineConfig, inputs: dict[str, str] | None = None) -> str:
    """The eval settings and base model only: one `<ekey>` covers every run and checkpoint.

    A held-out suite (prompts: heldout) adds the filter key its captions come from
    (`inputs["filter"]`, else this config's planned filter key).
    """
    config = cfg.evaluate.key_fields() | {"model_fp": model_fingerprint(cfg.model)}
    if cfg.evaluate.heldout:
        config["suite"] = (inputs or {}).get("filter") or _filter_key(cfg)
    return stage_key("evaluate", VERSION, config, {})


def _filter_key(cfg: PipelineConfig) -> str:
    from cogpipe.pipeline import plan

    return plan(cfg, "filter")["filter"]


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    """This pipeline's evaluate step: the eval key plus the train and check keys."""
    used = {k: inputs[k] for k in ("train", "check")}
    return stage_key("evaluate", VERSION, {"ekey": eval_key(cfg, inputs)}, used)


def output_dir(ws: Workspace, cfg: PipelineConfig, key: str, inputs: dict[str, str]) -> Path:
    """`evaluate/<ekey>/<run>/`, where `<run>` is the train run's folder name."""
    return ws.root / "evaluate" / eval_key(cfg, inputs) / (cfg.name or inputs["train"])


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


# --------------------------------------------------------------------------- suite


class Request(NamedTuple):
    """One video of the suite: what `sample` needs besides the pipeline."""

    index: int  # the prompt's place in the suite
    prompt: str
    seed: int
    settings: EvaluateConfig  # frames, size, steps, guidance
    device: str

    @property
    def video(self) -> str:
        return video_name(self.index, self.seed)


def sample(pipe, request: Request) -> np.ndarray:
    """The one place evaluation samples: [F, H, W, 3] uint8 frames of a request with
    whatever adapter or transformer the pipeline holds now.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    return generate(pipe, request.settings, request.prompt, request.seed, request.device)


def heldout_clips(check: StageResult, filter: StageResult | None, n: int) -> pd.DataFrame:
    """The first `n` held-out clips (by clip_id) that check kept and filter accepted, with
    their caption: clip_id, caption, path, start, end.

    Raises:
        StageNotReady: no filter result to read captions from.
        ValueError: no held-out clip is accepted (with the counts and the way out).
    """
    from cogpipe.workspace import StageNotReady

    if filter is None:
        raise StageNotReady("evaluate.prompts: heldout needs the filter stage's curated.parquet")
    clips = read_table(Path(check.path) / "clips.parquet")
    held = clips[clips.keep & (clips.split == "heldout")]
    curated = read_table(Path(filter.path) / "curated.parquet")
    curated = curated[curated.accepted][["clip_id", "caption"]]
    rows = curated.merge(held[["clip_id", "path", "start", "end"]], on="clip_id")
    if not len(rows):
        raise ValueError(
            f"evaluate.prompts: heldout, but none of the {len(held)} held-out clips of "
            f"{check.path}/clips.parquet has an accepted caption in {filter.path}/curated.parquet"
            " (raise check.heldout_fraction or list evaluate.prompts)"
        )
    return rows.sort_values("clip_id").head(n).reset_index(drop=True)


def reference_clips(cfg: PipelineConfig, check: StageResult, suite: pd.DataFrame | None):
    """The real clips of the Fréchet distance: the held-out suite's own clips, else the
    first `real_clips` held-out clips check kept (by clip_id)."""
    if suite is not None:
        return suite
    clips = read_table(Path(check.path) / "clips.parquet")
    clips = clips[clips.keep & (clips.split == "heldout")].sort_values("clip_id")
    return clips.head(cfg.evaluate.real_clips)


def suite_requests(ec: EvaluateConfig, prompts: list[str], device: str) -> list[Request]:
    return [Request(p, prompt, seed, ec, device) for p, prompt in enumerate(prompts)
            for seed in ec.seeds]  # fmt: skip


def real_features(ws: Workspace, ekey: str, ec: EvaluateConfig, clips: pd.DataFrame,
                  features) -> np.ndarray:  # fmt: skip
    """Features [N, D] of real clips, cut like the generated videos: `frames` at `fps` from
    the clip's start (spread over the clip when it is shorter); clips that do not decode are
    left out ([0, 0] when none does). Cached per eval key and clip list."""
    spans = clips[["clip_id", "start", "end"]].astype({"start": float, "end": float})
    cache = (
        ws.root / "evaluate" / ekey / f"real-features-{sha256_json(spans.values.tolist())[:12]}.npy"
    )
    if cache.is_file():
        return np.load(cache)
    videos = []
    for r in clips.itertuples():
        times = window_times(r.start, r.end, ec.fps, ec.frames) or even_times(
            r.start, r.end, ec.frames
        )
        try:
            videos.append(read_frames(r.path, times))
        except Exception:  # a clip check accepted can still fail further in; skip it
            continue
    feats = features(videos) if videos else np.zeros((0, 0))
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, feats)
    return feats


# --------------------------------------------------------------------------- base store


def base_key(cfg: PipelineConfig, request: Request) -> str:
    """What decides a base-model video: model weights, video settings, prompt and seed."""
    ec = cfg.evaluate
    return sha256_json({
        "v": BASE_VERSION, "model_fp": model_fingerprint(cfg.model),
        "settings": {f: getattr(ec, f) for f in VIDEO_FIELDS},
        "prompt": request.prompt, "seed": request.seed,
    })[:16]  # fmt: skip


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """An mp4 written under a temporary `.mp4` name and renamed into place."""
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}-{time.time_ns()}.mp4")
    try:
        write_mp4(tmp, frames, fps)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def base_video(ws: Workspace, cfg: PipelineConfig, request: Request, pipe) -> tuple[Path, float]:
    """The store's base-model video of a request and the seconds it took to generate,
    generated now (once, under its lock: a parallel evaluation waits for it) if missing.

    Args:
        pipe: () -> the base pipeline with no adapter loaded; called only to generate.
    """
    key = base_key(cfg, request)
    store = ws.cache_dir(BASE_STORE)
    path, record = store / f"{key}.mp4", store / f"{key}.json"
    with _file_lock(store / f".{key}.lock"):
        if not path.is_file():
            started = time.time()
            frames = sample(pipe(), request)  # [F, H, W, 3] uint8
            seconds = round(time.time() - started, 3)
            write_json(record, {
                "key": key, "prompt": request.prompt, "seed": request.seed, "model": cfg.model,
                "model_fp": model_fingerprint(cfg.model), "seconds": seconds,
                "settings": {f: getattr(cfg.evaluate, f) for f in VIDEO_FIELDS},
            })  # fmt: skip
            write_video(path, frames, cfg.evaluate.fps)  # the commit: a video is there or not
    seconds = read_json(record).get("seconds", 0.0) if record.is_file() else 0.0
    return path, seconds


def read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text())


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (the rating page serves files inside evaluate/ only), a copy across devices."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- units


@dataclass
class Evaluation:
    """What every unit of one call shares: the suite, the scorers, the base pipeline (loaded
    at the first video to generate), the progress tick."""

    ws: Workspace
    cfg: PipelineConfig
    device: str
    requests: list[Request]
    clip: Clip
    features: Any = None  # a metrics.FeatureExtractor, or None: no Fréchet distance
    real: np.ndarray | None = None  # [M, D] features of the reference clips
    tick: Callable[[str], None] = lambda note: None
    _pipe: Any = None

    def pipe(self):
        if self._pipe is None:
            self._pipe = load_pipeline(self.cfg.model, self.device)  # once per call
        return self._pipe


def sample_base(ev: Evaluation, folder: Path) -> dict[str, float]:
    """Fill a base unit from the shared store (generating what it lacks). Returns the
    seconds each video took to generate, by file name."""
    seconds = {}
    for r in ev.requests:
        path, seconds[r.video] = base_video(ev.ws, ev.cfg, r, ev.pipe)
        link_or_copy(path, folder / r.video)
        ev.tick(f"{BASE} {r.video}")
    return seconds


def sample_checkpoint(
    ev: Evaluation, name: str, checkpoint: Path, folder: Path
) -> dict[str, float]:
    """Generate every request with a checkpoint loaded. Returns seconds per video."""
    seconds, pipe = {}, ev.pipe()
    with lora(pipe, checkpoint, f"step_{step_of(name):06d}"):
        for r in ev.requests:
            started = time.time()
            write_mp4(folder / r.video, sample(pipe, r), ev.cfg.evaluate.fps)
            seconds[r.video] = round(time.time() - started, 3)
            ev.tick(f"{name} {r.video}")
    return seconds


def read_video(path: Path, ec: EvaluateConfig, count: int | None = None) -> np.ndarray:
    """Frames of a written mp4 ([F, H, W, 3] uint8), or `count` of them spread over it."""
    picks = range(ec.frames) if count is None else even_indices(0, ec.frames, count)
    return read_frames(path, [(i + 0.5) / ec.fps for i in picks])


def score(ev: Evaluation, name: str, folder: Path, seconds: dict[str, float]):
    """Score every video as written: a per-video table and features [N, D] (or None)."""
    rows, feats = [], []
    for r in ev.requests:
        frames = read_video(folder / r.video, ev.cfg.evaluate)
        rows.append({"checkpoint": name, "prompt_index": r.index, "prompt": r.prompt,
                     "seed": r.seed, "video": r.video, **scores(ev.clip, frames, r.prompt),
                     "seconds": seconds.get(r.video, 0.0)})  # fmt: skip
        if ev.features is not None:
            feats.append(ev.features([frames])[0])
    return pd.DataFrame(rows), (np.stack(feats) if feats else None)


def label(name: str, request: Request) -> str:
    """`checkpoint-000200 | seed 42 | a fighter slaps his opp...`: what a grid row shows."""
    prompt = request.prompt
    if len(prompt) > LABEL_CHARS:
        prompt = prompt[: LABEL_CHARS - 3] + "..."
    return f"{name} | seed {request.seed} | {prompt}"


def draw(ev: Evaluation, name: str, folder: Path, base: Path) -> None:
    """contact_sheet.png (a row per video) and, beside the committed base unit's video of the
    same request, ab_grid.png (base | checkpoint), every row labelled."""
    from PIL import Image

    ec, sheet, grid = ev.cfg.evaluate, [], []
    for r in ev.requests:
        row = sheet_row(read_video(folder / r.video, ec, SHEET_FRAMES), label(name, r))
        sheet.append(row)
        if name != BASE and (base / r.video).is_file():
            left = sheet_row(read_video(base / r.video, ec, SHEET_FRAMES), label(BASE, r))
            grid.append(np.concatenate([left, row], axis=1))
    Image.fromarray(np.concatenate(sheet, 0)).save(folder / "contact_sheet.png")
    if grid:
        Image.fromarray(np.concatenate(grid, 0)).save(folder / "ab_grid.png")


def summarise(metrics: pd.DataFrame, feats: np.ndarray | None, real: np.ndarray | None,
              ec: EvaluateConfig) -> dict[str, Any]:  # fmt: skip
    """A unit's numbers: the mean of each per-video metric, the Fréchet distance, each with
    its bootstrap interval, and why the distance is missing (fd_note)."""
    out: dict[str, Any] = {}
    for m in PER_VIDEO:
        values = metrics[m].to_numpy(np.float64)
        out[m] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{m}_low"], out[f"{m}_high"] = stats.bootstrap_mean(
            values, ec.bootstrap, BOOTSTRAP_SEED
        )
    name, nan = fd_name(ec), float("nan")
    out |= {name: nan, f"{name}_low": nan, f"{name}_high": nan, "fd_note": None}
    if feats is None or real is None:
        out["fd_note"] = "off (evaluate.video_features is not set)"
        return out | {"videos": len(metrics)}
    out["fd_note"] = stats.frechet_refusal(name, len(feats), len(real), ec.fd_min_samples)
    if out["fd_note"] is None:
        out[name] = stats.frechet_distance(feats, real)
        out[f"{name}_low"], out[f"{name}_high"] = stats.bootstrap_frechet(
            feats, real, ec.bootstrap, BOOTSTRAP_SEED
        )
    return out | {"videos": len(metrics)}


def evaluate_unit(ev: Evaluation, name: str, checkpoint: Path | None, folder: Path) -> dict:
    """Sample, score, draw and commit one checkpoint (None: the base model) into `folder`.
    Returns the unit's summary (`summarise`)."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if checkpoint is None:
            seconds = sample_base(ev, tmp)
        else:
            seconds = sample_checkpoint(ev, name, checkpoint, tmp)
        metrics, feats = score(ev, name, tmp, seconds)
        draw(ev, name, tmp, folder.parent / BASE)
        summary = summarise(metrics, feats, ev.real, ev.cfg.evaluate)
        write_table(tmp / "metrics.parquet", metrics)
        if feats is not None:
            np.save(tmp / "features.npy", feats)
        write_json(tmp / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- outputs


def sheet_row(frames: np.ndarray, text: str) -> np.ndarray:
    """[F, H, W, 3] -> one contact-sheet row [h, n * w, 3]: n frames spread over the video,
    `text` on a dark band in its top-left corner."""
    from PIL import Image, ImageDraw

    f, h, w, _ = frames.shape
    tw = min(THUMB_WIDTH, w)
    th = max(round(h * tw / w), 1)
    indices = even_indices(0, f, min(SHEET_FRAMES, f))
    picks = [Image.fromarray(frames[i]).resize((tw, th)) for i in indices]
    row = Image.fromarray(np.concatenate([np.asarray(x) for x in picks], axis=1))  # [th, n * tw, 3]
    pen = ImageDraw.Draw(row)
    box = pen.textbbox((2, 1), text)
    pen.rectangle((0, 0, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    pen.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(row)


def scores(clip: Clip, frames: np.ndarray, prompt: str) -> dict[str, float]:
    """CLIP score, temporal consistency and dynamic degree of one video (NaN for the two
    motion metrics of a one-frame video)."""
    if len(frames) < 2:
        nan = float("nan")
        return {"clip_score": clip_score(clip, frames, prompt), "temporal_consistency": nan,
                "dynamic_degree": nan}  # fmt: skip
    return video_metrics(clip, frames, prompt)


# --------------------------------------------------------------------------- index


def index_path(ws: Workspace) -> Path:
    return ws.root / "evaluate" / "index.parquet"


def read_index(ws: Workspace) -> pd.DataFrame:
    """Every evaluated (ekey, run, checkpoint); empty with the right columns before the
    first. Rows written before a column existed read it as NaN (older ones keep theirs)."""
    path = index_path(ws)
    if not path.is_file():
        return pd.DataFrame(columns=INDEX_COLUMNS)
    index = read_table(path)
    return index.reindex(columns=[*INDEX_COLUMNS, *(c for c in index if c not in INDEX_COLUMNS)])


def _evaluated(ws: Workspace, ekey: str, run: str) -> pd.DataFrame:
    """The index rows of one run under one eval key."""
    index = read_index(ws)
    return index[(index.ekey == ekey) & (index.run == run)]


def _append_index(ws: Workspace, ekey: str, run: str, name: str, summary: dict) -> None:
    row = {"ekey": ekey, "run": run, "checkpoint": name, "step": step_of(name), **summary,
           "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    with _file_lock(ws.root / "evaluate" / ".index.lock"):  # other runs append too
        index = read_index(ws)
        rows = pd.DataFrame([row])
        index = pd.concat([index, rows], ignore_index=True) if len(index) else rows
        write_table(index_path(ws), index.reindex(columns=read_columns(index)))


def read_columns(index: pd.DataFrame) -> list[str]:
    return [*INDEX_COLUMNS, *(c for c in index.columns if c not in INDEX_COLUMNS)]


# --------------------------------------------------------------------------- report


def compare(out: Path, a: pd.Series, b: pd.Series, metric: str, resamples: int):
    """(b - a, low, high, verdict) of one metric between two units of a run: a paired
    bootstrap of the difference over the videos both have (per-video metrics), or whether
    the two 95% intervals overlap (a Fréchet distance, a set statistic)."""
    if metric not in PER_VIDEO:
        diff, better = b[metric] - a[metric], higher_is_better(metric)
        low, high = (
            b[f"{metric}_low"] - a[f"{metric}_high"],
            b[f"{metric}_high"] - a[f"{metric}_low"],
        )
        return diff, low, high, stats.verdict(low, high, better)  # non-overlap <=> 0 outside
    ma, mb = (read_table(out / u.checkpoint / "metrics.parquet") for u in (a, b))
    pairs = ma.merge(mb, on="video", suffixes=("_a", "_b"))
    diff, low, high = stats.paired_difference(
        pairs[f"{metric}_a"], pairs[f"{metric}_b"], resamples, BOOTSTRAP_SEED
    )
    return diff, low, high, stats.verdict(low, high, higher_is_better(metric))


def winner(out: Path, scores: pd.DataFrame, metric: str, resamples: int) -> str:
    """The best unit on `metric` when it beats every other one (`compare`), else why not."""
    ranked = scores.dropna(subset=[metric])
    if len(ranked) < 2:
        return "no winner (fewer than two units with a value)"
    rows = ranked.sort_values(metric, ascending=not higher_is_better(metric))
    best, ties = rows.iloc[0], []
    for _, other in rows.iloc[1:].iterrows():
        if compare(out, other, best, metric, resamples)[3] != "better":
            ties.append(other.checkpoint)
    if ties:
        return (
            f"no winner: {best.checkpoint} is best but not beyond the interval of {', '.join(ties)}"
        )
    return f"**{best.checkpoint}** beats every other checkpoint and the base"


def _cell(value: float, low: float, high: float, digits: int) -> str:
    if not np.isfinite(value):
        return "-"
    bounds = f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else ""
    return f"{value:.{digits}f}{bounds}"


def write_report(out: Path, cfg: PipelineConfig, ekey: str, run: str, scores: pd.DataFrame,
                 prompts: list[str]) -> None:  # fmt: skip
    """`report.md`: every metric with its 95% interval per checkpoint, each checkpoint
    against the base model, the winner per metric, the human A/B win rates so far (the
    rating page rewrites that section as ratings come in), and `metrics_vs_step.png`."""
    ec, names = cfg.evaluate, metric_names(cfg.evaluate)
    fd, notes = names[-1], scores.fd_note.dropna().unique()
    suite = (
        f"captions of {len(prompts)} held-out clips" if ec.heldout else f"{len(prompts)} prompts"
    )
    lines = [
        f"# Evaluation of run `{run}`", "",
        f"Eval key `{ekey}`, model `{cfg.model}`, CLIP `{ec.clip_model}`: {suite} x "
        f"{len(ec.seeds)} seeds, {ec.frames} frames {ec.height}x{ec.width}, {ec.steps} steps, "
        f"guidance {ec.guidance}. Intervals: 95% bootstrap over videos ({ec.bootstrap} "
        f"resamples). {fd}: {'; '.join(map(str, notes)) or 'to the held-out clips'}.", "",
        "![metrics against step](metrics_vs_step.png)", "",
        "| checkpoint | step | " + " | ".join(n.replace("_", " ") for n in names)
        + " | videos | contact sheet | A/B |",
        "| --- | ---: |" + " ---: |" * len(names) + " ---: | --- | --- |",
    ]  # fmt: skip
    for _, r in scores.iterrows():
        ab = (
            f"[png]({r.checkpoint}/ab_grid.png)"
            if (out / r.checkpoint / "ab_grid.png").is_file()
            else ""
        )
        cells = [_cell(r[m], r[f"{m}_low"], r[f"{m}_high"], 4 if m != "clip_score" else 2)
                 for m in names]  # fmt: skip
        lines.append(f"| {r.checkpoint} | {r.step} | " + " | ".join(cells)
                     + f" | {r.videos} | [png]({r.checkpoint}/contact_sheet.png) | {ab} |")  # fmt: skip
    lines += against_base(out, scores, names, ec.bootstrap)
    lines += ["", "## Winner per metric", ""]
    lines += [f"- {m.replace('_', ' ')}: {winner(out, scores, m, ec.bootstrap)}" for m in names]
    lines += ["", ratings_section(Workspace(cfg.workspace), ekey, run)]  # cogpipe rate refreshes it
    lines += ["Prompts:", ""] + [f"{i}. {p}" for i, p in enumerate(prompts)]
    plot_metrics(scores, names, out / "metrics_vs_step.png")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def against_base(out: Path, scores: pd.DataFrame, names: list[str], resamples: int) -> list[str]:
    """The report's table of each checkpoint minus the base model, with its verdict."""
    base = scores[scores.checkpoint == BASE]
    if not len(base) or len(scores) < 2:
        return []
    lines = ["", "## Against the base model", "",
             "Checkpoint minus base, 95% interval, verdict. Per-video metrics: paired bootstrap of "
             "the difference over the same (prompt, seed) videos; a Fréchet distance: the two "
             "intervals must not overlap. A checkpoint beats the base only when the interval "
             "excludes 0.", "",
             "| checkpoint | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "| --- |" + " --- |" * len(names)]  # fmt: skip
    for _, r in scores[scores.checkpoint != BASE].iterrows():
        cells = []
        for m in names:
            diff, low, high, verdict = compare(out, base.iloc[0], r, m, resamples)
            text = {"better": "**beats base**", "worse": "worse than base"}.get(verdict, verdict)
            cells.append(
                "-" if not np.isfinite(diff) else f"{diff:+.4f} [{low:+.4f}, {high:+.4f}] {text}"
            )
        lines.append(f"| {r.checkpoint} | " + " | ".join(cells) + " |")
    return lines


def plot_metrics(scores: pd.DataFrame, names: list[str], path: Path) -> None:
    """One panel per metric against the training step: checkpoints as a line with their 95%
    band, the base model as a dashed horizontal line with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in names if scores[m].notna().any()]
    fig, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(4 * max(len(shown), 1), 3), squeeze=False
    )
    tuned, base = scores[scores.checkpoint != BASE], scores[scores.checkpoint == BASE]
    for ax, m in zip(axes[0], shown, strict=False):
        low, high = tuned[f"{m}_low"].astype(float), tuned[f"{m}_high"].astype(float)
        ax.fill_between(tuned.step, low, high, alpha=0.25, label="95% interval")
        ax.plot(tuned.step, tuned[m], marker="o", label="checkpoint")
        if len(base) and np.isfinite(base[m].iloc[0]):
            b = base.iloc[0]
            ax.axhline(b[m], color="grey", linestyle="--", label="base")
            if np.isfinite(b[f"{m}_low"]):
                ax.axhspan(b[f"{m}_low"], b[f"{m}_high"], color="grey", alpha=0.15)
        ax.set_xlabel("step")
        ax.set_title(
            m.replace("_", " ") + (" (lower is better)" if not higher_is_better(m) else "")
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def release_memory(device: str) -> None:
    """Collect garbage and, on a GPU, hand cached blocks back to the driver."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def prepare(ws: Workspace, cfg: PipelineConfig, ekey: str, upstream: dict[str, StageResult],
            progress: Progress, total: int) -> Evaluation:  # fmt: skip
    """The suite, CLIP and (with `video_features`) the reference clips' features; a missing
    held-out suite fails here, in seconds, before any model is loaded."""
    ec, device = cfg.evaluate, resolve_device(cfg.evaluate.device)
    prompts, suite = load_suite(cfg, upstream)
    ev = Evaluation(ws, cfg, device, suite_requests(ec, prompts, device), clip=None)
    if ec.video_features:
        ev.features = stats.load_features(ec.feature_extractor, ec.video_features, device)
        ev.real = real_features(
            ws, ekey, ec, reference_clips(cfg, upstream["check"], suite), ev.features
        )
    ev.clip = load_clip(ec.clip_model, device)
    done = 0

    def tick(note: str) -> None:
        nonlocal done
        done += 1
        progress(done, total, note)

    ev.tick = tick
    return ev


def load_suite(cfg: PipelineConfig, upstream: dict[str, StageResult]):
    """The suite's prompts and, for a held-out suite, its clips (`heldout_clips`; else None)."""
    ec = cfg.evaluate
    if not ec.heldout:
        return list(ec.prompts), None
    clips = heldout_clips(upstream["check"], upstream.get("filter"), ec.heldout_clips)
    return list(clips.caption), clips


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
        upstream: {"train": StageResult whose path is the run folder, "check": StageResult,
            "filter": StageResult}. Check's held-out clips are the reference of the Fréchet
            distance (with `evaluate.video_features`); filter's accepted captions of them
            are the suite with `evaluate.prompts: heldout` (filter is read only then).
        progress: called as (videos done, videos to make, checkpoint and video).

    Returns:
        The stage result. counts: checkpoints_evaluated (LoRA checkpoints generated by the
        call that wrote the marker), checkpoints_total (LoRA checkpoints in the run),
        videos (written by that call, base included). stats: clip_score per checkpoint,
        base included, and the checkpoints the marker covers.

    Raises:
        ValueError: `prompts: heldout` and no held-out clip has an accepted caption.
    """
    started = time.time()
    inputs = {name: r.key for name, r in upstream.items()}
    key, ekey, run_dir = key_of(cfg, inputs), eval_key(cfg, inputs), Path(upstream["train"].path)
    out = output_dir(ws, cfg, key, inputs)
    checkpoints = list_checkpoints(run_dir)
    wanted = [BASE, *checkpoints]
    record = ws.read_success(out) or {}
    if record.get("key") == key and is_current(ws, cfg, record):
        return ws.result("evaluate", out)

    clean_stale_tmp(out)
    for name in set(wanted) - set(_evaluated(ws, ekey, out.name).checkpoint):
        # A unit committed just before a crash, whose index row was never appended.
        if (out / name / "summary.json").is_file():
            _append_index(ws, ekey, out.name, name, read_json(out / name / "summary.json"))
    done = set(_evaluated(ws, ekey, out.name).checkpoint)
    pending = {n: checkpoints.get(n) for n in wanted if n not in done}
    videos = 0
    if pending:
        videos = _evaluate_pending(ws, cfg, ekey, out, pending, upstream, progress)
    scores = (
        _evaluated(ws, ekey, out.name)
        .query("checkpoint in @wanted")
        .drop_duplicates("checkpoint", keep="last")
        .assign(order=lambda d: d.checkpoint.map(wanted.index))
        .sort_values("order")
    )
    write_report(out, cfg, ekey, out.name, scores, load_suite(cfg, upstream)[0])
    counts = {
        "checkpoints_evaluated": len([n for n in pending if n != BASE]),
        "checkpoints_total": len(checkpoints),
        "videos": videos,
    }
    pairs = zip(scores.checkpoint, scores.clip_score, strict=True)
    stats_ = {
        "clip_score": {c: round(float(s), 4) for c, s in pairs},
        "checkpoints": wanted,
        "run_dir": str(run_dir),
    }
    return ws.finish(StageResult("evaluate", key, str(out), counts, stats=stats_), started)


def _evaluate_pending(ws: Workspace, cfg: PipelineConfig, ekey: str, out: Path,
                      pending: dict[str, Path | None], upstream: dict[str, StageResult],
                      progress: Progress) -> int:  # fmt: skip
    """Evaluate each pending checkpoint as one committed unit. Returns videos written."""
    ec = cfg.evaluate
    total = len(pending) * len(load_suite(cfg, upstream)[0]) * len(ec.seeds)
    try:
        ev = prepare(ws, cfg, ekey, upstream, progress, total)
        for name, checkpoint in pending.items():
            summary = evaluate_unit(ev, name, checkpoint, out / name)
            _append_index(ws, ekey, out.name, name, summary)
        ev = None  # the pipeline, CLIP and features go before the memory is released
    finally:
        release_memory(resolve_device(ec.device))
    return total
