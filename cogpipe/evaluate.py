"""Evaluate: every checkpoint of a training run, and the base model, on one prompt suite.

A unit of work is one checkpoint: each (prompt, seed) request of the suite is sampled
(`sample`) with that LoRA loaded on the base pipeline (loaded once per call, and only when
something must be generated; a full fine-tune's checkpoint swaps in its `transformer/`),
written as an mp4, then scored from the mp4 as written (CLIP score, temporal consistency,
dynamic degree, features for the Fréchet distance), drawn (contact sheet; A/B grid beside
the base at the same prompt and seed) and committed: the unit's folder is written under a
temporary name and renamed into place, then its row goes into `evaluate/index.parquet`; the
checkpoints listed there are never generated again.

Concurrent calls (two `cogpipe run`s, a nightly pass beside a manual one, a Prefect retry
while the first attempt still runs) share the work: each unit is made under its lock
(`Workspace.hold`, freed by the system when its holder dies, SIGKILL included) by one
process; a call skips the units another holds, makes the rest, then waits for the
skipped ones and makes any whose holder died before committing it. The index is rewritten
under its own lock, one row per (ekey, run, checkpoint), so no unit is ever listed twice.

What is notable:
- The base model's videos come from the shared content-keyed store (`cogpipe.base_suite`):
  generated once per (model, video settings, prompt, seed) for every run, sweep cell and
  nightly pass, hard-linked into each run's `base/` unit and scored there.
- The suite is the configured prompt list, or (`prompts: heldout`) the captions of the
  first `heldout_clips` accepted held-out clips, whose real videos are then exactly the
  Fréchet reference (`cogpipe.heldout` reads the held-out clips).
- A run trained as IC-LoRA or TIC-FT is evaluated as it was trained: each request gets a
  held-out clip (with `prompts: heldout` the clip its caption belongs to, else prompt i
  takes clip i mod N of the N reference clips) and its checkpoint videos are sampled on
  that clip's condition (`sampling.condition_for`, `sampling.sample`). TIC-FT samples the
  layout's whole condition + buffer + target sequence and keeps the target frames, so its
  videos are shorter than `evaluate.frames`: scoring and drawing read the frames in the
  file. Beside each result `pNN-sS.mp4` (what is scored) lies `pNN-sS-side.mp4`
  (condition | result). The base stays text-to-video: it has no conditioned mode.
- An image-to-video model (5B-I2V, 1.5-5B-I2V: `sampling.model_traits`, from its configs)
  is sampled with CogVideoXImageToVideoPipeline, base and checkpoints alike, each request
  from the first frame of its held-out clip (paired as for IC-LoRA: with `prompts:
  heldout` the clip its caption belongs to, else prompt i takes reference clip i mod N),
  resized and centre-cropped to evaluate's size (`heldout.first_frames`). The contact
  sheets show image | result. Conditioned modes are text-to-video only. The eval key is
  unchanged: the model fingerprint already tells image-to-video models apart.
- `evaluate.frames`, `height` and `width` must fit the model (`sampling.check_fits`:
  CogVideoX 1.5's 16k+1 frames up to 768x1360, 5B-I2V's fixed 480x720), checked before
  anything loads.
- `evaluate.step_cache` (first_block, pab, faster: `cogpipe.step_cache`) samples the
  checkpoints' videos with a step-reuse cache, faster at a deviation from the exact path;
  it enters the eval key only when on. The base suite, the reference, is always exact.
- Every metric carries a seeded 95% bootstrap interval; the report and its comparisons
  (`cogpipe.eval_report`) call a difference only when its interval excludes 0. The models
  (CLIP, base pipeline, a checkpoint's LoRA or full transformer) load in
  `cogpipe.eval_models`; the names other code uses stay importable from here.

Two keys. `eval_key(cfg)` hashes the eval settings and the base model (for a held-out
suite, the filter key its captions come from; for a conditioned run, its train mode), so
one `<ekey>` folder collects every run and checkpoint evaluated the same way:

    evaluate/index.parquet               ekey, run, checkpoint, step, <metric>[_low|_high], fd_note, videos, evaluated_at
    evaluate/<ekey>/<run>/report.md      metrics with intervals per checkpoint, verdicts vs base
    evaluate/<ekey>/<run>/_SUCCESS.json  key_of(...) and the checkpoints it covers
    evaluate/<ekey>/<run>/<checkpoint>/  p00-s42.mp4 (ic-lora, tic-ft: + p00-s42-side.mp4) ...,
                                         metrics.parquet, summary.json, features.npy,
                                         contact_sheet.png, ab_grid.png
    cache/evaluate-base/<key>.mp4        the base model's video of one request (+ .json)

`key_of(cfg, inputs)` adds the train and check keys: it is this pipeline's evaluate step.
A training run keeps adding checkpoints under the same train key, so the done marker
alone cannot say "done": it also records the checkpoints it covers, and a call that
finds new ones on disk evaluates just those and rewrites the marker.

    cogpipe evaluate demo/demo.yaml
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from cogpipe import sampling, step_cache
from cogpipe.base_suite import (  # noqa: F401  (BASE_STORE re-exported)
    BASE_STORE,
    base_video,
    link_or_copy,
    read_json,
)
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.eval_models import (  # noqa: F401  (re-exported: release_memory, to_uint8)
    Clip,
    generate,
    is_full,
    load_clip,
    load_pipeline,
    lora,
    release_memory,
    to_uint8,
)
from cogpipe.eval_report import (  # noqa: F401  (re-exported: PER_VIDEO, higher_is_better, metric_names)
    BASE,
    CONDITIONED,
    METRICS,
    PER_VIDEO,
    SHEET_FRAMES,
    higher_is_better,
    label,
    metric_names,
    sheet_row,
    summarise,
    write_report,
)
from cogpipe.heldout import (
    conditions,
    first_frames,
    heldout_clips,
    paired_clips,
    real_features,
    reference_clips,
)
from cogpipe.metrics import clip_score, load_features, video_metrics
from cogpipe.models.cogvideox import LORA_FILE
from cogpipe.ratings import report_lock
from cogpipe.stages import stage_keys
from cogpipe.video import (
    even_indices,
    probe_video,
    read_frames,
    write_mp4,
)
from cogpipe.workspace import (
    Busy,
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
    write_json,
    write_table,
)

VERSION = 3  # 3: shared base store, held-out suites, intervals, fd_<features>, mp4 scored; 2: A/B
CHECKPOINT = re.compile(r"^checkpoint-(\d{6})$")
INDEX_COLUMNS = [
    "ekey",
    "run",
    "checkpoint",
    "step",
    *[c for m in METRICS for c in (m, f"{m}_low", f"{m}_high")],
    "fd_note",
    "videos",
    "evaluated_at",
]
INDEX_KEY = ["ekey", "run", "checkpoint"]  # one row each


def eval_key(cfg: PipelineConfig, inputs: dict[str, str] | None = None) -> str:
    """The eval settings and base model only: one `<ekey>` covers every run and checkpoint.

    A held-out suite (prompts: heldout) adds the filter key its captions come from
    (`inputs["filter"]`, else this config's planned filter key). An IC-LoRA or TIC-FT run
    adds its mode: its checkpoints are sampled on held-out clips' conditions, another way
    of evaluating (a LoRA or full run's key is what it was before conditioned modes).
    """
    ec = cfg.evaluate
    models = {
        "clip_model": model_fingerprint(ec.clip_model),
        "model_fp": model_fingerprint(cfg.model),
    }
    if ec.video_features is not None:
        models["video_features"] = model_fingerprint(ec.video_features)
    config = ec.key_fields() | models  # the models by fingerprint, not path
    if ec.heldout:
        config["suite"] = (inputs or {}).get("filter") or _filter_key(cfg)
    if cfg.train.mode in CONDITIONED:
        config["conditioned"] = cfg.train.mode
    return stage_key("evaluate", VERSION, config, {})


def _filter_key(cfg: PipelineConfig) -> str:
    return stage_keys(cfg, "filter")["filter"]


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    """This pipeline's evaluate step: the eval key plus the train and check keys."""
    used = {k: inputs[k] for k in ("train", "check")}
    return stage_key("evaluate", VERSION, {"ekey": eval_key(cfg, inputs)}, used)


def output_dir(ws: Workspace, cfg: PipelineConfig, key: str, inputs: dict[str, str]) -> Path:
    """`evaluate/<ekey>/<run>/`, where `<run>` is the train run's folder name."""
    return ws.root / "evaluate" / eval_key(cfg, inputs) / (cfg.name or inputs["train"])


def list_checkpoints(run_dir: Path) -> dict[str, Path]:
    """Committed checkpoints of a run, by step: {"checkpoint-000500": folder}.

    Only folders named exactly `checkpoint-{step:06d}` that hold the LoRA weights or a
    full fine-tune's transformer count, so a checkpoint still being written
    (`.tmp-checkpoint-...`) is never picked up.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    found = [
        p
        for p in run_dir.iterdir()
        if CHECKPOINT.match(p.name) and ((p / LORA_FILE).is_file() or is_full(p))
    ]
    return {p.name: p for p in sorted(found)}  # zero-padded: name order is step order


def step_of(checkpoint: str) -> int:
    m = CHECKPOINT.match(checkpoint)
    return int(m.group(1)) if m else 0  # base: step 0


def is_current(ws: Workspace, cfg: PipelineConfig, record: dict[str, Any]) -> bool:
    """Whether a done marker still covers every checkpoint in its run folder.

    The key stays the same while a run adds checkpoints, so "done for this key" needs
    this too (for `stages.finished` and the Prefect cache key).
    """
    stats = record.get("stats", {})
    if "run_dir" not in stats:
        return False
    return stats.get("checkpoints") == [BASE, *list_checkpoints(Path(stats["run_dir"]))]


# --------------------------------------------------------------------------- suite


class Request(NamedTuple):
    """One video of the suite: what `sample` needs besides the pipeline."""

    index: int  # the prompt's place in the suite
    prompt: str
    seed: int
    settings: EvaluateConfig  # frames, size, steps, guidance
    device: str
    condition: sampling.Condition | None = None  # ic-lora, tic-ft checkpoints: a held-out clip's
    clip_id: str | None = None  # the held-out clip the condition (or image) comes from
    image: np.ndarray | None = None  # image-to-video: uint8 [H, W, 3], its clip's first frame

    @property
    def video(self) -> str:
        return video_name(self.index, self.seed)

    @property
    def side(self) -> str:
        """The condition | result video of a conditioned request."""
        return video_name(self.index, self.seed).replace(".mp4", "-side.mp4")

    @property
    def plain(self) -> Request:
        """The same prompt and seed without a condition (an image-to-video model keeps its
        image) and without a step cache (the base suite is the exact reference): what the
        base model is asked."""
        exact = self.settings.model_copy(update={"step_cache": "none"})
        clip_id = None if self.image is None else self.clip_id
        return self._replace(condition=None, clip_id=clip_id, settings=exact)


def video_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:02d}-s{seed}.mp4"


def sample(pipe, request: Request) -> np.ndarray:
    """The one place evaluation samples: [F, H, W, 3] uint8 frames of a request with
    whatever adapter or transformer the pipeline holds now; a request with a condition
    through `sampling.sample` (tic-ft: the target frames of the layout's whole sequence).

    A step cache (`evaluate.step_cache`) is on for the video when the settings name one.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    c, ec = request.condition, request.settings
    if c is None:
        cache = (ec.step_cache, ec.step_cache_threshold, ec.steps, ec.guidance > 1)
        with step_cache.cached(pipe.transformer, *cache):
            return generate(pipe, ec, request.prompt, request.seed, request.device, request.image)
    fields = {"frames": c.layout.video_frames} if c.mode == "tic-ft" else {}
    sampled = sampling.request_for(ec, request.prompt, request.seed, condition=c, **fields)
    return sampling.sample(pipe, sampled, request.device)


class Suite(NamedTuple):
    """What a run is evaluated on: the prompts, the held-out suite's clips (prompts: heldout;
    else None) and, for ic-lora and tic-ft runs and image-to-video models, the held-out clip
    of each prompt."""

    prompts: list[str]
    clips: pd.DataFrame | None = None  # clip_id, caption, path, start, end
    paired: pd.DataFrame | None = None  # one clip row per prompt; None: text-to-video
    reference: int = 0  # the held-out clips the prompts are paired with (i mod this)
    image_to_video: bool = False  # each prompt's image: its paired clip's first frame

    @property
    def conditioned(self) -> list[str] | None:
        """The clip_id each prompt is conditioned on (ic-lora, tic-ft), for the report."""
        return None if self.paired is None or self.image_to_video else list(self.paired.clip_id)


def suite_requests(
    ec: EvaluateConfig,
    prompts: list[str],
    device: str,
    paired: pd.DataFrame | None = None,
    given: list[sampling.Condition] | None = None,
    images: list[np.ndarray] | None = None,
) -> list[Request]:
    """Every (prompt, seed) of the suite, with its prompt's condition or image, and clip,
    where `given` or `images`."""
    ids = [None] * len(prompts) if paired is None else list(paired.clip_id)
    given = given or [None] * len(prompts)
    images = images or [None] * len(prompts)
    return [
        Request(p, prompt, seed, ec, device, given[p], ids[p], images[p])
        for p, prompt in enumerate(prompts)
        for seed in ec.seeds
    ]


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
            self._pipe = load_pipeline(self.cfg.model, self.device, self.cfg.evaluate)
        return self._pipe


def stored_base(ev: Evaluation, request: Request) -> tuple[Path, float]:
    """The shared store's base-model video of a request and the seconds it took, generated
    now (text-to-video whatever the run's mode) if the store lacks it."""
    return base_video(ev.ws, ev.cfg, request, lambda: sample(ev.pipe(), request.plain))


def sample_base(ev: Evaluation, folder: Path) -> dict[str, float]:
    """Fill a base unit from the shared store (generating what it lacks). Returns the
    seconds each video took to generate, by file name."""
    seconds = {}
    for r in ev.requests:
        path, seconds[r.video] = stored_base(ev, r)
        link_or_copy(path, folder / r.video)
        ev.tick(f"{BASE} {r.video}")
    return seconds


def sample_checkpoint(
    ev: Evaluation, name: str, checkpoint: Path, folder: Path
) -> dict[str, float]:
    """Generate every request with a checkpoint loaded (a conditioned request: the result
    and, beside it, `-side.mp4`, condition | result). Returns seconds per video."""
    seconds, pipe, fps = {}, ev.pipe(), ev.cfg.evaluate.fps
    with lora(pipe, checkpoint, f"step_{step_of(name):06d}", ev.cfg.evaluate):
        for r in ev.requests:
            started = time.time()
            frames = sample(pipe, r)  # [F, H, W, 3] uint8
            write_mp4(folder / r.video, frames, fps)
            if r.condition is not None:
                write_mp4(folder / r.side, sampling.side_by_side(r.condition.frames, frames), fps)
            seconds[r.video] = round(time.time() - started, 3)
            ev.tick(f"{name} {r.video}")
    return seconds


def read_video(path: Path, ec: EvaluateConfig, count: int | None = None) -> np.ndarray:
    """The frames in a written mp4 ([F, H, W, 3] uint8; F as written, which for TIC-FT is
    not `evaluate.frames`), or `count` of them spread over it."""
    info, reason = probe_video(path)
    if reason:
        raise RuntimeError(f"cannot read back {path}: {reason}")
    frames = info["frames"]
    picks = range(frames) if count is None else even_indices(0, frames, count)
    return read_frames(path, [(i + 0.5) / ec.fps for i in picks])


def score(ev: Evaluation, name: str, folder: Path, seconds: dict[str, float]):
    """Score every video as written: a per-video table and features [N, D] (or None); a
    conditioned checkpoint's rows name their held-out clip (condition_clip)."""
    rows, feats = [], []
    for r in ev.requests:
        frames = read_video(folder / r.video, ev.cfg.evaluate)
        rows.append(
            {
                "checkpoint": name,
                "prompt_index": r.index,
                "prompt": r.prompt,
                "seed": r.seed,
                "video": r.video,
                **scores(ev.clip, frames, r.prompt),
                "seconds": seconds.get(r.video, 0.0),
            }
        )
        if name != BASE and r.clip_id is not None:
            rows[-1]["condition_clip"] = r.clip_id
        if ev.features is not None:
            feats.append(ev.features([frames])[0])
    return pd.DataFrame(rows), (np.stack(feats) if feats else None)


def draw(ev: Evaluation, name: str, folder: Path, base: dict[str, Path] | None) -> None:
    """contact_sheet.png (a row per video: a conditioned checkpoint's shows condition | result)
    and, for a checkpoint, ab_grid.png (base | checkpoint) beside the base model's video of
    the same request (`base`: the store's, by file name), every row labelled."""
    from PIL import Image

    ec, sheet, grid = ev.cfg.evaluate, [], []
    for r in ev.requests:
        row = sheet_row(read_video(folder / r.video, ec, SHEET_FRAMES), label(name, r))
        if name != BASE and r.condition is not None:
            given = sheet_row(r.condition.frames, f"condition {r.clip_id}")
            row = np.concatenate([given, row], axis=1)
        elif r.image is not None:  # image-to-video: the first frame it was given
            given = sheet_row(r.image[None], f"image {r.clip_id}")
            row = np.concatenate([given, row], axis=1)
        sheet.append(row)
        if base is not None:
            left = sheet_row(read_video(base[r.video], ec, SHEET_FRAMES), label(BASE, r))
            grid.append(np.concatenate([left, row], axis=1))
    Image.fromarray(np.concatenate(sheet, 0)).save(folder / "contact_sheet.png")
    if grid:
        Image.fromarray(np.concatenate(grid, 0)).save(folder / "ab_grid.png")


def evaluate_unit(ev: Evaluation, name: str, checkpoint: Path | None, folder: Path) -> dict:
    """Sample, score, draw and commit one checkpoint (None: the base model) into `folder`.
    Returns the unit's summary (`summarise`).

    A checkpoint's A/B side is the store's base video, made first if missing (before the
    checkpoint loads), so a unit never depends on whether another process has committed
    the run's base unit yet.
    """
    base = None if checkpoint is None else {r.video: stored_base(ev, r)[0] for r in ev.requests}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        if checkpoint is None:
            seconds = sample_base(ev, tmp)
        else:
            seconds = sample_checkpoint(ev, name, checkpoint, tmp)
        metrics, feats = score(ev, name, tmp, seconds)
        draw(ev, name, tmp, base)
        summary = summarise(metrics, feats, ev.real, ev.cfg.evaluate)
        write_table(tmp / "metrics.parquet", metrics)
        if feats is not None:
            np.save(tmp / "features.npy", feats)
        write_json(tmp / "summary.json", summary)
    return summary


def scores(clip: Clip, frames: np.ndarray, prompt: str) -> dict[str, float]:
    """CLIP score, temporal consistency and dynamic degree of one video (NaN for the two
    motion metrics of a one-frame video)."""
    if len(frames) < 2:
        nan = float("nan")
        return {
            "clip_score": clip_score(clip, frames, prompt),
            "temporal_consistency": nan,
            "dynamic_degree": nan,
        }
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


def upsert_index(
    ws: Workspace, ekey: str, run: str, name: str, summary: dict, replace: bool = True
) -> None:
    """Put a unit's row into the shared index under its lock (read, modify, rename): the row
    of the same (ekey, run, checkpoint) is replaced, never doubled. `replace=False` keeps a
    row already there (a unit found committed: its row is as good as ours)."""
    row = {
        "ekey": ekey,
        "run": run,
        "checkpoint": name,
        "step": step_of(name),
        **summary,
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with ws.hold("evaluate-index"):  # every run and process of the workspace writes it
        index = read_index(ws)
        listed = (index.ekey == ekey) & (index.run == run) & (index.checkpoint == name)
        if listed.any() and not replace:
            return
        index = (
            pd.concat([index, pd.DataFrame([row])], ignore_index=True)
            if len(index)
            else (pd.DataFrame([row]))
        )
        write_table(index_path(ws), ordered(index).reindex(columns=read_columns(index)))


def ordered(index: pd.DataFrame) -> pd.DataFrame:
    """One row per (ekey, run, checkpoint), the last written; each run's rows together by
    step, runs in the order they first appeared. Whichever process commits first, the
    index reads the same (and an index doubled by an older version is repaired)."""
    group = index.groupby(["ekey", "run"], sort=False).ngroup()
    index = index.assign(_run=group).drop_duplicates(INDEX_KEY, keep="last")
    index = index.sort_values(["_run", "step", "checkpoint"], kind="stable")
    return index.drop(columns="_run").reset_index(drop=True)


def _index_committed(ws: Workspace, ekey: str, run: str, folder: Path) -> bool:
    """List a committed unit folder in the index if it is missing there (its committer
    died before writing the row). False: the folder is not committed."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return False
    upsert_index(ws, ekey, run, folder.name, read_json(summary), replace=False)
    return True


def read_columns(index: pd.DataFrame) -> list[str]:
    return [*INDEX_COLUMNS, *(c for c in index.columns if c not in INDEX_COLUMNS)]


def prepare(
    ws: Workspace,
    cfg: PipelineConfig,
    ekey: str,
    upstream: dict[str, StageResult],
    tick: Callable[[str], None],
) -> Evaluation:
    """The suite (with an ic-lora or tic-ft run's conditions), CLIP and (with
    `video_features`) the reference clips' features; `tick(note)` after every video."""
    ec, device = cfg.evaluate, resolve_device(cfg.evaluate.device)
    suite = load_suite(cfg, upstream)
    given, images = None, None
    if suite.image_to_video:
        images = first_frames(suite.paired, ec.height, ec.width)
    elif suite.paired is not None:
        given = conditions(cfg, suite.paired)
    requests = suite_requests(ec, suite.prompts, device, suite.paired, given, images)
    ev = Evaluation(ws, cfg, device, requests, clip=None, tick=tick)
    if ec.video_features:
        ev.features = load_features(ec.feature_extractor, ec.video_features, device)
        ev.real = real_features(
            ws, ekey, ec, reference_clips(cfg, upstream["check"], suite.clips), ev.features
        )
    ev.clip = load_clip(ec.clip_model, device)
    return ev


def load_suite(cfg: PipelineConfig, upstream: dict[str, StageResult]) -> Suite:
    """The suite's prompts, for a held-out suite its clips (`heldout_clips`), and for an
    ic-lora or tic-ft run or an image-to-video model each prompt's held-out clip
    (`paired_clips`).

    Raises:
        ValueError: evaluate's frames or size do not fit the model, or a conditioned mode
            on an image-to-video model.
    """
    ec = cfg.evaluate
    image_to_video = fit_model(cfg)
    suite = Suite(list(ec.prompts), image_to_video=image_to_video)
    if ec.heldout:
        clips = heldout_clips(upstream["check"], upstream.get("filter"), ec.heldout_clips)
        suite = suite._replace(prompts=list(clips.caption), clips=clips)
    if cfg.train.mode not in CONDITIONED and not image_to_video:
        return suite
    paired, reference = paired_clips(cfg, upstream["check"], suite.clips, suite.prompts)
    return suite._replace(paired=paired, reference=reference)


def fit_model(cfg: PipelineConfig) -> bool:
    """Whether the model is image-to-video, after checking evaluate's frames and size fit it.

    Raises:
        ValueError: a setting the model cannot take, or a conditioned mode (ic-lora,
            tic-ft: text-to-video only) on an image-to-video model.
    """
    ec, traits = cfg.evaluate, sampling.model_traits(cfg.model)
    wrong = sampling.check_fits(traits.shape, ec.frames, ec.height, ec.width)
    if wrong is not None:
        field = "evaluate.frames" if wrong[0] == "frames" else "evaluate.height/width"
        raise ValueError(f"{field} {wrong[1]} (model {cfg.model})")
    if traits.shape.image_to_video and cfg.train.mode in CONDITIONED:
        raise ValueError(
            f"train.mode {cfg.train.mode}: its evaluation is text-to-video only, "
            f"and model {cfg.model} is image-to-video"
        )
    return traits.shape.image_to_video


def _pending(
    ws: Workspace, ekey: str, out: Path, wanted: list[str], checkpoints: dict[str, Path]
) -> dict[str, Path | None]:
    """{unit: checkpoint (None for the base)} of `wanted` not in the index yet, once any
    unit committed just before a crash is indexed."""
    for name in set(wanted) - set(_evaluated(ws, ekey, out.name).checkpoint):
        _index_committed(ws, ekey, out.name, out / name)
    done = set(_evaluated(ws, ekey, out.name).checkpoint)
    return {n: checkpoints.get(n) for n in wanted if n not in done}


def _scores(ws: Workspace, ekey: str, out: Path, wanted: list[str]) -> pd.DataFrame:
    """The index's rows of the units `wanted`, in that order."""
    return (
        _evaluated(ws, ekey, out.name)
        .query("checkpoint in @wanted")
        .drop_duplicates("checkpoint", keep="last")  # an index doubled by an older version
        .assign(order=lambda d: d.checkpoint.map(wanted.index))
        .sort_values("order")
    )


def _stats(scores: pd.DataFrame, wanted: list[str], run_dir: Path) -> dict[str, Any]:
    """The done marker's stats: clip_score per unit, the units it covers, the run folder."""
    pairs = zip(scores.checkpoint, scores.clip_score, strict=True)
    return {
        "clip_score": {c: round(float(s), 4) for c, s in pairs},
        "checkpoints": wanted,
        "run_dir": str(run_dir),
    }


def run_evaluate(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
) -> StageResult:
    """Evaluate the base model and every checkpoint of the run not yet in the index.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model`, `evaluate` and, for ic-lora and tic-ft
            runs, `train` and `precompute`: the mode, its layout or condition function).
        upstream: {"train": StageResult whose path is the run folder, "check": StageResult,
            "filter": StageResult}. Check's held-out clips are the reference of the Fréchet
            distance (with `evaluate.video_features`) and an ic-lora or tic-ft run's
            conditions; filter's accepted captions of them are the suite with
            `evaluate.prompts: heldout` (filter is read only then).
        progress: called as (videos done, videos to make, checkpoint and video).

    Returns:
        The stage result. counts: checkpoints_evaluated (LoRA checkpoints generated by the
        call that wrote the marker, not those a concurrent call made), checkpoints_total
        (LoRA checkpoints in the run), videos (generated by that call, base included).
        stats: clip_score per checkpoint, base included, and the checkpoints the marker
        covers.

    Raises:
        ValueError: `prompts: heldout` and no held-out clip has an accepted caption; an
            ic-lora or tic-ft run and no kept held-out clip to condition on.
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

    suite = load_suite(cfg, upstream)  # a missing held-out suite fails here, in seconds
    clean_temporaries(ws, out)
    pending = _pending(ws, ekey, out, wanted, checkpoints)
    per_unit = len(suite.prompts) * len(cfg.evaluate.seeds)  # videos
    made = _evaluate_pending(ws, cfg, ekey, out, pending, upstream, progress, per_unit)
    scores = _scores(ws, ekey, out, wanted)
    paired = suite.conditioned
    counts = {
        "checkpoints_evaluated": len([n for n in made if n != BASE]),
        "checkpoints_total": len(checkpoints),
        "videos": len(made) * per_unit,
    }
    stats = _stats(scores, wanted, run_dir)
    clean_temporaries(ws, out)  # what a concurrent process killed meanwhile left
    with report_lock(ws, ekey, out.name):  # the rating page rewrites a section of it
        write_report(out, cfg, ekey, out.name, scores, suite.prompts, paired, suite.reference)
        return ws.finish(StageResult("evaluate", key, str(out), counts, stats=stats), started)


def clean_temporaries(ws: Workspace, out: Path) -> None:
    """Remove the temporaries of dead writers where evaluation writes (a live concurrent
    writer's stay): the run's folder, its eval key's, the index's, the base store."""
    for folder in (out, out.parent, index_path(ws).parent, ws.root / "cache" / BASE_STORE):
        clean_stale_tmp(folder)


def unit_lock(ekey: str, run: str, name: str) -> str:
    """The lock name of one unit: a checkpoint (or the base) of a run under an eval key."""
    return f"evaluate-{ekey}-{run}-{name}"


@dataclass
class Claims:
    """One call's pending units, each made by whichever process holds its lock. The models
    load at the first unit this call has to make (`make`), never for units made elsewhere."""

    ws: Workspace
    ekey: str
    out: Path
    make: Callable[[], Evaluation]
    tick: Callable[[str, int], None]  # (note, videos done)
    per_unit: int  # videos of one unit
    made: list[str] = field(default_factory=list)

    def claim(self, name: str, checkpoint: Path | None, wait: bool) -> bool:
        """Make unit `name` unless it is committed by now. False: another process holds it
        (only without `wait`; with it, this waits and then makes what the holder did not)."""
        run, folder = self.out.name, self.out / name

        def waiting(holder: str) -> None:
            self.tick(f"waiting for {name}, held by {holder}", 0)

        with ExitStack() as held:
            try:
                held.enter_context(self.ws.hold(unit_lock(self.ekey, run, name), wait, waiting))
            except Busy:
                return False
            if _index_committed(self.ws, self.ekey, run, folder):  # by another process
                self.tick(f"{name} made by another process", self.per_unit)
                return True
            clean_stale_tmp(self.out)  # a killed holder's partial unit
            summary = evaluate_unit(self.make(), name, checkpoint, folder)
            upsert_index(self.ws, self.ekey, run, name, summary)
            self.made.append(name)
        return True


def _evaluate_pending(
    ws: Workspace,
    cfg: PipelineConfig,
    ekey: str,
    out: Path,
    pending: dict[str, Path | None],
    upstream: dict[str, StageResult],
    progress: Progress,
    per_unit: int,
) -> list[str]:
    """Make every pending unit no other process holds, then wait for the held ones. Returns
    the units this call made (none when nothing is pending)."""
    if not pending:
        return []
    total, done, loaded = len(pending) * per_unit, [0], []

    def tick(note: str, videos: int = 1) -> None:
        done[0] += videos
        progress(done[0], total, note)

    def make() -> Evaluation:
        if not loaded:
            loaded.append(prepare(ws, cfg, ekey, upstream, tick))
        return loaded[0]

    claims = Claims(ws, ekey, out, make, tick, per_unit)
    try:
        held = [n for n, checkpoint in pending.items() if not claims.claim(n, checkpoint, False)]
        for name in held:
            claims.claim(name, pending[name], wait=True)
    finally:
        loaded.clear()  # the pipeline, CLIP and features go before the memory is released
        release_memory(resolve_device(cfg.evaluate.device))
    return claims.made
