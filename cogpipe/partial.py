"""What an unfinished stage has committed so far, read from its folders without writing
anything: the next run's resume line, the line a Ctrl-C prints, and `cogpipe status`.

The units each stage commits (see the stage modules):

- caption: `caption/<key>/part-SSS-IIIII.parquet`, one per batch: clips committed of the
  clips the model captions;
- recaption: round 1's parts in `cache/recaption/<pass key>/`: clips re-captioned of those
  the gate rejects (later rounds are not counted);
- precompute: `precompute/<key>/shard-IIIII.safetensors`: shards committed of the plan's,
  and the latents in `cache/latents/` of clips whose shard is not committed yet;
- train: `train/<run>/checkpoint-SSSSSS/` holding a training state: where a run resumes;
- evaluate: the base and each checkpoint, as rows of `evaluate/index.parquet` or units
  committed under `evaluate/<ekey>/<run>/<unit>/summary.json`.

ingest, check and filter write their output in one go: they have no partial progress.

    from cogpipe.partial import partial_progress
    p = partial_progress(cfg, "train", stage_keys(cfg))
    p.resuming()   # "resuming train from checkpoint-000100"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cogpipe.config import PipelineConfig
from cogpipe.stages import UPSTREAM, finished
from cogpipe.workspace import StageResult, Workspace, read_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Partial:
    """Committed work of an unfinished stage: `done` of `total` `unit` (total None when
    it cannot be known before the stages upstream finish); train: the step of `checkpoint`."""

    stage: str
    done: int
    total: int | None
    unit: str
    checkpoint: str | None = None
    note: str = ""

    def counted(self) -> str:
        """'812 of 2,982 clips' (train: 'step 100 of 200')."""
        if self.checkpoint is not None:
            return f"step {self.done:,} of {self.total:,}"
        of = f" of {self.total:,}" if self.total is not None else ""
        return f"{self.done:,}{of} {self.unit}"

    def summary(self) -> str:
        """For `status`: '812 of 2,982 clips committed', 'step 100 of 200 (checkpoint-000100)'."""
        if self.checkpoint is not None:
            return f"{self.counted()} ({self.checkpoint})"
        return f"{self.counted()} committed" + (f" ({self.note})" if self.note else "")

    def committed(self) -> str:
        """For an interrupted run: 'train at step 100 (checkpoint-000100)',
        'caption: 812 of 2,982 clips committed'."""
        if self.checkpoint is not None:
            return f"train at step {self.done:,} ({self.checkpoint})"
        return f"{self.stage}: {self.summary()}"

    def resuming(self) -> str:
        """For the next run: 'resuming train from checkpoint-000100',
        'caption: 812 of 2,982 clips already committed'."""
        if self.checkpoint is not None:
            return f"resuming train from {self.checkpoint} (step {self.done:,} of {self.total:,})"
        return f"{self.stage}: {self.counted()} already committed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"text": self.summary()}


def partial_progress(cfg: PipelineConfig, stage: str, keys: dict[str, str]) -> Partial | None:
    """What `stage` has committed for this config (`keys`: `stages.stage_keys(cfg)`), or None
    when it is finished, has nothing committed, or commits in one go.

    Reading never fails the caller: a folder it cannot make sense of (written by another
    version, say) counts as nothing committed, and is logged at debug level.
    """
    reader = READERS.get(stage)
    if reader is None:
        return None
    ws = Workspace(cfg.workspace)
    inputs = {up: keys[up] for up in UPSTREAM[stage]}
    try:
        if finished(ws, cfg, stage, keys[stage], inputs) is not None:
            return None
        found = reader(ws, cfg, keys)
    except Exception:  # noqa: BLE001 - informational: a status line must not fail the command
        log.debug("cannot read the partial progress of %s", stage, exc_info=True)
        return None
    return found if found is not None and (found.done > 0 or found.note) else None


def resume_lines(cfg: PipelineConfig, keys: dict[str, str]) -> list[str]:
    """One line per stage of `keys` that finds work committed by an earlier run."""
    found = (partial_progress(cfg, stage, keys) for stage in keys)
    return [p.resuming() for p in found if p is not None]


def is_finished(cfg: PipelineConfig, stage: str, keys: dict[str, str]) -> bool:
    inputs = {up: keys[up] for up in UPSTREAM[stage]}
    return finished(Workspace(cfg.workspace), cfg, stage, keys[stage], inputs) is not None


def running_stage(cfg: PipelineConfig, keys: dict[str, str]) -> str | None:
    """The first stage of `keys` not finished: the one a sequential run was in."""
    return next((stage for stage in keys if not is_finished(cfg, stage, keys)), None)


def _upstream(ws: Workspace, cfg: PipelineConfig, stage: str, keys: dict[str, str]):
    """The finished results `stage` reads, or None when one is not finished."""
    out: dict[str, StageResult] = {}
    for up in UPSTREAM[stage]:
        res = finished(ws, cfg, up, keys[up], {u: keys[u] for u in UPSTREAM[up]})
        if res is None:
            return None
        out[up] = res
    return out


def _committed(folder: Path, pattern: str) -> list[Path]:
    """Committed files of `folder` (temporaries are named `.tmp-*`, never matched)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith(".tmp-"))


