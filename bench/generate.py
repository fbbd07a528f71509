"""Seconds per generated video of full-size CogVideoX-2b and -5b, 50 steps, 49x480x720.

The pipeline is `CogVideoXPipeline` built from full-size random-weight components made
on the GPU (speed does not depend on weight values): the transformer configs of
bench/train_step.py, the VAE and T5-XXL of bench/precompute.py, a local word-level
tokenizer, and the DDIM scheduler the models ship with. Both variants sample through
`cogpipe.generate.generate_one`, the code `cogpipe generate` runs:

- plain: the weights at the model's precision (fp16 2B, bf16 5B), VAE tiling;
- compile: the same with the transformer blocks compiled (`GenerateOptions.compile`);
  one untimed 2-step video first (compilation; shapes do not depend on the steps).

Anchors: about 45 s (2B) and 90 s (5B) per video on an H100 per the model cards.

    python bench/generate.py [--models 2b,5b] [--steps 50]
    python bench/generate.py --dry     # tiny models on the CPU, to try the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    vae, tokenizer, t5 = build_models(VAE_TINY if dry else VAE_2B, T5_TINY if dry else T5_XXL,
                                      [PROMPT], device, dtype)  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       snr_shift_scale=3.0 if model == "2b" else 1.0,
                                       timestep_spacing="trailing", clip_sample=False)  # fmt: skip
    pipe = CogVideoXPipeline(tokenizer, t5, vae, transformer.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    return pipe, torch.device(device)


def seconds_per_video(pipe, options, repeats: int) -> float:
    from cogpipe.generate import generate_one

    tic = time.perf_counter()
    for _ in range(repeats):
        generate_one(pipe, PROMPT, options)  # returns uint8 on the CPU: waits for the GPU
    return (time.perf_counter() - tic) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU")
    args = parser.parse_args()

    import torch

    from cogpipe.generate import GenerateOptions
    from cogpipe.models import speed

    size = dict(frames=9, height=64, width=64) if args.dry else {}
    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    common = {"device": device, "date": datetime.date.today().isoformat(),
              "commit": os.environ.get("COMMIT", "unknown")}  # fmt: skip
    for model in args.models.split(","):
        pipe, dev = build_pipeline(model, args.dry)
        options = GenerateOptions(model=model, steps=args.steps, device=dev.type, **size)
        case = f"cogvideox-{model} {options.steps} steps {options.frames}x{options.height}x{options.width}"
        plain = seconds_per_video(pipe, options, args.repeats)
        line = {"bench": "generate", "case": f"{case} plain", "metric": "s_per_video",
                "value": round(plain, 2), "reference": round(plain, 2), "ratio": 1.0}  # fmt: skip
        print(json.dumps(line | common), flush=True)
        if args.dry:
            continue  # compile needs a GPU
        speed.compile_blocks(pipe.transformer)
        # Compiles: the shapes do not depend on the step count, so 2 steps compile it all.
        seconds_per_video(pipe, options.model_copy(update={"steps": 2}), 1)
        fast = seconds_per_video(pipe, options, args.repeats)
        line = {"bench": "generate", "case": f"{case} compile", "metric": "s_per_video",
                "value": round(fast, 2), "reference": round(plain, 2),
                "ratio": round(plain / fast, 3)}  # fmt: skip
        print(json.dumps(line | common), flush=True)
        del pipe
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
