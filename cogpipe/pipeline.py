"""The stage graph: which stage reads which, every stage's key, and running one stage.

Keys are computed front to back without running anything (ingest lists the source
folder, the rest hash configs and upstream keys), so `status` and the Prefect cache can
ask "is this stage done for this config?" in milliseconds.

    from cogpipe.pipeline import plan, run_stage, run_all
    keys = plan(cfg)                 # {"ingest": "3f2a...", "check": ...}
    result = run_stage(cfg, "check") # reads ingest's finished output from disk
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

from cogpipe.config import STAGES, PipelineConfig
from cogpipe.workspace import (
    Progress,
    StageNotReady,
    StageResult,
    Workspace,
    no_progress,
    stage_clock,
    sweep_temporaries,
)

UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "check": ("ingest",),
    "caption": ("check",),
    "recaption": ("caption", "check"),
    "filter": ("recaption", "check"),
    "precompute": ("filter", "check"),
    "train": ("precompute",),
    "evaluate": ("train", "check", "filter"),  # filter: the captions of a held-out suite
}

log = logging.getLogger(__name__)


# Stages done in one piece (seconds of CPU work): a second run of the same key waits for
# the first and then finds it done. The others lock their own units (caption parts,
# precompute shards, the training run, evaluation units), so two runs share the work.
WHOLE_STAGES = ("ingest", "check", "filter")


def module(stage: str) -> ModuleType:
    """The stage's library module (`cogpipe.<stage>`), imported on first use."""
    if stage not in UPSTREAM:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"cogpipe.{stage}")


def plan(cfg: PipelineConfig, until: str = "evaluate") -> dict[str, str]:
    """Every stage's key up to `until`, computed without running anything."""
    keys: dict[str, str] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        inputs = {up: keys[up] for up in UPSTREAM[stage]}
        keys[stage] = module(stage).key_of(cfg, inputs)
    return keys


def stage_path(
    ws: Workspace, cfg: PipelineConfig, stage: str, key: str, inputs: dict[str, str]
) -> Path:
    """Where a stage writes: `<stage>/<key>/`, `train/<run>/` or `evaluate/<ekey>/<run>/`."""
    fn = getattr(module(stage), "output_dir", None)
    return fn(ws, cfg, key, inputs) if fn else ws.stage_dir(stage, key)


def finished(
    ws: Workspace, cfg: PipelineConfig, stage: str, key: str, inputs: dict[str, str]
) -> StageResult | None:
    """The recorded result of a stage done for exactly this key (and still current), else None.

    A stage whose output can go stale under the same key (evaluate, while its run gains
    checkpoints) says so through its module's `is_current(ws, cfg, record)`.
    """
    path = stage_path(ws, cfg, stage, key, inputs)
    record = ws.read_success(path)
    if record is None or record.get("key") != key:
        return None
    is_current = getattr(module(stage), "is_current", None)
    if is_current is not None and not is_current(ws, cfg, record):
        return None
    return ws.result(stage, path)


def upstream_results(
    cfg: PipelineConfig, stage: str, keys: dict[str, str] | None = None
) -> dict[str, StageResult]:
    """The finished outputs a stage reads.

    Raises:
        StageNotReady: an upstream stage has not finished for this config.
    """
    ws = Workspace(cfg.workspace)
    keys = keys or plan(cfg, stage)
    out = {}
    for up in UPSTREAM[stage]:
        res = finished(ws, cfg, up, keys[up], {u: keys[u] for u in UPSTREAM[up]})
        if res is None:
            raise StageNotReady(
                f"stage {stage!r} needs {up!r} to be finished for this config; run `cogpipe {up} CONFIG` (or `cogpipe run CONFIG`) first"
            )
        out[up] = res
    return out


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    upstream: dict[str, StageResult] | None = None,
    progress: Progress = no_progress,
    **options: Any,
) -> StageResult:
    """Run one stage (or return its finished result), reading its inputs from disk.

    `options` go to the stage's run function (caption, recaption: `shard=K` runs one shard
    only; precompute: `part=K`; `merge_only=True` merges committed shards).
    """
    from cogpipe.disk import in_use
    from cogpipe.estimate import StageClock

    clock = StageClock(cfg, stage, progress)  # the done marker's timing: setup, per item
    token = stage_clock.set(clock)
    try:
        with in_use(Workspace(cfg.workspace)):  # `cogpipe gc` refuses while this is held
            return _run_stage(cfg, stage, upstream, clock.progress, **options)
    finally:
        stage_clock.reset(token)


def _run_stage(
    cfg: PipelineConfig,
    stage: str,
    upstream: dict[str, StageResult] | None,
    progress: Progress,
    **options: Any,
) -> StageResult:
    ws = Workspace(cfg.workspace)
    sweep_temporaries(ws.root)  # what a killed run left, even where this stage is done
    upstream = upstream if upstream is not None else upstream_results(cfg, stage)
    run = getattr(module(stage), f"run_{stage}")
    if stage not in WHOLE_STAGES:  # one writer per unit, held inside the stage
        return run(ws, cfg, upstream, progress, **options)
    key = module(stage).key_of(cfg, {up: r.key for up, r in upstream.items()})

    def waiting(holder: str) -> None:
        log.warning("%s %s: waiting for %s; then this run reuses its result", stage, key, holder)

    with ws.hold(f"{stage}-{key}", on_wait=waiting):
        return run(ws, cfg, upstream, progress, **options)


def run_all(
    cfg: PipelineConfig, until: str = "evaluate", progress: Progress = no_progress
) -> list[StageResult]:
    """The whole pipeline in-process, without Prefect (scripts, notebooks, tests)."""
    from cogpipe.disk import in_use

    results: dict[str, StageResult] = {}
    with in_use(Workspace(cfg.workspace)):  # also between stages: gc waits for the run
        for stage in STAGES[: STAGES.index(until) + 1]:
            ups = {up: results[up] for up in UPSTREAM[stage]}
            results[stage] = run_stage(cfg, stage, ups, progress)
    return list(results.values())


def status(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage: key, output path, done, counts, rejections and when it finished; for an
    unfinished stage, what an earlier run committed (`partial`: `Partial.to_dict()`, or
    None), read from its folders (`cogpipe.partial`)."""
    from cogpipe.partial import partial_progress

    ws = Workspace(cfg.workspace)
    try:
        keys = plan(cfg)
    except (FileNotFoundError, ValueError) as e:  # no source, a bad layout (SourceError)
        return {"error": {"message": str(e)}}
    out: dict[str, dict[str, Any]] = {}
    for stage, key in keys.items():
        inputs = {up: keys[up] for up in UPSTREAM[stage]}
        path = stage_path(ws, cfg, stage, key, inputs)
        record = ws.read_success(path) or {}
        done = finished(ws, cfg, stage, key, inputs) is not None
        out[stage] = {
            "key": key,
            "path": str(path),
            "done": done,
            "counts": record.get("counts", {}) if done else {},
            "rejections": record.get("stats", {}).get("rejections", {}) if done else {},
            "finished_at": record.get("finished_at") if done else None,
            "seconds": record.get("seconds") if done else None,
            "partial": None,
        }
        found = None if done else partial_progress(cfg, stage, keys)
        if found is not None:
            out[stage]["partial"] = found.to_dict()
    return out
