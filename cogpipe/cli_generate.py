"""The sampling commands: `generate` and `sweep` (outside the pipeline, optionally as a
config's evaluation samples) and `serve-api` (the same sampling over HTTP). Library calls
only, no Prefect."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pydantic import ValidationError

from cogpipe.cli_parser import (
    add_config_options,
    add_model_options,
    add_prompt_options,
    command,
)
from cogpipe.config import load_config
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.interrupt import Guard, interrupted


def _steps(display):
    """A library's (steps done, steps, video name) calls as one progress bar per video."""
    return lambda done, steps, name: display.stage(name, unit="steps")(done, steps)


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    """The config's settings (`--config`, `--latest`), then the flags given, which win; a bad
    value is an error naming its flag or config field. A CPU asked for full-size video gets
    a warning here, once, before anything loads (hours, where a user expects minutes)."""
    from cogpipe import generate_config
    from cogpipe.workspace import resolve_device

    values, source = _config_values(args), {}
    given = {k: v for k, v in vars(args).items() if k in GenerateOptions.model_fields}
    if getattr(args, "latest", False) and {"lora", "transformer"} & set(given):
        raise GenerateError("give --latest or --lora / --transformer, not both")
    if getattr(args, "config", None):
        source = {k: f"{args.config}: {generate_config.CONFIG_FIELDS.get(k, k)}" for k in values}
    values |= given
    try:
        options = GenerateOptions(**values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            message = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # a check across options: its message names them
                lines.append(message)
                continue
            name = str(err["loc"][0])
            flag = "--" + name.replace("_", "-")
            where = flag if name in given else source.get(name, flag)
            lines.append(f"{where}: {message}")
        raise GenerateError("; ".join(lines)) from None
    warning = generate_config.cpu_warning(options, resolve_device(options.device), _grid(args))
    if warning:
        print(f"cogpipe: {warning}", file=sys.stderr, flush=True)
    return options


def _config_values(args: argparse.Namespace) -> dict:
    """The GenerateOptions values of `--config` (and its run's `--latest` checkpoint)."""
    from cogpipe import generate_config

    config = getattr(args, "config", None)
    if not config:
        if getattr(args, "latest", False):
            raise GenerateError("--latest needs --config (the run whose newest checkpoint to use)")
        return {}
    cfg = load_config(config)
    values = generate_config.config_values(cfg)
    if getattr(args, "latest", False):
        values |= generate_config.checkpoint_values(generate_config.latest_checkpoint(cfg))
    return values


def _grid(args: argparse.Namespace) -> dict[str, list[str]] | None:
    """A generation sweep's `--grid` (None for generate, or a grid the sweep will refuse)."""
    from cogpipe.sweep import parse_grid

    try:
        return parse_grid(getattr(args, "grid", None) or [])
    except GenerateError:
        return None


def _print_video(path: Path, seconds: float) -> None:
    print(f"{path} {seconds:.1f}s", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from cogpipe.generate import read_prompts, run_generate
    from cogpipe.progress import console_display, show

    options = generate_options(args)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts_dir)
    written: list[Path] = []

    def on_video(path: Path, seconds: float) -> None:
        written.append(path)
        _print_video(path, seconds)

    def summary() -> str:  # generate overwrites: nothing to resume from
        n = len(prompts)
        return (
            f"interrupted; generate: {len(written)} of {n} videos written (listed above); "
            f"running again makes all {n} (existing files are overwritten)"
        )

    with Guard(summary), show(console_display()) as display:  # a bar per video: its steps
        run_generate(prompts, options, args.output, on_video=on_video, on_step=_steps(display))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cogpipe.generate import read_prompts
    from cogpipe.progress import console_display, show
    from cogpipe.sweep import clip_metric, parse_grid, run_sweep

    options = generate_options(args)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts_dir)
    grid = parse_grid(args.grid)
    experiment = args.experiment or "-".join(sorted(grid))
    metrics = {}
    clip_model = args.clip_model or (
        load_config(args.config).evaluate.clip_model if args.config else None
    )
    if clip_model:
        metrics["clip_score"] = clip_metric(clip_model, options.device)
    folder = Path(args.out) / experiment
    reached = [0, len(prompts) * math.prod(len(v) for v in grid.values())]  # done, total

    def progress(done: int, total: int, note: str) -> None:
        reached[:] = [done, total]
        print(f"[{done}/{total}] {note}", flush=True)

    def summary() -> str:
        done, total = reached
        return interrupted(f"sweep: {done} of {total} videos done in {folder} (results.csv)")

    with Guard(summary), show(console_display()) as display:  # a bar per video: its steps
        table = run_sweep(
            prompts,
            options,
            grid,
            args.out,
            experiment,
            metrics,
            progress=progress,
            on_step=_steps(display),
        )
    skipped, errors = int(table.skipped.sum()), int((table.error != "").sum())
    print(
        f"{folder}: {len(table)} videos ({len(table) - skipped - errors} generated, "
        f"{skipped} skipped, {errors} failed); results.csv, grid.png, timing.png"
    )
    return 1 if errors else 0


