"""Seconds per generated video of full-size CogVideoX-2b and -5b (50 steps, 49x480x720)
and CogVideoX1.5-5B (50 steps, 81x768x1360).

The pipeline is `CogVideoXPipeline` built from full-size random-weight components made
on the GPU (speed does not depend on weight values): the transformer configs of
bench/train_step.py, the VAE and T5-XXL of bench/precompute.py, a local word-level
tokenizer, and the DDIM scheduler the models ship with. Both variants sample through
`cogpipe.generate.generate_one`, the code `cogpipe generate` runs, at the size
bench/train_step.py trains the model at (1.5: 21 latent frames, which the pipeline pads
to 22 for the temporal patch of 2 and drops after denoising):

- plain: the weights at the model's precision (fp16 2B, bf16 5B and 1.5-5B), VAE tiling;
- compile: the same with the transformer blocks compiled (`GenerateOptions.compile`);
  one untimed 2-step video first (compilation; shapes do not depend on the steps).

With `--step-cache first_block,pab,faster` each model also samples one seed exactly and
with each step-reuse cache (`cogpipe.step_cache`) through `cogpipe.sampling`, in the same
run, and prints a line per option: its seconds against the exact video's (ratio above 1:
faster) and its deviation from it, `rel_l2` of the denoised latents and `psnr_db` of the
decoded frames (null: identical). The exact video is timed first, after the plain and
compile variants when they run (which warm the GPU up).

Anchors: about 45 s (2B), 90 s (5B) and 550 s (1.5-5B) per video on an H100 per the
model cards. A 1.5-5B video takes minutes: run its variants one per command
(`--variants plain`, then `--variants compile`) to stay within a time limit.

    python bench/generate.py [--models 2b,5b,1.5-5b] [--steps 50] [--variants plain,compile]
    python bench/generate.py --models 2b,1.5-5b --dry   # tiny models on the CPU, to try the script
    python bench/generate.py --variants plain --step-cache first_block,pab,faster [--step-cache-threshold 0.1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, device_name  # noqa: E402

PROMPT = "A bald fighter in black shorts slaps his opponent as the referee watches."


def build_pipeline(model: str, dry: bool):
    """A CogVideoXPipeline of random full-size (or, dry, tiny) components."""
    import torch
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline
    from precompute import T5_TINY, T5_XXL, VAE_2B, VAE_TINY, build_models
    from train_step import build, transformer_config

    from cogpipe.models import cogvideox

    device = "cpu" if dry else "cuda"
    dtype = cogvideox.weight_dtype("auto", transformer_config(model, dry), device)
    transformer, _ = build(model, dry, dtype)
    vae, tokenizer, t5 = build_models(
        VAE_TINY if dry else VAE_2B, T5_TINY if dry else T5_XXL, [PROMPT], device, dtype
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0 if model == "2b" else 1.0,
        timestep_spacing="trailing",
        clip_sample=False,
    )
    pipe = CogVideoXPipeline(tokenizer, t5, vae, transformer.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    return pipe, torch.device(device)


def video_size(model: str, dry: bool) -> dict:
    """Frames, height and width of the model's videos: those bench/train_step.py trains at."""
    from train_step import shapes, transformer_config

    s = shapes(transformer_config(model, dry), dry)
    return {"frames": s["pixel_frames"], "height": s["height"], "width": s["width"]}


def seconds_per_video(pipe, options, repeats: int) -> float:
    """Mean seconds of `repeats` videos; each must have the frames and size asked for (a
    1.5 video whose padding frame was not dropped would not).

    Raises:
        RuntimeError: a video of another shape.
    """
    from cogpipe.generate import generate_one

    want = (options.frames, options.height, options.width, 3)
    tic = time.perf_counter()
    for _ in range(repeats):
        video = generate_one(pipe, PROMPT, options)  # uint8 on the CPU: waits for the GPU
        if video.shape != want:
            raise RuntimeError(
                f"generated a video of shape {list(video.shape)}, asked {list(want)}"
            )
    return (time.perf_counter() - tic) / repeats


