"""Generation settings from a pipeline config, and a warning before hours of CPU sampling.

`cogpipe generate --config CONFIG` samples as the config's evaluation does: its base
`model` and its `evaluate` section's frames, size, steps, guidance, fps, first seed and
device. Flags given on the command line win over the config. `--latest` adds the newest
checkpoint of the config's own training run (`train/<run>/checkpoint-NNNNNN`), as a LoRA or,
for a full fine-tune, as the transformer:

    cogpipe generate --config demo/demo.yaml --latest --prompt "a fighter slaps" --output s.mp4

    values = config_values(load_config("demo/demo.yaml"))   # {"model": ..., "steps": 2, ...}
    checkpoint_values(latest_checkpoint(cfg))               # {"lora": .../checkpoint-000006}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cogpipe.config import PipelineConfig
from cogpipe.generate import GenerateError, GenerateOptions

# GenerateOptions field -> where a config holds it (for the values and the flags' help).
CONFIG_FIELDS = {
    "model": "model",
    "steps": "evaluate.steps",
    "guidance": "evaluate.guidance",
    "frames": "evaluate.frames",
    "height": "evaluate.height",
    "width": "evaluate.width",
    "fps": "evaluate.fps",
    "seed": "evaluate.seeds[0]",
    "device": "evaluate.device",
    "step_cache": "evaluate.step_cache",
    "step_cache_threshold": "evaluate.step_cache_threshold",
    "fp8_linears": "evaluate.fp8_linears",
}

# Per-video work (frames x height x width x steps) above which a CPU run gets a warning:
# 1/20 of CogVideoX's native 49x480x720 at 50 steps. The 2B model needs about 2e14 FLOPs
# per step there, hours on a CPU; a twentieth of it is still many minutes.
CPU_WARN_WORK = 49 * 480 * 720 * 50 // 20
# Frames and size left to the model (`generate.fit`) count as the smallest native video,
# 49x480x720 (CogVideoX 1.5's is 81x768x1360): the warning needs no model config.
UNSET_GUESS = {"frames": 49, "height": 480, "width": 720}


def config_values(cfg: PipelineConfig) -> dict[str, Any]:
    """The GenerateOptions values a config gives: its model and its evaluation's sampling."""
    ev = cfg.evaluate
    return {
        "model": cfg.model,
        "steps": ev.steps,
        "guidance": ev.guidance,
        "frames": ev.frames,
        "height": ev.height,
        "width": ev.width,
        "fps": ev.fps,
        "seed": ev.seeds[0],
        "device": ev.device,
        "step_cache": ev.step_cache,
        "step_cache_threshold": ev.step_cache_threshold,
        "fp8_linears": ev.fp8_linears,
    }


def run_folder(cfg: PipelineConfig) -> Path:
    """The config's training run folder, `train/<name or train key>/` (it may not exist)."""
    from cogpipe.stages import UPSTREAM, stage_keys, stage_path
    from cogpipe.workspace import Workspace

    keys = stage_keys(cfg, "train")
    inputs = {up: keys[up] for up in UPSTREAM["train"]}
    return stage_path(Workspace(cfg.workspace), cfg, "train", keys["train"], inputs)


def latest_checkpoint(cfg: PipelineConfig) -> Path:
    """The newest committed checkpoint of the config's training run.

    Raises:
        GenerateError: the run has no committed checkpoint yet.
    """
    from cogpipe.evaluate import list_checkpoints

    folder = run_folder(cfg)
    found = list_checkpoints(folder)
    if not found:
        raise GenerateError(
            f"--latest: no checkpoint in {folder} (train this config first: cogpipe train CONFIG)"
        )
    return found[max(found)]


def checkpoint_values(checkpoint: Path) -> dict[str, Path]:
    """`{"lora": folder}`, or `{"transformer": folder}` for a full fine-tune's checkpoint."""
    from cogpipe.eval_models import is_full

    return {"transformer" if is_full(checkpoint) else "lora": checkpoint}


def largest(
    options: GenerateOptions, grid: Mapping[str, Sequence[Any]] | None = None
) -> tuple[int, int, int, int]:
    """(frames, height, width, steps) of the largest video asked: a sweep grid's largest
    value of each that it varies."""
    sizes = []
    for name in ("frames", "height", "width", "steps"):
        values = [getattr(options, name) or UNSET_GUESS.get(name, 1)]
        for value in (grid or {}).get(name, []):
            try:
                values.append(int(float(value)))
            except (TypeError, ValueError):
                continue  # a bad value is the sweep's error to report, not this warning's
        sizes.append(max(values))
    f, h, w, s = sizes
    return f, h, w, s


def cpu_warning(
    options: GenerateOptions, device: str, grid: Mapping[str, Sequence[Any]] | None = None
) -> str | None:
    """A one-line warning when video this large is asked of a CPU, else None."""
    f, h, w, s = largest(options, grid)
    if device != "cpu" or f * h * w * s <= CPU_WARN_WORK:
        return None
    from cogpipe.demo import DEMO_CONFIG

    demo = DEMO_CONFIG["evaluate"]
    small = f"{demo['frames']}x{demo['height']}x{demo['width']} at {demo['steps']} steps"
    return (
        f"warning: {f}x{h}x{w} at {s} steps on a CPU takes hours with a real CogVideoX; use a"
        f" config's sizes (--config demo/demo.yaml: {small}) or a GPU"
    )
