"""Seconds per LoRA training step of full-size CogVideoX-2b and -5b at 49x480x720, batch 1.

The reference is the naive diffusers + peft step the CogVideoX LoRA example takes: bf16
weights, autocast, the transformer's own gradient checkpointing, a foreach AdamW and a
loss read every step. The cogpipe variants run `cogpipe.train.build_trainer` and
`Trainer.step`, the code a training run executes, with the settings named in the case.
Every variant runs in its own process (a clean peak-memory count, no compiled code
shared in memory) on the same random inputs; weights are random (speed does not depend
on their values).

MFU counts the model FLOPs of a step: the linears forward plus their input gradients
(frozen weights need no weight gradients) and attention forward plus backward (2x):
312.8 TFLOP for 2B and 827.5 TFLOP for 5B, over 989 TFLOP/s of dense bf16 (H100/H200).

    python bench/train_step.py                      # every model and variant
    python bench/train_step.py --models 2b --variants naive-ckpt,compile-selective
    python bench/train_step.py --dry                # a tiny model on the CPU, to try the script

One JSON line per measurement on stdout, as DESIGN.md's Benchmarks section says.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
REFERENCE = "naive-ckpt"

# The transformer configs of THUDM/CogVideoX-2b and -5b (diffusers' defaults are the 2b's).
MODELS = {
    "2b": {"num_attention_heads": 30, "num_layers": 30, "use_rotary_positional_embeddings": False},
    "5b": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True},
}
TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "in_channels": 4,
        "out_channels": 4, "time_embed_dim": 8, "text_embed_dim": 32, "max_text_seq_length": 16,
        "sample_width": 8, "sample_height": 8, "sample_frames": 9}  # fmt: skip

# Variants: (kind, train-section overrides). "naive*" are the reference implementation.
VARIANTS = {
    "naive-ckpt": ("naive", {"gradient_checkpointing": "full"}),
    "naive": ("naive", {"gradient_checkpointing": "off"}),
    "eager-full": ("cogpipe", {"compile": False, "gradient_checkpointing": "full"}),
    "eager-selective": ("cogpipe", {"compile": False, "gradient_checkpointing": "selective"}),
    "compile-off": ("cogpipe", {"gradient_checkpointing": "off"}),
    "compile-full": ("cogpipe", {"gradient_checkpointing": "full"}),
    "compile-selective": ("cogpipe", {"gradient_checkpointing": "selective"}),
    "compile-attention": ("cogpipe", {"gradient_checkpointing": "attention"}),
    "compile-selective-half": (
        "cogpipe",
        {"gradient_checkpointing": "selective", "checkpointed_blocks": 0.5},
    ),
    "compile-selective-0.6": (
        "cogpipe",
        {"gradient_checkpointing": "selective", "checkpointed_blocks": 0.6},
    ),
    "compile-selective-flash": (
        "cogpipe",
        {"gradient_checkpointing": "selective", "attention_backend": "flash"},
    ),
    "compile-selective-efficient": (
        "cogpipe",
        {"gradient_checkpointing": "selective", "attention_backend": "efficient"},
    ),
    "compile-selective-adamw8bit": (
        "cogpipe",
        {"gradient_checkpointing": "selective", "optimizer": "adamw8bit"},
    ),
}


def transformer_config(model: str, dry: bool) -> dict:
    """Constructor arguments: the model's own, tiny sizes for a dry run."""
    return MODELS[model] | (TINY if dry else {})


def shapes(config: dict, dry: bool) -> dict:
    """Latent frames, height and width, pixel height and width, text length."""
    if dry:
        return {"frames": 3, "h": 8, "w": 8, "height": 64, "width": 64, "text": 16}
    return {"frames": 13, "h": 60, "w": 90, "height": 480, "width": 720, "text": 226}


