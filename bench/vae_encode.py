"""Seconds per clip of the CogVideoX-2b VAE encode at 49x480x720, by way of running it, and
how far each faster variant's latents land from diffusers' default on the same clip.

Precompute is bound by the VAE (bench/precompute.py on an H200: 0.49 of its ~0.58 s per
clip, encoder compiled), so this measures what could make the encode itself faster. Every
variant runs in its own process (a clean peak-memory count, nothing compiled shared) on
the same random weights (seed 0, fp32 init cast to the run's dtype) and the same clip (a
textured scene with grain and a block swinging across it, so GroupNorm sees real motion),
after diffusers' default in the same run. A variant is a set of features:

- benchmark: cuDNN benchmark mode, each conv's algorithm timed once per shape (what
  precompute runs with); every variant but `default` has it;
- channels_last: NDHWC activations: the encoder's Conv3d weights `channels_last_3d`, the
  downsamplers' Conv2d weights (they run frame by frame on 4-D tensors) `channels_last`,
  the clip `channels_last_3d` (`Module.to(memory_format=channels_last_3d)`, as this
  bench did first, fails on those 4-D weights: "required rank 5 tensor");
- input_ndhwc: the clip as precompute hands it over (`cogvideox.encode_video` permutes
  [B, F, H, W, 3] to [B, 3, F, H, W] without a copy: NDHWC strides), weights NCDHW;
  without it the clip is contiguous NCDHW, as diffusers' pipelines pass it;
- compile: `cogpipe.models.speed.compile_static(vae.encoder)`, what precompute does;
- max_autotune: `torch.compile(mode="max-autotune-no-cudagraphs")` of the encoder, static
  shapes (Triton conv templates timed against cuDNN for every conv shape);
- frames16 / frames_all: the encoder's temporal chunk. diffusers encodes the first 9
  frames, then 8 at a time (`vae.num_sample_frames_batch_size`), each causal conv
  carrying its last 2 input frames over (`conv_cache`); these take 17 then 16, or the
  whole clip in one call. NOT exact: the convs and the temporal pooling see the same
  frames either way, but every GroupNorm takes its statistics over the frames of the
  chunk (with a per-frame GroupNorm the chunk sizes agree bit for bit in fp64 on the tiny
  VAE). At 49 frames `CogVideoXSafeConv3d` splits the full-resolution convs of a whole
  clip into 3 pieces along time (inputs over 2 GiB at 2 bytes an element; exact);
- tiling: `vae.enable_tiling()` (precompute.vae_tiling): tiles of half the clip's height
  and width (diffusers' 240x360 at 480x720), overlapping by 1/6 and 1/5, blended;
- fp32: weights and clip in fp32, TF32 off: how far the fp16 (bf16) run itself is from
  full precision, the yardstick for the other deviations.

The named variants: default (none), benchmark, channels_last, compile,
compile_channels_last, compile_max_autotune, frames16, frames_all, tiling, fp32, and
precompute (benchmark + compile + input_ndhwc: what precompute runs today); any other
name is features joined by "+", on top of benchmark mode (compile+channels_last+frames16).

Each line (DESIGN.md's shape; ratio = default's s_per_clip / the variant's, > 1 faster)
adds `max_abs` and `rel_l2` (||v - d|| / ||d||) of `latent_dist.mean` in fp32 against the
default's on the same clip (0.0: bit-exact), `mfu` (the default encode's conv FLOPs,
149.0 TFLOP per clip at 49x480x720, counted by torch's FlopCounterMode, / s_per_clip /
989 TFLOP/s dense fp16), `peak_mem_gb` and `warmup_s` (the first call: cuDNN tuning,
compilation). `--budget` stops the run after that many seconds: a variant is not started
without enough time left for it (the line says so) and one still running is stopped.

    python bench/vae_encode.py [--variants default,compile,...] [--batch 1] [--repeats 3]
        [--dtype fp16] [--budget 225] [--out FILE] [--commit abc1234]
    python bench/vae_encode.py --dry   # tiny VAE, 33x96x160 clip, CPU fp32: every code path
    python bench/vae_encode.py --dry --compile-on-cpu --variants compile   # minutes on CPU
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, device_name, run_fresh, timed  # noqa: E402

FEATURES = (
    "benchmark",
    "channels_last",
    "input_ndhwc",
    "compile",
    "max_autotune",
    "frames16",
    "frames_all",
    "tiling",
    "fp32",
)
VARIANTS = {
    "default": (),
    "benchmark": ("benchmark",),
    "channels_last": ("benchmark", "channels_last"),
    "compile": ("benchmark", "compile"),
    "compile_channels_last": ("benchmark", "compile", "channels_last"),
    "compile_max_autotune": ("benchmark", "max_autotune"),
    "frames16": ("benchmark", "frames16"),
    "frames_all": ("benchmark", "frames_all"),
    "tiling": ("benchmark", "tiling"),
    "fp32": ("benchmark", "fp32"),
    "precompute": ("benchmark", "compile", "input_ndhwc"),
}
COMPILED = {"compile", "max_autotune"}
# Seconds a variant needs on a GPU before `--budget` lets it start (the H100's compile
# warm-up was 73 s; max-autotune times Triton templates for every conv shape on top).
NEEDS_S = {"eager": 20, "compile": 90, "max_autotune": 180}
SIZES = {"full": (49, 480, 720), "dry": (33, 96, 160)}  # frames, height, width
PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense fp16 and bf16
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def features_of(variant: str) -> tuple[str, ...]:
    """A named variant's features, or those of "a+b+c" with benchmark mode added.

    Raises:
        ValueError: an unknown feature, or compile with max_autotune.
    """
    if variant in VARIANTS:
        return VARIANTS[variant]
    named = tuple(variant.split("+"))
    unknown = [f for f in named if f not in FEATURES]
    if unknown:
        raise ValueError(
            f"variant {variant!r}: unknown {', '.join(unknown)}; a variant is one of"
            f" {', '.join(VARIANTS)} or features joined by '+' ({', '.join(FEATURES)})"
        )
    if COMPILED <= set(named):
        raise ValueError(f"variant {variant!r}: compile and max_autotune are two modes of one")
    return tuple(dict.fromkeys(("benchmark", *named)))


# --------------------------------------------------------------------------- one variant


_STOPPED: list[float] = []  # when the alarm went off


def _stop_at(deadline: float | None) -> None:
    """Raise TimeoutError in this process at `deadline` (time.time()): the run's budget."""
    if deadline is None:
        return

    def out_of_time(signum, frame):
        _STOPPED.append(time.time())
        raise TimeoutError("stopped: past the run's --budget")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, math.ceil(deadline - time.time())))


