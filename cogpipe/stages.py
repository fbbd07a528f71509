"""The stage contract, written down once: every stage's name, inputs, key, run function,
output place and freshness check, in one table (`STAGE_SPECS`) that the runner
(`cogpipe.pipeline`), `status`, the Prefect tasks and flows and the CLI all read.

A stage module `cogpipe.<stage>` provides what its spec names:

    VERSION                                  bumped when the output for a key changes
    key_of(cfg, inputs) -> str               `workspace.stage_key` of its own config fields,
                                             `inputs` (the upstream keys) and VERSION
    run_<stage>(ws, cfg, upstream, progress, **options) -> StageResult
                                             writes its done marker last (`Workspace.finish`)
    output_dir(ws, cfg, key, inputs) -> Path where it writes, when not `<stage>/<key>/`
    is_current(ws, cfg, record) -> bool      when a done marker can go stale under its key

The modules are imported at the first call, so `cogpipe --help` does not load torch, and
by name (`importlib.import_module`, in `_lazy` and `StageSpec.version`, the one place that
does so): the stage modules read this table (`stage_keys`, `upstream_results`), so a plain
import of them here would close a circle. The registry sits below the stages it names.
`key_inputs` says what went into a key (the dotted config fields, fingerprints, upstream
keys, VERSION): the done marker records it and `cogpipe explain-key` compares it.

    from cogpipe.stages import STAGE_SPECS
    spec = STAGE_SPECS["caption"]
    spec.upstream                     # ("check",)
    spec.key(cfg, {"check": "5d6e7f8a9b0c"})

Read from the table, without running anything: every stage's key (`stage_keys`), where a
stage writes (`stage_path`), whether it is done for a key (`finished`) and the finished
outputs a stage reads (`upstream_results`). `cogpipe.pipeline` runs stages and re-exports
these, as before they moved here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from cogpipe.config import STAGES, PipelineConfig
from cogpipe.workspace import StageNotReady, StageResult, Workspace, recording_keys, sha256_json

LONG_VALUE = 80  # a key input longer than this (as JSON) is recorded by its hash


def _lazy(stage: str, name: str) -> Callable[..., Any]:
    """`cogpipe.<stage>.<name>`, imported at its first call rather than here."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(import_module(f"cogpipe.{stage}"), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"cogpipe.{stage}.{name}"
    return call


@dataclass(frozen=True)
class StageSpec:
    """One stage's contract: what it reads, how its key and output place are made, how it
    runs and how the scheduler treats it."""

    name: str
    upstream: tuple[str, ...]  # the stages whose finished output it reads
    section: str  # the config section of its own key fields (recaption: filter's gate)
    key: Callable[[PipelineConfig, dict[str, str]], str]
    run: Callable[..., StageResult | None]
    output_dir: Callable[[Workspace, PipelineConfig, str, dict[str, str]], Path] | None = None
    is_current: Callable[[Workspace, PipelineConfig, dict[str, Any]], bool] | None = None
    whole: bool = False  # done in one piece under one lock; else it locks its own units
    gpu: bool = False  # a GPU stage: on the GPU pool when the pipeline has one
    shard_option: str | None = None  # the run option that runs one shard ("shard", "part")

    @property
    def version(self) -> int:
        """The stage module's VERSION (part of every key)."""
        return import_module(f"cogpipe.{self.name}").VERSION

    def inputs(self, keys: dict[str, str]) -> dict[str, str]:
        """The upstream keys this stage's key takes, picked from every stage's `keys`."""
        return {up: keys[up] for up in self.upstream}

    def output(self, ws: Workspace, cfg: PipelineConfig, key: str, inputs: dict) -> Path:
        """Where it writes: `<stage>/<key>/`, or what its `output_dir` says."""
        if self.output_dir is None:
            return ws.stage_dir(self.name, key)
        return self.output_dir(ws, cfg, key, inputs)

    def fresh(self, ws: Workspace, cfg: PipelineConfig, record: dict[str, Any]) -> bool:
        """Whether a done marker of this key still holds (evaluate: no new checkpoint)."""
        return self.is_current is None or self.is_current(ws, cfg, record)

    def key_inputs(self, cfg: PipelineConfig, inputs: dict[str, str]) -> tuple[str, dict]:
        """The key and what went into it: {"version", "fields": {dotted name: value, long
        values by hash}, "upstream": {stage: key}}."""
        with recording_keys() as calls:
            key = self.key(cfg, inputs)
        mine = [c for c in calls if c["stage"] == self.name]
        final = next(c for c in reversed(mine) if c["key"] == key)
        config = _expand(final["config"], {c["key"]: c["config"] for c in mine if c is not final})
        fields = _flatten(config, self.section) | _flatten(
            {k: v for k, v in final["inputs"].items() if k not in STAGES}, self.name
        )
        upstream = {k: v for k, v in final["inputs"].items() if k in STAGES}
        return key, {"version": final["version"], "fields": fields, "upstream": upstream}


def _expand(config: Any, sub_keys: dict[str, Any]) -> Any:
    """A key's config with a nested key of the same stage (evaluate's `ekey`) replaced by
    the fields that made it, so a change names the field and not the nested hash."""
    if not isinstance(config, dict):
        return config
    out: dict[str, Any] = {}
    for name, value in config.items():
        if isinstance(value, str) and value in sub_keys:
            out |= _expand(sub_keys[value], sub_keys)
        else:
            out[name] = value
    return out