def add_generate_commands(sub) -> None:
    """generate and sweep: sampling outside the pipeline, optionally as a config samples."""
    from cogpipe.generate_config import CONFIG_FIELDS

    p = command(
        sub,
        "generate",
        "text- or image-to-video with a base model and optional LoRA",
        """
Writes one mp4 per prompt with CogVideoX (a hub id, 2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v or a
diffusers folder) and an optional LoRA, sampled exactly as `evaluate` samples. Frames, size
and fps not given are the model's own (CogVideoX 1.5: 81x768x1360); an image-to-video
model needs --image. With --config, the model and the sampling settings come from the
config's `evaluate` section and --latest adds its run's newest checkpoint; flags given
win. A CPU at full size (49x480x720, 50 steps) takes hours.

examples:
  cogpipe generate --config demo/demo.yaml --latest --prompt "a fighter slaps" --output slap.mp4
  cogpipe generate --prompt "A fighter slaps his opponent." --model 2b --output slap.mp4
  cogpipe generate --model 5b-i2v --image first.png --prompt "The fighter turns." --output t.mp4
""",
        cmd_generate,
    )
    add_prompt_options(p)
    p.add_argument(
        "--output",
        metavar="PATH",
        help="an .mp4 for one prompt, else a folder (default: generated/)",
    )
    add_config_options(p)
    add_model_options(p, GenerateOptions, CONFIG_FIELDS)
    _add_sweep(sub)


def _add_sweep(sub) -> None:
    """sweep: every prompt at every combination of a grid's values, one model loaded."""
    from cogpipe.generate_config import CONFIG_FIELDS

    p = command(
        sub,
        "sweep",
        "an ablation grid over generation parameters",
        """
Generates every prompt at every combination of the grid's values with one loaded model,
into <out>/<experiment>/<param>=<value>,.../<prompt>.mp4 with results.csv (seconds, size,
CLIP score with --clip-model), grid.png and timing.png. Run it again after an interruption
and only the missing videos are made. --config and flags as for generate.

example:
  cogpipe sweep --config demo/demo.yaml --latest --grid lora-scale=0,1 --prompt "a slap" --out /tmp/sweeps
""",
        cmd_sweep,
    )
    add_prompt_options(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help="a per-video option and its values, e.g. guidance=1,6,12 (repeatable)",
    )
    p.add_argument(
        "--out", default="sweeps", metavar="DIR", help="sweeps folder (default: sweeps/)"
    )
    p.add_argument(
        "--experiment", metavar="NAME", help="experiment folder name (default: the grid's names)"
    )
    p.add_argument(
        "--clip-model", metavar="MODEL", help="add a CLIP score column (hub id or folder)"
    )
    add_config_options(p)
    add_model_options(p, GenerateOptions, CONFIG_FIELDS)


