"""Running the stage graph: one stage, all of them, their status and what made a key.

The contract of each stage (upstream, key, run, output place, freshness) is its spec in
`cogpipe.stages.STAGE_SPECS`, and the readers of that table (`stage_keys`, `finished`,
`stage_path`, `upstream_results`, `UPSTREAM`) live there too, so the stage modules can
read it without importing this runner; they are imported here under their old names.
This module runs the specs, holding the workspace against `cogpipe gc` (`disk.in_use`),
timing each stage (`estimate.StageClock`) and reading unfinished work for `status`
(`partial`). Keys are computed front to back
without running anything (ingest lists the source folder, the rest hash configs and
upstream keys), so `status` and the Prefect cache can ask "is this stage done for this
config?" in milliseconds, and `explain_key` says what went into a key and what changed.

    from cogpipe.pipeline import stage_keys, run_stage, run_all
    keys = stage_keys(cfg)           # {"ingest": "3f2a...", "check": ...}
    result = run_stage(cfg, "check") # reads ingest's finished output from disk
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cogpipe.config import STAGES, PipelineConfig
from cogpipe.disk import in_use
from cogpipe.estimate import StageClock
from cogpipe.partial import partial_progress
from cogpipe.stages import (  # UPSTREAM ... upstream_results: also read from here
    STAGE_SPECS,
    UPSTREAM,
    changed_fields,
    finished,
    spec_of,
    stage_keys,
    stage_path,
    upstream_results,
)
from cogpipe.workspace import (
    SUCCESS,
    Progress,
    StageResult,
    Workspace,
    no_progress,
    stage_clock,
    stage_key_inputs,
    sweep_temporaries,
)

log = logging.getLogger(__name__)


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
    ws, spec = Workspace(cfg.workspace), spec_of(stage)
    sweep_temporaries(ws.root)  # what a killed run left, even where this stage is done
    upstream = upstream if upstream is not None else upstream_results(cfg, stage)
    key, inputs = spec.key_inputs(cfg, {up: r.key for up, r in upstream.items()})
    token = stage_key_inputs.set({"stage": stage, "key": key, "inputs": inputs})
    try:
        if not spec.whole:  # one writer per unit, held inside the stage
            return spec.run(ws, cfg, upstream, progress, **options)

        def waiting(holder: str) -> None:
            log.warning(
                "%s %s: waiting for %s; then this run reuses its result", stage, key, holder
            )

        with ws.hold(f"{stage}-{key}", on_wait=waiting):
            return spec.run(ws, cfg, upstream, progress, **options)
    finally:
        stage_key_inputs.reset(token)


def run_all(
    cfg: PipelineConfig, until: str = "evaluate", progress: Progress = no_progress
) -> list[StageResult]:
    """The whole pipeline in-process, without Prefect (scripts, notebooks, tests)."""
    results: dict[str, StageResult] = {}
    with in_use(Workspace(cfg.workspace)):  # also between stages: gc waits for the run
        for stage in STAGES[: STAGES.index(until) + 1]:
            ups = {up: results[up] for up in STAGE_SPECS[stage].upstream}
            results[stage] = run_stage(cfg, stage, ups, progress)
    return list(results.values())


def status(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Per stage: key, output path, done, counts, rejections and when it finished; for an
    unfinished stage, what an earlier run committed (`partial`: `Partial.to_dict()`, or
    None), read from its folders (`cogpipe.partial`)."""
    ws = Workspace(cfg.workspace)
    try:
        keys = stage_keys(cfg)
    except (FileNotFoundError, ValueError) as e:  # no source, a bad layout (SourceError)
        return {"error": {"message": str(e)}}
    out: dict[str, dict[str, Any]] = {}
    for stage, key in keys.items():
        inputs = STAGE_SPECS[stage].inputs(keys)
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


