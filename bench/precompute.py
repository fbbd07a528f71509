"""Precompute throughput: CogVideoX-2b VAE latents + T5-XXL embeddings, clips per second.

The models are the real architectures at full size with random weights, built on the GPU
in the dtype cogpipe picks for a 2B-type model (fp16) without any hub access (speed does
not depend on weight values): `AutoencoderKLCogVideoX` with CogVideoX-2b's VAE config and
`T5EncoderModel` with T5 v1.1 XXL's (4.8B parameters, 9.5 GB in fp16). The clips are
made here with PyAV: `--clips` H.264 files of 1280x720 at 30 fps, 7 s, a textured scene
with grain and a block swinging across it, so decoding is real work. Each sample is a
49-frame window at 8 fps (6 s), resized and centre-cropped to 480x720, and a distinct
caption padded to 226 tokens (a local word-level tokenizer: T5's cost does not depend on
the ids).

- Reference: one clip at a time, as the diffusers CogVideoX LoRA example precomputes:
  decode the window (cogpipe's decoder and resize, so only the pipeline differs), then
  `vae.encode(x).latent_dist.sample() * scaling_factor`, then T5 on its caption, each
  waiting for the last, cuDNN's default (heuristic) algorithms. One untimed clip first.
- cogpipe: `cogpipe.precompute.run_precompute` itself, as the CLI runs it, on a fresh
  workspace per batch size: captions T5-encoded 16 at a time, frames decoded in
  background threads while the VAE encodes `batch_size` clips per call, the VAE encoder
  compiled (`precompute.compile`, since commit 69662bb), cuDNN benchmark mode, one
  decode-back spot check per shard of 16 (3 latent frames to 9 video frames; timed,
  recorded only: random weights do not reconstruct), latents and embeddings written to
  the caches and the shards. Only the two loaders are swapped for ones that hand over
  the models built here (the model folder holds configs only: loading 10 GB of random
  weights would only time the disk).
  One untimed run of `batch_size` other clips first (cuDNN tunes each conv shape once).

Lines (DESIGN.md's shape; ratio > 1 means cogpipe is better), per batch size:
`clips_per_s`; `peak_mem_gb` (torch.cuda.max_memory_allocated, both models' weights
included, 1e9 bytes; ratio = reference / value); main-thread seconds per clip in each part
(`decode_s_per_clip`: waiting for frames, `vae_s_per_clip`, `t5_s_per_clip`,
`spot_check_s_per_clip`; ratio = reference / value). A batch size out of memory gives a
line with metric `oom`.

Memory estimate for the VAE encode (fp16, 49x480x720): frames go through the encoder in
chunks of 8 (the first 9); at full resolution one activation is 128 channels x 9 frames x
480 x 720 x 2 bytes = 0.8 GB, about five are alive in a resnet block, and every causal
conv keeps 2 frames of cache: ~5-6 GB per clip, so batch 4 needs ~25 GB next to 10 GB of
weights, and batch 8 ~55 GB (an 80 GB H100 holds both).

    python bench/precompute.py [--clips 16] [--batch-size 1,4] [--out FILE] [--commit abc1234]
    python bench/precompute.py --dry     # tiny models and clips on the CPU: a smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import Bench, commit, device_name, hub_config, in_processes  # noqa: E402

from cogpipe import precompute  # noqa: E402
from cogpipe.config import PipelineConfig, PrecomputeConfig  # noqa: E402
from cogpipe.models import cogvideox  # noqa: E402
from cogpipe.samples import build_word_tokenizer  # noqa: E402
from cogpipe.video import read_frames, resize_center_crop, window_times  # noqa: E402
from cogpipe.workspace import StageResult, Workspace, write_table  # noqa: E402

MAX_LEN = 226  # CogVideoX's max_text_seq_length
# THUDM/CogVideoX-2b vae/config.json (also diffusers' defaults for this class).
VAE_2B = hub_config("cogvideox-2b-vae")
# google/t5-v1_1-xxl, the text encoder of every CogVideoX.
T5_XXL = hub_config("t5-v1_1-xxl")
# The tiny CogVideoX of cogpipe.samples (DESIGN.md's sizes) for --dry.
VAE_TINY = VAE_2B | dict(
    block_out_channels=[8, 8, 8, 8], latent_channels=4, layers_per_block=1, norm_num_groups=2
)
T5_TINY = T5_XXL | dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
WORDS = (
    "a fighter slaps his opponent across the cheek while the referee watches and the "
    "crowd cheers under bright arena lights in slow motion close up wide shot"
).split()

# name -> clip files (width, height, fps, seconds) and samples (frames, height, width)
SIZES = {
    "full": {"source": (1280, 720, 30, 7.0), "sample": (49, 480, 720)},
    "dry": {"source": (192, 128, 10, 2.0), "sample": (9, 64, 96)},
}


# --------------------------------------------------------------------------- inputs


def make_clip(path: Path, seed: int, width: int, height: int, fps: int, seconds: float) -> Path:
    """An H.264 clip (x264 veryfast, a keyframe every 2 s): a textured scene with grain
    and a block swinging across it."""
    from common import textured_scene, with_subject, write_h264

    rng = np.random.default_rng(seed)
    scene = textured_scene(rng, width, height)
    frames = (
        with_subject(scene + rng.normal(0, 4, (height, width, 3)), i)
        for i in range(round(seconds * fps))
    )
    return write_h264(path, frames, (width, height), fps, 2 * fps)


def make_clips(folder: Path, n: int, source: tuple) -> list[Path]:
    """`n` clips, made in parallel processes (before CUDA starts: the pool forks)."""
    width, height, fps, seconds = source
    jobs = [(folder / f"clip{i:03d}.mp4", i, width, height, fps, seconds) for i in range(n)]
    return in_processes(make_clip, jobs)


def clips_table(paths: list[Path], source: tuple, tag: str) -> pd.DataFrame:
    """check's clips.parquet columns (every clip whole) plus filter's caption."""
    width, height, fps, seconds = source
    rng = np.random.default_rng(0)  # the tag keeps captions of different tables apart
    captions = [f"{tag} {i}: " + " ".join(rng.choice(WORDS, 60)) for i in range(len(paths))]
    return pd.DataFrame(
        {
            "clip_id": [f"{tag}{i:04d}" for i in range(len(paths))],
            "video_id": [f"{tag}-video{i:04d}" for i in range(len(paths))],
            "path": [str(p) for p in paths],
            "start": 0.0,
            "end": seconds,
            "fps": float(fps),
            "width": width,
            "height": height,
            "split": "train",
            "keep": True,
            "caption": captions,
            "selected": True,
        }
    )


def write_upstream(root: Path, clips: pd.DataFrame, tag: str) -> dict[str, StageResult]:
    """check/ and filter/ outputs holding `clips`, as the upstream of run_precompute."""
    check, filt = root / "check" / tag, root / "filter" / tag
    write_table(check / "clips.parquet", clips.drop(columns=["caption", "selected"]))
    write_table(filt / "curated.parquet", clips[["clip_id", "caption", "selected"]])
    return {
        "check": StageResult("check", tag, str(check)),
        "filter": StageResult("filter", tag, str(filt)),
    }


# --------------------------------------------------------------------------- models


def write_model_folder(folder: Path, vae_config: dict) -> Path:
    """A diffusers-layout folder with the configs precompute reads (no weights): a
    text-to-video transformer, as many latent channels in as out (those of the VAE)."""
    latent = vae_config["latent_channels"]
    transformer = {
        "_class_name": "CogVideoXTransformer3DModel",
        "max_text_seq_length": MAX_LEN,
        "in_channels": latent,
        "out_channels": latent,
    }
    for name, config in [
        ("transformer", transformer),
        ("vae", {"_class_name": "AutoencoderKLCogVideoX"} | vae_config),
    ]:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
    return folder


def build_models(vae_config: dict, t5_config: dict, captions: list[str], device: str, dtype):
    """(VAE, tokenizer, T5 encoder): random weights created on `device`, frozen, eval."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**vae_config).to(dtype)
        t5 = T5EncoderModel._from_config(T5Config(**t5_config), dtype=dtype)
    tokenizer = build_word_tokenizer(captions, SPECIALS, MAX_LEN, add_eos=True)
    return vae.eval().requires_grad_(False), tokenizer, t5.eval().requires_grad_(False)


