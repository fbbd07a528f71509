"""cogpipe: a folder of videos to an evaluated CogVideoX fine-tune; every stage caches its
result by content and resumes after any interruption.

    cogpipe demo [--workspace DIR]         sample videos + tiny models, then the whole pipeline
    cogpipe run CONFIG [--until STAGE]     the full pipeline as a Prefect flow
    cogpipe <stage> CONFIG                 one stage: ingest check caption recaption filter precompute train evaluate
    cogpipe caption CONFIG --shard K       one caption shard (a GPU worker's share), no merge
    cogpipe recaption CONFIG --shard K     every re-caption round of one shard, no merge
    cogpipe precompute CONFIG --part K     one precompute part (a GPU worker's shards), no index
    cogpipe status CONFIG [--json]         per stage: key, output path, done or not, counts
    cogpipe generate --prompt TEXT [...]   text-to-video with a base model and optional LoRA
    cogpipe sweep --grid NAME=V1,V2 [...]  an ablation grid over generation parameters
    cogpipe export LORA --out PATH [...]   a LoRA for diffusers, SAT, ComfyUI, or merged weights
    cogpipe captions CONFIG --export FILE  the current captions as a file to edit (filter.overrides)
    cogpipe export-dataset CONFIG --format finetrainers|diffusers|jsonl OUT   the curated clips
    cogpipe rate CONFIG [--port P] [--run NAME]   a page to rate checkpoint vs base videos, blind
    cogpipe serve [--port P] [--expose]    Prefect server, pools, deployments and workers
    cogpipe setup [--api URL]              pools, automation and deployments on a running server
    cogpipe worker --pool cpu|gpu          one worker (a GPU worker's GPUs: CUDA_VISIBLE_DEVICES)

Stage commands call the library directly (no Prefect); `run` and `demo` import the flow
lazily and run it on a temporary Prefect server of their own (on PREFECT_HOME's SQLite
database; it ends with the command, SIGKILL included) unless PREFECT_API_URL points at a
server. Their console shows Prefect's progress lines; everything, tracebacks included,
goes to `<workspace>/logs/run-<time>.log`, and an error to one line naming that file
(`--debug`: the traceback and Prefect's full console output).

Ctrl-C (run, demo, stage commands, generate, sweep) stops within seconds with one line
saying what was committed, exit code 130 (`cogpipe.interrupt`); the next run says what it
resumes from, and `status` shows what unfinished stages committed (`cogpipe.partial`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from cogpipe.config import STAGES, ConfigError, PipelineConfig, load_config
from cogpipe.errors import EmptyStage, describe, is_permanent
from cogpipe.export import FORMATS, ExportError
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.interrupt import Guard, interrupted
from cogpipe.preflight import preflight
from cogpipe.sources import SourceError
from cogpipe.workspace import StageNotReady, StageResult, read_table


def _prefect_env() -> None:
    """Defaults for running offline on a small machine; explicit settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cogpipe")  # its warnings in run logs


class _ProgressLine:
    """A one-line progress bar on stderr for stage commands, with rate and ETA.

    The rate counts only work done in this run: what a resumed run found committed at its
    first report is its baseline, not its speed.
    """

    WIDTH = 24

    def __init__(self, stage: str):
        self.stage, self.last = stage, 0.0
        self.started: float | None = None
        self.baseline = 0
        self.open = False  # a bar is on screen without its newline

    def __call__(self, done: int, total: int, note: str = "") -> None:
        now = time.time()
        if self.started is None:
            self.started, self.baseline = now, done
        if note.startswith("waiting for "):  # on a line of its own, whole and never skipped
            sys.stderr.write(("\n" if self.open else "") + f"{self.stage}: {note}\n")
            sys.stderr.flush()
            self.open = False
            return
        if done < total and now - self.last < 0.5:
            return
        self.last = now
        rate = (done - self.baseline) / max(now - self.started, 1e-6)
        eta = f"ETA {(total - done) / rate:.0f}s" if rate > 0 else "ETA -"
        filled = round(self.WIDTH * done / max(total, 1))
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        end = "\n" if done >= total else ""
        sys.stderr.write(
            f"\r{self.stage} [{bar}] {done}/{total} {rate * 3600:.0f}/h {eta} {note[-32:]:<32}{end}"
        )
        sys.stderr.flush()
        self.open = not end

    def after(self, line: str) -> str:
        """`line` on a line of its own, below an unfinished bar."""
        return "\n" + line if self.open else line


