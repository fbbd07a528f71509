"""Seconds per generated video of full-size CogVideoX-2b and -5b (50 steps, 49x480x720)
and CogVideoX1.5-5B (50 steps, 81x768x1360).

The pipeline is `CogVideoXPipeline` built from full-size random-weight components made
on the GPU (speed does not depend on weight values): the transformer configs of
bench/train_step.py, the VAE and T5-XXL of bench/precompute.py, a local word-level
tokenizer, and the DDIM scheduler the models ship with. Every variant samples through
`cogpipe.sampling` (denoise, then decode), the code `cogpipe generate` runs, at the size
bench/train_step.py trains the model at (1.5: 21 latent frames, which the pipeline pads
to 22 for the temporal patch of 2 and drops after denoising):

- plain: the weights at the model's precision (fp16 2B, bf16 5B and 1.5-5B), VAE tiling,
  eager: the exact path, and the reference of every deviation;
- compile: the same with the transformer blocks compiled (`GenerateOptions.compile`);
  one untimed 2-step video first (compilation; shapes do not depend on the steps);
- fp8: then the blocks' linears in FP8 (`cogpipe.models.speed.fp8_linears`, torchao float8
  with per-row scales) and compiled again (needs an H100-class GPU and torchao).

Variants run in the order given, each on the pipeline the last one left. With
`--step-cache first_block,pab,faster`, each option then samples the same seed after every
variant named in `--cache-after` (default plain). Every line after the first exact one
reports its deviation from it: `rel_l2` of the denoised latents and `psnr_db` of the
decoded frames (null: identical); ratios are against the first variant (ratio above 1:
faster). PAB and FasterCache re-trace compiled blocks as they skip (2B: FasterCache 46 s
compiled, 23 s eager, on an H200): they run only after plain.

Anchors: about 45 s (2B), 90 s (5B) and 550 s (1.5-5B) per video on an H100 per the
model cards. A 1.5-5B video takes minutes: run its variants one per command
(`--variants plain`, then `--variants compile`) to stay within a time limit.

    python bench/generate.py [--models 2b,5b,1.5-5b] [--steps 50] [--variants plain,compile]
    python bench/generate.py --models 2b,1.5-5b --dry   # tiny models on the CPU, to try the script
    python bench/generate.py --variants plain --step-cache first_block,pab,faster [--step-cache-threshold 0.1]
    python bench/generate.py --models 5b --variants compile,fp8 --step-cache first_block --cache-after compile,fp8
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

from common import Bench, commit, device_name, timed  # noqa: E402

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


def result(case: str, seconds: float, reference: float | None) -> dict:
    """A line of seconds per video against a reference variant's (None: not measured)."""
    return timed("generate", case, "s_per_video", seconds, reference, digits=2)


def timed_video(pipe, request) -> tuple:
    """(latents [1, F', C, h, w], frames [F, H, W, 3] uint8, seconds) of one sampled video,
    through `cogpipe.sampling` (the path `cogpipe generate` and evaluation take); the
    frames must have the shape asked for (a 1.5 video whose padding frame was not dropped
    would not).

    Raises:
        RuntimeError: a video of another shape.
    """
    from cogpipe import sampling

    tic = time.perf_counter()
    latents = sampling.denoise(pipe, request)
    frames = sampling.decode(pipe, latents, request)  # uint8 on the CPU: waits for the GPU
    seconds = time.perf_counter() - tic
    want = (request.frames, request.height, request.width, 3)
    if frames.shape != want:
        raise RuntimeError(f"generated a video of shape {list(frames.shape)}, asked {list(want)}")
    return latents, frames, seconds


class Exact:
    """The first exact video of the run (latents, frames): what every other variant's
    deviation is measured from."""

    def __init__(self):
        self.latents = self.frames = None

    def deviation(self, latents, frames) -> dict:
        """{"rel_l2", "psnr_db"} of a video against the exact one ({} for the exact one
        itself, which becomes the reference)."""
        from cogpipe import step_cache

        if self.latents is None:
            self.latents, self.frames = latents, frames
            return {}
        found = step_cache.deviation(self.latents, latents, self.frames, frames)
        psnr = found["psnr_db"]
        return {
            "rel_l2": round(found["rel_l2"], 6),
            "psnr_db": round(psnr, 2) if math.isfinite(psnr) else None,  # null: identical
        }


def measured(pipe, request, case: str, reference: float | None, exact: Exact, repeats: int):
    """(result line with its deviation from the exact video, mean seconds) of `repeats`
    videos of one request."""
    runs = [timed_video(pipe, request) for _ in range(repeats)]
    seconds = sum(r[2] for r in runs) / repeats
    line = result(case, seconds, reference or seconds) | exact.deviation(*runs[0][:2])
    return line, seconds