def _flatten(config: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts as dotted names (`caption.model_fp.files`); a top-level config field
    (`seed`) keeps its own name; long values become `sha256:<16 hex> (<n> chars)`."""
    out: dict[str, Any] = {}
    for name, value in config.items():
        dotted = name if _top_level(prefix, name) else f"{prefix}.{name}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, dotted)
        else:
            out[dotted] = _short(value)
    return out


def _top_level(prefix: str, name: str) -> bool:
    """A field of the whole config (seed) rather than of the stage's section."""
    section = PipelineConfig.model_fields.get(prefix)
    if section is None or name not in PipelineConfig.model_fields:
        return False  # a nested value (`caption.model_fp.files`) or the section's own
    return name not in getattr(section.annotation, "model_fields", {})


def _short(value: Any) -> Any:
    text = json.dumps(value, sort_keys=True, default=str)
    if len(text) <= LONG_VALUE:
        return value
    return f"sha256:{sha256_json(value)[:16]} ({len(text)} chars)"


def changed_fields(before: dict[str, Any], now: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The key inputs that differ between two `key_inputs` records: {name: {"was", "now"}}
    over the fields, the upstream keys (`upstream.<stage>`) and `version`; a field one of
    them lacks shows as None there."""

    def flat(record: dict[str, Any]) -> dict[str, Any]:
        ups = {f"upstream.{k}": v for k, v in record.get("upstream", {}).items()}
        return {"version": record.get("version")} | record.get("fields", {}) | ups

    old, new = flat(before), flat(now)
    names = sorted(set(old) | set(new), key=lambda n: (n not in new, n))
    return {n: {"was": old.get(n), "now": new.get(n)} for n in names if old.get(n) != new.get(n)}


def _spec(name: str, upstream: tuple[str, ...], section: str = "", **hooks: Any) -> StageSpec:
    """A spec whose key and run are the module's `key_of` and `run_<name>`."""
    key, run = _lazy(name, "key_of"), _lazy(name, f"run_{name}")
    return StageSpec(name, upstream, section or name, key=key, run=run, **hooks)


STAGE_SPECS: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        _spec("ingest", (), whole=True),
        _spec("check", ("ingest",), whole=True),
        _spec("caption", ("check",), gpu=True, shard_option="shard"),
        _spec("recaption", ("caption", "check"), "filter", gpu=True, shard_option="shard"),
        _spec("filter", ("recaption", "check"), whole=True),
        _spec("precompute", ("filter", "check"), gpu=True, shard_option="part"),
        _spec("train", ("precompute",), output_dir=_lazy("train", "output_dir"), gpu=True),
        _spec(
            "evaluate",
            ("train", "check", "filter"),  # filter: the captions of a held-out suite
            output_dir=_lazy("evaluate", "output_dir"),
            is_current=_lazy("evaluate", "is_current"),
            gpu=True,
        ),
    )
}


def spec_of(stage: str) -> StageSpec:
    """The stage's spec.

    Raises:
        ValueError: not a stage (the message lists the stages).
    """
    if stage not in STAGE_SPECS:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return STAGE_SPECS[stage]


# The stage graph's edges (from STAGE_SPECS), for readers that need only those.
UPSTREAM: dict[str, tuple[str, ...]] = {name: s.upstream for name, s in STAGE_SPECS.items()}


def stage_keys(cfg: PipelineConfig, until: str = "evaluate") -> dict[str, str]:
    """Every stage's key up to `until`, computed without running anything."""
    keys: dict[str, str] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        spec = STAGE_SPECS[stage]
        keys[stage] = spec.key(cfg, spec.inputs(keys))
    return keys


def stage_path(
    ws: Workspace, cfg: PipelineConfig, stage: str, key: str, inputs: dict[str, str]
) -> Path:
    """Where a stage writes: `<stage>/<key>/`, `train/<run>/` or `evaluate/<ekey>/<run>/`."""
    return spec_of(stage).output(ws, cfg, key, inputs)


def finished(
    ws: Workspace, cfg: PipelineConfig, stage: str, key: str, inputs: dict[str, str]
) -> StageResult | None:
    """The recorded result of a stage done for exactly this key (and still current), else None.

    A stage whose output can go stale under the same key (evaluate, while its run gains
    checkpoints) says so through its spec's `is_current`.
    """
    path = stage_path(ws, cfg, stage, key, inputs)
    record = ws.read_success(path)
    if record is None or record.get("key") != key:
        return None
    if not spec_of(stage).fresh(ws, cfg, record):
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
    keys = keys or stage_keys(cfg, stage)
    out = {}
    for up in spec_of(stage).upstream:
        res = finished(ws, cfg, up, keys[up], STAGE_SPECS[up].inputs(keys))
        if res is None:
            raise StageNotReady(
                f"stage {stage!r} needs {up!r} to be finished for this config;"
                f" run `cogpipe {up} CONFIG` (or `cogpipe run CONFIG`) first"
            )
        out[up] = res
    return out