def add_serve_api(sub) -> None:
    """serve-api: the inference service (cogpipe.service), one process per GPU."""
    p = command(
        sub,
        "serve-api",
        "the inference service: one warm pipeline, LoRAs by name",
        """
Loads the base model once and serves text/image-to-video over HTTP (FastAPI, docs at
/docs) until Ctrl-C: POST /v1/videos queues a job, GET /v1/videos/ID reports it, GET
/v1/videos/ID/content is the mp4. LoRAs stay resident and switch per request; more are
added with POST /v1/loras. Jobs and results persist in --folder across restarts. With
COGPIPE_API_KEY set, every /v1 request needs `Authorization: Bearer <key>`. --step-cache
and --fp8-linears make videos faster at a deviation from the exact ones (a request may ask
for another step cache); a stored video is keyed by them.

example:
  cogpipe serve-api demo/demo.yaml --lora slap=demo/workspace/train/<run>/checkpoint-000006
  cogpipe serve-api --model 2b --lora a=runs/a.safetensors --port 8001 --folder /data/api1
""",
        cmd_serve_api,
    )
    p.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="a pipeline config: its model and evaluate settings are the defaults",
    )
    p.add_argument("--model", help="the base model (wins over CONFIG's): 2b, 5b, hub id, folder")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA to load at start: checkpoint folder or .safetensors (repeatable)",
    )
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument(
        "--folder",
        default=".cogpipe-api",
        metavar="DIR",
        help="jobs database and videos (default .cogpipe-api/)",
    )
    p.add_argument("--templates", metavar="YAML", help="prompt templates (default: shipped)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto (or CONFIG's)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the transformer blocks (GPU); LoRAs then hot-swap in one slot",
    )
    p.add_argument(
        "--max-rank",
        type=int,
        metavar="R",
        help="with --compile: the slot's rank, the largest a LoRA may have "
        "(default: the largest --lora's, else 128)",
    )
    p.add_argument("--paused", action="store_true", help="accept jobs, run none until resumed")
    _add_speed(p)
    _add_limits(p)


def _add_speed(p: argparse.ArgumentParser) -> None:
    """--step-cache, --step-cache-threshold, --fp8-linears: generate's flags of the same
    names (`service.SPEED`), over CONFIG's evaluate values; a request may ask for another
    step cache."""
    from pydantic import create_model

    from cogpipe.service import SPEED

    fields = GenerateOptions.model_fields
    speed = create_model(
        "Speed", **{name: (fields[name].annotation, fields[name]) for name in SPEED}
    )
    add_model_options(p, speed)


def _add_limits(p: argparse.ArgumentParser) -> None:
    """--max-frames, --max-pixels, --max-steps, --max-queue: what a request may ask."""
    for name, default, what in (
        ("frames", 81, "frames a request may ask"),
        ("pixels", 768 * 1360, "height x width a request may ask"),
        ("steps", 100, "steps a request may ask"),
        ("queue", 100, "jobs waiting; more get 429"),
    ):
        p.add_argument(
            f"--max-{name}",
            type=int,
            default=default,
            metavar="N",
            help=f"the most {what} (default {default})",
        )


def cmd_serve_api(args: argparse.Namespace) -> int:
    """The inference service in the foreground; a bad flag or file is one line and exit 2."""
    from cogpipe import service
    from cogpipe.service_http import serve
    from cogpipe.templates import load_templates

    templates = load_templates(Path(args.templates) if args.templates else None)
    loras = service.parse_loras(args.lora)
    speed = {k: v for k, v in vars(args).items() if k in service.SPEED}  # flags given
    defaults = service.defaults_for(args.config, args.model, args.device, args.compile, speed)
    limits = service.Limits(args.max_frames, args.max_pixels, args.max_steps, args.max_queue)
    svc = service.Service(
        Path(args.folder), defaults, templates, limits, args.paused, max_rank=args.max_rank
    )
    serve(svc, loras, args.host, args.port, on_line=lambda x: print(x, flush=True))
    return 0
