"""Seconds per clip of the CogVideoX-2b VAE encode at 49x480x720, by way of running it.

Precompute is bound by the VAE (bench/precompute.py: about 1 s per clip of ~1.3 s on an
H100), so this measures what could make the encode itself faster, each variant in its
own process on the same random clip, against diffusers' default (eager, NCDHW, cuDNN
heuristics) in the same run:

- benchmark: cuDNN benchmark mode (what precompute runs with);
- channels_last: NDHWC activations (`torch.channels_last_3d`) plus benchmark mode;
- compile: `torch.compile` of the encoder plus benchmark mode.

    python bench/vae_encode.py [--variants default,benchmark,channels_last,compile] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Bench, commit, device_name, run_fresh  # noqa: E402

VARIANTS = ("default", "benchmark", "channels_last", "compile")


def measure(variant: str, batch: int, repeats: int) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from precompute import VAE_2B

    torch.backends.cudnn.benchmark = variant != "default"
    with torch.device("cuda"):
        vae = AutoencoderKLCogVideoX(**VAE_2B).to(torch.float16).eval().requires_grad_(False)
    x = torch.rand(batch, 3, 49, 480, 720, device="cuda", dtype=torch.float16) * 2 - 1
    if variant == "channels_last":  # conv weights and the input; norms keep their layout
        for conv in (m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    if variant == "compile":
        vae.encoder.compile()
    with torch.no_grad():
        tic = time.perf_counter()
        vae.encode(x).latent_dist.mean.float().sum().item()  # warm-up (tuning, compilation)
        warm = time.perf_counter() - tic
        torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        for _ in range(repeats):
            out = vae.encode(x).latent_dist.mean
        out.float().sum().item()
    seconds = (time.perf_counter() - tic) / repeats / batch
    return {
        "s_per_clip": seconds,
        "warmup_s": warm,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.repeats)))
        return

    bench = Bench("vae_encode", device_name(False), commit())
    reference = None
    for variant in ["default"] + [v for v in args.variants.split(",") if v != "default"]:
        one = ["--one", variant, "--batch", str(args.batch), "--repeats", str(args.repeats)]
        got = run_fresh(__file__, one)
        case = f"cogvideox-2b vae encode fp16 49x480x720 bs{args.batch} {variant}"
        if "error" in got:
            bench.failed(case, "s_per_clip", got["error"])
            continue
        reference = reference or got["s_per_clip"]
        bench.print(
            {
                "bench": "vae_encode",
                "case": case,
                "metric": "s_per_clip",
                "value": round(got["s_per_clip"], 4),
                "reference": round(reference, 4),
                "ratio": round(reference / got["s_per_clip"], 3),
                "peak_mem_gb": round(got["peak_mem_gb"], 2),
                "warmup_s": round(got["warmup_s"], 1),
            }
        )


if __name__ == "__main__":
    main()