def run_pipeline(cfg: PipelineConfig, until: str = "evaluate") -> tuple[list[StageResult], float]:
    """Run the Prefect flow; returns the stage results and the flow run's duration in seconds.

    The duration is Prefect's own record of the flow run, so starting the server is not
    counted as pipeline time. Runs on the server Prefect's settings name (in-process
    callers: Prefect's ephemeral one); the CLI starts its own (`_prefect_api`).
    """
    _prefect_env()
    from prefect import tags
    from prefect.client.orchestration import get_client

    from cogpipe_flows.pipeline import cli_tags, pipeline

    with tags(*cli_tags()):  # who runs it: a later run can tell if this process was killed
        state = pipeline(cfg, until=until, return_state=True)
    records = state.result()  # raises the flow's error if it failed
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    return [StageResult.from_dict(r) for r in records.values()], run.total_run_time.total_seconds()


def _run_log(cfg: PipelineConfig) -> Path:
    """`<workspace>/logs/run-<time>-<pid>.log`: everything a `run` logs, tracebacks included."""
    from cogpipe.workspace import Workspace

    folder = Workspace(cfg.workspace).root / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def _prefect_api(log_file: Path, meanwhile) -> Iterator[None]:
    """Call `meanwhile()`, then yield with Prefect pointed at a server: PREFECT_API_URL's,
    else a temporary one of ours (`cogpipe_flows.local_server`: its own session, so a
    terminal's Ctrl-C leaves it to us; it dies with this process), started first so that
    it starts up while `meanwhile` runs (imports, reading the workspace)."""
    _prefect_env()
    if os.environ.get("PREFECT_API_URL"):
        meanwhile()
        yield
        return
    from cogpipe_flows.local_server import LocalServer

    server = LocalServer.start(log_file)
    try:
        meanwhile()
        server.wait()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server.api_url}):
            _report_killed_runs()
            try:
                yield
            except KeyboardInterrupt:
                raise  # nothing is sent: the Guard exits at once
            except BaseException:
                _drain_prefect()
                raise
            _drain_prefect()
    except KeyboardInterrupt:
        raise  # the Guard says what was committed, then stops every child, this server too
    except BaseException:
        server.stop()
        raise
    server.stop()


def _report_killed_runs() -> None:
    """Earlier runs on this home that were killed (their server died with them) are still
    Running in its database: mark them Crashed, and say so."""
    from cogpipe_flows.pipeline import crash_killed_runs

    try:
        names = crash_killed_runs()
    except Exception as e:  # noqa: BLE001 - housekeeping: the run goes on
        logging.getLogger(__name__).warning("cannot mark killed runs Crashed: %s", describe(e))
        return
    for name in names:
        print(f"flow run {name!r} of a killed `cogpipe run` marked Crashed", flush=True)


def _drain_prefect(timeout: float = 10) -> None:
    """Send the logs and events Prefect still holds while its server is up: at exit they
    would retry a stopped server for over a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout)


class _QuietConsole(logging.Filter):
    """Prefect's console without errors and tracebacks: the CLI reports a failure in one
    line, and the run's log file has them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.exc_info


