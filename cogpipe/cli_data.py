"""The commands that measure, take out or put in: `du`, `gc` and `plan` over a workspace;
`export`, `captions`, `export-dataset` and `rate` (what a person takes out or puts in).
Library calls only, no Prefect."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cogpipe.cli_parser import CONFIG_HELP, command, set_flag
from cogpipe.config import ConfigError, PipelineConfig, load_config, parse_sets, with_fields
from cogpipe.export import FORMATS
from cogpipe.workspace import read_table


def _disk_configs(paths: list[str]) -> dict[str, PipelineConfig]:
    """du's and gc's configs by the path given; a file that is not a config is one line."""
    out = {}
    for path in paths:
        try:
            out[path] = load_config(path)
        except ConfigError as e:
            first, *more = str(e).splitlines()
            if more:  # field errors or YAML's context: the first, and how many more
                first += f" {more[0].strip()}" + (f" (+{len(more) - 1} more)" if more[1:] else "")
            raise ConfigError(first) from None
    return out


def cmd_du(args: argparse.Namespace) -> int:
    from cogpipe.disk import collect, format_usage, usage_json

    usage = collect(_disk_configs(args.configs))
    if not usage.items:
        print(f"du: workspace {usage.root} is empty")
        return 0
    print(json.dumps(usage_json(usage), indent=2) if args.json else format_usage(usage))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from cogpipe.disk import format_freed, gc

    freed = gc(_disk_configs(args.configs), args.dry_run, args.checkpoints)
    print(format_freed(freed))
    return 0


def _add_du(sub) -> None:
    p = command(
        sub,
        "du",
        "what each stage key, cache and run holds; which the configs use",
        """
Measures the workspace without running anything: every stage key, training run, evaluation
and cache store (files, bytes), marked with the configs that use it (their keys computed as
`cogpipe status` does), and what `cogpipe gc` would free. Give every config you keep.

example:
  cogpipe du demo/demo.yaml configs/other.yaml
""",
        cmd_du,
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="configs of one workspace")
    p.add_argument("--json", action="store_true", help="one JSON object: items, keys, sizes")


def _add_gc(sub) -> None:
    p = command(
        sub,
        "gc",
        "remove the outputs and cache items no given config uses",
        """
Removes the stage keys, evaluations, cache entries (latents, text embeddings, recaption
passes, base videos) and stale temporaries that none of the given configs uses, and the
training states of runs none uses; their LoRA checkpoints (and evaluations) only with
--checkpoints. Prints each item and the total freed. Refuses while a stage runs.

example:
  cogpipe gc demo/demo.yaml configs/other.yaml --dry-run
""",
        cmd_gc,
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="every config to keep")
    p.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    p.add_argument(
        "--checkpoints",
        action="store_true",
        help="also remove unused runs whole: their LoRA checkpoints and evaluations",
    )


def add_workspace_commands(sub) -> None:
    """du, gc and plan: what a workspace holds, what can go, what a run will cost."""
    for add in (_add_du, _add_gc, _add_plan):
        add(sub)


def cmd_plan(args: argparse.Namespace) -> int:
    from cogpipe.estimate import estimate, remember_stats_from

    cfg = load_config(args.config)
    if args.sets:
        cfg = with_fields(cfg, parse_sets(args.sets), base=Path(args.config).parent)
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus}: a plan needs at least one GPU")
    if args.stats_from:  # remembered: the `cogpipe run` that follows predicts from them too
        remember_stats_from(cfg, args.stats_from)
    est = estimate(cfg, gpus=args.gpus, gpu=args.gpu)
    print(json.dumps(est.to_dict(), indent=2) if args.json else est.text())
    return 0


def _add_plan(sub) -> None:
    p = command(
        sub,
        "plan",
        "per stage: work, predicted GPU-hours, wall time and disk",
        """
Predicts each stage of CONFIG before a run: its work (files, clips, samples, steps,
videos), wall time on --gpus GPUs, GPU-hours and disk, as setup seconds + seconds per item.
The throughput comes from this workspace's finished runs of the same stage, device and
settings (and of each --stats-from workspace, remembered for this workspace's later plans
and runs), else from bench/results of the same model and GPU; the last column says which.
A stage already done here costs 0 (reused).

example:
  cogpipe plan configs/power-slap-conservative.yaml --gpus 8 --gpu h200
  cogpipe plan demo/demo.yaml --stats-from pilot/workspace --json
