"""Seconds per LoRA training step of full-size CogVideoX models at their native size, batch 1:
2B, 5B and 5B-I2V at 49x480x720, CogVideoX1.5-5B (and 1.5-5B-I2V) at 81x768x1360.

The reference is the naive diffusers + peft step the CogVideoX LoRA example takes: bf16
weights, autocast, the transformer's own gradient checkpointing, a foreach AdamW and a
loss read every step. The cogpipe variants run `cogpipe.train.build_trainer` and
`Trainer.step`, the code a training run executes, with the settings named in the case.
Every variant runs in its own process (a clean peak-memory count, no compiled code
shared in memory) on the same random weights and inputs (speed does not depend on their
values; the cogpipe variants' losses agree up to rounding); image-to-video models get
random first-frame image latents too. `--reference` runs another variant first instead.

The -fp8 variants run the blocks' frozen base linears in FP8 under the LoRA
(`train.fp8_base`, torchao float8 training linears); their lines add `bf16_loss_mean`, the
mean loss of their bf16 twin (the name without -fp8) over the same timed steps on the same
batch, next to their own `loss_mean`: run 50 steps to compare the curves.

MFU counts the model FLOPs of a step: the linears forward plus their input gradients
(frozen weights need no weight gradients) and attention forward plus backward (2x), over
the tokens a block sees: 226 text tokens and latent frames / temporal patch x h/2 x w/2
video tokens. 49x480x720 is 13 x 30 x 45 video tokens: 312.8 TFLOP for 2B, 827.4 for 5B
and 5B-I2V (its wider input touches only the patch embedding). 81x768x1360 is 21 latent
frames padded to 22, so 11 x 48 x 85: 4008.2 TFLOP for 1.5-5B, attention about 79% of it.
Peak dense bf16 is 989 TFLOP/s (H100/H200). `fits_80gb` says whether the peak memory is
at most 75 GiB, which leaves an 80 GB H100 room for the CUDA context and fragmentation:
the budget the shipped configs keep.

    python bench/train_step.py                      # 2B and 5B, every variant
    python bench/train_step.py --models 2b --variants naive-ckpt,compile-selective
    python bench/train_step.py --models 1.5-5b --variants compile-attention --warmup 2 --steps 3
    python bench/train_step.py --models 1.5-5b,5b-i2v --dry   # tiny models on the CPU
    python bench/train_step.py --models 5b --reference compile-selective \
        --variants compile-selective-fp8 --warmup 3 --steps 50   # FP8 base: speed and loss

One JSON line per measurement on stdout, as DESIGN.md's Benchmarks section says.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, device_name, run_fresh  # noqa: E402

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
REFERENCE = "naive-ckpt"

FITS_GIB = 75.0  # what fits an 80 GB H100, with room for the CUDA context and fragmentation

# The transformer configs of the hub models (transformer/config.json) where they differ
# from diffusers' defaults, which are CogVideoX-2b's.
_5B = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
_1_5 = _5B | {
    "patch_size_t": 2,
    "patch_bias": False,
    "sample_height": 300,
    "sample_width": 300,
    "sample_frames": 81,
}
MODELS = {
    "2b": {"num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False},
    "5b": _5B,
    "5b-i2v": _5B | {"in_channels": 32, "use_learned_positional_embeddings": True},
    "1.5-5b": _1_5,
    "1.5-5b-i2v": _1_5 | {"in_channels": 32, "ofs_embed_dim": 512},
}
# Tiny sizes for a dry run, each model's generation kept (`transformer_config`): image-to-video
# doubles the latent channels, 1.5-I2V's ofs embedding is as wide as the time embedding.
TINY = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 8,
    "text_embed_dim": 32,
    "max_text_seq_length": 16,
    "sample_width": 8,
    "sample_height": 8,
    "sample_frames": 9,
}


def cogpipe_variant(checkpointing: str, **train) -> tuple[str, dict]:
    """A variant of cogpipe's Trainer: its gradient checkpointing and other train settings."""
    return "cogpipe", {"gradient_checkpointing": checkpointing} | train


