"""Multi-GPU training: DDP LoRA steps per second on 2 GPUs against 1, and FSDP full
fine-tune of 5B within memory, on full-size random-weight CogVideoX at 49x480x720.

Every measurement runs `cogpipe.train.build_trainer` and `Trainer.step` (the code a
training run executes) in processes started by `cogpipe.distributed.launch` (the code
`run_train` starts them with), with the inputs of bench/train_step.py. A step is always
the same global batch: `--accum` micro-batches of one sample, all on one GPU, or split
over the GPUs. So steps per second on 2 GPUs over those on 1 is the scaling (goal: at
least 1.8x).

- ddp-lora: CogVideoX-2b (fp16), LoRA rank 128, compiled blocks, selective recomputation;
  1 process (reference) against 2 processes with DDP.
- fsdp-full: CogVideoX-5b (bf16 autocast), every weight trained with fp32 master weights
  and AdamW (16 bytes per parameter before activations, about 90 GB in all), sharded over
  2 processes with FSDP2; peak memory per GPU (the highest of the ranks) against one
  process holding it all (the reference line has an error where that does not fit).

    python bench/train_ddp.py                        # both cases, 2 GPUs
    python bench/train_ddp.py --cases ddp-lora --accum 4
    python bench/train_ddp.py --dry                  # tiny models, 2 CPU processes (gloo)

One JSON line per measurement on stdout, as DESIGN.md's Benchmarks section says.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, device_name  # noqa: E402

# case -> (model, train-section overrides)
CASES = {
    "ddp-lora": ("2b", {"gradient_checkpointing": "selective"}),
    "fsdp-full": ("5b", {"mode": "full", "gradient_checkpointing": "selective"}),
}


def measure(
    rank: int, progress, case: str, processes: int, dry: bool, accum: int, warmup: int, steps: int
) -> dict:
    """One rank of a measurement: `warmup` untimed steps (compilation), then `steps` timed."""
    import torch
    from train_step import build, inputs, shapes, transformer_config

    from cogpipe import distributed
    from cogpipe.config import TrainConfig
    from cogpipe.models import cogvideox
    from cogpipe.train import build_trainer

    model, overrides = CASES[case]
    device = "cpu" if dry else f"cuda:{rank}"
    if dry:
        torch.set_num_threads(
            1
        )  # as cogpipe.distributed.init_group sets CPU ranks: the 1-process run too
    else:
        torch.cuda.set_device(device)
    config = transformer_config(model, dry)
    dtype = cogvideox.weight_dtype("auto", config, device)  # fp16 for 2B-type, bf16 for 5B-type
    torch.manual_seed(0)  # the same random weights in every process (FSDP shards each rank's own)
    transformer, scheduler = build(model, dry, dtype)
    strategy = "single" if processes == 1 else ("fsdp" if case == "fsdp-full" else "ddp")
    t = TrainConfig(
        **(
            {
                "max_steps": warmup + steps,
                "lr_warmup_steps": 0,
                "device": "cpu" if dry else "cuda",
                "gradient_accumulation_steps": accum,
                "num_processes": processes,
                "compile": not dry,
            }
            | overrides
        )
    )
    trainer = build_trainer(transformer, scheduler, t, seed=0, device=device, strategy=strategy)
    s = shapes(config, dry)
    latents, embeds = inputs(transformer_config(model, dry), s)
    bucket = (s["height"], s["width"], s["frames"])
    mine = distributed.share(accum, rank, processes)
    batches = [(latents, embeds, bucket)] * len(mine)
    skipped = [tuple(latents.shape)] * mine.start  # the lower ranks' micro-batches' draws
    cuda = not dry

    def run(first: int, count: int):
        for step in range(first, first + count):
            loss, _, _ = trainer.step(step, batches, skipped)
        loss.item()  # waits for the GPU
        if processes > 1:
            torch.distributed.barrier()
        return loss.item()

    run(1, warmup)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    loss = run(warmup + 1, steps)
    seconds = (time.perf_counter() - tic) / steps
    return {
        "s_per_step": seconds,
        "loss": loss,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def run_case(case: str, processes: int, args) -> dict:
    """`measure` on `processes` fresh processes; rank 0's time, the highest peak memory;
    {"error": ...} when it fails (out of memory, say)."""
    from cogpipe import distributed

    margs = (case, processes, args.dry, args.accum, args.warmup, args.steps)
    try:
        ranks = distributed.launch(measure, margs, processes)
    except Exception as e:  # noqa: BLE001 - a case that does not fit is a result line
        return {"error": str(e).splitlines()[0][-400:]}
    peaks = [r["peak_mem_gb"] for r in ranks]
    return ranks[0] | {"peak_mem_gb": None if None in peaks else max(peaks)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def line(case: str, metric: str, value, reference, ratio, **extra) -> dict:
    """A result line: `ratio` > 1 is better than the reference; the extras (the losses)
    unrounded, so that the two runs' losses can be compared to 1e-6."""
    return {
        "bench": "train_ddp",
        "case": case,
        "metric": metric,
        "value": _round(value),
        "reference": _round(reference),
        "ratio": _round(ratio),
    } | extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs")
    parser.add_argument(
        "--accum", type=int, help="micro-batches per step (global; default: one per GPU)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--dry", action="store_true", help="tiny models on CPU processes")
    args = parser.parse_args()
    args.accum = args.accum or args.gpus
    if args.accum % args.gpus:
        parser.error(f"--accum {args.accum} must be a multiple of --gpus {args.gpus}")

    bench = Bench("train_ddp", device_name(args.dry), commit())
    for case in args.cases.split(","):
        model = CASES[case][0]
        what = f"cogvideox-{model} {case} {args.gpus} gpus 49x480x720 bs1 x{args.accum}"
        one, many = run_case(case, 1, args), run_case(case, args.gpus, args)
        for processes, got in ((1, one), (args.gpus, many)):
            if "error" in got:
                bench.failed(f"{what} ({processes} process)", "s_per_step", got["error"])
        if "error" in many:
            continue
        ref = None if "error" in one else one
        extra = {"loss": many["loss"], "reference_loss": ref and ref["loss"]}
        rate, ref_rate = 1 / many["s_per_step"], ref and 1 / ref["s_per_step"]
        ratio = ref_rate and rate / ref_rate
        bench.print(line(what, "steps_per_s", rate, ref_rate, ratio, **extra))
        peak, ref_peak = many["peak_mem_gb"], ref and ref["peak_mem_gb"]
        ratio = ref_peak and peak and ref_peak / peak
        bench.print(line(what, "peak_mem_gb_per_gpu", peak, ref_peak, ratio))


if __name__ == "__main__":
    main()
