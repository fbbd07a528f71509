"""cogpipe: a folder of videos to an evaluated CogVideoX fine-tune; every stage caches its
result by content and resumes after any interruption.

`cogpipe COMMAND --help` says what a command reads and writes, with an example. A first
session:

  cogpipe demo                       # sample videos + tiny models, then every stage (CPU)
  cogpipe status demo/demo.yaml      # per stage: done or not, counts, output folder
  cogpipe generate --config demo/demo.yaml --latest --prompt "a slap"   # the trained LoRA
  cogpipe run CONFIG                 # your videos: write a config like demo/demo.yaml
  cogpipe status CONFIG
  cogpipe serve                      # production: Prefect UI, deployments, cogpipe worker

Stage commands call the library directly (no Prefect); `run`, `demo`, `sweep-train` and
`evaluate-checkpoints` import their flow lazily and run it on a temporary Prefect server of
their own (on the SQLite database of PREFECT_HOME, by default `<workspace>/.prefect`; it
ends with the command, SIGKILL included) unless PREFECT_API_URL points at a server.
Their console shows each running stage's progress (a bar per stage on a terminal, else a
plain line at most every COGPIPE_PROGRESS_EVERY seconds, default 30) and Prefect's log lines.
Everything they log, tracebacks included, goes to `<workspace>/logs/run-<time>.log`, and an
error to one line naming that file (`--debug`: the traceback and Prefect's full console).

Ctrl-C (run, demo, stage commands, generate, sweep, sweep-train) stops within seconds with
one line saying what was committed, exit code 130 (`cogpipe.interrupt`); the next run says
what it resumes from, and `status` shows what unfinished stages committed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from cogpipe.cli_data import add_data_commands, add_workspace_commands
from cogpipe.cli_generate import add_generate_commands, add_serve_api
from cogpipe.cli_parser import CONFIG_HELP, DEBUG_HELP, command, debug_flag, set_flag
from cogpipe.compat import HelpFormatter
from cogpipe.config import STAGES, ConfigError, PipelineConfig, load_config, parse_sets, with_fields
from cogpipe.errors import EmptyStage, UserError, describe, is_permanent
from cogpipe.export import ExportError
from cogpipe.generate import GenerateError
from cogpipe.interrupt import Guard, interrupted
from cogpipe.preflight import preflight
from cogpipe.sources import SourceError
from cogpipe.stages import STAGE_SPECS
from cogpipe.workspace import StageNotReady, StageResult


def _prefect_env() -> None:
    """Defaults for running offline on a small machine; explicit settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cogpipe")  # its warnings in run logs


def _prefect_home(folder: Path) -> Path:
    """Keep this command's Prefect database and results in `folder` (a run's, the demo's,
    serve's own) rather than the shared ~/.prefect; an explicit PREFECT_HOME wins. Set
    before Prefect is imported, which reads it once."""
    home = Path(os.environ.setdefault("PREFECT_HOME", str(folder))).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def _with_progress(call):
    """`call()` with the running stages' progress on the console (`cogpipe.progress`: bars
    on a terminal, plain periodic lines otherwise): the flow's tasks run in this process
    and report to the display installed here. Returns what `call` returns."""
    from cogpipe.progress import console_display, show

    with show(console_display()):
        return call()


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
        state = pipeline(config=cfg, until=until, return_state=True)
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
    handler.setFormatter(
        PrefectFormatter(
            line.format("%(name)s"),
            flow_run_fmt=line.format("Flow run %(flow_run_name)r"),
            task_run_fmt=line.format("Task run %(task_run_name)r"),
        )
    )
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
    """The pipeline flow for `run` and `demo`: resume lines first, then `_in_prefect`."""

    def meanwhile() -> None:
        from cogpipe.partial import resume_lines
        from cogpipe.pipeline import stage_keys

        for line in resume_lines(cfg, stage_keys(cfg, until)):
            print(line, flush=True)
        import cogpipe_flows.pipeline  # noqa: F401 - the imports, while the server starts

    return _in_prefect(
        cfg,
        lambda: _with_progress(lambda: run_pipeline(cfg, until)),
        meanwhile,
        debug,
        on_interrupt=lambda: _run_interrupted(cfg, until),
        error_line=lambda e: _error_line(cfg, until, e),
    )


