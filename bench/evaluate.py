"""Wall time of evaluating one training checkpoint: evaluate's settings as shipped against
the fastest ones, the base model's suite already in the store.

The checkpoint is a rank-128 LoRA (alpha 64 on to_q, to_k, to_v, to_out.0, as the shipped
configs train) with random non-zero weights, in the trainer's layout:
`checkpoint-000500/pytorch_lora_weights.safetensors`, rank, alpha and targets in its
metadata. `cogpipe.evaluate.run_evaluate`, what `cogpipe evaluate` runs, evaluates it:
the LoRA loaded on the base pipeline, each (prompt, seed) sampled, written as an mp4, read
back and scored (CLIP), drawn (contact sheet, A/B grid beside the base's video), indexed
and reported. Only two loaders are swapped (`load_pipeline`, `load_clip`, in
`cogpipe.evaluate` and `cogpipe.eval_models`), to hand over models built here:
bench/generate.py's CogVideoXPipeline (full-size random weights made on the GPU: speed
does not depend on weight values) given evaluate's own speed-ups (`eval_models.speed_up`:
FP8 linears, compiled blocks), and a CLIP of clip-vit-base-patch32's sizes (CLIPConfig's
defaults) with a local word-level tokenizer.
The model folder holds configs only, so reading ~20 GB of weights from disk is not timed.
`evaluate.video_features` stays off (EvaluateConfig's default; the shipped 5B config
turns it on: one VideoMAE forward per video, under a second next to a 93 s video).

Settings, in one run, a workspace each, today first (FP8 changes the pipeline for good):
- today: `EvaluateConfig` as shipped (50 steps, guidance 6; exact: no compile, FP8 or
  step cache);
- fastest: today with `--fast`'s overrides, by default
  compile=true,fp8_linears=true,step_cache=first_block,step_cache_threshold=0.1.
  fp8_linears needs a CUDA GPU (torchao): a --dry run leaves it out and says so.

Per setting, three steps. The base suite goes into the shared store (`--base-suite
stand-in`: textured frames written by the store's own `base_suite.base_video`, under the
setting's keys; `generate`: nothing here, the next call samples it, 93 s a 5B video).
A run_evaluate call on the run with no checkpoint makes its base unit (from the store:
the pipeline is not even loaded). Then checkpoint-000500 appears and the timed call
evaluates it, and only it. Lines (bench/common.py's shape; ratio = today / fastest, above
1: fastest is faster), the suite in the case name:

- `base_unit_s`: the call that made the run's base unit (the base suite reused, or with
  `--base-suite generate` generated);
- `checkpoint_s`: the wall seconds of the call that evaluated the checkpoint, with
  `speed_up_s`, the part spent quantising and wrapping the transformer at its load, and
  what it ran: `compiled_blocks`, `torchao_linears` (FP8);
- `s_per_video`: seconds of a checkpoint video (sampling and mp4 writing, as evaluate
  records them), the mean of those after the first, which carries warm-up and
  compilation (`video_s`: every video's);
- `fixed_s`: the rest of the call, `checkpoint_s - s_per_video x videos`: loading, the
  LoRA, compilation, scoring and drawing, index and report;
- `projected_20x2_s`: NOT measured: `s_per_video x 40 + fixed_s`, what a 20 prompt x
  2 seed suite would take (scoring 40 videos instead of a few adds under a second each).
  One video cannot tell warm-up from a video: run 2 or more.

About 93 s per 5B video today on an H200 (bench/results/generate-*): 20 x 2 is about an
hour per setting, so a 10-minute command runs a reduced suite and reads the projection.

    python bench/evaluate.py [--model 2b|5b] [--prompts 20] [--seeds 2] [--steps 50]
    python bench/evaluate.py --prompts 2 --seeds 1 --out bench/results/evaluate-DEVICE.jsonl
    python bench/evaluate.py --fast compile=true,step_cache=first_block   # without FP8
    python bench/evaluate.py --dry   # tiny models on the CPU: 3 prompts x 2 seeds, 4 steps
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import Bench, commit, device_name  # noqa: E402

FASTEST = "compile=true,fp8_linears=true,step_cache=first_block,step_cache_threshold=0.1"
CUDA_ONLY = ("fp8_linears",)  # left out of a --dry run
LORA = {"rank": 128, "alpha": 64, "targets": ["to_k", "to_out.0", "to_q", "to_v"]}
CHECKPOINT = "checkpoint-000500"
SUBJECTS = [
    "A bald fighter in black shorts",
    "A tall fighter with a beard",
    "A young woman in a red shirt",
    "An old man with a white towel",
    "A fighter in a blue tank top",
]
ACTIONS = [
    "delivers an open-hand slap to his opponent's cheek as the referee watches",
    "winds up and strikes while the crowd erupts under bright arena lights",
    "plants his feet and measures the distance with his palm before the swing",
    "staggers back after the impact and the camera zooms in on his face",
]


# --------------------------------------------------------------------------- inputs


def prompts(n: int) -> list[str]:
    """`n` distinct prompts of evaluate's kind (each its own base-store key)."""
    return [
        f"{SUBJECTS[i % len(SUBJECTS)]} {ACTIONS[i // len(SUBJECTS) % len(ACTIONS)]}, take {i}."
        for i in range(n)
    ]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def parse_overrides(text: str) -> dict[str, str]:
    """`compile=true,step_cache=first_block` -> {"compile": "true", ...} (EvaluateConfig
    validates the values).

    Raises:
        ValueError: an item without `=`.
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if bad := [item for item in items if "=" not in item]:
        raise ValueError(f"--fast: {', '.join(bad)}: write field=value")
    return dict(item.split("=", 1) for item in items)


def settings(args, cuda: bool):
    """{"today": EvaluateConfig, "fastest": EvaluateConfig} and the fastest's overrides as
    applied (a CPU run leaves the CUDA-only ones out, saying so)."""
    from cogpipe.config import EvaluateConfig

    size = dict(frames=args.frames, height=args.height, width=args.width)
    today = EvaluateConfig(
        prompts=prompts(args.prompts),
        seeds=list(range(42, 42 + args.seeds)),
        steps=args.steps,
        device="cuda" if cuda else "cpu",
        **size,
    )
    overrides = parse_overrides(args.fast)
    dropped = [] if cuda else [f for f in CUDA_ONLY if overrides.pop(f, None) is not None]
    fastest = EvaluateConfig(**today.model_dump() | overrides)
    label = ",".join(f"{k}={v}" for k, v in overrides.items())
    if dropped:
        label += f" ({', '.join(dropped)} left out: needs CUDA)"
    return {"today": today, "fastest": fastest}, label


# --------------------------------------------------------------------------- models


def build_clip(dry: bool, device: str, words: list[str]):
    """An `evaluate.Clip` of random weights: clip-vit-base-patch32's sizes (CLIPConfig's
    defaults; dry: cogpipe.samples' tiny towers), a word-level tokenizer on `words`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from cogpipe.evaluate import Clip
    from cogpipe.samples import TINY_IMAGE_PROCESSOR, TINY_TOWER, TINY_VISION, build_word_tokenizer

    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
    tokenizer = build_word_tokenizer(words, specials, 77, add_bos=True, add_eos=True)
    ids = {f"{n}_id": tokenizer.convert_tokens_to_ids(t) for n, t in specials.items()}
    ids.pop("unk_token_id")  # the text tower pools at the first eos_token_id: ours
    text = dict(TINY_TOWER, max_position_embeddings=77, vocab_size=len(tokenizer)) if dry else {}
    config = CLIPConfig(
        text_config=text | ids,
        vision_config=TINY_VISION if dry else {},
        **({"projection_dim": 16} if dry else {}),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = CLIPModel(config).eval()
    processor = CLIPImageProcessor(**(TINY_IMAGE_PROCESSOR if dry else {}))
    return Clip(model, tokenizer, processor, device)


def write_model_folder(folder: Path, pipe) -> Path:
    """A diffusers-layout folder of the pipeline's configs, no weights: what evaluate reads
    besides the weights (the model's traits, its fingerprint in keys)."""
    pipe.transformer.save_config(folder / "transformer")
    pipe.vae.save_config(folder / "vae")
    pipe.scheduler.save_config(folder / "scheduler")
    return folder


def write_lora(folder: Path, transformer, seed: int = 0) -> Path:
    """A checkpoint's LoRA as the trainer writes it (`cogvideox.save_lora`'s file and
    metadata): rank 128, alpha 64 on every block's attention projections, A and B random
    (B is zero at init: the adapter would change nothing), of a size that leaves the
    projections' outputs within a few percent of the base's."""
    import torch
    from diffusers import CogVideoXPipeline

    from cogpipe.models.cogvideox import LORA_FILE, lora_metadata

    rank, g, layers = LORA["rank"], torch.Generator().manual_seed(seed), {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".attn1.")[-1] in LORA["targets"]:
            a = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            b = torch.randn(module.out_features, rank, generator=g) * 0.02 / rank**0.5
            layers[f"{name}.lora_A.weight"] = a.to(transformer.dtype)  # [r, in]
            layers[f"{name}.lora_B.weight"] = b.to(transformer.dtype)  # [out, r]
    if len(layers) != 2 * len(LORA["targets"]) * len(transformer.transformer_blocks):
        raise RuntimeError(f"found {len(layers) // 2} LoRA targets in the transformer")
    CogVideoXPipeline.save_lora_weights(
        str(folder),
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=lora_metadata(rank, LORA["alpha"], LORA["targets"]),
    )
    return folder / LORA_FILE


@contextmanager
def models_handed_over(pipe, clip, loads: list[float]) -> Iterator[None]:
    """evaluate's pipeline and CLIP loaders return the models built here; the pipeline gets
    evaluate's speed-ups (`speed_up`) as `load_pipeline` gives them, at the first load
    that asks for them (they change it in place: one set of them per run). Each load's
    seconds go into `loads`.

    Raises:
        RuntimeError: (at a load) speed-ups other than those the pipeline already has.
    """
    from cogpipe import eval_models, evaluate

    applied = {(False, False)}  # the pipeline as built: neither compiled nor FP8

    def load_pipeline(model, device, ec=None):
        started = time.perf_counter()
        options = (ec.compile, ec.fp8_linears) if ec is not None else (False, False)
        if options not in applied:
            if len(applied) > 1:
                raise RuntimeError(f"the pipeline has speed-ups {applied}, asked {options}")
            eval_models.speed_up(pipe.transformer, ec)
            applied.add(options)
        loads.append(time.perf_counter() - started)
        return pipe

    given = {"load_pipeline": load_pipeline, "load_clip": lambda name, device: clip}
    # Both modules: evaluate calls the names it imported from eval_models.
    saved = [(m, name, getattr(m, name)) for m in (evaluate, eval_models) for name in given]
    for module, name, _ in saved:
        setattr(module, name, given[name])
    try:
        yield
    finally:
        for module, name, loader in saved:
            setattr(module, name, loader)


# --------------------------------------------------------------------------- runs


def stand_in(index: int, ec):
    """The frames [F, H, W, 3] uint8 a base video stands in with: a textured scene and a
    block swinging across it (x264 work like a real video's, unlike flat frames)."""
    import numpy as np
    from common import textured_scene, with_subject

    scene = textured_scene(np.random.default_rng(index), ec.width, ec.height)
    frames = [with_subject(scene.copy(), i) for i in range(ec.frames)]
    return np.stack(frames).clip(0, 255).astype(np.uint8)


def fill_base_store(ws, cfg, how: str) -> int:
    """The base suite into the shared store (`base_suite.base_video`, its keys and files):
    stand-in frames, or nothing here with `generate` (the base unit then samples it).
    Returns the videos written."""
    from cogpipe.base_suite import base_video
    from cogpipe.evaluate import suite_requests

    if how == "generate":
        return 0
    ec = cfg.evaluate
    requests = suite_requests(ec, list(ec.prompts), ec.device)
    for i, r in enumerate(requests):
        base_video(ws, cfg, r.plain, lambda i=i: stand_in(i, ec))
    return len(requests)


def upstream(root: Path, run_dir: Path) -> dict:
    """What run_evaluate is given: the train run's folder (check and filter are not read
    with a prompt list and no Fréchet distance)."""
    from cogpipe.workspace import StageResult

    return {
        "train": StageResult("train", "benchtrainkey", str(run_dir)),
        "check": StageResult("check", "benchcheckkey", str(root / "check")),
        "filter": StageResult("filter", "benchfilterkey", str(root / "filter")),
    }


def timed_evaluate(ws, cfg, up) -> tuple:
    """(stage result, wall seconds) of one run_evaluate call."""
    from cogpipe.evaluate import run_evaluate

    started = time.perf_counter()
    result = run_evaluate(ws, cfg, up)
    return result, time.perf_counter() - started


def transformer_state(transformer) -> dict[str, int]:
    """What the timed call ran: blocks compiled, linears quantised by torchao (FP8)."""
    import torch

    blocks = transformer.transformer_blocks
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    return {
        "compiled_blocks": sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks),
        "torchao_linears": sum(type(m.weight).__module__.startswith("torchao") for m in linears),
    }