def vae_config(dry: bool) -> dict:
    """CogVideoX-2b's VAE config, or with `dry` the tiny one of bench/precompute.py."""
    from precompute import VAE_2B, VAE_TINY

    return VAE_TINY if dry else VAE_2B


def build(config: dict, features: tuple[str, ...], device: str, dtype):
    """The VAE with the variant's features applied, in eval mode, frozen."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from cogpipe.models import speed

    torch.manual_seed(0)  # fp32 init on the device, then the run's dtype: same weights
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**config)
    vae = vae.to(dtype).eval().requires_grad_(False)
    if "channels_last" in features:  # the weights' own layout; the encoder only is used
        for conv in vae.encoder.modules():
            if isinstance(conv, torch.nn.Conv3d | torch.nn.Conv2d):
                nd = torch.channels_last_3d if conv.weight.ndim == 5 else torch.channels_last
                conv.weight.data = conv.weight.data.contiguous(memory_format=nd)
    if "compile" in features:
        speed.compile_static(vae.encoder)
    if "max_autotune" in features:  # two graphs: the first chunk and the others (cached)
        vae.encoder.compile(dynamic=False, mode="max-autotune-no-cudagraphs")
    return vae


def clip_tensor(path: str, features: tuple[str, ...], batch: int, device: str, dtype):
    """The clip [B, 3, F, H, W] in [-1, 1] as `cogvideox.encode_video` makes it, in the
    variant's layout (NCDHW contiguous unless input_ndhwc or channels_last)."""
    import torch

    frames = torch.from_numpy(np.load(path))[None].repeat(batch, 1, 1, 1, 1)  # [B, F, H, W, 3]
    x = frames.to(device).float() / 255.0 * 2.0 - 1.0
    x = x.permute(0, 4, 1, 2, 3).to(dtype)  # [B, F, H, W, C] -> [B, C, F, H, W], NDHWC strides
    if "channels_last" in features:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x if "input_ndhwc" in features else x.contiguous()


