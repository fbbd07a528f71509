"""Precompute: curated clips become VAE latents and T5 prompt embeddings in shards.

Each selected clip of the configured splits (sorted by clip_id) gives one sample: a
contiguous window resampled to `fps` from the clip's start (real motion speed, never a
stride over the whole clip), resized and centre-cropped into the resolution bucket
nearest the clip's display aspect ratio (`all_buckets()`, nearest in log(w/h), ties to
the earlier bucket), VAE-encoded, and its caption T5-encoded. The window has `frames`
frames, or with `frame_buckets` the longest count of `frame_counts()` whose window fits
the clip ((n - 1) / fps <= its length): of [49, 33, 25, 17] at 8 fps, a 4.0 s clip gets
33 frames, a 3.9 s one 25. Check has already rejected clips too short for the shortest
window and, with `windows: all | N`, split long clips into spans of about one window
each, so here every clip gives the window at its start. A clip too short all the same
(an upstream table not made by check) or one that fails to decode keeps its row in the
index with the reason.
What the model cannot take is refused before anything is encoded
(`cogvideox.check_fits`): a transformer that patches 2 latent frames at once (CogVideoX
1.5) takes only 16k+1 frame counts, learned positional embeddings (5B-I2V) only their
own size, an image-to-video model no ic-lora or tic-ft training.

Work units are shards of `shard_size` samples, `shard-{i:05d}.safetensors`, each holding
`<clip_id>.latents` [F', C, H/8, W/8] and `<clip_id>.prompt_embeds` [L, D]; a restart
skips committed shards. With `reference` (IC-LoRA), each sample also holds
`<clip_id>.reference_latents` [F', C, H/8, W/8]: the latents of the condition function's
output for the same decoded frames (`cogpipe.condition`), run in the decode threads.
An image-to-video model's samples also hold `<clip_id>.image_latents` [1, C, H/8, W/8]:
the window's first frame encoded as a 1-frame video (`cogvideox.encode_image`), with
its own per-clip noise; for a text-to-video model nothing changes (keys, caches, files).
A shard may mix buckets: every row of index.parquet carries its own `frames`, `height`,
`width` and `latent_frames`; each VAE call takes one shape, and training batches by them.
Tensors keep the encoders' dtype: fp32 on CPU, the model's weight dtype on GPU (fp16 for
2B-type, bf16 for 5B-type). Training casts them anyway.

Per-item results are shared across keys in `cache/latents` (by video, span, frame count,
fps, bucket, tiling and VAE; references also by the condition function's path, options and
source) and `cache/text` (by caption, tokenizer + encoder and length), so a new shard
size re-encodes nothing and an edited caption adds only itself to the cache (its chunk of
`TEXT_BATCH` captions is encoded again, see below).
The VAE and T5 are loaded only when something is missing from the caches.

One writer per unit, across processes sharing the workspace (two `cogpipe run`, a
`--part K` worker beside a full run, a Prefect retry while the original still runs): a
shard is claimed with its workspace lock (`precompute-<key>-shard-NNNNN`) before its
frames are decoded and held until it is committed; a shard another process holds is
left to it, and before the index (or a part's end) the run waits for those shards and
encodes any their holder did not commit (it died). The cache stores and the index have
their own locks (`cache-latents`, `cache-text`, `precompute-<key>-index`).

Commit order, so a kill anywhere redoes a unit exactly as an uninterrupted run does: a
shard's file is renamed into place before its new latents are stored in the cache (a
redone shard re-encodes the same clips and keeps its spot check; a committed shard whose
cache stores were cut short fills them from its own tensors at the next run), and the
captions are T5-encoded in fixed chunks of the sample table's distinct captions (a resumed run
encodes the same chunks, so the same numbers).

Speed: the missing captions are T5-encoded first, `TEXT_BATCH` distinct captions per
call, and the encoder is freed before the VAE loads. Frames are decoded in background
threads (one per core), `BATCHES_AHEAD` VAE batches ahead of the encoder, while the VAE
encodes up to `batch_size` clips of one shard and one bucket per call. Each clip draws
its latent sample noise from its own generator (`_seed`), so the batch size changes no
latent beyond float noise. On CUDA, cuDNN times its conv algorithms once per shape.

Decode-back spot check: once a shard's clips are encoded, the first clip encoded in this
run is decoded back with the VAE and compared (PSNR, dB, 0..255) with the frames it was
encoded from: its first `CHECK_LATENT_FRAMES` latent frames, the decoder's first chunk,
which the causal VAE decodes to exactly the first 9 frames of a full decode at about a
quarter of its cost (13 latent frames for 49). The record goes into the shard's metadata, so it shows in index.parquet's
`psnr` column and in the result's `stats["spot_checks"]` after any restart. Under
`min_psnr` (0: recorded only) the stage stops with `SpotCheckError` before writing the
shard or any of its latents to the cache. A shard made only of cached latents is not
checked (its frames are never decoded): latents reach the cache only from committed
shards, which passed their check, one clip per shard, under the min_psnr of the run that
encoded them.
The check catches gross mistakes (another model's scaling factor: ~15 dB; NaN; a wrong
latent layout), not subtle ones: scaling_factor applied twice costs even a lossless
autoencoder only ~30 dB, the order of a real video VAE's own reconstruction error.

    cogpipe precompute demo/demo.yaml
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cogpipe import condition
from cogpipe.config import ConfigError, PipelineConfig, PrecomputeConfig
from cogpipe.errors import first_line
from cogpipe.video import read_frames, resize_center_crop, window_times
from cogpipe.workspace import (
    Busy,
    Progress,
    ShardsIncomplete,
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
    write_table,
)

VERSION = 2  # 2: resolution buckets, batched encode, decode-back spot check
TEXT_BATCH = 16  # distinct captions per T5 call
BATCHES_AHEAD = 2  # VAE batches decoded in background threads ahead of the one encoding
CHECK_LATENT_FRAMES = 3  # latent frames decoded by the spot check: 9 video frames

log = logging.getLogger(__name__)


class SpotCheckError(RuntimeError):
    """A shard's latents do not decode back to the frames they were encoded from."""