def evaluate_setting(root: Path, model: Path, ec, lora: Path, how: str, loads: list, pipe) -> dict:
    """The base unit, then one checkpoint, of a fresh run on a fresh workspace (the base
    suite put into the store first). Returns the measurements.

    Raises:
        RuntimeError: a call evaluated other units or videos than asked, or the base unit
            loaded the pipeline although the store held its suite.
    """
    import pandas as pd

    from cogpipe.config import PipelineConfig
    from cogpipe.workspace import Workspace

    ws, run_dir = Workspace(root), root / "train" / "bench-run"
    cfg = PipelineConfig(workspace=root, model=str(model), name="bench-run", evaluate=ec)
    run_dir.mkdir(parents=True)
    stored = fill_base_store(ws, cfg, how)
    loads.clear()
    base, base_s = timed_evaluate(ws, cfg, upstream(root, run_dir))
    if stored and loads:
        raise RuntimeError("the base unit loaded the pipeline: the store lacked its suite")
    (run_dir / CHECKPOINT).mkdir()
    shutil.copy(lora, run_dir / CHECKPOINT / lora.name)  # as the trainer commits it
    loads.clear()
    result, wall = timed_evaluate(ws, cfg, upstream(root, run_dir))
    videos = len(ec.prompts) * len(ec.seeds)
    want = {"checkpoints_evaluated": 1, "videos": videos}
    if {k: result.counts.get(k) for k in want} != want or base.counts.get("videos") != videos:
        raise RuntimeError(f"evaluated {result.counts} (base: {base.counts}), expected {want}")
    seconds = list(pd.read_parquet(Path(result.path) / CHECKPOINT / "metrics.parquet").seconds)
    steady = seconds[1:] or seconds  # the first video carries compilation and warm-up
    per_video = sum(steady) / len(steady)
    fixed = wall - per_video * videos
    return {
        "base_unit_s": base_s,
        "checkpoint_s": wall,
        "s_per_video": per_video,
        "video_s": seconds,
        "fixed_s": fixed,
        "speed_up_s": sum(loads),
        "transformer": transformer_state(pipe.transformer),
        "projected_20x2_s": per_video * 40 + fixed,
        "videos": videos,
    }


