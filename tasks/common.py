"""What every stage task shares: the cache key, progress artifacts, the result artifact.

The disk is the source of truth: a task's Prefect cache key is its stage key only once
the stage's done marker is on disk for this workspace; before that it is None (no
caching), so a deleted workspace can never be answered from a stale Prefect cache.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import TaskRunContext

from cogpipe import progress
from cogpipe.config import PipelineConfig
from cogpipe.errors import is_permanent, writing
from cogpipe.pipeline import finished, run_stage
from cogpipe.progress import Rate
from cogpipe.stages import STAGE_SPECS
from cogpipe.summary import stage_markdown, stage_rows
from cogpipe.workspace import StageResult, Workspace

PROGRESS_EVERY_S = 2.0  # at most one progress update (one API call) per this many seconds


def retry_unless(*errors: type[BaseException]):
    """A `retry_condition_fn` that retries every failure except `errors` and the permanent
    ones (`cogpipe.errors.is_permanent`: a full disk, a read-only workspace, a wrong model,
    an empty stage): failures that would come back on a retry, after reloading a model."""

    def should_retry(task, task_run, state) -> bool:
        error = state.data
        return not isinstance(error, errors) and not (
            isinstance(error, BaseException) and is_permanent(error)
        )

    return should_retry


def stage_inputs(stage: str, params: dict[str, Any]) -> dict[str, str]:
    """The upstream keys of a stage task's run, from its `upstream` records by stage."""
    upstream = params.get("upstream") or {}
    return {up: upstream[up]["key"] for up in STAGE_SPECS[stage].upstream}


def cache_key(stage: str):
    """A `cache_key_fn` for a stage: '<stage>-<key>-<workspace hash>' once done on disk."""

    def fn(context: TaskRunContext, params: dict[str, Any]) -> str | None:
        cfg: PipelineConfig = params["config"]
        inputs = stage_inputs(stage, params)
        key = STAGE_SPECS[stage].key(cfg, inputs)
        if finished(Workspace(cfg.workspace), cfg, stage, key, inputs) is None:
            return None
        ws_hash = hashlib.sha256(str(cfg.workspace).encode()).hexdigest()[:8]
        return f"{stage}-{key}-{ws_hash}"

    return fn


class ProgressArtifact:
    """Turns the library's progress callback into a Prefect progress artifact whose text is
    `cogpipe.progress.Rate`'s (the CLI's), and sends every report to the console display
    the CLI installed (`cogpipe.progress.report`: `cogpipe run` runs its tasks in-process).

    The artifact is created at the first report, so a reused stage makes no API call.
    """

    def __init__(self, stage: str):
        self.stage = stage
        self.rate = Rate()  # the first report is the baseline (a resumed run)
        self.last = 0.0
        self.artifact_id = None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        progress.report(self.stage, done, total, note)
        now = time.monotonic()
        text = self.rate.line(self.stage, done, total, note)  # every report: the rate's start
        if self.artifact_id is not None and done < total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        percent = 100.0 * done / max(total, 1)
        if self.artifact_id is None:
            key = f"{self.stage}-progress"
            self.artifact_id = create_progress_artifact(percent, key=key, description=text)
        else:
            update_progress_artifact(self.artifact_id, progress=percent, description=text)


def inline_images(report: Path) -> str:
    """The report's markdown with its PNGs (linked by file name) inlined as data URIs,
    so the artifact shows the plots without access to the workspace."""

    def inline(match: re.Match) -> str:
        png = report.parent / match.group(2)
        if not png.is_file():
            return match.group(0)
        data = base64.b64encode(png.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", inline, report.read_text())


def run(stage: str, config: PipelineConfig, upstream: dict[str, dict] | None = None) -> dict:
    """Run one stage through the library and publish its summary; returns a small record.

    `upstream`: the result records of the stages it reads, by stage name."""
    ups = {name: StageResult.from_dict(record) for name, record in (upstream or {}).items()}
    with writing(config.workspace):  # a full disk says so, not `unexpected pos 32448 vs 32336`
        result = run_stage(config, stage, ups, progress=ProgressArtifact(stage))
    return publish(stage, result)


def run_shard(stage: str, config: PipelineConfig, upstream: dict[str, dict], shard: int) -> int:
    """Commit every part of one shard of a sharded stage (caption, recaption), without the
    merge; returns the shard."""
    ups = {name: StageResult.from_dict(record) for name, record in upstream.items()}
    progress = ProgressArtifact(f"{stage}-shard-{shard}")
    run_stage(config, stage, ups, progress, **{STAGE_SPECS[stage].shard_option: shard})
    return shard


def publish(stage: str, result: StageResult) -> dict:
    """Log a stage's result and, if this run computed it, publish its summary table and
    report as artifacts; returns the result's record."""
    logger = get_run_logger()
    if result.reused:  # its artifacts' latest versions are those of the run that computed it
        logger.info("%s %s: reused %s", stage, result.key, result.counts)
        return result.to_dict()
    logger.info("%s %s: computed in %.1fs %s", stage, result.key, result.seconds, result.counts)
    description = f"{stage} {result.key}: computed in {result.seconds:.1f}s"
    create_table_artifact(table=stage_rows(result), key=f"{stage}-summary", description=description)
    # A stage that writes its own report (evaluate: scores per checkpoint) publishes it.
    report = Path(result.path) / "report.md"
    markdown = inline_images(report) if report.is_file() else stage_markdown(result)
    create_markdown_artifact(markdown=markdown, key=f"{stage}-report")
    return result.to_dict()