# Variants: (kind, train-section overrides). "naive*" are the reference implementation.
VARIANTS = {
    "naive-ckpt": ("naive", {"gradient_checkpointing": "full"}),
    "naive": ("naive", {"gradient_checkpointing": "off"}),
    "eager-full": cogpipe_variant("full", compile=False),
    "eager-selective": cogpipe_variant("selective", compile=False),
    "compile-off": cogpipe_variant("off"),
    "compile-full": cogpipe_variant("full"),
    "compile-selective": cogpipe_variant("selective"),
    "compile-attention": cogpipe_variant("attention"),
    "compile-attention-0.9": cogpipe_variant("attention", checkpointed_blocks=0.9),
    "compile-attention-0.8": cogpipe_variant("attention", checkpointed_blocks=0.8),
    "compile-attention-0.7": cogpipe_variant("attention", checkpointed_blocks=0.7),
    "compile-selective-half": cogpipe_variant("selective", checkpointed_blocks=0.5),
    "compile-selective-0.6": cogpipe_variant("selective", checkpointed_blocks=0.6),
    "compile-selective-flash": cogpipe_variant("selective", attention_backend="flash"),
    "compile-selective-efficient": cogpipe_variant("selective", attention_backend="efficient"),
    "compile-selective-adamw8bit": cogpipe_variant("selective", optimizer="adamw8bit"),
    # The frozen base linears in FP8 under the LoRA (`train.fp8_base`), at the shipped configs'
    # checkpointing: 5B (all blocks selective) and 2B (60% of the blocks).
    "compile-selective-fp8": cogpipe_variant("selective", fp8_base=True),
    "compile-selective-0.6-fp8": cogpipe_variant(
        "selective", checkpointed_blocks=0.6, fp8_base=True
    ),
}