METRICS = ("base_unit_s", "checkpoint_s", "s_per_video", "fixed_s", "projected_20x2_s")


def report(bench: Bench, case: str, name: str, found: dict, today: dict | None, extra: dict):
    """A setting's lines; each against today's (ratio today / this: above 1, faster)."""
    reference = today or found
    videos = found["videos"]
    notes = {
        "base_unit_s": {
            "note": "the run's base unit: the base suite reused from the store, scored"
            if extra["base_suite"] == "stand-in"
            else "the run's base unit: the base suite generated, scored"
        },
        "checkpoint_s": {"speed_up_s": round(found["speed_up_s"], 2)} | found["transformer"],
        "s_per_video": {
            "note": "mean of the videos after the first" if videos > 1 else "the only video",
            "video_s": found["video_s"],
        },
        "fixed_s": {"note": "checkpoint_s - s_per_video x videos"},
        "projected_20x2_s": {
            "projected": True,
            "note": f"not measured: s_per_video x 40 + fixed_s, from {videos} videos",
        },
    }
    for metric in METRICS:
        value, ref = found[metric], reference[metric]
        ratio = ref / value if value > 0 and ref > 0 else None
        bench.result(f"{case} {name}", metric, value, ref, ratio, **notes.get(metric, {}) | extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="5b", choices=["2b", "5b"])
    parser.add_argument("--prompts", type=int, default=None, help="prompts; 20 (dry: 3)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per prompt; 2")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps; 50 (dry: 4)")
    parser.add_argument("--fast", default=FASTEST, help="the fastest setting: field=value,...")
    parser.add_argument("--settings", default="today,fastest", help="today, fastest or both")
    parser.add_argument(
        "--base-suite",
        default="stand-in",
        choices=["stand-in", "generate"],
        help="how the base suite gets into the store before the timed call",
    )
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    parser.add_argument("--commit", default=None, help="default: env COMMIT, else git's HEAD")
    args = parser.parse_args()
    args.prompts = args.prompts or (3 if args.dry else 20)
    args.seeds = args.seeds or 2
    args.steps = args.steps or (4 if args.dry else 50)
    wanted = args.settings.split(",")
    if unknown := [s for s in wanted if s not in ("today", "fastest")]:
        parser.error(f"--settings: unknown {', '.join(unknown)}; known: today, fastest")
    from generate import build_pipeline, video_size

    size = video_size(args.model, args.dry)
    args.frames, args.height, args.width = size["frames"], size["height"], size["width"]
    try:  # before the models are built: a wrong --fast fails in seconds
        chosen, label = settings(args, cuda=not args.dry)
    except ValueError as e:
        parser.error(str(e))
    if args.prompts * args.seeds < 2:
        print("one video: s_per_video includes warm-up and compilation", file=sys.stderr)

    bench = Bench("evaluate", device_name(args.dry), commit(args.commit), args.out)
    suite = f"{plural(args.prompts, 'prompt')} x {plural(args.seeds, 'seed')}"
    video = f"{args.frames}x{args.height}x{args.width}"
    case = f"cogvideox-{args.model} {suite} {args.steps} steps {video}"
    pipe, device = build_pipeline(args.model, args.dry)
    words = [w for p in chosen["today"].prompts for w in p.split()]
    clip = build_clip(args.dry, device.type, words)
    found, loads = {}, []
    with tempfile.TemporaryDirectory(prefix="cogpipe-bench-evaluate-") as tmp:
        tmp = Path(tmp)
        model = write_model_folder(tmp / "model", pipe)
        lora = write_lora(tmp / "lora", pipe.transformer)
        with models_handed_over(pipe, clip, loads):
            for name in [s for s in ("today", "fastest") if s in wanted]:  # FP8 is for good
                ec = chosen[name]
                found[name] = evaluate_setting(
                    tmp / name, model, ec, lora, args.base_suite, loads, pipe
                )
                extra = {
                    "settings": label if name == "fastest" else "as shipped",
                    "base_suite": args.base_suite,
                }
                report(bench, case, name, found[name], found.get("today"), extra)


if __name__ == "__main__":
    main()