""",
        cmd_plan,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    set_flag(p)
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="GPUs to spread over (default: this machine's, at least 1)",
    )
    p.add_argument(
        "--gpu",
        choices=["h100", "h200"],
        default=None,
        help="GPU kind (default: this machine's; without one, the last run's)",
    )
    p.add_argument(
        "--stats-from",
        action="append",
        default=[],
        type=Path,
        metavar="WORKSPACE",
        help="another workspace whose finished runs count as measurements, remembered"
        " for this workspace's later plans and runs (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="the estimate as one JSON object")


def cmd_export(args: argparse.Namespace) -> int:
    from cogpipe.export import run_export

    path, lora = run_export(args.lora, args.out, args.format, args.model)
    shape = f"{len(lora.modules)} modules, rank {lora.rank}, alpha {lora.alpha:g}"
    print(f"{path}: {args.format} export of {lora.source} ({shape})")
    return 0


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from cogpipe.dataset import export_dataset
    from cogpipe.progress import console_display, show

    cfg = load_config(args.config)
    with show(console_display()) as display:
        progress = display.stage("export-dataset")
        r = export_dataset(cfg, args.out, args.format, args.force, args.workers, progress=progress)
    print(
        f"export-dataset: {r.clips} clips ({r.written} written, {r.reused} reused, "
        f"{r.removed} removed) in {r.seconds:.1f}s -> {r.out} ({r.format})"
    )
    return 0


def cmd_captions(args: argparse.Namespace) -> int:
    from cogpipe.overrides import export_captions
    from cogpipe.stages import stage_keys, upstream_results

    cfg = load_config(args.config)
    keys = stage_keys(cfg, "precompute")
    curated = Path(upstream_results(cfg, "precompute", keys)["filter"].path) / "curated.parquet"
    n = export_captions(read_table(curated), Path(args.export))
    print(f"{args.export}: {n} captions of {curated}; edit, then set filter.overrides to it")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    from cogpipe.rate import Ratings, run_folder, serve

    ws, ekey, folder = run_folder(load_config(args.config), args.run)
    state = Ratings(ws, ekey, folder)
    print(
        f"rate: {len(state.pairs)} pairs of run {state.run} (eval key {ekey}); ratings go "
        f"to {ws.root / 'evaluate' / 'ratings.parquet'}; Ctrl-C stops",
        flush=True,
    )
    serve(state, args.host, args.port, on_url=lambda url: print(f"rate: {url}", flush=True))
    return 0


def add_data_commands(sub) -> None:
    """export, captions, export-dataset and rate: what a person takes out or puts in."""
    for add in (_add_export, _add_captions, _add_export_dataset, _add_rate):
        add(sub)


def _add_export(sub) -> None:
    p = command(
        sub,
        "export",
        "a LoRA for diffusers, SAT, ComfyUI, or merged weights",
        """
Reads a checkpoint folder or a LoRA file in any of these layouts and writes it as diffusers
(default), sat (CogVideo's SwissArmyTransformer), comfyui, merged into the base model's
transformer weights, or sat-merged: those weights as the SAT checkpoint folder CogVideo's
sat/sample_video.py loads (both need --model).

example:
  cogpipe export demo/workspace/train/<run>/checkpoint-000006 --format comfyui --out slap.safetensors
""",
        cmd_export,
    )
    p.add_argument("lora", help="a checkpoint folder, a LoRA file, or a SAT checkpoint")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="default: diffusers")
    p.add_argument(
        "--out", required=True, metavar="PATH", help="NAME.safetensors for one file, else a folder"
    )
    p.add_argument(
        "--model",
        help="base model (hub id, folder, 2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v):"
        " the LoRA must fit it; merged and sat-merged need it, sat takes num_layers"
        " from it",
    )


def _add_captions(sub) -> None:
    p = command(
        sub,
        "captions",
        "write the current captions as an overrides file to edit",
        """
Writes the filter stage's captions as a YAML file, clip_id -> caption. Edit a caption or
replace it with {reject: reason}, set filter.overrides to the file, and run again: only
the filter and the stages after it are redone.

example:
  cogpipe captions demo/demo.yaml --export overrides.yaml
""",
        cmd_captions,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument(
        "--export",
        required=True,
        metavar="FILE",
        help="a YAML file: clip_id -> caption or {reject: reason}",
    )


def _add_export_dataset(sub) -> None:
    p = command(
        sub,
        "export-dataset",
        "the curated training clips as a dataset folder",
        """
Writes the filter stage's curated clips with their captions as a dataset other trainers
read: finetrainers (metadata.csv), diffusers (prompts.txt + videos.txt) or jsonl (with
provenance). An earlier export of the format is updated.

example:
  cogpipe export-dataset demo/demo.yaml --format finetrainers /tmp/slaps-dataset
""",
        cmd_export_dataset,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument(
        "--format",
        required=True,
        choices=("finetrainers", "diffusers", "jsonl"),
        help="finetrainers: metadata.csv; diffusers: prompts.txt + videos.txt; "
        "jsonl: metadata.jsonl with provenance",
    )
    p.add_argument(
        "--force", action="store_true", help="export into a folder that holds something else"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="clips encoded at once (default: one per CPU core, at most 8)",
    )
    p.add_argument("out", help="the export folder (an earlier export of the format is updated)")


def _add_rate(sub) -> None:
    p = command(
        sub,
        "rate",
        "a page to rate checkpoint vs base videos, blind; Ctrl-C stops",
        """
Serves a page where people judge a checkpoint's video against the base model's at the same
prompt and seed (sides drawn at random), after `cogpipe evaluate CONFIG`. Ratings go to
evaluate/ratings.parquet; the evaluation report shows the win rates.

example:
  cogpipe rate demo/demo.yaml --port 0
""",
        cmd_rate,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument("--port", type=int, default=8700, help="default 8700; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--run", help="a run folder under evaluate/<ekey>/ (default: the config's run)")