def _rows(parts: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in parts)


def _caption(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> Partial | None:
    parts = _committed(ws.stage_dir("caption", keys["caption"]), "part-*.parquet")
    if not parts:
        return None
    total = None
    ups = _upstream(ws, cfg, "caption", keys)
    if ups is not None:
        from cogpipe.caption import _to_caption, kept_clips
        from cogpipe.captions_in import existing_captions

        kept = kept_clips(ups["check"])
        given, _ = existing_captions(
            cfg, kept, read_table(Path(ups["check"].path) / "clips.parquet")
        )
        total = len(_to_caption(kept, given, cfg.caption.existing))
    return Partial("caption", _rows(parts), total, "clips")


def _recaption(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> Partial | None:
    store = ws.root / "cache" / "recaption"
    ups = _upstream(ws, cfg, "recaption", keys)
    if ups is None or not store.is_dir() or not cfg.filter.retries:
        return None
    if cfg.caption.existing == "use":  # recaption copies the captions: no units
        return None
    from cogpipe.filter import judge_captions, token_counter
    from cogpipe.recaption import pass_dir, rejected_ids, retry_config

    captions = read_table(Path(ups["caption"].path) / "captions.parquet")
    rejected = rejected_ids(captions, judge_captions(captions, cfg.filter, token_counter(cfg)))
    if not rejected:
        return None
    parts = _committed(pass_dir(ws, retry_config(cfg, 1), 1, rejected), "part-*.parquet")
    return Partial("recaption", _rows(parts), len(rejected), "clips (round 1)")


def _precompute(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> Partial | None:
    out = ws.stage_dir("precompute", keys["precompute"])
    shards = {p.name for p in _committed(out, "shard-*.safetensors")}
    ups = _upstream(ws, cfg, "precompute", keys)
    if ups is None or not (shards or (ws.root / "cache" / "latents").is_dir()):
        return Partial("precompute", len(shards), None, "shards") if shards else None
    from cogpipe import precompute as pc

    plan = pc.sample_table(cfg, ups)
    waiting = plan[plan.shard.notna() & ~plan.shard.isin(shards)]
    latents = ws.root / "cache" / "latents"
    cached = sum(pc.cache_file(latents, k).is_file() for k in waiting.latents_cache.unique())
    note = f"latents of {cached} more clip{'s' * (cached != 1)} cached" if cached else ""
    return Partial("precompute", len(shards), plan.shard.nunique(), "shards", note=note)


def _train(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> Partial | None:
    import json

    from cogpipe.train import STATE_FILE, checkpoints, output_dir

    out = output_dir(ws, cfg, keys["train"])
    try:
        if json.loads((out / "run.json").read_text()).get("key") != keys["train"]:
            return None  # another run's folder: this config's run has not started
    except (OSError, json.JSONDecodeError):
        return None
    resumable = [c for c in checkpoints(out) if (c / STATE_FILE).is_file()]
    if not resumable:
        return None
    last = resumable[-1]
    return Partial("train", int(last.name[11:]), cfg.train.max_steps, "steps", checkpoint=last.name)


def _evaluate(ws: Workspace, cfg: PipelineConfig, keys: dict[str, str]) -> Partial | None:
    from cogpipe import evaluate as ev
    from cogpipe.eval_report import BASE

    ups = _upstream(ws, cfg, "evaluate", keys)
    if ups is None:  # the run's checkpoints are not final: evaluate has not started
        return None
    inputs = {up: keys[up] for up in UPSTREAM["evaluate"]}
    out = ev.output_dir(ws, cfg, keys["evaluate"], inputs)
    wanted = [BASE, *ev.list_checkpoints(Path(ups["train"].path))]
    index = ev.read_index(ws) if ev.index_path(ws).is_file() else None
    done = {n for n in wanted if (out / n / "summary.json").is_file()}
    if index is not None and len(index):
        mine = index[(index.ekey == ev.eval_key(cfg, inputs)) & (index.run == out.name)]
        done |= set(mine.checkpoint) & set(wanted)
    return Partial("evaluate", len(done), len(wanted), "units (base and checkpoints)")


Reader = Callable[[Workspace, PipelineConfig, dict[str, str]], Partial | None]
READERS: dict[str, Reader] = {
    "caption": _caption,
    "recaption": _recaption,
    "precompute": _precompute,
    "train": _train,
    "evaluate": _evaluate,
}