def key_of(cfg: PipelineConfig, inputs: dict[str, str]) -> str:
    p = cfg.precompute
    config = p.key_fields() | {"model_fp": model_fingerprint(cfg.model)}
    if p.reference is not None:  # the function's source too: an edit gives new references
        config["reference_fp"] = condition.fingerprint(p.reference, p.reference_options)
    return stage_key("precompute", VERSION, config, inputs)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(
    path: Path, tensors: dict[str, Any], rejected: dict[str, str], spot_check: dict | None = None
) -> None:
    """Commit one shard atomically; its metadata lists the clips that failed inside it
    ({clip_id: reason}) and its spot check ({"clip_id", "psnr"}, or None).

    One metadata entry: safetensors writes its metadata in hash-map order, random per
    process, so two entries would make a redone shard's bytes differ from the original's.
    """
    from safetensors.torch import save_file

    record = {"rejected": rejected, "spot_check": spot_check}
    metadata = {"record": json.dumps(record, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def shard_record(path: Path) -> tuple[dict[str, str], dict | None]:
    """({clip_id: reason} of the clips that failed inside a committed shard, its spot check)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "record" in metadata:
        record = json.loads(metadata["record"])
        return record["rejected"], record["spot_check"]
    rejected, check = metadata.get("rejected", "{}"), metadata.get("spot_check", "null")
    return json.loads(rejected), json.loads(check)  # shards written before the single record


def nearest_bucket(width: float, height: float, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket nearest a width x height clip in aspect ratio.

    Distances are in log(w/h), so 2:1 and 1:2 are as far from 1:1; ties go to the
    earlier bucket.
    """
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: round(abs(math.log(b[1] / b[0]) - aspect), 9))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two same-shape arrays in 0..255.

    inf when they are equal, nan when either holds a nan.
    """
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@dataclass(frozen=True)
class _Model:
    """What precompute needs to know of the model before loading any weights."""

    max_len: int  # T5 tokens per caption (max_text_seq_length)
    image: bool  # image-to-video: each sample also stores its first frame's latents
    ratio: int  # VAE temporal compression: 4 frames per latent frame after the first
    vae_fp: str  # fingerprints: the caches' keys
    text_fp: str
    reference_fp: str | None  # the condition function's, with references
    device: str
    dtype: Any  # the encoders' weight dtype


def _model(cfg: PipelineConfig) -> _Model:
    """The model's settings; refuses what its transformer cannot take (`cogvideox.check_fits`).

    Raises:
        ConfigError: a frame count, bucket or training mode the model cannot take.
    """
    from cogpipe.models import cogvideox

    p = cfg.precompute
    tcfg, vcfg = cogvideox.transformer_config(cfg.model), cogvideox.vae_config(cfg.model)
    shape = cogvideox.model_shape(tcfg, vcfg)
    cogvideox.check_fits(cfg, shape)
    device = resolve_device(p.device)
    reference_fp = condition.fingerprint(p.reference, p.reference_options) if p.reference else None
    return _Model(
        max_len=tcfg["max_text_seq_length"],
        image=shape.image_to_video,
        ratio=vcfg["temporal_compression_ratio"],  # 4 for CogVideoX
        vae_fp=cogvideox.component_fingerprint(cfg.model, "vae"),
        text_fp=cogvideox.component_fingerprint(cfg.model, "tokenizer", "text_encoder"),
        reference_fp=reference_fp,
        device=device,
        dtype=cogvideox.weight_dtype("auto", tcfg, device),
    )


def _selected(cfg: PipelineConfig, upstream: dict[str, StageResult]) -> pd.DataFrame:
    """The filter's selected clips of the configured splits, sorted by clip_id, each with
    the (height, width) bucket nearest its aspect ratio."""
    p = cfg.precompute
    curated = read_table(Path(upstream["filter"].path) / "curated.parquet")
    clips = read_table(Path(upstream["check"].path) / "clips.parquet")
    clips = clips[clips.keep & clips.split.isin(p.splits)]
    cols = ["clip_id", "video_id", "path", "start", "end", "fps", "width", "height"]
    samples = curated.loc[curated.selected, ["clip_id", "caption"]].merge(clips[cols], on="clip_id")
    samples = samples.sort_values("clip_id", ignore_index=True)
    # From here on height x width is the sample's bucket, no longer the clip's display size.
    buckets = p.all_buckets()
    sizes = [
        nearest_bucket(w, h, buckets) for w, h in zip(samples.width, samples.height, strict=True)
    ]
    samples["height"], samples["width"] = [h for h, _ in sizes], [w for _, w in sizes]
    return samples


def frames_for(start: float, end: float, p: PrecomputeConfig) -> int | None:
    """The longest of `p.frame_counts()` whose window at `p.fps` fits [start, end), or None."""
    fits = (n for n in p.frame_counts() if window_times(start, end, p.fps, n) is not None)
    return next(fits, None)


def _fit_windows(samples: pd.DataFrame, p: PrecomputeConfig, ratio: int) -> None:
    """Each row's frame count (its frame bucket), latent frames and window times, or the
    reason it has none (shorter than the shortest count's window)."""
    fewest = min(p.frame_counts())
    frames = [frames_for(r.start, r.end, p) for r in samples.itertuples()]
    samples["frames"] = [n or fewest for n in frames]
    # The first frame alone, then `ratio` (4) each.
    samples["latent_frames"] = (samples.frames - 1) // ratio + 1
    samples["times"] = [
        window_times(r.start, r.end, p.fps, r.frames) if n else None
        for r, n in zip(samples.itertuples(), frames, strict=True)
    ]
    samples["status"], samples["reason"] = "ok", ""
    short = samples.times.isna()
    samples.loc[short, "status"] = "rejected"
    need = f"{fewest} frames at {p.fps:g} fps"
    samples.loc[short, "reason"] = [
        f"too short for {need}: {e - s:.2f} s (needs {p.window_seconds(fewest):.2f} s)"
        for s, e in zip(samples.start[short], samples.end[short], strict=True)
    ]


def _cache_keys(samples: pd.DataFrame, p: PrecomputeConfig, m: _Model) -> None:
    """Content keys of each row's latents (video, span, frames, bucket, tiling, VAE), its
    references' and its caption's embeddings."""
    latents_fields = [
        {
            "video_id": r.video_id,
            "start": r.start,
            "end": r.end,
            "frames": r.frames,
            "fps": p.fps,
            "height": r.height,
            "width": r.width,
            "vae_tiling": p.vae_tiling,
            "vae": m.vae_fp,
        }
        for r in samples.itertuples()
    ]
    samples["latents_cache"] = [sha256_json(f) for f in latents_fields]
    if m.reference_fp is not None:
        samples["reference_cache"] = [
            sha256_json(f | {"reference": m.reference_fp}) for f in latents_fields
        ]
    if m.image:  # the window's first frame alone, encoded as a 1-frame video
        samples["image_cache"] = [sha256_json(f | {"image": "first-frame"}) for f in latents_fields]
    samples["embeds_cache"] = [
        sha256_json({"caption": c, "text_encoder": m.text_fp, "max_len": m.max_len})
        for c in samples.caption
    ]


def sample_table(
    cfg: PipelineConfig, upstream: dict[str, StageResult], m: _Model | None = None
) -> pd.DataFrame:
    """One row per selected clip of the configured splits, sorted by clip_id: its bucket
    (height, width, frames), its frame window (or why it has none), its cache keys and its
    shard (`shard_size` samples with a window each, in clip_id order). `m`: the model's
    settings (`_model`), read from its configs when not given.

    Raises:
        ConfigError: a frame count, bucket or training mode the model cannot take.
    """
    m = _model(cfg) if m is None else m
    p = cfg.precompute
    samples = _selected(cfg, upstream)
    _fit_windows(samples, p, m.ratio)
    _cache_keys(samples, p, m)
    samples["shard"] = None
    ok = samples.index[samples.status == "ok"]
    for i in range(0, len(ok), p.shard_size):
        samples.loc[ok[i : i + p.shard_size], "shard"] = shard_name(i // p.shard_size)
    return samples


def _index(samples: pd.DataFrame, out: Path) -> pd.DataFrame:
    """index.parquet: the clips that failed inside committed shards marked rejected, and
    the PSNR of each shard's spot-checked clip."""
    samples = samples.copy()
    samples["psnr"] = np.nan
    for shard in samples.shard.dropna().unique():
        rejected, check = shard_record(out / shard)
        for clip_id, reason in rejected.items():
            row = samples.clip_id == clip_id
            samples.loc[row, ["status", "reason", "shard"]] = ["rejected", reason, None]
        if check is not None:
            samples.loc[samples.clip_id == check["clip_id"], "psnr"] = check["psnr"]
    ok = samples.status == "ok"
    index = pd.DataFrame(
        {
            "clip_id": samples.clip_id,
            "caption": samples.caption,
            "shard": samples.shard,
            "latents_key": (samples.clip_id + ".latents").where(
                ok, None
            ),  # tensor names in the shard
            "embeds_key": (samples.clip_id + ".prompt_embeds").where(ok, None),
            "frames": samples.frames,  # the sample's frame bucket (rejected: the shortest asked)
            "height": samples.height,  # the bucket, pixels
            "width": samples.width,
            "latent_frames": samples.latent_frames,
            "status": samples.status,
            "reason": samples.reason,
            "psnr": samples.psnr,  # dB, decode-back spot check; one clip per shard encoded
            "latents_cache": samples.latents_cache,  # content keys in cache/latents and cache/text
            "embeds_cache": samples.embeds_cache,
        }
    )
    if "reference_cache" in samples:  # tensor name and content key of the reference latents
        index["reference_key"] = (samples.clip_id + ".reference_latents").where(ok, None)
        index["reference_cache"] = samples.reference_cache
    if "image_cache" in samples:  # image-to-video: the first frame's latents
        index["image_key"] = (samples.clip_id + ".image_latents").where(ok, None)
        index["image_cache"] = samples.image_cache
    return index


def cache_file(folder: Path, key: str) -> Path:
    """Where a content key's tensors live in a cache folder: sharded by its first 2 hex
    characters, so no folder holds more than 1/256 of the entries."""
    return folder / key[:2] / f"{key}.safetensors"


def _cache_get(folder: Path, key: str):
    from safetensors.torch import load_file

    path = cache_file(folder, key)
    return load_file(path)["value"] if path.is_file() else None


def _cache_put(folder: Path, key: str, value) -> None:
    from safetensors.torch import save_file

    with atomic_path(cache_file(folder, key)) as tmp:
        save_file({"value": value.contiguous()}, str(tmp))


def _cached(folder: Path, keys: pd.Series) -> pd.Series:
    return keys.map(lambda k: cache_file(folder, k).is_file()).astype(bool)  # bool when empty


def _cache_store(ws: Workspace, folder: Path, entries: dict[str, Any]) -> None:
    """Store {key: latents} in a shared cache under its lock, each only if absent: one
    writer per entry, and a stored entry never changes (other keys' shards copied it)."""
    if not entries:
        return
    with ws.hold(f"cache-{folder.name}", on_wait=_waiting(f"the {folder.name} cache")):
        for key, value in entries.items():
            if not cache_file(folder, key).is_file():
                _cache_put(folder, key, value)


def _waiting(what: str) -> Callable[[str], None]:
    """The message of a run that waits for a lock another process holds (`Workspace.hold`)."""
    return lambda holder: log.warning("precompute: waiting for %s, held by %s", what, holder)


def _prefetch(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, depth: int) -> Iterator:
    """`(tag, fn(arg))` for each `(tag, arg)` of `items`, in order, with up to `depth`
    calls running ahead in `pool`: the tag says whose result it is."""
    pending: list[tuple[Any, Future]] = []
    for tag, arg in items:
        pending.append((tag, pool.submit(fn, arg)))
        if len(pending) > depth:
            tag, fut = pending.pop(0)
            yield tag, fut.result()
    for tag, fut in pending:
        yield tag, fut.result()


@contextmanager
def _timed(seconds: dict[str, float], part: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[part]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - started


@contextmanager
def _cudnn_benchmark(on: bool) -> Iterator[None]:
    """cuDNN picks each conv's algorithm by timing it (once per shape); restored after."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _seed(row, *kind: str):
    """The latent sample's noise: a function of the clip's content and span only (and of
    `kind`, "reference" for a reference video, so its noise is not the target's)."""
    import torch

    seed = int(sha256_json([row.video_id, row.start, row.end, *kind])[:15], 16)
    return torch.Generator().manual_seed(seed)


def _reference_seed(row):
    return _seed(row, "reference")


def _image_seed(row):
    return _seed(row, "image")


class Reference:
    """The condition function of a run, applied in the decode threads."""

    def __init__(self, path: str, options: dict[str, Any]):
        self.path, self.options, self.fn = path, options, condition.load(path)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return condition.apply(self.fn, frames, self.options, self.path)


def _decode(row, reference: Reference | None = None):
    """(frames, reference frames, "") or (None, None, why).

    frames: [F, height, width, 3] uint8 of the row's window in its bucket; the reference
    frames are `reference(frames)` when the row needs its reference encoded, else None.

    Raises:
        ConditionError: the condition function failed or returned the wrong shape (a
            mistake in the function, not in the clip: the stage stops).
    """
    try:
        frames = resize_center_crop(read_frames(row.path, row.times), row.height, row.width)
    except Exception as e:  # a video decodable at probe time can still break further in
        return None, None, f"decode failed: {first_line(e)}"
    if reference is None or not getattr(row, "need_reference", False):
        return frames, None, ""
    try:
        return frames, reference(frames), ""
    except condition.ConditionError:
        raise
    except Exception as e:
        raise condition.ConditionError(
            f"precompute.reference {reference.path} failed on clip {row.clip_id}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _batches(videos: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """One shard's VAE batches: up to `batch_size` clips of one shape (height, width,
    frames), in samples order."""
    out: list[pd.DataFrame] = []
    for _, same in videos.groupby(["height", "width", "frames"], sort=False):
        out.extend(same.iloc[i : i + batch_size] for i in range(0, len(same), batch_size))
    return out


def _text_chunks(samples: pd.DataFrame, text_dir: Path, wanted: set[str]) -> list[pd.DataFrame]:
    """The chunks of `TEXT_BATCH` of the table's distinct captions (table order) that hold a
    caption of `wanted` still missing from the text cache. The chunks depend on the table
    only, so a resumed run encodes each caption in the same batch as an uninterrupted
    run (a batch's shape can change the float rounding of every caption in it)."""
    distinct = samples[samples.shard.notna()].drop_duplicates("embeds_cache")
    chunks = [distinct.iloc[i : i + TEXT_BATCH] for i in range(0, len(distinct), TEXT_BATCH)]
    return [
        c
        for c in chunks
        if (c.embeds_cache.isin(wanted) & ~_cached(text_dir, c.embeds_cache)).any()
    ]


def _encode_texts(run: _Run, todo: pd.DataFrame) -> int:
    """T5-encode the captions of `todo` missing from the text cache into it (whole
    `_text_chunks`), and free the encoder (the VAE's batches get its memory). The text
    cache's lock is held meanwhile: a concurrent run waits, then finds them stored.

    Returns:
        How many captions were stored (0: the encoder was not loaded).
    """
    import torch

    from cogpipe.models import cogvideox

    text_dir, m = run.caches[1], run.m
    wanted = set(todo.embeds_cache[~_cached(text_dir, todo.embeds_cache)])
    if not wanted:
        return 0
    stored = 0
    with run.ws.hold("cache-text", on_wait=_waiting("the text cache")):
        chunks = _text_chunks(run.samples, text_dir, wanted)  # another run may have stored some
        if not chunks:
            return 0
        with _timed(run.seconds, "text_encode"):
            tokenizer, text_encoder = cogvideox.load_text_encoder(run.cfg.model, m.device, m.dtype)
            for chunk in chunks:
                missing = ~_cached(text_dir, chunk.embeds_cache)
                embeds = cogvideox.encode_prompt(
                    tokenizer, text_encoder, list(chunk.caption), m.max_len
                )
                for key, e, store in zip(chunk.embeds_cache, embeds.cpu(), missing, strict=True):
                    if store:  # [L, D]
                        _cache_put(text_dir, key, e)
                        stored += 1
            del tokenizer, text_encoder
            if m.device.startswith("cuda"):
                torch.cuda.empty_cache()
    return stored


def _encode_batch(
    vae, batch: pd.DataFrame, frames: list[np.ndarray], column: str = "latents_cache", seed=_seed
):
    """{cache key (from `column`): CPU latents [F', C, h, w]} of one batch, in one
    `vae.encode` call; each clip's sample noise from `seed(row)`. Frames [H, W, 3] are
    images (image-to-video conditions), encoded to [1, C, h, w] each."""
    import torch

    from cogpipe.models import cogvideox

    pixels = torch.from_numpy(np.stack(frames))  # [B, F, H, W, 3] or [B, H, W, 3] uint8
    encode = cogvideox.encode_image if pixels.ndim == 4 else cogvideox.encode_video
    latents = encode(vae, pixels, [seed(r) for r in batch.itertuples()])
    return dict(zip(batch[column], latents.cpu(), strict=True))


def _take(decoded: Iterator, name: str, row) -> tuple:
    """The next decoded frames, which must be `row`'s of shard `name`: the decoder and the
    encoder walk one sequence of claimed shards, so anything else is a bug, never data."""
    (shard, clip_id), frames = next(decoded)
    if (shard, clip_id) != (name, row.clip_id):
        raise RuntimeError(
            f"precompute: the frames of {clip_id} ({shard}) came for {row.clip_id} ({name})"
        )
    return frames


def _encode_shard(run: _Run, name: str, batches: list[pd.DataFrame], decoded: Iterator):
    """Encode one claimed shard's batches from the decoded frames (in the same order): the
    target latents of the rows marked `need_latents`, the references of those marked
    `need_reference`, the first frames' latents of those marked `need_image`.

    Returns:
        ({cache key: CPU latents}, (row, cache key, frames) of the first video encoded or
        None). Clips whose frames did not decode land in `run.failed`.
    """
    latents, first = {}, None
    for batch in batches:
        with _timed(run.seconds, "decode_wait"):
            frames = [_take(decoded, name, r) for r in batch.itertuples()]
        good = [f is not None for f, _, _ in frames]
        for r, (_, _, reason) in zip(batch.itertuples(), frames, strict=True):
            if reason:
                run.failed[r.latents_cache] = reason
        if not any(good):
            continue
        batch, frames = batch[good], [f for f in frames if f[0] is not None]
        jobs = [
            ("latents_cache", "need_latents", 0, _seed),
            ("reference_cache", "need_reference", 1, _reference_seed),
            ("image_cache", "need_image", 0, _image_seed),
        ]
        for column, need, part, seed in jobs:
            mask = batch[need].to_numpy() if need in batch else np.zeros(len(batch), bool)
            if not mask.any():
                continue
            pixels = [f[part] for f, m in zip(frames, mask, strict=True) if m]
            if column == "image_cache":
                pixels = [p[0] for p in pixels]  # the first frame [H, W, 3]
            with _timed(run.seconds, "vae_encode"):
                latents |= _encode_batch(run.vae, batch[mask], pixels, column, seed)
            if column != "image_cache":  # the spot check compares videos
                row = next(batch[mask].itertuples())
                first = first or (row, getattr(row, column), pixels[0])
    return latents, first


def _spot_check(vae, name: str, row, latents, frames: np.ndarray, min_psnr: float) -> dict:
    """Decode the start of one clip's latents [F', C, h, w] back and compare it with the
    same frames of the [F, H, W, 3] uint8 frames they were encoded from.

    Returns:
        {"clip_id", "psnr"}, the shard's record.

    Raises:
        SpotCheckError: the PSNR is under `min_psnr` (or nan) and `min_psnr` is not 0.
    """
    from cogpipe.models import cogvideox

    decoded = cogvideox.decode_latents(vae, latents[None, :CHECK_LATENT_FRAMES])[0].numpy()
    value = psnr(decoded, frames[: len(decoded)])  # [9, H, W, 3] each
    if min_psnr > 0 and not value >= min_psnr:  # nan fails too
        raise SpotCheckError(
            f"decode-back spot check failed in {name}: clip {row.clip_id} decodes to {value:.1f} dB "
            f"PSNR against its source frames, under min_psnr {min_psnr:g} dB. The latents do not "
            "match the VAE: most likely a latent scaling mistake (another model's scaling_factor), "
            "a layout mistake ([F', C, h, w] read as [C, F', h, w]) or a dtype problem (fp16 "
            "overflow to inf/NaN; try bf16 or fp32). The shard was not committed and none of its "
            "latents were cached."
        )
    return {"clip_id": row.clip_id, "psnr": round(value, 3)}


def _shard_tensors(rows: pd.DataFrame, new: dict, failed: dict, latents_dir: Path, text_dir: Path):
    """(tensors, rejected) of one shard: latents (and references) from `new` or the cache,
    embeddings from the cache."""
    tensors, rejected = {}, {}
    for r in rows.itertuples():
        if r.latents_cache in failed:
            rejected[r.clip_id] = failed[r.latents_cache]
            continue
        names = {
            "latents": r.latents_cache,
            "reference_latents": getattr(r, "reference_cache", None),
            "image_latents": getattr(r, "image_cache", None),
        }
        for suffix, key in names.items():
            if key is None:  # no references (images) in this run
                continue
            latents = new.get(key)
            if latents is None:
                latents = _cache_get(latents_dir, key)
            tensors[f"{r.clip_id}.{suffix}"] = latents.contiguous()  # [F', C, h, w]; image [1, ...]
        tensors[f"{r.clip_id}.prompt_embeds"] = _cache_get(text_dir, r.embeds_cache)  # [L, D]
    return tensors, rejected


@dataclass
class _Run:
    """What the claim, encode and commit steps of one run share: its samples, caches and
    tallies."""

    ws: Workspace
    key: str
    cfg: PipelineConfig
    m: _Model
    samples: pd.DataFrame
    out: Path
    caches: tuple[Path, Path]  # cache/latents, cache/text
    counts: dict[str, int]
    progress: Progress
    total: int  # this run's shards
    seconds: dict[str, float] = field(default_factory=dict)
    settled: int = 0  # shards committed, here or by another process
    claimed: set[str] = field(default_factory=set)  # latents keys encoded or found cached here
    failed: dict[str, str] = field(default_factory=dict)  # latents key -> why it did not decode
    vae: Any = None  # loaded at the first shard with something to encode

    def lock(self, name: str) -> str:
        """The workspace lock of one shard: `precompute-<key>-shard-NNNNN`."""
        return f"precompute-{self.key}-{name.removesuffix('.safetensors')}"

    def settle(self, note: str) -> None:
        self.settled += 1
        self.progress(self.settled, self.total, note)


def _claimed(run: _Run, names: list[str], wait: bool, held: dict[str, ExitStack], busy: list[str]):
    """This run's shards to encode, in order, each with its VAE batches, claimed only as
    the decoder reaches it: its lock goes into `held` until it is committed, so no frames
    are decoded for a shard another process encodes. A shard held elsewhere goes to
    `busy`, or with `wait` is waited for; one committed by then is settled, not yielded."""
    for name in names:
        lock = ExitStack()
        try:
            lock.enter_context(run.ws.hold(run.lock(name), wait, _waiting(f"{run.key}/{name}")))
        except Busy as holder:
            log.info("precompute: %s is being encoded by %s; it comes last", name, holder)
            busy.append(name)
            continue
        if (run.out / name).is_file():
            with lock:
                _backfill(run, name)
            run.settle(f"{name} committed earlier")
            continue
        held[name] = lock
        yield name, _shard_batches(run, name)


def _shard_batches(run: _Run, name: str) -> list[pd.DataFrame]:
    """A claimed shard's VAE batches: its distinct samples missing from the latents cache
    (exact copies of an earlier shard's are that shard's), marked `need_latents` /
    `need_reference` / `need_image`; the cache hits are counted."""
    latents_dir = run.caches[0]
    videos = run.samples[run.samples.shard == name].drop_duplicates("latents_cache")
    videos = videos[~videos.latents_cache.isin(run.claimed)].copy()
    run.claimed.update(videos.latents_cache)
    videos["need_latents"] = need = ~_cached(latents_dir, videos.latents_cache)
    run.counts["latents_cache_hits"] += int((~need).sum())
    for kind in ("reference", "image"):
        if f"{kind}_cache" in videos:
            videos[f"need_{kind}"] = ~_cached(latents_dir, videos[f"{kind}_cache"])
            run.counts[f"{kind}_cache_hits"] += int((~videos[f"need_{kind}"]).sum())
            need = need | videos[f"need_{kind}"]
    return _batches(videos[need], run.cfg.precompute.batch_size)


def _backfill(run: _Run, name: str) -> None:
    """Store in the latents cache what a committed shard holds and the cache lacks: what a
    kill between the shard's rename and its cache stores left out (the shard's tensors are
    the same latents, so the same bytes)."""
    from safetensors import safe_open

    rows = run.samples[run.samples.shard == name]
    columns = {
        "latents": "latents_cache",
        "reference_latents": "reference_cache",
        "image_latents": "image_cache",
    }
    wanted = {
        f"{r.clip_id}.{suffix}": getattr(r, column)
        for r in rows.itertuples()
        for suffix, column in columns.items()
        if column in rows
    }
    missing = {t: k for t, k in wanted.items() if not cache_file(run.caches[0], k).is_file()}
    if not missing:
        return
    with safe_open(str(run.out / name), "pt") as f:
        names = set(f.keys())  # a clip that failed to decode has no tensor
        found = {k: f.get_tensor(t) for t, k in missing.items() if t in names}
    _cache_store(run.ws, run.caches[0], found)


def _load_vae(cfg: PipelineConfig, m: _Model):
    """The VAE on the device, with slicing, tiling and a compiled encoder as configured."""
    from cogpipe.models import cogvideox, speed

    p = cfg.precompute
    vae = cogvideox.load_vae(cfg.model, m.device, m.dtype)
    if p.vae_slicing:
        vae.enable_slicing()
    if p.vae_tiling:
        vae.enable_tiling()
    if p.compile and m.device.startswith("cuda"):
        speed.compile_static(vae.encoder)  # bench/vae_encode.py: 1.9x on an H100
    return vae


def _commit_shard(run: _Run, name: str, new: dict, first) -> None:
    """Spot-check a claimed shard's new latents, write the shard, then store them in the
    cache. In that order: a kill before the shard's rename leaves none of them cached, so
    the redo encodes (and checks) the same clips; one after it is completed by `_backfill`.

    Raises:
        SpotCheckError: before anything of the shard is written or cached.
    """
    check = None
    if first is not None:
        row, cache_key, frames = first
        with _timed(run.seconds, "spot_check"):
            min_psnr = run.cfg.precompute.min_psnr
            check = _spot_check(run.vae, name, row, new[cache_key], frames, min_psnr)
    rows = run.samples[run.samples.shard == name]
    tensors, rejected = _shard_tensors(rows, new, run.failed, *run.caches)
    write_shard(run.out / name, tensors, rejected, check)
    _cache_store(run.ws, run.caches[0], new)  # checked and committed: now they serve other keys
    for count, column in [
        ("encoded_videos", "latents_cache"),
        ("encoded_references", "reference_cache"),
        ("encoded_images", "image_cache"),
    ]:
        if column in rows:
            run.counts[count] += len(set(new) & set(rows[column]))


def _encode_all(run: _Run, names: list[str], wait: bool) -> list[str]:
    """Claim, encode and commit the shards `names` in order, frames decoded in background
    threads `BATCHES_AHEAD` VAE batches ahead of the encoder.

    Returns:
        The shards other processes held, left to them (none with `wait`).
    """
    p = run.cfg.precompute
    reference = Reference(p.reference, p.reference_options) if p.reference else None
    held: dict[str, ExitStack] = {}
    busy: list[str] = []
    threads = max(len(os.sched_getaffinity(0)), 1)
    try:
        with _cudnn_benchmark(run.m.device.startswith("cuda")), ThreadPoolExecutor(threads) as pool:
            # The decoder (ahead, claiming) and the encoder walk one sequence of claimed
            # shards; each clip's frames come tagged with its shard and clip.
            ahead, shards = itertools.tee(_claimed(run, names, wait, held, busy))
            clips = (
                ((name, r.clip_id), r)
                for name, batches in ahead
                for b in batches
                for r in b.itertuples()
            )
            decode = partial(_decode, reference=reference)
            decoded = _prefetch(decode, clips, pool, BATCHES_AHEAD * p.batch_size)
            for name, batches in shards:
                if batches and run.vae is None:
                    run.vae = _load_vae(run.cfg, run.m)
                new, first = _encode_shard(run, name, batches, decoded)
                _commit_shard(run, name, new, first)
                held.pop(name).close()
                run.settle(name)
    finally:
        for lock in held.values():  # claimed, not committed: an error or an interrupt
            lock.close()
    return busy


def _write_index(run: _Run, started: float) -> StageResult:
    """Write index.parquet and the done marker: counts of samples, stats of rejections,
    buckets, frame counts, spot checks and seconds."""
    samples = run.samples
    index = _index(samples, run.out)
    write_table(run.out / "index.parquet", index)
    ok = index[index.status == "ok"]
    counts = {
        "samples": len(index),
        "ok": len(ok),
        "rejected": len(index) - len(ok),
        "shards": samples.shard.nunique(),
    } | run.counts
    kinds = index.loc[index.status != "ok", "reason"].str.split(":").str[0]
    checked = index[index.psnr.notna()]
    stats = {
        "rejections": kinds.value_counts().to_dict(),
        "buckets": (ok.height.astype(str) + "x" + ok.width.astype(str)).value_counts().to_dict(),
        "frames": {str(n): int(k) for n, k in ok.frames.value_counts().sort_index().items()},
        "spot_checks": {
            r.shard: {"clip_id": r.clip_id, "psnr": float(r.psnr)} for r in checked.itertuples()
        },
        "seconds": {part: round(s, 3) for part, s in run.seconds.items()},
    }
    result = StageResult("precompute", run.key, str(run.out), counts, stats=stats)
    return run.ws.finish(result, started)


def _counts(samples: pd.DataFrame) -> dict[str, int]:
    """This run's tallies, all 0: distinct videos and captions encoded or found cached
    (encoded_videos, encoded_texts, latents_cache_hits, text_cache_hits); with
    `precompute.reference` also encoded_references and reference_cache_hits, for an
    image-to-video model encoded_images and image_cache_hits."""
    names = ["encoded_videos", "encoded_texts", "latents_cache_hits", "text_cache_hits"]
    if "reference_cache" in samples:
        names += ["encoded_references", "reference_cache_hits"]
    if "image_cache" in samples:
        names += ["encoded_images", "image_cache_hits"]
    return dict.fromkeys(names, 0)


def _part_shards(
    samples: pd.DataFrame, out: Path, part: int | None, workers: int, merge_only: bool
) -> list[str]:
    """The shards this run encodes (shard i is in part i mod `workers`), their temporaries
    of a killed run cleaned (other parts' may be live, so only these).

    Raises:
        ShardsIncomplete: `merge_only`, and one of them is not committed.
    """
    shards = sorted(samples.shard.dropna().unique())
    mine = [s for i, s in enumerate(shards) if part is None or i % workers == part]
    if merge_only and (missing := [s for s in mine if not (out / s).is_file()]):
        raise ShardsIncomplete(
            f"{out}: {len(missing)} of {len(mine)} shards are not committed ({', '.join(missing)})"
        )
    for name in mine:
        clean_stale_tmp(out, f".tmp-{name}-*")
    return mine


def _encode_captions(run: _Run, shards: list[str]) -> None:
    """T5-encode the captions of `shards`' uncommitted samples missing from the text cache,
    first, so that the encoder is freed before the VAE loads; counted in `run.counts`."""
    todo = run.samples[run.samples.shard.isin([s for s in shards if not (run.out / s).is_file()])]
    cached = _cached(run.caches[1], todo.embeds_cache.drop_duplicates())
    run.counts["text_cache_hits"] = int(cached.sum())
    run.counts["encoded_texts"] = _encode_texts(run, todo)


def run_precompute(
    ws: Workspace,
    cfg: PipelineConfig,
    upstream: dict[str, StageResult],
    progress: Progress = no_progress,
    part: int | None = None,
    merge_only: bool = False,
) -> StageResult | None:
    """Encode every selected clip into shards and write `precompute/<key>/index.parquet`.

    Args:
        ws: the workspace.
        cfg: the pipeline config (uses `model` and `precompute`).
        upstream: {"filter": StageResult, "check": StageResult}.
        progress: called as (shards done, shards total, shard name).
        part: encode only the shards of this part (shard i is in part i mod
            `precompute.workers`) and return None: one GPU worker's run. By default every
            uncommitted shard is encoded here and the index is written.
        merge_only: only index: the parts' runs have committed every shard (no model is
            loaded; a GPU pipeline indexes on its CPU worker).

    Returns:
        The stage result; counts hold samples, ok, rejected, shards and `_counts`' tallies
        of distinct videos, captions, references and first frames encoded or found cached;
        stats hold rejections by kind, samples per bucket and per frame count, spot_checks
        ({shard: {"clip_id", "psnr"}}) and this run's seconds per part.

    Raises:
        SpotCheckError: a shard's spot check came out under `min_psnr`.
        ConditionError: the condition function does not load, fails or returns another shape.
        ShardsIncomplete: `merge_only`, and a shard is not committed.
        ConfigError: `part` out of range; a frame count, bucket or train.mode the model
            cannot take (`cogvideox.check_fits`).
    """
    started = time.time()
    key = key_of(cfg, {"filter": upstream["filter"].key, "check": upstream["check"].key})
    out = ws.stage_dir("precompute", key)
    p = cfg.precompute
    if part is not None and not 0 <= part < p.workers:
        raise ConfigError(f"part {part} is not in [0, {p.workers}) (precompute.workers)")
    if ws.done(out):  # before the heavy imports: a reused run takes ms
        return None if part is not None else ws.result("precompute", out)

    m = _model(cfg)
    samples = sample_table(cfg, upstream, m)
    mine = _part_shards(samples, out, part, p.workers, merge_only)
    caches = ws.cache_dir("latents"), ws.cache_dir("text")
    run = _Run(ws, key, cfg, m, samples, out, caches, _counts(samples), progress, len(mine))
    _encode_captions(run, mine)
    if busy := _encode_all(run, mine, wait=False):  # other processes' shards: theirs first
        _encode_all(run, busy, wait=True)  # then any they did not commit (they died)
    if part is not None:
        return None
    with ws.hold(f"precompute-{key}-index", on_wait=_waiting(f"{key}/index.parquet")):
        if ws.done(out):  # a concurrent run indexed meanwhile
            return ws.result("precompute", out)
        return _write_index(run, started)