def model_tflops(config: dict, s: dict) -> float:
    """Model FLOPs of one step (TFLOP), as the module docstring counts them."""
    heads = config.get("num_attention_heads", 30)
    d = heads * config.get("attention_head_dim", 64)
    layers = config.get("num_layers", 30)
    tokens = s["text"] + s["frames"] * (s["h"] // 2) * (s["w"] // 2)
    linear_params = layers * (4 * d * d + 2 * d * 4 * d)  # q, k, v, out; feed-forward 4x
    linear = 2 * 2 * linear_params * tokens  # forward + input gradient
    attention = 3 * 4 * tokens**2 * d * layers  # QK^T and PV, forward + 2x backward
    return (linear + attention) / 1e12


def build(model: str, dry: bool, dtype):
    """A randomly initialised transformer in `dtype` and the training noise schedule."""
    import torch
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    device = "cpu" if dry else "cuda"
    with torch.device(device):
        transformer = CogVideoXTransformer3DModel(**transformer_config(model, dry))
    transformer = transformer.to(dtype).requires_grad_(False)
    scheduler = CogVideoXDPMScheduler(beta_end=0.012, beta_schedule="scaled_linear",
                                      prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      snr_shift_scale=3.0, timestep_spacing="trailing")  # fmt: skip
    return transformer, scheduler


def inputs(config: dict, s: dict):
    """(latents [1, F', C, h, w], prompt embeds [1, L, D]) on the CPU, fixed by a seed."""
    import torch

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(
        1, s["frames"], config.get("in_channels", 16), s["h"], s["w"], generator=g
    )
    embeds = torch.randn(1, s["text"], config.get("text_embed_dim", 4096), generator=g)
    return latents, embeds


def naive_steps(model: str, overrides: dict, dry: bool, steps: int):
    """The diffusers example's step; yields after each one."""
    import torch
    from peft import LoraConfig

    from cogpipe.models import cogvideox
    from cogpipe.train import diffusion_loss, generator

    dtype = torch.float32 if dry else torch.bfloat16
    transformer, scheduler = build(model, dry, dtype)
    config, s = transformer.config, shapes(transformer_config(model, dry), dry)
    transformer.add_adapter(LoraConfig(r=128, lora_alpha=64, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if overrides["gradient_checkpointing"] == "full":
        transformer.enable_gradient_checkpointing()
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, eps=1e-8)
    device = next(transformer.parameters()).device
    latents, embeds = (x.to(device, dtype) for x in inputs(config, s))
    rotary = cogvideox.rotary_embeddings(config, s["height"], s["width"], s["frames"], device)
    yield transformer
    for step in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=not dry):
            loss = diffusion_loss(transformer, scheduler, latents, embeds, rotary, generator(step))
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
    latents, embeds = inputs(transformer.config, s)
    bucket = (s["height"], s["width"], s["frames"])
    yield transformer
    for step in range(1, steps + 1):
        loss, _, _ = trainer.step(step, [(latents, embeds, bucket)])
        yield loss


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
    for _ in range(steps):
        loss = next(run)
    final = loss.item()  # waits for the GPU
    seconds = (time.perf_counter() - tic) / steps
    if profile and cuda:
        write_profile(run, Path(profile) / f"{model}-{variant}.txt")
    return {
        "s_per_step": seconds,
        "warmup_s": warm,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": final,
        "dtype": str(next(transformer.parameters()).dtype).removeprefix("torch."),
    }


def run_variant(model: str, variant: str, args) -> dict:
    """`measure` in a child process; {"error": ...} when it fails (out of memory, say)."""
    cmd = [sys.executable, __file__, "--one", model, variant, "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--dry"] if args.dry else [])  # fmt: skip
    if args.profile and variant in args.profile_variants.split(","):
        cmd += ["--profile", args.profile]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="2b,5b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
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

    import torch

    device = "cpu (dry run)" if args.dry else torch.cuda.get_device_name()
    variants = args.variants.split(",")
    if REFERENCE not in variants:
        variants.insert(0, REFERENCE)
    common = {"device": device, "date": datetime.date.today().isoformat(), "commit": commit()}
    for model in args.models.split(","):
        config = transformer_config(model, args.dry)
        tflops = model_tflops(config, shapes(config, args.dry))
        reference = None
        for variant in [REFERENCE] + [v for v in variants if v != REFERENCE]:
            if variant.startswith("naive") and variant != REFERENCE and model == "5b":
                continue  # the unchecked naive 5B step needs over 80 GB
            got = run_variant(model, variant, args)
            case = f"cogvideox-{model} lora r128 49x480x720 bs1 {variant}"
            if "error" in got:
                print(json.dumps({"bench": "train_step", "case": case, "metric": "s_per_step",
                                  "value": None, "error": got["error"]} | common), flush=True)  # fmt: skip
                continue
            seconds = got["s_per_step"]
            reference = reference or seconds  # the reference runs first
            line = {"bench": "train_step", "case": case, "metric": "s_per_step",
                    "value": round(seconds, 4), "reference": round(reference, 4),
                    "ratio": round(reference / seconds, 3),
                    "mfu": round(tflops / seconds / PEAK_TFLOPS, 4),
                    "peak_mem_gb": got["peak_mem_gb"] and round(got["peak_mem_gb"], 2),
                    "model_tflop": round(tflops, 1), "dtype": got["dtype"],
                    "warmup_s": round(got["warmup_s"], 1), "loss": got["loss"]}  # fmt: skip
            print(json.dumps(line | common), flush=True)


if __name__ == "__main__":
    main()