def _in_prefect(cfg: PipelineConfig, call, meanwhile, debug: bool, on_interrupt, error_line):
    """`call()` (a flow run in-process) as `run` runs the pipeline: on `_prefect_api`'s
    server (`meanwhile()` while it starts), logged to `<workspace>/logs/run-*.log`, Ctrl-C
    as the one line `on_interrupt()` gives (exit 130), a failure as `error_line(error)` and
    the log file (returns None; `debug`: the traceback too). Returns what `call` returns."""
    log_file = _run_log(cfg)
    with Guard(on_interrupt, log_file) as guard:
        try:
            with _prefect_api(log_file, meanwhile), _run_logging(log_file, debug):
                return call()
        except Exception as e:
            if guard.requested is not None:  # the interrupt, as Prefect re-raised it
                raise
            with open(log_file, "a") as log:  # the server may have failed before any logging
                traceback.print_exc(file=log)
            if debug:
                traceback.print_exc()
            print(f"cogpipe: error: {error_line(e)}; log: {log_file}", file=sys.stderr)
            return None


def _error_line(cfg: PipelineConfig, until: str, error: BaseException) -> str:
    """The error in one line, after the stage it stopped (when it does not name it)."""
    from cogpipe.partial import running_stage
    from cogpipe.pipeline import stage_keys

    text = describe(error)
    try:
        stage = running_stage(cfg, stage_keys(cfg, until))
    except Exception:  # noqa: BLE001 - the error itself is what matters
        stage = None
    return f"{stage}: {text}" if stage and not text.startswith(stage) else text


def _run_interrupted(cfg: PipelineConfig, until: str) -> str:
    """The Ctrl-C line of a pipeline run: what the stage it was in had committed."""
    from cogpipe.partial import running_stage
    from cogpipe.pipeline import stage_keys

    keys = stage_keys(cfg, until)
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
    if args.sets:
        cfg = with_fields(cfg, parse_sets(args.sets), base=Path(args.config).parent)
    _prefect_home(cfg.workspace / ".prefect")
    preflight(cfg, args.until)
    _print_estimate(cfg, args.until)
    outcome = _run_flow(cfg, args.until, _debug(args))
    if outcome is None:
        return 1
    results, elapsed = outcome
    print(table(results))
    print(f"pipeline: {elapsed:.1f}s")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from cogpipe.partial import partial_progress
    from cogpipe.pipeline import run_stage, stage_keys, upstream_results
    from cogpipe.progress import console_display, show
    from cogpipe.summary import table

    cfg = load_config(args.config)
    shard, part = getattr(args, "shard", None), getattr(args, "part", None)
    options = {"shard": shard} if shard is not None else {}
    options |= {"part": part} if part is not None else {}
    keys = stage_keys(cfg, args.command)
    upstream = upstream_results(cfg, args.command, keys)  # first: "run X first" says most
    preflight(cfg, args.command)  # the stages upstream are done: this one's fields
    found = partial_progress(cfg, args.command, keys)
    if found is not None:
        print(found.resuming(), flush=True)
    with Guard(lambda: _stage_interrupted(cfg, args.command, keys)), show(console_display()) as d:
        result = run_stage(cfg, args.command, upstream, progress=d.stage(args.command), **options)
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
    if any(not s.get("done", True) for s in report.values()):
        print(f"why a stage's key is new: cogpipe explain-key {args.config} STAGE")
    return 0


def cmd_explain_key(args: argparse.Namespace) -> int:
    from cogpipe.pipeline import explain_key, explain_text

    report = explain_key(load_config(args.config), args.stage)
    print(json.dumps(report, indent=2) if args.json else explain_text(report))
    return 0


EXPLAIN_KEY_ABOUT = """
Computes STAGE's key for CONFIG without running anything and prints what went into it:
the config fields by dotted name (long values by hash), the model fingerprints, the keys
of the stages it reads and the stage's VERSION. When the workspace holds an earlier run
of STAGE under another key, it names the fields that changed since then, and says for
every stage upstream whether its key is the one that run read.

example:
  cogpipe explain-key demo/demo.yaml caption
  cogpipe explain-key demo/demo.yaml train --json
"""