def transformer_config(model: str, dry: bool) -> dict:
    """Constructor arguments: the model's own, tiny sizes for a dry run."""
    config = MODELS[model]
    if not dry:
        return dict(config)
    tiny = TINY | {"in_channels": TINY["in_channels"] * (config.get("in_channels", 16) // 16)}
    if config.get("ofs_embed_dim"):
        tiny["ofs_embed_dim"] = TINY["time_embed_dim"]
    return config | tiny


def image_to_video(config: dict) -> bool:
    """Whether the transformer takes image latents beside the video's (twice the channels)."""
    return config.get("in_channels", 16) == 2 * config.get("out_channels", 16)


def shapes(config: dict, dry: bool) -> dict:
    """Latent frames, height and width, pixel frames, height and width, text length: the
    native size of the config's generation (a temporal patch of 2 is CogVideoX 1.5's).

    A dry run keeps the generation's latent frame count where it needs padding (1.5's 21).
    """
    wide = config.get("patch_size_t") == 2
    if dry:
        frames = 81 if wide else 9
        return {
            "frames": (frames - 1) // 4 + 1,
            "h": 8,
            "w": 8,
            "pixel_frames": frames,
            "height": 64,
            "width": 64,
            "text": 16,
        }
    frames, height, width = (81, 768, 1360) if wide else (49, 480, 720)
    return {
        "frames": (frames - 1) // 4 + 1,
        "h": height // 8,
        "w": width // 8,
        "pixel_frames": frames,
        "height": height,
        "width": width,
        "text": 226,
    }


def model_tflops(config: dict, s: dict) -> float:
    """Model FLOPs of one step (TFLOP), as the module docstring counts them."""
    heads = config.get("num_attention_heads", 30)
    d = heads * config.get("attention_head_dim", 64)
    layers = config.get("num_layers", 30)
    p, p_t = config.get("patch_size", 2), config.get("patch_size_t") or 1
    tokens = s["text"] + -(-s["frames"] // p_t) * (s["h"] // p) * (s["w"] // p)
    linear_params = layers * (4 * d * d + 2 * d * 4 * d)  # q, k, v, out; feed-forward 4x
    linear = 2 * 2 * linear_params * tokens  # forward + input gradient
    attention = 3 * 4 * tokens**2 * d * layers  # QK^T and PV, forward + 2x backward
    return (linear + attention) / 1e12


def build(model: str, dry: bool, dtype):
    """A randomly initialised transformer in `dtype` and the training noise schedule; the
    same weights in every process (seed 0), so every variant's loss can be compared."""
    import torch
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    device = "cpu" if dry else "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        transformer = CogVideoXTransformer3DModel(**transformer_config(model, dry))
    transformer = transformer.to(dtype).requires_grad_(False)
    scheduler = CogVideoXDPMScheduler(
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return transformer, scheduler


def inputs(config, s: dict):
    """(latents [1, F', C, h, w], prompt embeds [1, L, D]) on the CPU, fixed by a seed; C
    is the latent channels (the transformer's output channels)."""
    import torch

    g = torch.Generator().manual_seed(0)
    channels = config.get("out_channels", 16)
    latents = torch.randn(1, s["frames"], channels, s["h"], s["w"], generator=g)
    embeds = torch.randn(1, s["text"], config.get("text_embed_dim", 4096), generator=g)
    return latents, embeds


def image_inputs(config, s: dict):
    """First-frame image latents [1, 1, C, h, w] of an image-to-video model, else None."""
    import torch

    if not image_to_video(dict(config)):
        return None
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 1, config.get("out_channels", 16), s["h"], s["w"], generator=g)


def naive_steps(model: str, overrides: dict, dry: bool, steps: int):
    """The diffusers example's step (with CogVideo's trainers' 1.5 padding and image
    latents, which `diffusion_loss` adds from the model's config); yields after each one."""
    import torch
    from peft import LoraConfig

    from cogpipe.models import cogvideox
    from cogpipe.train import diffusion_loss, generator

    dtype = torch.float32 if dry else torch.bfloat16
    transformer, scheduler = build(model, dry, dtype)
    config, s = transformer.config, shapes(transformer_config(model, dry), dry)
    transformer.add_adapter(
        LoraConfig(
            r=128,
            lora_alpha=64,
            init_lora_weights=True,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if overrides["gradient_checkpointing"] == "full":
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8)
    device = next(transformer.parameters()).device
    latents, embeds = (x.to(device, dtype) for x in inputs(config, s))
    image = image_inputs(config, s)
    extra = {} if image is None else {"image": image.to(device, dtype)}
    rotary = cogvideox.rotary_embeddings(config, s["height"], s["width"], s["frames"], device)
    yield transformer
    for step in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=not dry):
            loss = diffusion_loss(
                transformer, scheduler, latents, embeds, rotary, generator(step), **extra
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the example logs the loss every step
        yield loss


def cogpipe_steps(model: str, overrides: dict, dry: bool, steps: int):
    """cogpipe's Trainer with the variant's train settings; yields after each step."""

    from cogpipe.config import TrainConfig
    from cogpipe.models import cogvideox
    from cogpipe.train import build_trainer

    config = transformer_config(model, dry)
    device = "cpu" if dry else "cuda"
    dtype = cogvideox.weight_dtype("auto", config, device)  # fp16 for 2B-type, bf16 for 5B-type
    transformer, scheduler = build(model, dry, dtype)
    t = TrainConfig(**({"max_steps": steps, "lr_warmup_steps": 0, "device": device} | overrides))
    trainer = build_trainer(transformer, scheduler, t, seed=0, device=device)
    s = shapes(config, dry)
    batch = micro_batch(transformer.config, s)
    yield transformer
    for step in range(1, steps + 1):
        loss, _, _ = trainer.step(step, [batch])
        yield loss


def micro_batch(config, s: dict) -> tuple:
    """A `Trainer.step` micro-batch on the CPU: (latents, prompt embeds, bucket), and for an
    image-to-video model the first frame's latents fourth."""
    latents, embeds = inputs(config, s)
    image = image_inputs(config, s)
    bucket = (s["height"], s["width"], s["frames"])  # latent frames as stored (unpadded)
    return (latents, embeds, bucket) + (() if image is None else (image,))


def write_profile(run, path: Path) -> None:
    """CUDA kernel times of one more step, the most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        next(run).item()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90
    )
    path.write_text(table)


def measure(
    model: str, variant: str, dry: bool, warmup: int, steps: int, profile: str | None = None
) -> dict:
    """Time `steps` steps after `warmup` (compilation happens there) in this process."""
    import torch

    kind, overrides = VARIANTS[variant]
    make = naive_steps if kind == "naive" else cogpipe_steps
    cuda = not dry
    run = make(model, overrides, dry, warmup + steps + 1)
    transformer = next(run)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(warmup):
        loss = next(run)
    loss.item()
    warm = time.perf_counter() - tic
    tic = time.perf_counter()
    losses = [next(run) for _ in range(steps)]
    final = losses[-1].item()  # waits for the GPU
    seconds = (time.perf_counter() - tic) / steps
    if profile and cuda:
        write_profile(run, Path(profile) / f"{model}-{variant}.txt")
    return {
        "s_per_step": seconds,
        "warmup_s": warm,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": final,
        "loss_mean": float(torch.stack([torch.as_tensor(x).float() for x in losses]).mean()),
        "dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
    }


def run_variant(model: str, variant: str, args) -> dict:
    """`measure` in a child process; {"error": ...} when it fails (out of memory, say)."""
    one = ["--one", model, variant, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    one += ["--dry"] if args.dry else []
    if args.profile and variant in args.profile_variants.split(","):
        one += ["--profile", args.profile]
    return run_fresh(__file__, one)


def bf16_loss(variant: str, losses: dict[str, float]) -> dict:
    """For an FP8 variant whose bf16 twin (the name without -fp8) ran before it: that run's
    mean loss over the same steps on the same batch, to state the FP8 deviation."""
    twin = variant.removesuffix("-fp8")
    if twin == variant or twin not in losses:
        return {}
    return {"bf16_loss_mean": round(losses[twin], 6)}


def model_lines(model: str, variants: list[str], args, bench: Bench) -> Iterator[dict]:
    """The result lines of one model: the reference variant first, each line its ratio (a
    variant that fails is a line of `bench`'s errors)."""
    config = transformer_config(model, args.dry)
    s = shapes(config, args.dry)
    tflops = model_tflops(config, s)
    size = f"{s['pixel_frames']}x{s['height']}x{s['width']}"
    reference, losses = None, {}
    for variant in [args.reference] + [v for v in variants if v != args.reference]:
        if variant.startswith("naive") and variant != args.reference and model != "2b":
            continue  # the unchecked naive step of a 5B-size model needs over 80 GB
        got = run_variant(model, variant, args)
        case = f"cogvideox-{model} lora r128 {size} bs1 {variant}"
        if "error" in got:
            bench.failed(case, "s_per_step", got["error"])
            continue
        seconds, peak = got["s_per_step"], got["peak_mem_gb"]
        reference = reference or seconds  # the reference runs first
        yield {
            "bench": "train_step",
            "case": case,
            "metric": "s_per_step",
            "value": round(seconds, 4),
            "reference": round(reference, 4),
            "ratio": round(reference / seconds, 3),
            "mfu": round(tflops / seconds / PEAK_TFLOPS, 4),
            "peak_mem_gb": peak and round(peak, 2),
            "fits_80gb": None if peak is None else peak <= FITS_GIB,
            "model_tflop": round(tflops, 1),
            "dtype": got["dtype"],
            "warmup_s": round(got["warmup_s"], 1),
            "loss": got["loss"],
            "loss_mean": round(got["loss_mean"], 6),  # over the timed steps, on one batch
        } | bf16_loss(variant, losses)
        losses[variant] = got["loss_mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--reference", default=REFERENCE, help="the variant run first, every ratio against it"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--dry", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--profile", help="folder for CUDA kernel tables of one step")
    parser.add_argument("--profile-variants", default="compile-selective", help="which to profile")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.dry, args.warmup, args.steps, args.profile)))
        return

    models, variants = args.models.split(","), args.variants.split(",")
    given_variants = variants + [args.reference]
    for name, given, known in [("models", models, MODELS), ("variants", given_variants, VARIANTS)]:
        if unknown := [x for x in given if x not in known]:
            parser.error(f"--{name}: unknown {', '.join(unknown)}; known: {', '.join(known)}")

    bench = Bench("train_step", device_name(args.dry), commit())
    for model in models:
        bench.print_lines(model_lines(model, variants, args, bench))


if __name__ == "__main__":
    main()