def explain_key(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """What went into `stage`'s key for this config and what changed since the stage's
    last run in the workspace (its newest done marker under another key).

    Returns {"stage", "key", "done", "path", "version", "fields", "upstream": {stage:
    {"key", "done", "was", "changed"}} for every stage upstream of it, "last_run": None or
    {"key", "path", "finished_at", "recorded", "changed"}}. `was` and `changed` are None
    where the last run did not record its key inputs.
    """
    spec, ws = spec_of(stage), Workspace(cfg.workspace)
    keys = stage_keys(cfg, stage)
    key, now = spec.key_inputs(cfg, spec.inputs(keys))
    last = next(((p, r) for p, r in _markers(ws, stage) if r.get("key") != key), None)
    then = _keys_then(ws, last[1]) if last else {}
    upstream = {}
    for up in _ancestors(stage):
        was = then.get(up)
        done = finished(ws, cfg, up, keys[up], STAGE_SPECS[up].inputs(keys)) is not None
        upstream[up] = {
            "key": keys[up],
            "done": done,
            "was": was,
            "changed": _differ(was, keys[up]),
        }
    return {
        "stage": stage,
        "key": key,
        "done": finished(ws, cfg, stage, key, spec.inputs(keys)) is not None,
        "path": str(stage_path(ws, cfg, stage, key, spec.inputs(keys))),
        **now,
        "upstream": upstream,
        "last_run": _last_run(last, now),
    }


def _differ(was: str | None, now: str) -> bool | None:
    return None if was is None else was != now


def _last_run(last: tuple[Path, dict] | None, now: dict[str, Any]) -> dict[str, Any] | None:
    """The last run's key, place and time, and what differs from `now` (None where it did
    not record its key inputs: markers written before they were recorded)."""
    if last is None:
        return None
    path, record = last
    before = record.get("key_inputs")
    return {
        "key": record.get("key"),
        "path": str(path),
        "finished_at": record.get("finished_at"),
        "recorded": before is not None,
        "changed": changed_fields(before, now) if before is not None else None,
    }


def _ancestors(stage: str) -> list[str]:
    """Every stage `stage` reads, directly or through others, in pipeline order."""
    seen: set[str] = set()
    todo = list(UPSTREAM[stage])
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo.extend(UPSTREAM[up])
    return [s for s in STAGES if s in seen]


def _markers(ws: Workspace, stage: str) -> list[tuple[Path, dict[str, Any]]]:
    """The stage's done markers in the workspace (`<stage>/<key>/`, `train/<run>/`,
    `evaluate/<ekey>/<run>/`), newest first, as (folder, record)."""
    base = ws.root / stage
    found = [*base.glob(f"*/{SUCCESS}"), *base.glob(f"*/*/{SUCCESS}")]
    found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    out = []
    for marker in found:
        record = ws.read_success(marker.parent)
        if record is not None and record.get("stage") == stage:
            out.append((marker.parent, record))
    return out


def _keys_then(ws: Workspace, record: dict[str, Any]) -> dict[str, str]:
    """The upstream keys a past run read: its marker's recorded upstream keys, and theirs
    in turn from their own markers (as far as markers recorded them)."""
    found: dict[str, str] = {}
    todo = [record]
    while todo:
        ups = (todo.pop().get("key_inputs") or {}).get("upstream", {})
        for up, key in ups.items():
            if up in found:
                continue
            found[up] = key
            marker = next((r for _, r in _markers(ws, up) if r.get("key") == key), None)
            if marker is not None:
                todo.append(marker)
    return found


def explain_text(report: dict[str, Any]) -> str:
    """`explain_key`'s report as the lines `cogpipe explain-key` prints."""
    stage, last = report["stage"], report["last_run"]
    state = "done" if report["done"] else "not done"
    lines = [f"{stage} {report['key']}  {state}  {report['path']}"]
    lines += _last_run_lines(stage, last)
    changed = (last or {}).get("changed") or {}
    lines.append(f"\nkey inputs (version {report['version']}):")
    width = max(map(len, report["fields"]), default=0)
    for name, value in report["fields"].items():
        was = f"   was {_value(changed[name]['was'])}" if name in changed else ""
        lines.append(f"  {name:<{width}}  {_value(value)}{was}")
    lines.append(f"upstream keys (* read by {stage} directly):")
    unknown = "unknown then" if last else ""
    for up, u in report["upstream"].items():
        known = {None: unknown, True: f"changed (was {u['was']})", False: "unchanged"}
        done = "done" if u["done"] else "not done"
        name = f"*{up}" if up in STAGE_SPECS[stage].upstream else f" {up}"
        lines.append(f"  {name:<11} {u['key']}  {done:<8}  {known[u['changed']]}".rstrip())
    return "\n".join(lines)


def _last_run_lines(stage: str, last: dict[str, Any] | None) -> list[str]:
    if last is None:
        return [f"no earlier run of {stage} in this workspace (a done marker under another key)"]
    lines = [f"last run: {last['key']}, finished {last['finished_at']} ({last['path']})"]
    if not last["recorded"]:
        return [*lines, "the last run did not record its key inputs"]
    names = ", ".join(last["changed"]) or "nothing (same inputs)"
    return [*lines, f"changed since the last run: {names}"]


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