# --------------------------------------------------------------------------- runs


@contextmanager
def timed(parts: dict[str, float], part: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    parts[part] = parts.get(part, 0.0) + time.perf_counter() - started


def reference(vae, tokenizer, t5, clips: pd.DataFrame, sample: tuple) -> dict[str, float]:
    """One clip at a time: decode, VAE-encode, T5-encode. Returns seconds per part and all."""
    frames, height, width = sample
    parts: dict[str, float] = {}
    started = time.perf_counter()
    for r in clips.itertuples():
        with timed(parts, "decode"):
            times = window_times(r.start, r.end, 8.0, frames)
            pixels = resize_center_crop(read_frames(r.path, times), height, width)
        with timed(parts, "vae"):
            x = torch.from_numpy(pixels).to(vae.device).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
            x = x.to(vae.dtype) / 127.5 - 1.0
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
            latents.cpu()  # as the example stores them; waits for the GPU
        with timed(parts, "t5"):
            cogvideox.encode_prompt(tokenizer, t5, [r.caption], MAX_LEN).cpu()
    return parts | {"all": time.perf_counter() - started}


def cogpipe_run(root: Path, model: Path, clips: pd.DataFrame, tag: str, sample, bs, device):
    """run_precompute over `clips` on workspace `root`; returns (result, wall seconds)."""
    frames, height, width = sample
    p = PrecomputeConfig(
        frames=frames, fps=8, height=height, width=width, batch_size=bs, min_psnr=0, device=device
    )
    cfg = PipelineConfig(workspace=root, model=str(model), precompute=p)
    upstream = write_upstream(root, clips, tag)
    started = time.perf_counter()
    result = precompute.run_precompute(Workspace(root), cfg, upstream)
    return result, time.perf_counter() - started


@contextmanager
def models_handed_over(vae, tokenizer, t5) -> Iterator[None]:
    """cogvideox's VAE and text-encoder loaders return the models built here."""
    loaders = cogvideox.load_vae, cogvideox.load_text_encoder
    cogvideox.load_vae = lambda model, device, dtype: vae
    cogvideox.load_text_encoder = lambda model, device, dtype: (tokenizer, t5)
    try:
        yield
    finally:
        cogvideox.load_vae, cogvideox.load_text_encoder = loaders


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- output


def _inverse_ratio(value, reference):
    """reference / value: the ratio of a lower-is-better metric."""
    return reference / value if value and reference is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=None, help="clips per run; 16 (dry: 8)")
    parser.add_argument("--batch-size", default="1,4", help="comma-separated VAE batch sizes")
    parser.add_argument("--dry", action="store_true", help="tiny models and clips on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    parser.add_argument("--commit", default=None, help="default: env COMMIT, else git's HEAD")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    size = SIZES["dry" if args.dry else "full"]
    source, sample = size["source"], size["sample"]
    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    dtype = cogvideox.weight_dtype("auto", {}, device)  # 2B-type: fp16 on GPU, fp32 on CPU
    frames, height, width = sample
    name = "tiny vae+t5 (dry)" if args.dry else "cogvideox-2b vae+t5"
    label = f"{name} {frames}x{height}x{width}"
    cpu = f"cpu-{platform.machine()}"
    bench = Bench("precompute", device_name(device == "cpu", cpu), commit(args.commit), args.out)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cogpipe-bench-precompute-") as tmp:
        tmp = Path(tmp)
        (tmp / "videos").mkdir()
        paths = make_clips(tmp / "videos", args.clips or (8 if args.dry else 16), source)
        clips = clips_table(paths, source, "clip")
        warm = clips_table(paths[: max(batch_sizes)], source, "warm")
        print(f"{len(paths)} clips made in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        vae_config = VAE_TINY if args.dry else VAE_2B
        model = write_model_folder(tmp / "model", vae_config)
        captions = list(clips.caption) + list(warm.caption)
        vae, tokenizer, t5 = build_models(
            vae_config, T5_TINY if args.dry else T5_XXL, captions, device, dtype
        )

        torch.backends.cudnn.benchmark = False  # the example's setting (PyTorch's default)
        reference(vae, tokenizer, t5, clips.iloc[:1], sample)  # warm-up
        reset_peak(device)
        ref = reference(vae, tokenizer, t5, clips, sample)
        ref_peak, ref_rate = peak_gb(device), len(clips) / ref["all"]

        for bs in batch_sizes:
            case = f"{label} bs{bs}"
            res = None
            with models_handed_over(vae, tokenizer, t5):
                try:
                    cogpipe_run(
                        tmp / f"ws-bs{bs}", model, warm.iloc[:bs], "warm", sample, bs, device
                    )
                    reset_peak(device)
                    res, seconds = cogpipe_run(
                        tmp / f"ws-bs{bs}", model, clips, "clip", sample, bs, device
                    )
                except torch.cuda.OutOfMemoryError:
                    pass  # freed below, once the traceback (and its tensors) is gone
            if res is None:
                reset_peak(device)
                bench.result(case, "oom", float(bs), None)
                continue
            assert res.counts["encoded_videos"] == len(clips), res.counts
            bench.result(case, "clips_per_s", len(clips) / seconds, ref_rate)
            peak = peak_gb(device)
            bench.result(case, "peak_mem_gb", peak, ref_peak, _inverse_ratio(peak, ref_peak))
            parts = res.stats["seconds"]
            for metric, ours, theirs in [
                ("decode_s_per_clip", "decode_wait", "decode"),
                ("vae_s_per_clip", "vae_encode", "vae"),
                ("t5_s_per_clip", "text_encode", "t5"),
                ("spot_check_s_per_clip", "spot_check", None),
            ]:
                value = parts.get(ours, 0.0) / len(clips)
                reference_value = ref[theirs] / len(clips) if theirs else None
                bench.result(
                    case, metric, value, reference_value, _inverse_ratio(value, reference_value)
                )

    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