def configure(vae, features: tuple[str, ...], x) -> None:
    """The temporal chunk and tiling of the variant (attributes of the VAE, not weights)."""
    frames, height, width = x.shape[2:]
    if "frames16" in features:
        vae.num_sample_frames_batch_size = 16  # 17, then 16 at a time
    if "frames_all" in features:
        vae.num_sample_frames_batch_size = frames  # one call
    if "tiling" in features:  # half the height and width: diffusers' 240x360 at 480x720
        vae.enable_tiling(tile_sample_min_height=height // 2, tile_sample_min_width=width // 2)


def conv_tflop(config: dict, x) -> float | None:
    """The encode's FLOPs (convolutions; norms and elementwise are not counted) in TFLOP,
    on the meta device; None where the counter fails (the timing stands without it)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            meta = AutoencoderKLCogVideoX(**config).to(x.dtype)
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                meta.encode(torch.empty(x.shape, dtype=x.dtype))
        return counter.get_total_flops() / 1e12 / x.shape[0]
    except Exception as e:  # a side figure: say why, never fail the timing
        print(f"conv_tflop: {e!r}", file=sys.stderr)
        return None


def deviation(mean, ref_path: str, save: bool) -> dict:
    """max_abs and rel_l2 of this run's fp32 latent means against the default's saved ones
    (None when the default failed or the shapes differ); `save`: this run is the default."""
    import torch

    if save:
        torch.save(mean, ref_path)
        return {"max_abs": 0.0, "rel_l2": 0.0}
    if not Path(ref_path).exists():
        return {"max_abs": None, "rel_l2": None}
    ref = torch.load(ref_path)
    if ref.shape != mean.shape:
        print(f"deviation: shape {tuple(mean.shape)} against {tuple(ref.shape)}", file=sys.stderr)
        return {"max_abs": None, "rel_l2": None}
    diff = (mean - ref).double()
    return {
        "max_abs": diff.abs().max().item(),
        "rel_l2": (diff.norm() / ref.double().norm()).item(),
    }


def measure(args) -> dict:
    """Time one variant's encodes of the clip in this process (a warm-up call, then
    `repeats` timed ones) and compare its latent means with the default's."""
    import torch

    _stop_at(args.deadline)
    features = features_of(args.one)
    device = "cpu" if args.dry else "cuda"
    dtype = getattr(torch, DTYPES["fp32" if "fp32" in features else args.dtype])
    torch.backends.cudnn.benchmark = "benchmark" in features
    if "fp32" in features:  # IEEE fp32 convs, not TF32. The old flag sets cuDNN's conv and
        torch.backends.cudnn.allow_tf32 = False  # RNN alike (conv's alone makes it unreadable)
    config = vae_config(args.dry)
    vae = build(config, features, device, dtype)
    x = clip_tensor(args.clip, features, args.batch, device, dtype)
    configure(vae, features, x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        tic = time.perf_counter()
        mean = vae.encode(x).latent_dist.mean  # cuDNN tuning, compilation
        sync()
        warm = time.perf_counter() - tic
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        for _ in range(args.repeats):
            mean = vae.encode(x).latent_dist.mean
        sync()
    seconds = (time.perf_counter() - tic) / args.repeats / args.batch
    signal.alarm(0)
    return {
        "s_per_clip": seconds,
        "warmup_s": warm,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None,
        "tflop": conv_tflop(config, x) if args.save_ref else None,
        **deviation(mean.float().cpu(), args.ref, args.save_ref),
    }


# --------------------------------------------------------------------------- the run


def write_clip(path: Path, frames: int, height: int, width: int) -> str:
    """A uint8 clip [F, H, W, 3]: a textured scene with grain (sd 4) and a block swinging
    across it (bench/common.py's, as bench/precompute.py's clips)."""
    from common import textured_scene, with_subject

    rng = np.random.default_rng(0)
    scene = textured_scene(rng, width, height)
    clip = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):  # a frame at a time: the grain of 49 frames is 400 MB in fp64
        grain = rng.normal(0, 4, (height, width, 3))
        clip[i] = with_subject(scene + grain, 4 * i).clip(0, 255).astype(np.uint8)
    np.save(path, clip)
    return str(path)