def warm_up(pipe, request) -> float:
    """Seconds of one untimed 2-step video: compiles the blocks for this size (the shapes
    do not depend on the step count)."""
    tic = time.perf_counter()
    timed_video(pipe, replace(request, steps=2))
    return time.perf_counter() - tic


def model_lines(model: str, args) -> Iterator[dict]:
    """The result lines of one model, on one seed, in this order (each variant changes the
    pipeline for those after it): plain (eager, the exact reference), compile (blocks
    compiled), fp8 (the blocks' linears in FP8, then compiled again). After each variant
    named in --cache-after, one line per --step-cache option on that pipeline. Ratios are
    against the first exact variant measured (plain, else compile); deviations against the
    first exact video."""
    import torch

    from cogpipe import sampling
    from cogpipe.generate import GenerateOptions
    from cogpipe.models import speed

    pipe, dev = build_pipeline(model, args.dry)
    options = GenerateOptions(
        model=model, steps=args.steps, device=dev.type, **video_size(model, args.dry)
    )
    size = f"{options.frames}x{options.height}x{options.width}"
    case = f"cogvideox-{model} {options.steps} steps {size}"
    request = sampling.request_for(options, PROMPT, options.seed)
    exact, reference = Exact(), None
    for variant in args.variants:
        if variant != "plain" and args.dry:
            print(f"{case} {variant}: skipped, needs a CUDA GPU", file=sys.stderr)
            continue
        warm = None
        if variant == "fp8":
            speed.fp8_linears(pipe.transformer)
        if variant in ("compile", "fp8"):
            speed.compile_blocks(pipe.transformer)  # again after fp8: new weights, new graphs
            warm = warm_up(pipe, request)
        line, seconds = measured(pipe, request, f"{case} {variant}", reference, exact, args.repeats)
        reference = reference or seconds
        yield line | ({"warmup_s": round(warm, 1)} if warm is not None else {})
        if variant in args.cache_after:
            compiled = variant != "plain"
            name = f"{case} {variant}"
            yield from cache_lines(pipe, request, name, compiled, exact, args, reference)
    del pipe
    if not args.dry:
        torch.cuda.empty_cache()


def cache_lines(
    pipe, request, case: str, compiled: bool, exact: Exact, args, reference: float
) -> Iterator[dict]:
    """A line per step-cache option on the pipeline as it is now: its seconds against the
    reference's and its deviation from the exact video. A cache on compiled blocks is
    warmed up first (its hooks are traced into new graphs)."""
    for option in args.step_cache:
        if compiled and option in ("pab", "faster"):  # config.py refuses them (evaluate)
            print(
                f"{case} step_cache {option}: skipped, re-traces compiled blocks", file=sys.stderr
            )
            continue
        cached = replace(request, step_cache=option, step_cache_threshold=args.step_cache_threshold)
        warm = warm_up(pipe, cached) if compiled and not args.dry else None
        threshold = f" {args.step_cache_threshold}" if option == "first_block" else ""
        name = f"{case} step_cache {option}{threshold}"
        line, _ = measured(pipe, cached, name, reference, exact, args.repeats)
        yield line | ({"warmup_s": round(warm, 1)} if warm is not None else {})


def main() -> None:
    from train_step import MODELS, image_to_video

    from cogpipe.step_cache import OPTIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--variants", default="plain,compile", help="in order: plain, compile, fp8 (needs cuda)"
    )
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU")
    parser.add_argument(
        "--step-cache",
        default="",
        help="step-reuse caches to time against the exact path: first_block, pab, faster",
    )
    parser.add_argument(
        "--step-cache-threshold", type=float, default=0.1, help="first_block's threshold"
    )
    parser.add_argument(
        "--cache-after",
        default="plain",
        help="the variants after which each --step-cache option runs (pab recompiles"
        " compiled blocks at every other step: run it after plain)",
    )
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    args.cache_after = args.cache_after.split(",")
    args.step_cache = [o for o in args.step_cache.split(",") if o]
    text_models = [m for m, config in MODELS.items() if not image_to_video(config)]
    models = args.models.split(",")
    if unknown := [m for m in models if m not in text_models]:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(text_models)}")
    known = ("plain", "compile", "fp8")
    if unknown := [v for v in args.variants + args.cache_after if v not in known]:
        parser.error(f"--variants/--cache-after: unknown {', '.join(unknown)}; known: {known}")
    caches = [o for o in OPTIONS if o != "none"]
    if unknown := [o for o in args.step_cache if o not in caches]:
        parser.error(f"--step-cache: unknown {', '.join(unknown)}; known: {', '.join(caches)}")

    bench = Bench("generate", device_name(args.dry), commit())
    for model in models:
        bench.print_lines(model_lines(model, args))


if __name__ == "__main__":
    main()