@contextlib.contextmanager
def _run_logging(log_file: Path, debug: bool) -> Iterator[None]:
    """Every log record to `log_file`; Prefect's console quiet about errors unless `debug`."""
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler  # prefect's logging is set up

    root = logging.getLogger()
    handler = logging.FileHandler(log_file)
    line = "%(asctime)s | %(levelname)-7s | {} - %(message)s"
    handler.setFormatter(PrefectFormatter(
        line.format("%(name)s"), flow_run_fmt=line.format("Flow run %(flow_run_name)r"),
        task_run_fmt=line.format("Task run %(task_run_name)r"),
    ))  # fmt: skip
    root.addHandler(handler)
    quiet = _QuietConsole()
    consoles = [] if debug else [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    for console in consoles:
        console.addFilter(quiet)
    try:
        yield
    finally:
        for console in consoles:
            console.removeFilter(quiet)
        root.removeHandler(handler)
        handler.close()


def _run_flow(
    cfg: PipelineConfig, until: str, debug: bool
) -> tuple[list[StageResult], float] | None:
    """The pipeline flow for `run` and `demo`: resume lines first, Ctrl-C as one line
    (exit 130), a failure as one line naming the log file (None; `debug`: the traceback too)."""
    log_file = _run_log(cfg)

    def meanwhile() -> None:
        from cogpipe.partial import resume_lines
        from cogpipe.pipeline import plan

        for line in resume_lines(cfg, plan(cfg, until)):
            print(line, flush=True)
        import cogpipe_flows.pipeline  # noqa: F401 - the imports, while the server starts

    with Guard(lambda: _run_interrupted(cfg, until), log_file) as guard:
        try:
            with _prefect_api(log_file, meanwhile), _run_logging(log_file, debug):
                return run_pipeline(cfg, until)
        except Exception as e:
            if guard.requested is not None:  # the interrupt, as Prefect re-raised it
                raise
            with open(log_file, "a") as log:  # the server may have failed before any logging
                traceback.print_exc(file=log)
            if debug:
                traceback.print_exc()
            print(f"cogpipe: error: {_error_line(cfg, until, e)}; log: {log_file}", file=sys.stderr)
            return None


def _error_line(cfg: PipelineConfig, until: str, error: BaseException) -> str:
    """The error in one line, after the stage it stopped (when it does not name it)."""
    from cogpipe.partial import running_stage
    from cogpipe.pipeline import plan

    text = describe(error)
    try:
        stage = running_stage(cfg, plan(cfg, until))
    except Exception:  # noqa: BLE001 - the error itself is what matters
        stage = None
    return f"{stage}: {text}" if stage and not text.startswith(stage) else text


def _run_interrupted(cfg: PipelineConfig, until: str) -> str:
    """The Ctrl-C line of a pipeline run: what the stage it was in had committed."""
    from cogpipe.partial import running_stage
    from cogpipe.pipeline import plan

    keys = plan(cfg, until)
    stage = running_stage(cfg, keys)
    if stage is None:
        return f"interrupted after every stage up to {until} had finished"
    return _stage_interrupted(cfg, stage, keys)


def _stage_interrupted(cfg: PipelineConfig, stage: str, keys: dict[str, str]) -> str:
    """'interrupted; caption: 812 of 2,982 clips committed; run again to resume'."""
    from cogpipe.partial import is_finished, partial_progress

    if is_finished(cfg, stage, keys):
        return f"interrupted after {stage} had finished"
    found = partial_progress(cfg, stage, keys)
    return interrupted(found.committed() if found else f"{stage}: nothing committed yet")


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False))