def _sig(value, digits: int = 3):
    """A deviation to `digits` significant digits (4-place rounding would make 3e-5 read
    as bit-exact); None as it is."""
    return None if value is None else float(f"{value:.{digits}g}")


def _needs(features: tuple[str, ...]) -> float:
    kind = next((f for f in ("max_autotune", "compile") if f in features), "eager")
    return NEEDS_S[kind]


def _child_args(args, variant: str, clip: str, ref: str, deadline: float | None) -> list[str]:
    one = ["--one", variant, "--clip", clip, "--ref", ref, "--batch", str(args.batch)]
    one += ["--repeats", str(args.repeats), "--dtype", args.dtype]
    one += ["--dry"] * args.dry + ["--save-ref"] * (variant == "default")
    return one + (["--deadline", repr(deadline)] if deadline else [])


def run(args, bench: Bench, variants: list[str]) -> None:
    """Every variant in its own process, default first; one line each."""
    frames, height, width = SIZES["dry" if args.dry else "full"]
    model = "tiny" if args.dry else "cogvideox-2b"
    dtype = args.dtype
    started = time.time()
    deadline = started + args.budget if args.budget else None
    reference = tflop = None
    with tempfile.TemporaryDirectory(prefix="vae_encode-") as tmp:
        clip = write_clip(Path(tmp) / "clip.npy", frames, height, width)
        ref = str(Path(tmp) / "default.pt")
        for variant in variants:
            features = features_of(variant)
            case = f"{model} vae encode {dtype} {frames}x{height}x{width} bs{args.batch} {variant}"
            extra = {"features": "+".join(features) or "none"}
            if args.dry and COMPILED & set(features) and not args.compile_on_cpu:
                bench.failed(case, "s_per_clip", "skipped: needs cuda", **extra)
                continue
            needs = 0 if args.dry else _needs(features)
            if deadline and deadline - time.time() <= needs:
                left = max(deadline - time.time(), 0)
                why = f"skipped: {left:.0f} s of --budget left, it needs {needs} s"
                bench.failed(case, "s_per_clip", why, **extra)
                continue
            got = run_fresh(__file__, _child_args(args, variant, clip, ref, deadline))
            if "error" in got:
                bench.failed(case, "s_per_clip", got["error"], **extra)
                continue
            seconds = got["s_per_clip"]
            if variant == "default":
                reference, tflop = seconds, got["tflop"]
            mfu = tflop / seconds / PEAK_TFLOPS if tflop and not args.dry else None
            bench.print(
                timed("vae_encode", case, "s_per_clip", seconds, reference)
                | {
                    **extra,
                    "max_abs": _sig(got["max_abs"]),
                    "rel_l2": _sig(got["rel_l2"]),
                    "mfu": mfu and round(mfu, 3),
                    "model_tflop": _sig(tflop, 4),
                    "peak_mem_gb": got["peak_mem_gb"] and round(got["peak_mem_gb"], 2),
                    "warmup_s": round(got["warmup_s"], 1),
                }
            )
    print(f"vae_encode: {len(variants)} variants in {time.time() - started:.0f} s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="timed encodes (3; 1 with --dry)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="fp16; fp32 with --dry")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (none: no limit)")
    parser.add_argument("--dry", action="store_true", help="tiny VAE and clip on the CPU")
    parser.add_argument("--compile-on-cpu", action="store_true", help="--dry: run compile too")
    parser.add_argument("--out", help="append the result lines to this file")
    parser.add_argument("--commit")
    for hidden in ("--one", "--clip", "--ref"):  # a variant's own process
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--save-ref", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.dry else 3)
    args.dtype = args.dtype or ("fp32" if args.dry else "fp16")
    if args.one:
        try:
            print(json.dumps(measure(args)))
        except Exception:  # the alarm's TimeoutError may come out as compile's own error
            if not _STOPPED:
                raise
            traceback.print_exc()
            sys.exit("stopped: past the run's --budget")
        return

    named = [v for v in args.variants.split(",") if v]
    try:
        for variant in named:
            features_of(variant)
    except ValueError as e:
        parser.error(str(e))
    variants = ["default"] + [v for v in dict.fromkeys(named) if v != "default"]
    bench = Bench("vae_encode", device_name(args.dry), commit(args.commit), args.out)
    run(args, bench, variants)


if __name__ == "__main__":
    main()
