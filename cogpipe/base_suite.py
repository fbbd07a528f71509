"""The shared base store: the base model's video of each request, generated once.

Every run, sweep cell and nightly pass compares its checkpoints with the base model at
the same (prompt, seed). Those videos depend only on the model's weights (by fingerprint),
the video settings (`VIDEO_FIELDS`), the prompt and the seed, never on the run, so they
live once in `cache/evaluate-base/<key>.mp4` (+ `<key>.json`: prompt, seed, model,
settings, seconds) and each run's `base/` unit hard-links them (a copy across
filesystems). A per-key lock (`Workspace.hold`, freed when its holder dies) makes a
parallel evaluation wait for a video in flight instead of generating it twice; the mp4's
rename into place is the commit (its temporary names its writer, so a sweep removes a
killed writer's and never a live one's). The base
model is always sampled text-to-video: it has no conditioned mode, so the base of an
IC-LoRA or TIC-FT run is the same video as a LoRA run's.

    path, seconds = base_video(ws, cfg, request, lambda: sample(pipe, request))
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cogpipe.config import PipelineConfig
from cogpipe.video import write_mp4
from cogpipe.workspace import Workspace, atomic_path, model_fingerprint, sha256_json, write_json

VIDEO_FIELDS = ("frames", "height", "width", "steps", "guidance", "fps")  # what changes a video
NUMERICS_FIELDS = ("compile", "fp8_linears")  # change its floats too, keyed only when on
BASE_STORE = "evaluate-base"  # cache/<this>/<key>.mp4: the base model's videos
BASE_VERSION = 1  # of the base store's keys


def video_settings(ec) -> dict[str, Any]:
    """The evaluate settings that change a base video: `VIDEO_FIELDS`, and the numerics
    options (compile, fp8_linears) when on, so keys without them are as before."""
    settings = {f: getattr(ec, f) for f in VIDEO_FIELDS}
    return settings | {f: True for f in NUMERICS_FIELDS if getattr(ec, f)}


def base_key(cfg: PipelineConfig, request) -> str:
    """What decides a base-model video: model weights, video settings, prompt and seed
    (`request`: anything with .prompt and .seed), and for an image-to-video model the
    image's pixels (`request.image`), so another held-out image is another video.
    Text-to-video keys are as before."""
    ec = cfg.evaluate
    key = {
        "v": BASE_VERSION,
        "model_fp": model_fingerprint(cfg.model),
        "settings": video_settings(ec),
        "prompt": request.prompt,
        "seed": request.seed,
    }
    image = getattr(request, "image", None)
    if image is not None:
        key["image"] = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]
    return sha256_json(key)[:16]


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    """An mp4 written under a temporary `.mp4` name (the encoder picks the format by it)
    and renamed into place."""
    with atomic_path(path, keep_suffix=True) as tmp:
        write_mp4(tmp, frames, fps)


def base_video(
    ws: Workspace, cfg: PipelineConfig, request, make: Callable[[], np.ndarray]
) -> tuple[Path, float]:
    """The store's base-model video of a request and the seconds it took to generate,
    generated now (once, under its lock: a parallel evaluation waits for it) if missing.

    Args:
        request: anything with .prompt and .seed (an `evaluate.Request`).
        make: () -> the base model's frames of the request, [F, H, W, 3] uint8; called
            only when the store lacks the video.
    """
    key = base_key(cfg, request)
    store = ws.cache_dir(BASE_STORE)
    path, record = store / f"{key}.mp4", store / f"{key}.json"
    with ws.hold(f"{BASE_STORE}-{key}"):
        if not path.is_file():
            started = time.time()
            frames = make()  # [F, H, W, 3] uint8
            seconds = round(time.time() - started, 3)
            write_json(
                record,
                {
                    "key": key,
                    "prompt": request.prompt,
                    "seed": request.seed,
                    "model": cfg.model,
                    "model_fp": model_fingerprint(cfg.model),
                    "seconds": seconds,
                    "settings": video_settings(cfg.evaluate),
                },
            )
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
