"""Sweep: ablation grids over generation parameters for a prompt set, resumable.

    cogpipe sweep --experiment guidance --grid guidance=1,6,12 --grid steps=10,25 \
        --prompts-dir prompts/ --out sweeps/ --model 2b --frames 49

A cell is one combination of grid values (the product of the grid); every prompt of every
cell is one video, made by `cogpipe.generate` with the fixed options plus the cell's:

    <out>/<experiment>/guidance=1,steps=10/<prompt>.mp4   parameters sorted by name
    <out>/<experiment>/results.parquet, results.csv        one row per cell x prompt
    <out>/<experiment>/grid.png                            rows = cells, columns = prompts
    <out>/<experiment>/timing.png                          seconds per video, per cell

Grid parameters are the options read per video (`generate.PER_VIDEO`: steps, guidance,
frames, height, width, fps, seed, lora_scale, step_cache, step_cache_threshold): the
pipeline loads once, and only when a video is missing. `--grid step-cache=none,pab,faster`
puts each step cache's videos and seconds beside the exact ones; `--fp8-linears` decides
how the pipeline loads, so it is fixed for a sweep (compare two sweeps). Values are
validated before anything loads, against the model too (`generate.fit`: CogVideoX 1.5's
16k+1 frames, 5B-I2V's fixed size), and named canonically (`guidance=1` and `guidance=1.0`
are one cell). An image-to-video model takes `--image` for every cell, cropped to each
cell's size.

Resume: a video is written under a temporary name and renamed, so a file on disk is
complete, and a rerun skips it. The table is rewritten after every video: a skipped
video keeps the seconds and metrics of the run that made it (metrics missing there are
computed from the decoded file), so the table stays complete across interruptions. A
video whose pixels come out NaN is a row with its error and no file; a rerun retries it.

Metrics are pluggable: `metrics={name: fn}` with `fn(frames, prompt) -> float` adds a
column per name, e.g. the CLI's `--clip-model` adds `clip_score` (`clip_metric`). A
skipped video gets a metric it has no value for (a metric added on a rerun) from its
decoded file.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from pydantic import ValidationError

from cogpipe import evaluate, generate
from cogpipe.generate import PER_VIDEO, GenerateError, GenerateOptions
from cogpipe.plots import figure, frame_strip, save
from cogpipe.video import VideoReader
from cogpipe.workspace import (
    Progress,
    atomic_path,
    clean_stale_tmp,
    no_progress,
    read_table,
    resolve_device,
    write_table,
)

Metric = Callable[[np.ndarray, str], float]  # ([F, H, W, 3] uint8, prompt) -> score
COLUMNS = ["cell", "prompt", "file", "seconds", "file_bytes", "skipped", "error"]  # + params
GRID_FRAMES = 4  # frames per video in the comparison grid
THUMB_WIDTH = 128  # pixels per grid frame (never upscaled)


class Cell(NamedTuple):
    name: str  # "guidance=1,steps=10": the cell's folder
    params: dict[str, Any]  # {"guidance": 1.0, "steps": 10}, sorted by name
    options: GenerateOptions  # the fixed options with the cell's values


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """`["guidance=1,6,12", "steps=10,25"]` -> {"guidance": ["1", "6", "12"], "steps": [...]}.

    Raises:
        GenerateError: a spec without `=` or values, or a parameter given twice.
    """
    grid: dict[str, list[str]] = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        grid_values = [v.strip() for v in values.split(",") if v.strip()]
        if not name or not grid_values:
            raise GenerateError(f"--grid {spec}: expected NAME=V1,V2,...")
        if name in grid:
            raise GenerateError(f"--grid {name}: given twice")
        grid[name] = grid_values
    return grid


def format_value(value: Any) -> str:
    """A grid value as written in a cell name: 1.0 -> "1", 0.5 -> "0.5", 10 -> "10"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def grid_cells(options: GenerateOptions, grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    """Every combination of grid values, parameters sorted by name, values in the given order.

    Raises:
        GenerateError: no grid, a parameter that is not set per video, a value the options
            reject (named with the parameter), or two values that name the same cell.
    """
    if not grid:
        raise GenerateError("a sweep needs at least one --grid NAME=V1,V2,...")
    unknown = sorted(set(grid) - set(PER_VIDEO))
    if unknown:
        raise GenerateError(f"--grid {unknown[0]}: not a per-video option ({', '.join(PER_VIDEO)})")
    base = options.model_dump()
    typed: dict[str, list[Any]] = {}
    for name in sorted(grid):
        typed[name] = []
        for value in grid[name]:
            try:
                checked = GenerateOptions.model_validate(base | {name: value})
            except ValidationError as e:
                reason = e.errors()[0]["msg"].removeprefix("Value error, ")
                raise GenerateError(f"--grid {name}={value}: {reason}") from None
            typed[name].append(getattr(checked, name))
    cells, names = [], set()
    for values in itertools.product(*typed.values()):
        params = dict(zip(typed, values, strict=True))
        name = ",".join(f"{k}={format_value(v)}" for k, v in params.items())
        if name in names:
            raise GenerateError(f"--grid: cell {name} appears twice (repeated value)")
        names.add(name)
        cells.append(Cell(name, params, options.model_copy(update=params)))
    return cells


def clip_metric(clip_model: str, device: str = "auto") -> Metric:
    """`evaluate.clip_score` against the prompt; CLIP loads at the first video scored."""
    clip = None

    def score(frames: np.ndarray, prompt: str) -> float:
        nonlocal clip
        if clip is None:
            clip = evaluate.load_clip(clip_model, resolve_device(device))
        return evaluate.clip_score(clip, frames, prompt)

    return score


# --------------------------------------------------------------------------- table


def read_video(path: Path) -> np.ndarray:
    """Every frame of an mp4, [F, H, W, 3] uint8."""
    with VideoReader(path) as reader:
        return np.stack([frame for _, frame in reader.scan(0.0, math.inf)])


def _previous(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The last run's rows by (cell, prompt); empty before the first."""
    path = folder / "results.parquet"
    if not path.is_file():
        return {}
    return {(r["cell"], r["prompt"]): r for r in read_table(path).to_dict("records")}


def _scores(metrics: Mapping[str, Metric], frames: np.ndarray, prompt: str) -> dict[str, float]:
    return {name: float(fn(frames, prompt)) for name, fn in metrics.items()}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _row(cell: Cell, prompt: str, path: Path, **values: Any) -> dict[str, Any]:
    """A table row: cell, the cell's parameters, prompt, file, then `values`."""
    return {
        "cell": cell.name,
        **cell.params,
        "prompt": prompt,
        "file": f"{cell.name}/{path.name}",
        **values,
    }


def _reused(
    cell: Cell,
    name: str,
    text: str,
    path: Path,
    previous: dict[str, Any] | None,
    metrics: Mapping[str, Metric],
) -> dict[str, Any]:
    """The row of a video already on disk: seconds and scores from the run that made it."""
    previous = previous or {}
    scores = {k: v for k, v in previous.items() if k not in COLUMNS and k not in cell.params}
    missing = {column: fn for column, fn in metrics.items() if _missing(previous.get(column))}
    if missing:
        scores |= _scores(missing, read_video(path), text)
    seconds = previous.get("seconds", float("nan"))
    return _video_row(cell, name, path, seconds, scores, skipped=True)


def _generated(
    pipe,
    cell: Cell,
    name: str,
    text: str,
    path: Path,
    metrics: Mapping[str, Metric],
    on_step: Progress = no_progress,
) -> dict[str, Any]:
    """Generate, score and write one video; a NaN video is a row with its error, no file.
    `on_step` hears (steps done, steps, "<cell>/<prompt>") as it samples."""
    t0 = time.time()
    label = f"{cell.name}/{name}"
    try:
        frames = generate.generate_one(  # [F, H, W, 3] uint8
            pipe, text, cell.options, on_step=lambda done, steps: on_step(done, steps, label)
        )
    except FloatingPointError as e:
        seconds = round(time.time() - t0, 3)
        return _row(cell, name, path, seconds=seconds, file_bytes=0, skipped=False, error=str(e))
    seconds = round(time.time() - t0, 3)
    scores = _scores(metrics, frames, text)
    generate.write_video(path, frames, cell.options.fps)
    return _video_row(cell, name, path, seconds, scores, skipped=False)


def _video_row(
    cell: Cell, prompt: str, path: Path, seconds: float, scores: dict[str, Any], *, skipped: bool
) -> dict[str, Any]:
    """The row of a video on disk at `path` (its size in bytes, no error), whether generated
    now or reused (`skipped`)."""
    return _row(
        cell,
        prompt,
        path,
        seconds=seconds,
        file_bytes=path.stat().st_size,
        skipped=skipped,
        error="",
        **scores,
    )


def write_results(folder: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """`results.parquet` and `results.csv`, each written atomically. Returns the table."""
    table = pd.DataFrame(rows)
    write_table(folder / "results.parquet", table)
    with atomic_path(folder / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


# --------------------------------------------------------------------------- images


def _strip(path: Path) -> np.ndarray:
    """GRID_FRAMES frames spread over a video, side by side: [h, n * w, 3]."""
    return frame_strip(read_video(path), GRID_FRAMES, THUMB_WIDTH)


def write_grid(folder: Path, table: pd.DataFrame, path: Path) -> None:
    """The comparison grid: a row per cell, a column per prompt, a few frames per video."""
    cells, prompts = list(dict.fromkeys(table.cell)), list(dict.fromkeys(table.prompt))
    fig = figure(2.0 + 0.9 * GRID_FRAMES * len(prompts), 0.4 + 1.1 * len(cells))
    axes = fig.subplots(len(cells), len(prompts), squeeze=False)
    files = {(r.cell, r.prompt): r.file for r in table.itertuples(index=False)}
    for (i, cell), (j, prompt) in itertools.product(enumerate(cells), enumerate(prompts)):
        ax = axes[i, j]
        ax.set_xticks([])
        ax.set_yticks([])
        file = folder / files[cell, prompt]
        if file.is_file():
            ax.imshow(_strip(file))
        else:
            ax.text(0.5, 0.5, "no video", ha="center", va="center", transform=ax.transAxes)
        if i == 0:
            ax.set_title(prompt[:40], fontsize=8)
        if j == 0:
            ax.set_ylabel(cell.replace(",", "\n"), fontsize=8, rotation=0, ha="right", va="center")
    save(fig, path)


def write_timing(table: pd.DataFrame, path: Path) -> None:
    """Seconds per video, mean over the prompts of each cell, as horizontal bars."""
    done = table[table.error == ""]
    seconds = done.groupby("cell", sort=False).seconds.mean()
    fig = figure(6.0, 1.0 + 0.3 * len(seconds))
    ax = fig.subplots()
    ax.barh(list(seconds.index), seconds.fillna(0).to_numpy())
    for y, s in enumerate(seconds):
        ax.text(0, y, f" {s:.1f}s" if not math.isnan(s) else " unknown", va="center", fontsize=8)
    ax.invert_yaxis()  # the first cell on top, as in the grid
    ax.set_xlabel("seconds per video (mean over prompts)")
    ax.set_title(f"{path.parent.name}: sampling time per cell")
    save(fig, path)


# --------------------------------------------------------------------------- run


def _checked_cells(
    options: GenerateOptions, grid: Mapping[str, Sequence[Any]], experiment: str
) -> tuple[list[Cell], str]:
    """(the grid's cells with options fitted to the model, the device), once the grid, the
    experiment name, the device, an --image and a --lora check out: bad options fail now,
    not at the first missing video. Reads the model's configs only, not its weights.

    Raises:
        GenerateError: naming the option and why.
    """
    cells = grid_cells(options, grid)
    if not re.fullmatch(r"[A-Za-z0-9_.=,-]+", experiment):
        raise GenerateError(f"--experiment {experiment!r}: use letters, digits and _ . = , -")
    device = resolve_device(options.device)
    generate.check_device(options, device)
    traits = generate.model_traits(options.model)
    cells = [cell._replace(options=generate.fit(cell.options, traits)) for cell in cells]
    generate.image_of(cells[0].options)  # a missing or unreadable --image
    if options.lora is not None:
        generate.lora_file(options.lora)
    return cells, device


def run_sweep(
    prompts: dict[str, str],
    options: GenerateOptions,
    grid: Mapping[str, Sequence[Any]],
    out: str | Path,
    experiment: str,
    metrics: Mapping[str, Metric] | None = None,
    progress: Progress = no_progress,
    on_step: Progress = no_progress,
) -> pd.DataFrame:
    """Generate every prompt for every cell of the grid that is not on disk yet.

    Args:
        prompts: {output name: prompt}, e.g. from `generate.read_prompts`.
        options: the fixed options (model, LoRA, device, sizes, ...); the grid overrides some.
        grid: {per-video option: values}, e.g. {"guidance": [1, 6, 12], "steps": [10, 25]}.
        out: the sweeps folder; the experiment writes under `out/experiment/`.
        experiment: the experiment's folder name.
        metrics: {column: fn(frames [F, H, W, 3] uint8, prompt) -> float}.
        progress: called as (videos done, videos in the grid, "path seconds" or "path skipped")
            after each video is committed and the table rewritten.
        on_step: called as (denoising steps done, steps, "<cell>/<prompt>") at the start of
            each video generated and after each of its steps.

    Returns:
        The results table: cell, grid parameters, prompt, file, seconds, file_bytes,
        skipped, error, then the metrics' columns.

    Raises:
        GenerateError: bad grid, experiment name or options, before anything is generated.
    """
    cells, device = _checked_cells(options, grid, experiment)
    folder, metrics = Path(out) / experiment, metrics or {}
    previous, rows = _previous(folder), {}
    keys, pipe = _keys(cells, prompts), None
    try:
        for cell in cells:
            clean_stale_tmp(folder / cell.name)  # temporaries of a killed run
            for name, text in prompts.items():
                path = folder / cell.name / f"{name}.mp4"
                if path.is_file():
                    row = _reused(cell, name, text, path, previous.get((cell.name, name)), metrics)
                    note = f"{path} skipped"
                else:
                    if pipe is None:  # at the first missing video: a finished sweep never loads
                        pipe = generate.load(options)
                    row = _generated(pipe, cell, name, text, path, metrics, on_step)
                    note = f"{path} {row['seconds']:.1f}s" + (" error" if row["error"] else "")
                rows[cell.name, name] = row
                _write_known(folder, keys, rows, previous)
                progress(len(rows), len(keys), note)
    finally:
        if pipe is not None:
            pipe = None
            evaluate.release_memory(device)
    table = write_results(folder, [rows[k] for k in keys])
    write_grid(folder, table, folder / "grid.png")
    write_timing(table, folder / "timing.png")
    return table


def _write_known(folder: Path, keys: list[tuple], rows: dict, previous: dict) -> None:
    """The results table so far: rows not reached yet keep the last run's values, so a
    killed rerun loses none."""
    write_results(folder, [rows.get(k) or previous[k] for k in keys if k in rows or k in previous])


def _keys(cells: list[Cell], prompts: dict[str, str]) -> list[tuple[str, str]]:
    """(cell, prompt) in table order: cells in grid order, prompts in the given order."""
    return [(cell.name, name) for cell in cells for name in prompts]