def cmd_run(args: argparse.Namespace) -> int:
    from cogpipe.summary import table

    cfg = load_config(args.config)
    preflight(cfg, args.until)
    outcome = _run_flow(cfg, args.until, _debug(args))
    if outcome is None:
        return 1
    results, elapsed = outcome
    print(table(results))
    print(f"pipeline: {elapsed:.1f}s")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from cogpipe.partial import partial_progress
    from cogpipe.pipeline import plan, run_stage, upstream_results
    from cogpipe.summary import table

    cfg = load_config(args.config)
    shard, part = getattr(args, "shard", None), getattr(args, "part", None)
    options = {"shard": shard} if shard is not None else {}
    options |= {"part": part} if part is not None else {}
    keys = plan(cfg, args.command)
    upstream = upstream_results(cfg, args.command, keys)  # first: "run X first" says most
    preflight(cfg, args.command)  # the stages upstream are done: this one's fields
    found = partial_progress(cfg, args.command, keys)
    if found is not None:
        print(found.resuming(), flush=True)
    progress = _ProgressLine(args.command)
    with Guard(lambda: progress.after(_stage_interrupted(cfg, args.command, keys))):
        result = run_stage(cfg, args.command, upstream, progress=progress, **options)
    if result is None and shard is not None:  # its parts are committed; the merge comes later
        print(f"{args.command} shard {shard} of {cfg.caption.shards}: every part committed")
        return 0
    if result is None:  # its shards are committed; the index comes with the last run
        print(f"precompute part {part} of {cfg.precompute.workers}: every shard committed")
        return 0
    print(table([result]))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cogpipe.pipeline import status

    report = status(load_config(args.config))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for stage, s in report.items():
        if stage == "error":
            print(f"error: {s['message']}")
            continue
        state = "done" if s["done"] else "not done"
        counts = ", ".join(f"{k}={v}" for k, v in s["counts"].items())
        if s.get("partial"):
            counts = f"partial: {s['partial']['text']}"
        print(f"{stage:<11} {s['key']:<12} {state:<9} {counts}")
        print(f"{'':<11} {s['path']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cogpipe.demo import prepare_demo
    from cogpipe.pipeline import status
    from cogpipe.summary import table

    root = Path(args.workspace).resolve()
    print(f"demo: writing sample videos and tiny models under {root}")
    with Guard(lambda: interrupted("demo: files written so far are kept")):
        config_path = prepare_demo(root)
    cfg = load_config(config_path)
    preflight(cfg, "evaluate")
    outcome = _run_flow(cfg, "evaluate", _debug(args))
    if outcome is None:
        return 1
    results, elapsed = outcome
    print(table(results))
    computed = [r.stage for r in results if not r.reused]
    print(f"pipeline: {elapsed:.1f}s; computed: {', '.join(computed) or 'none (all reused)'}")
    done = {stage: s["done"] for stage, s in status(cfg).items()}
    missing = [stage for stage, ok in done.items() if not ok]
    if missing:
        print(f"demo: stages without a done marker: {missing}", file=sys.stderr)
        return 1
    print(f"config: {config_path}\nstatus: cogpipe status {config_path}")
    return 0


def _add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of a pydantic model (`lora_scale` -> `--lora-scale`).

    Help and choices come from the field; defaults stay in the model (an option not given
    is not passed), and pydantic converts and validates the strings.
    """
    for name, field in model.model_fields.items():
        kwargs = {"dest": name, "default": argparse.SUPPRESS,
                  "help": f"{field.description} Default: {field.default}."}  # fmt: skip
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(field.annotation) is Literal:
            kwargs["choices"] = get_args(field.annotation)
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="a prompt as text")
    group.add_argument(
        "--prompt-file", metavar="NAME", help="prompts/NAME.txt (from the current folder) or a path"
    )
    group.add_argument(
        "--prompts-dir", metavar="DIR", help="every .txt in DIR: one prompt each, named by its stem"
    )


def _generate_options(args: argparse.Namespace) -> GenerateOptions:
    """The options given on the command line; a bad value is an error naming its flag."""
    values = {k: v for k, v in vars(args).items() if k in GenerateOptions.model_fields}
    try:
        return GenerateOptions(**values)
    except ValidationError as e:
        lines = [
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        ]
        raise GenerateError("; ".join(lines)) from None


def _print_video(path: Path, seconds: float) -> None:
    print(f"{path} {seconds:.1f}s", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from cogpipe.generate import read_prompts, run_generate

    options = _generate_options(args)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts_dir)
    written: list[Path] = []

    def on_video(path: Path, seconds: float) -> None:
        written.append(path)
        _print_video(path, seconds)

    def summary() -> str:  # generate overwrites: nothing to resume from
        n = len(prompts)
        return (f"interrupted; generate: {len(written)} of {n} videos written (listed above); "
                f"running again makes all {n} (existing files are overwritten)")  # fmt: skip

    with Guard(summary):
        run_generate(prompts, options, args.output, on_video=on_video)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cogpipe.generate import read_prompts
    from cogpipe.sweep import clip_metric, parse_grid, run_sweep

    options = _generate_options(args)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts_dir)
    grid = parse_grid(args.grid)
    experiment = args.experiment or "-".join(sorted(grid))
    metrics = {}
    if args.clip_model:
        metrics["clip_score"] = clip_metric(args.clip_model, options.device)
    folder = Path(args.out) / experiment
    reached = [0, len(prompts) * math.prod(len(v) for v in grid.values())]  # done, total

    def progress(done: int, total: int, note: str) -> None:
        reached[:] = [done, total]
        print(f"[{done}/{total}] {note}", flush=True)

    def summary() -> str:
        done, total = reached
        return interrupted(f"sweep: {done} of {total} videos done in {folder} (results.csv)")

    with Guard(summary):
        table = run_sweep(prompts, options, grid, args.out, experiment, metrics, progress=progress)
    skipped, errors = int(table.skipped.sum()), int((table.error != "").sum())
    print(f"{folder}: {len(table)} videos ({len(table) - skipped - errors} generated, "
          f"{skipped} skipped, {errors} failed); results.csv, grid.png, timing.png")  # fmt: skip
    return 1 if errors else 0


def cmd_export(args: argparse.Namespace) -> int:
    from cogpipe.export import run_export

    path, lora = run_export(args.lora, args.out, args.format, args.model)
    print(f"{path}: {args.format} export of {lora.source} ({len(lora.modules)} modules, "
          f"rank {lora.rank}, alpha {lora.alpha:g})")  # fmt: skip
    return 0


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from cogpipe.dataset import DatasetExportError, export_dataset

    cfg = load_config(args.config)
    try:
        r = export_dataset(cfg, args.out, args.format, args.force, args.workers,
                           progress=_ProgressLine("export-dataset"))  # fmt: skip
    except DatasetExportError as e:
        print(f"cogpipe: error: {e}", file=sys.stderr)
        return 2
    print(f"export-dataset: {r.clips} clips ({r.written} written, {r.reused} reused, "
          f"{r.removed} removed) in {r.seconds:.1f}s -> {r.out} ({r.format})")  # fmt: skip
    return 0


def cmd_captions(args: argparse.Namespace) -> int:
    from cogpipe.overrides import export_captions
    from cogpipe.pipeline import plan, upstream_results

    cfg = load_config(args.config)
    keys = plan(cfg, "precompute")
    curated = Path(upstream_results(cfg, "precompute", keys)["filter"].path) / "curated.parquet"
    n = export_captions(read_table(curated), Path(args.export))
    print(f"{args.export}: {n} captions of {curated}; edit, then set filter.overrides to it")
    return 0


def cmd_rate(args: argparse.Namespace) -> int:
    from cogpipe.rate import RateError, Ratings, run_folder, serve

    try:
        ws, ekey, folder = run_folder(load_config(args.config), args.run)
        state = Ratings(ws, ekey, folder)
        print(f"rate: {len(state.pairs)} pairs of run {state.run} (eval key {ekey}); ratings go "
              f"to {ws.root / 'evaluate' / 'ratings.parquet'}; Ctrl-C stops", flush=True)  # fmt: skip
        serve(state, args.host, args.port, on_url=lambda url: print(f"rate: {url}", flush=True))
    except RateError as e:
        print(f"cogpipe: error: {e}", file=sys.stderr)
        return 2
    return 0


DEBUG_HELP = "show tracebacks and Prefect's full console output"


def build_parser() -> argparse.ArgumentParser:
    intro, commands = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(
        prog="cogpipe", description=intro, epilog="commands:\n" + commands,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="sample videos + tiny models, then the whole pipeline")
    p.add_argument(
        "--workspace", default="demo", help="folder for videos, models, config, workspace"
    )
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("run", help="the full pipeline as a Prefect flow")
    p.add_argument("config")
    p.add_argument("--until", choices=STAGES, default="evaluate", help="last stage to run")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    p.set_defaults(fn=cmd_run)

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage alone (its inputs must be done)")
        p.add_argument("config")
        if stage in ("caption", "recaption"):
            p.add_argument(
                "--shard", type=int, help=f"{stage} only this shard (0..caption.shards-1)"
            )
        if stage == "precompute":
            p.add_argument(
                "--part", type=int, help="encode only this part (0..precompute.workers-1)"
            )
        p.set_defaults(fn=cmd_stage)

    p = sub.add_parser("status", help="per stage: key, output path, done or not, counts")
    p.add_argument("config")
    p.add_argument("--json", action="store_true", help="one JSON object keyed by stage")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("generate", help="text-to-video with a base model and optional LoRA")
    _add_prompt_options(p)
    p.add_argument("--output", help="an .mp4 for one prompt, else a folder (default: generated/)")
    _add_model_options(p, GenerateOptions)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("sweep", help="an ablation grid over generation parameters")
    _add_prompt_options(p)
    p.add_argument(
        "--grid", action="append", default=[], metavar="NAME=V1,V2",
        help="a per-video option and its values, e.g. guidance=1,6,12 (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", default="sweeps", help="sweeps folder (default: sweeps/)")
    p.add_argument("--experiment", help="experiment folder name (default: the grid's names)")
    p.add_argument("--clip-model", help="add a CLIP score column (hub id or folder)")
    _add_model_options(p, GenerateOptions)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("export", help="a LoRA for diffusers, SAT, ComfyUI, or merged weights")
    p.add_argument("lora", help="a checkpoint folder, a LoRA file, or a SAT checkpoint")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="default: diffusers")
    p.add_argument("--out", required=True, help="NAME.safetensors for one file, else a folder")
    p.add_argument("--model", help="base model (hub id, folder, 2b, 5b): the LoRA must fit it; "
                   "merged needs it, sat takes num_layers from it")  # fmt: skip
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("captions", help="write the current captions as an overrides file")
    p.add_argument("config")
    p.add_argument("--export", required=True, metavar="FILE",
                   help="a YAML file: clip_id -> caption or {reject: reason}")  # fmt: skip
    p.set_defaults(fn=cmd_captions)

    p = sub.add_parser("export-dataset", help="the curated training clips as a dataset folder")
    p.add_argument("config")
    p.add_argument("--format", required=True, choices=("finetrainers", "diffusers", "jsonl"),
                   help="finetrainers: metadata.csv; diffusers: prompts.txt + videos.txt; "
                   "jsonl: metadata.jsonl with provenance")  # fmt: skip
    p.add_argument("out", help="the export folder (an earlier export of the format is updated)")
    p.add_argument("--force", action="store_true",
                   help="export into a folder that holds something else")  # fmt: skip
    p.add_argument("--workers", type=int, default=0,
                   help="clips encoded at once (default: one per CPU core, at most 8)")  # fmt: skip
    p.set_defaults(fn=cmd_export_dataset)

    p = sub.add_parser("rate", help="a page to rate checkpoint vs base videos; Ctrl-C stops")
    p.add_argument("config")
    p.add_argument("--port", type=int, default=8700, help="default 8700; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--run", help="a run folder under evaluate/<ekey>/ (default: the config's run)")
    p.set_defaults(fn=cmd_rate)

    p = sub.add_parser("serve", help="Prefect server, pools, deployments and workers; Ctrl-C stops")
    p.add_argument("--port", type=int, default=4200, help="UI and API port (default 4200)")
    p.add_argument(
        "--expose", action="store_true",
        help="bind 0.0.0.0 instead of 127.0.0.1 (the API has no authentication: a trusted network only)",
    )  # fmt: skip
    p.add_argument(
        "--logs", default=".cogpipe-serve", help="server and worker logs (default .cogpipe-serve/)"
    )
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("setup", help="pools, stuck-run automation and deployments on a server")
    p.add_argument("--api", help="the server's API URL (default: PREFECT_API_URL)")
    p.set_defaults(fn=cmd_setup)

    p = sub.add_parser("worker", help="one Prefect worker for a cogpipe pool")
    p.add_argument("--pool", choices=["cpu", "gpu"], required=True)
    p.add_argument("--api", help="the server's API URL (default: PREFECT_API_URL)")
    p.add_argument("--name", help="worker name (default: pool, host and GPUs)")
    p.set_defaults(fn=cmd_worker)
    return parser


def _serving(command) -> int:
    """Run a serve, setup or worker command; a ServeError is a clean error, like the others."""
    from cogpipe_flows.serve import ServeError

    _prefect_env()
    try:
        return command()
    except ServeError as e:
        print(f"cogpipe: error: {e}", file=sys.stderr)
        return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from cogpipe_flows.serve import serve_forever

    host = "0.0.0.0" if args.expose else "127.0.0.1"
    return _serving(lambda: serve_forever(host, args.port, Path(args.logs).resolve()))


def cmd_setup(args: argparse.Namespace) -> int:
    from cogpipe_flows.serve import ServeError, setup

    def command() -> int:
        api = args.api or os.environ.get("PREFECT_API_URL")
        if not api:
            raise ServeError("cogpipe setup: set PREFECT_API_URL or pass --api (the server's /api)")
        setup(api, gpu_groups=[])  # GPU workers create their own slots when they start
        print(f"cogpipe: pools, automation and deployments are set up on {api}")
        return 0

    return _serving(command)


def cmd_worker(args: argparse.Namespace) -> int:
    from cogpipe_flows.serve import run_worker

    return _serving(lambda: run_worker(args.pool, args.api, args.name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, StageNotReady, FileNotFoundError, SourceError, GenerateError,
            ExportError, EmptyStage) as e:  # fmt: skip
        print(f"cogpipe: error: {describe(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only, permission: one line naming the file
        if not is_permanent(e) or getattr(args, "debug", False):
            raise
        print(f"cogpipe: error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a command's own Guard (loading, checking): no work yet
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