def _add_explain_key(sub) -> None:
    help = "what went into a stage's key, and what changed since its last run"
    p = command(sub, "explain-key", help, EXPLAIN_KEY_ABOUT, cmd_explain_key)
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument("stage", metavar="STAGE", choices=STAGES, help=f"one of {', '.join(STAGES)}")
    p.add_argument("--json", action="store_true", help="the explanation as one JSON object")


def _print_estimate(cfg: PipelineConfig, until: str) -> None:
    """What `cogpipe plan` says, printed before a run starts; the run's done markers then
    record each prediction against what the stage took. An estimate never stops a run."""
    from cogpipe.estimate import estimate, save_predictions

    try:
        est = estimate(cfg, stages=list(STAGES[: STAGES.index(until) + 1]))
        save_predictions(cfg, est)
    except Exception as e:  # a broken measurement file must not cost the run
        print(f"estimate: none ({type(e).__name__}: {e})", flush=True)
        return
    print(est.text(), flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from cogpipe.demo import prepare_demo
    from cogpipe.pipeline import status
    from cogpipe.summary import table

    root = Path(args.workspace).resolve()
    print(f"demo: writing sample videos and tiny models under {root}")
    with Guard(lambda: interrupted("demo: files written so far are kept")):
        config_path = prepare_demo(root)
    cfg = load_config(config_path)
    _prefect_home(cfg.workspace / ".prefect")
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


def _grid_value(text: str):
    """A `--grid` value as YAML would type it: '1e-4' -> 0.0001, '64' -> 64, 'true' -> True,
    'adamw' stays text (so cell names match a grid given in Python)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _train_grid(specs: list[str]) -> dict[str, list]:
    """`--grid train.rank=4,8` as {"train.rank": [4, 8]}; none given: the flow's default grid."""
    from cogpipe.sweep import parse_grid

    if not specs:
        from cogpipe_flows.train_sweep import DEFAULT_GRID

        return DEFAULT_GRID
    return {path: [_grid_value(v) for v in values] for path, values in parse_grid(specs).items()}


def _sweep_interrupted(cfg: PipelineConfig, cells: list[tuple[str, PipelineConfig]]) -> str:
    """The Ctrl-C line of a training sweep: the shared stage or the cell it stopped in."""
    from cogpipe.partial import running_stage
    from cogpipe.pipeline import stage_keys

    shared = stage_keys(cfg, "precompute")
    stage = running_stage(cfg, shared)
    if stage is not None:
        return _stage_interrupted(cfg, stage, shared)
    for k, (name, cell) in enumerate(cells):
        keys = stage_keys(cell, "evaluate")
        stage = running_stage(cell, keys)
        if stage is not None:
            where = f"interrupted in cell {k + 1} of {len(cells)} ({name}); "
            return _stage_interrupted(cell, stage, keys).replace("interrupted; ", where, 1)
    return "interrupted after every cell had been trained and evaluated"


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    from cogpipe.summary import render

    print(render(columns, rows))


def _sweep_rows(records: list[dict], grid: dict[str, list], metric: str) -> list[list[str]]:
    """One row per cell, best first: run, grid values, best checkpoint, metric [95% interval]."""
    rows = []
    for r in records:
        value, low, high = r.get(metric), r.get(f"{metric}_low"), r.get(f"{metric}_high")
        score = "-" if value is None or math.isnan(value) else f"{value:.4f}"
        if score != "-" and low is not None and not math.isnan(low):
            score += f" [{low:.4f}, {high:.4f}]"
        values = [str(r.get(path, "")) for path in grid]
        rows.append([r["run"], *values, str(r.get("checkpoint") or "-"), score])
    return rows


def cmd_sweep_train(args: argparse.Namespace) -> int:
    from cogpipe import train_sweep as sweeps
    from cogpipe.evaluate import metric_names
    from cogpipe.preflight import check_stage_models
    from cogpipe.workspace import Workspace

    cfg = load_config(args.config)
    _prefect_home(cfg.workspace / ".prefect")  # as `run` on this config: one record of its runs
    grid = _train_grid(args.grid)
    cells = sweeps.cells(cfg, grid)  # a bad grid fails here, before anything runs
    if args.metric not in metric_names(cfg.evaluate):
        raise ConfigError(
            f"--metric {args.metric}: not one of "
            f"{', '.join(metric_names(cfg.evaluate))} for this config"
        )
    preflight(cfg, "precompute")
    for stage in ("train", "evaluate"):
        check_stage_models(cfg, stage)
    print(f"train-sweep: {len(cells)} cells: {', '.join(name for name, _ in cells)}", flush=True)

    def call():
        from cogpipe_flows.train_sweep import train_sweep

        return train_sweep(config=cfg, grid=grid, metric=args.metric)

    def meanwhile() -> None:
        import cogpipe_flows.train_sweep  # noqa: F401 - the imports, while the server starts

    records = _in_prefect(
        cfg,
        lambda: _with_progress(call),
        meanwhile,
        _debug(args),
        on_interrupt=lambda: _sweep_interrupted(cfg, cells),
        error_line=describe,
    )
    if records is None:
        return 1
    columns = ["run", *grid, "best checkpoint", args.metric]
    _print_table(columns, _sweep_rows(records, grid, args.metric))
    report = Workspace(cfg.workspace).root / "sweeps" / "train" / (cfg.name or "sweep")
    print(f"report: {report / 'report.md'} (table: results.parquet)")
    return 0


def _nightly_interrupted(cfg: PipelineConfig) -> str:
    """The Ctrl-C line of evaluate-checkpoints: checkpoints in the index against all."""
    from cogpipe.evaluate import eval_key, list_checkpoints
    from cogpipe.workspace import Workspace
    from cogpipe_flows.evaluate_checkpoints import evaluated, run_config, training_runs

    ws = Workspace(cfg.workspace)
    done = total = 0
    for run, record in training_runs(ws).items():
        total += len(list_checkpoints(ws.root / "train" / run))
        try:
            done += evaluated(ws, eval_key(run_config(cfg, run, record)), run)
        except Exception:  # noqa: BLE001 - a run that no longer validates counts as not done
            continue
    return interrupted(
        f"evaluate-checkpoints: {done} of {total} checkpoints in "
        f"{ws.root / 'evaluate' / 'index.parquet'}"
    )


def cmd_evaluate_checkpoints(args: argparse.Namespace) -> int:
    from cogpipe.preflight import check_stage_models, check_workspace

    cfg = load_config(args.config)
    _prefect_home(cfg.workspace / ".prefect")  # as `run` on this config: one record of its runs
    check_workspace(cfg.workspace)
    check_stage_models(cfg, "evaluate")

    def call():
        from cogpipe_flows.evaluate_checkpoints import evaluate_checkpoints

        return evaluate_checkpoints(config=cfg)

    def meanwhile() -> None:
        import cogpipe_flows.evaluate_checkpoints  # noqa: F401 - the imports, while the server starts

    new = _in_prefect(
        cfg,
        lambda: _with_progress(call),
        meanwhile,
        _debug(args),
        on_interrupt=lambda: _nightly_interrupted(cfg),
        error_line=describe,
    )
    if new is None:
        return 1
    _print_table(["run", "checkpoints evaluated now"], [[run, str(n)] for run, n in new.items()])
    print(f"index: {Path(cfg.workspace) / 'evaluate' / 'index.parquet'}")
    return 0


# One line each (`cogpipe --help`), then what `cogpipe STAGE --help` adds.
STAGE_HELP = {
    "ingest": "probe every input video into one manifest row, or a rejection with its reason",
    "check": "clips: trimmed, split at shots, scored for black/frozen/motion, deduplicated, held out",
    "caption": "caption the clips with a LLaVA model, batch by batch (resumable, sharded)",
    "recaption": "caption again, with the stricter prompt, the clips the filter's gate rejects",
    "filter": "the caption quality gate, your overrides, and the training selection",
    "precompute": "VAE latents and T5 embeddings of the curated clips, in safetensors shards",
    "train": "train the LoRA (or full fine-tune) on the precomputed shards; resumes from a checkpoint",
    "evaluate": "generate and score the base model and every checkpoint of the run",
}
STAGE_WRITES = {
    "ingest": "ingest/<key>/videos.parquet",
    "check": "check/<key>/clips.parquet and report.md",
    "caption": "caption/<key>/part-*.parquet and captions.parquet",
    "recaption": "recaption/<key>/captions.parquet",
    "filter": "filter/<key>/curated.parquet and report.md",
    "precompute": "precompute/<key>/shard-*.safetensors and index.parquet",
    "train": "train/<run>/checkpoint-NNNNNN/ folders and run.json",
    "evaluate": "evaluate/<ekey>/<run>/<checkpoint>/ videos, metrics and report.md",
}


SHARD_HELP = {  # the stages that run in pieces (their spec's `shard_option`)
    "caption": "caption only shard K (0..caption.shards-1) and skip the merge",
    "recaption": "recaption only shard K (0..caption.shards-1) and skip the merge",
    "precompute": "encode only part K (0..precompute.workers-1) and skip the index",
}


def _add_stage_commands(sub) -> None:
    """One command per pipeline stage (library calls, no Prefect)."""
    for k, stage in enumerate(STAGES):
        before = f"`cogpipe run CONFIG --until {STAGES[k - 1]}`" if k else "nothing"
        about = textwrap.fill(
            f"Runs the {stage} stage alone, in this process and without Prefect. It reads the"
            f" finished stages before it (needs: {before}) and writes {STAGE_WRITES[stage]}"
            " under the workspace. Run again after an interruption and it resumes from what"
            " was committed.",
            width=88,
        )
        example = f"example:\n  cogpipe {stage} demo/demo.yaml"
        p = command(sub, stage, STAGE_HELP[stage], f"{about}\n\n{example}", cmd_stage)
        p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
        option = STAGE_SPECS[stage].shard_option  # --shard K, --part K: one piece of the stage
        if option is not None:
            p.add_argument(f"--{option}", type=int, metavar="K", help=SHARD_HELP[stage])


def _add_flow_commands(sub) -> None:
    """The training sweep and the nightly evaluation, in-process as `run` runs the pipeline."""
    p = command(
        sub,
        "sweep-train",
        "train and evaluate a grid of config values, then rank them",
        """
Runs the train-sweep flow in this process (as `run` runs the pipeline): the stages up to
precompute once, then per grid cell a training run train/<name>-<field><value>.../ and its
evaluation, then sweeps/train/<name>/report.md ranking the cells by their best checkpoint
(a best cell only when its 95% interval clears the runner-up's). Cells done before are
reused, so adding a value trains only the new cells. Without --grid: train.learning_rate
1e-4,5e-4,1e-3 x train.rank 64,128,256.

example:
  cogpipe sweep-train demo/demo.yaml --grid train.learning_rate=1e-3,1e-2 --grid train.max_steps=2
""",
        cmd_sweep_train,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="a dotted config field and its values, e.g. train.rank=64,128 (repeatable)",
    )
    p.add_argument(
        "--metric",
        default="clip_score",
        help="what ranks the cells: clip_score (default), temporal_consistency, "
        "dynamic_degree, or fd_videomae (with evaluate.video_features; lowest first)",
    )
    debug_flag(p)

    p = command(
        sub,
        "evaluate-checkpoints",
        "evaluate the new checkpoints of every training run",
        """
The nightly evaluation, run now in this process (no deployment needed): every run under
the workspace's train/ with checkpoints not yet in evaluate/index.parquet is evaluated with
its own run.json (base model, mode) and the config's evaluate settings. The check stage
must be done for the config. One run's failure is reported and the others go on.

example:
  cogpipe evaluate-checkpoints demo/demo.yaml
""",
        cmd_evaluate_checkpoints,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    debug_flag(p)


def _add_serve_commands(sub) -> None:
    """serve, setup and worker: the production Prefect setup."""
    p = command(
        sub,
        "serve",
        "Prefect server, pools, deployments and workers; Ctrl-C stops",
        """
Starts a Prefect server with the UI, the cpu and gpu work pools, the deployments of
deployments/prefect.yaml and one worker per pool (a gpu worker per GPU group), all in the
foreground until Ctrl-C. Logs go to --logs.

example:
  cogpipe serve --port 4200
""",
        cmd_serve,
    )
    p.add_argument("--port", type=int, default=4200, help="UI and API port (default 4200)")
    p.add_argument(
        "--expose",
        action="store_true",
        help="bind 0.0.0.0 instead of 127.0.0.1 (the API has no authentication: a trusted network only)",
    )
    p.add_argument(
        "--logs",
        default=".cogpipe-serve",
        metavar="DIR",
        help="server and worker logs (default .cogpipe-serve/)",
    )

    p = command(
        sub,
        "setup",
        "pools, stuck-run automation and deployments on a server",
        """
Creates the work pools, the automation that marks stuck runs Crashed, and the deployments
on a Prefect server that is already running (yours, not `cogpipe serve`'s).

example:
  cogpipe setup --api http://127.0.0.1:4200/api
""",
        cmd_setup,
    )
    p.add_argument("--api", metavar="URL", help="the server's API URL (default: PREFECT_API_URL)")

    p = command(
        sub,
        "worker",
        "one Prefect worker for a cogpipe pool",
        """
Starts one worker that runs the cpu or gpu pool's flow runs; a gpu worker takes the GPUs
of CUDA_VISIBLE_DEVICES and runs one GPU job at a time on them.

example:
  CUDA_VISIBLE_DEVICES=0,1 cogpipe worker --pool gpu --api http://127.0.0.1:4200/api
""",
        cmd_worker,
    )
    p.add_argument("--pool", choices=["cpu", "gpu"], required=True, help="the work pool to serve")
    p.add_argument("--api", metavar="URL", help="the server's API URL (default: PREFECT_API_URL)")
    p.add_argument("--name", help="worker name (default: pool, host and GPUs)")
    add_serve_api(sub)


def build_parser() -> argparse.ArgumentParser:
    """The command line. `cogpipe --help` lists every subcommand with its `help` line
    (argparse's own list: a new subparser appears there by itself)."""
    intro, *notes = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="cogpipe",
        description=intro,
        epilog="\n\n".join(notes).strip(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    _add_run_commands(sub)
    _add_stage_commands(sub)
    p = command(
        sub,
        "status",
        "per stage: key, output path, done or not, counts",
        """
Reads the workspace without running anything: each stage's key, folder, whether it is
done for this config, its counts, and what an unfinished stage has committed.

example:
  cogpipe status demo/demo.yaml --json
""",
        cmd_status,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="one JSON object keyed by stage")
    _add_explain_key(sub)
    add_workspace_commands(sub)

    add_generate_commands(sub)
    _add_flow_commands(sub)
    add_data_commands(sub)
    _add_serve_commands(sub)
    _add_submit(sub)
    return parser


def _add_run_commands(sub) -> None:
    """demo and run: the whole pipeline as a Prefect flow, in this process."""
    p = command(
        sub,
        "demo",
        "sample videos + tiny models, then the whole pipeline",
        """
Writes sample videos, tiny random models (in the real diffusers / transformers layouts)
and demo.yaml under --workspace, then runs every stage on them as `cogpipe run` does. About
two minutes on a CPU the first time; a second run reuses every stage.

example:
  cogpipe demo --workspace demo
""",
        cmd_demo,
    )
    p.add_argument(
        "--workspace",
        default="demo",
        metavar="DIR",
        help="folder for videos, models, config and workspace (default: demo/)",
    )
    debug_flag(p)

    p = command(
        sub,
        "run",
        "the full pipeline as a Prefect flow, in this process",
        """
Runs the stages up to --until as one Prefect flow on a temporary server of its own (or on
PREFECT_API_URL's). Every stage caches its result by content: a second run reuses what
is done and resumes what was interrupted. Logs go to <workspace>/logs/run-<time>.log.

example:
  cogpipe run demo/demo.yaml --until filter
  cogpipe run demo/demo.yaml --set train.max_steps=12 --set train.learning_rate=5e-4
""",
        cmd_run,
    )
    p.add_argument("config", metavar="CONFIG", help=CONFIG_HELP)
    set_flag(p)
    p.add_argument(
        "--until", choices=STAGES, default="evaluate", help="last stage to run (default: evaluate)"
    )
    debug_flag(p)


def _add_submit(sub) -> None:
    """submit: a run of the deployed pipeline, on the server `cogpipe serve` started."""
    p = sub.add_parser(
        "submit",
        help="start a run of the deployed pipeline (cogpipe serve) on a config file",
        description="Start a run of the deployed cogpipe-pipeline/pipeline on CONFIG, by its "
        "absolute path (the workers share this filesystem), and print the run's UI link. The "
        "config and every --set are checked here first.",
    )
    p.add_argument("config", help="the YAML config (a path the workers can read)")
    set_flag(p)
    p.add_argument("--until", choices=STAGES, default="evaluate", help="last stage to run")
    p.add_argument("--api", help="the server's API URL (default: PREFECT_API_URL)")
    p.add_argument(
        "--wait", action="store_true", help="wait for the run; exit 1 unless it completes"
    )
    p.set_defaults(fn=cmd_submit)


def _serving(call) -> int:
    """Run a serve, setup or worker command with Prefect's offline defaults."""
    _prefect_env()
    return call()


def cmd_serve(args: argparse.Namespace) -> int:
    logs = Path(args.logs).resolve()
    _prefect_home(logs / "prefect")
    from cogpipe_flows.serve import serve_forever

    host = "0.0.0.0" if args.expose else "127.0.0.1"
    return _serving(lambda: serve_forever(host, args.port, logs))


def cmd_setup(args: argparse.Namespace) -> int:
    from cogpipe_flows.serve import ServeError, arm_schedules, setup, using

    def command() -> int:
        api = args.api or os.environ.get("PREFECT_API_URL")
        if not api:
            raise ServeError("cogpipe setup: set PREFECT_API_URL or pass --api (the server's /api)")
        setup(api, gpu_groups=[])  # GPU workers create their own slots when they start
        print(f"cogpipe: pools, automation and deployments are set up on {api}")
        with using(api) as client:  # schedules on only where their paths exist from here
            for line in arm_schedules(client):
                print(f"cogpipe: {line}")
        return 0

    return _serving(command)


def cmd_submit(args: argparse.Namespace) -> int:
    """Send a config to the deployed pipeline; a bad config or --set fails before sending."""
    _prefect_env()
    from cogpipe_flows.submit import run_config, submit, wait

    sets = parse_sets(args.sets)
    run_config(str(Path(args.config).expanduser().resolve()), overrides=sets)  # before a server
    api = args.api or os.environ.get("PREFECT_API_URL")
    if not api:
        print(
            "cogpipe: error: no server given: export the PREFECT_API_URL that `cogpipe serve` "
            "prints, or pass --api URL",
            file=sys.stderr,
        )
        return 2
    run_id, link = submit(Path(args.config), sets, args.until, api)
    print(f"submitted: {link}", flush=True)
    if not args.wait:
        return 0
    state, message = wait(run_id, api)
    print(f"{state}: {link}" + (f" ({message})" if message and state != "Completed" else ""))
    return 0 if state == "Completed" else 1


def cmd_worker(args: argparse.Namespace) -> int:
    from cogpipe_flows.serve import run_worker

    return _serving(lambda: run_worker(args.pool, args.api, args.name))


# A person's mistake, which the message alone lets them fix: one line, exit 2.
ONE_LINE_ERRORS = (
    ConfigError,
    StageNotReady,
    FileNotFoundError,
    SourceError,
    GenerateError,
    ExportError,
    EmptyStage,
    UserError,
)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake is one line and exit 2, Ctrl-C exit 130."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # `cogpipe` alone: the command list, not argparse's "required: COMMAND"
        parser.print_help()
        return 2
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ONE_LINE_ERRORS as e:
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