def result(case: str, seconds: float, plain: float | None) -> dict:
    """A line of seconds per video against the plain variant's (None: not measured)."""
    return {
        "bench": "generate",
        "case": case,
        "metric": "s_per_video",
        "value": round(seconds, 2),
        "reference": plain and round(plain, 2),
        "ratio": plain and round(plain / seconds, 3),
    }


def timed_video(pipe, request) -> tuple:
    """(latents [1, F', C, h, w], frames [F, H, W, 3] uint8, seconds) of one sampled video."""
    from cogpipe import sampling

    tic = time.perf_counter()
    latents = sampling.denoise(pipe, request)
    frames = sampling.decode(pipe, latents, request)  # uint8 on the CPU: waits for the GPU
    return latents, frames, time.perf_counter() - tic


def cache_lines(pipe, options, case: str, args) -> Iterator[dict]:
    """A line per step-cache option: its seconds against the exact video of the same seed,
    sampled first in this run, and its deviation from it (rel_l2, psnr_db)."""
    from cogpipe import sampling, step_cache

    exact = sampling.request_for(options, PROMPT, options.seed)
    exact_latents, exact_frames, exact_seconds = timed_video(pipe, exact)
    for option in args.step_cache:
        request = replace(exact, step_cache=option, step_cache_threshold=args.step_cache_threshold)
        latents, frames, seconds = timed_video(pipe, request)
        found = step_cache.deviation(exact_latents, latents, exact_frames, frames)
        threshold = f" {args.step_cache_threshold}" if option == "first_block" else ""
        yield result(f"{case} step_cache {option}{threshold}", seconds, exact_seconds) | {
            "rel_l2": round(found["rel_l2"], 6),
            "psnr_db": round(found["psnr_db"], 2) if math.isfinite(found["psnr_db"]) else None,
        }


def model_lines(model: str, args) -> Iterator[dict]:
    """The result lines of one model: plain, then compiled (its ratio against plain)."""
    import torch

    from cogpipe.generate import GenerateOptions
    from cogpipe.models import speed

    pipe, dev = build_pipeline(model, args.dry)
    options = GenerateOptions(
        model=model, steps=args.steps, device=dev.type, **video_size(model, args.dry)
    )
    case = (
        f"cogvideox-{model} {options.steps} steps {options.frames}x{options.height}x{options.width}"
    )
    plain = None
    if "plain" in args.variants:
        plain = seconds_per_video(pipe, options, args.repeats)
        yield result(f"{case} plain", plain, plain)
    if "compile" in args.variants and not args.dry:  # compile needs a GPU
        speed.compile_blocks(pipe.transformer)
        # Compiles: the shapes do not depend on the step count, so 2 steps compile it all.
        seconds_per_video(pipe, options.model_copy(update={"steps": 2}), 1)
        fast = seconds_per_video(pipe, options, args.repeats)
        yield result(f"{case} compile", fast, plain)
    if args.step_cache:
        yield from cache_lines(pipe, options, case, args)
    del pipe
    if not args.dry:
        torch.cuda.empty_cache()


def main() -> None:
    from train_step import MODELS, image_to_video

    from cogpipe.step_cache import OPTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default="plain,compile", help="plain, compile or both")
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU")
    parser.add_argument(
        "--step-cache",
        default="",
        help="step-reuse caches to time against the exact path: first_block, pab, faster",
    )
    parser.add_argument(
        "--step-cache-threshold", type=float, default=0.1, help="first_block's threshold"
    )
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    args.step_cache = [o for o in args.step_cache.split(",") if o]
    text_models = [m for m, config in MODELS.items() if not image_to_video(config)]
    models = args.models.split(",")
    if unknown := [m for m in models if m not in text_models]:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(text_models)}")
    if unknown := [v for v in args.variants if v not in ("plain", "compile")]:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: plain, compile")
    caches = [o for o in OPTIONS if o != "none"]
    if unknown := [o for o in args.step_cache if o not in caches]:
        parser.error(f"--step-cache: unknown {', '.join(unknown)}; known: {', '.join(caches)}")

    bench = Bench("generate", device_name(args.dry), commit())
    for model in models:
        bench.print_lines(model_lines(model, args))


if __name__ == "__main__":
    main()
