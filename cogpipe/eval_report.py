"""The report of an evaluated run: metrics with intervals, verdicts, plots, sheets.

What is notable:
- Every metric carries a seeded 95% bootstrap interval over videos (`<metric>_low`,
  `<metric>_high`, `summarise`); the Fréchet distance is named after its features
  (`fd_videomae`) and refused (NaN and the reason in `fd_note`) below `fd_min_samples`
  videos per set.
- A checkpoint beats another only when a paired bootstrap of the difference over the same
  (prompt, seed) videos excludes 0 (`compare`); a Fréchet distance, a set statistic, only
  when the two intervals do not overlap. `winner` names a best unit only when it beats
  every other one.
- `report.md` says how the suite was sampled: for IC-LoRA and TIC-FT runs, which held-out
  clip conditioned each prompt, and that the A/B sets the conditioned checkpoint against
  the unconditioned base (the base model has no conditioned mode).
- `metrics_vs_step.png` draws each metric at its own scale (`metric_limits`): every
  interval in view, and a y-span of at least 5% of the metric's range, so differences
  inside the intervals do not fill the panel.
- `sheet_row` is one labelled row of a contact sheet or A/B grid: frames spread over the
  video, thumbnails never upscaled.

Re-exported by `cogpipe.evaluate`, which calls `summarise` per unit and `write_report`
per call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cogpipe import metrics as stats
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.metrics import features_name
from cogpipe.ratings import ratings_section
from cogpipe.workspace import Workspace, atomic_path, read_table

BASE = "base"  # the checkpoint name of the base model (step 0: an untrained LoRA is the base)
PER_VIDEO = ["clip_score", "temporal_consistency", "dynamic_degree"]  # one value per video
METRICS = [*PER_VIDEO, "fd_videomae"]  # per checkpoint; the last follows evaluate.feature_extractor
BOOTSTRAP_SEED = 0
SHEET_FRAMES = 8  # frames across each contact-sheet row
THUMB_WIDTH = 160  # pixels per contact-sheet frame (never upscaled)
LABEL_CHARS = 48  # of a prompt in a sheet or grid label
CONDITIONED = ("ic-lora", "tic-ft")  # train modes whose checkpoints are sampled on a condition


def fd_name(ec: EvaluateConfig) -> str:
    """The Fréchet distance's column: `fd_<features>` (fd_videomae)."""
    return f"fd_{features_name(ec.feature_extractor)}"


def metric_names(ec: EvaluateConfig) -> list[str]:
    return [*PER_VIDEO, fd_name(ec)]


def higher_is_better(metric: str) -> bool:
    """Every per-video metric grows with quality; a Fréchet distance (fd_*) shrinks."""
    return not metric.startswith("fd_") and metric != "fvd"


def summarise(
    metrics: pd.DataFrame, feats: np.ndarray | None, real: np.ndarray | None, ec: EvaluateConfig
) -> dict[str, Any]:
    """A unit's numbers: the mean of each per-video metric, the Fréchet distance, each with
    its bootstrap interval, and why the distance is missing (fd_note)."""
    out: dict[str, Any] = {}
    for m in PER_VIDEO:
        values = metrics[m].to_numpy(np.float64)
        out[m] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        out[f"{m}_low"], out[f"{m}_high"] = stats.bootstrap_mean(
            values, ec.bootstrap, BOOTSTRAP_SEED
        )
    name, nan = fd_name(ec), float("nan")
    out |= {name: nan, f"{name}_low": nan, f"{name}_high": nan, "fd_note": None}
    if feats is None or real is None:
        out["fd_note"] = "off (evaluate.video_features is not set)"
        return out | {"videos": len(metrics)}
    out["fd_note"] = stats.frechet_refusal(name, len(feats), len(real), ec.fd_min_samples)
    if out["fd_note"] is None:
        out[name] = stats.frechet_distance(feats, real)
        out[f"{name}_low"], out[f"{name}_high"] = stats.bootstrap_frechet(
            feats, real, ec.bootstrap, BOOTSTRAP_SEED
        )
    return out | {"videos": len(metrics)}


def compare(out: Path, a: pd.Series, b: pd.Series, metric: str, resamples: int):
    """(b - a, low, high, verdict) of one metric between two units of a run: a paired
    bootstrap of the difference over the videos both have (per-video metrics), or whether
    the two 95% intervals overlap (a Fréchet distance, a set statistic)."""
    if metric not in PER_VIDEO:
        diff, better = b[metric] - a[metric], higher_is_better(metric)
        low, high = (
            b[f"{metric}_low"] - a[f"{metric}_high"],
            b[f"{metric}_high"] - a[f"{metric}_low"],
        )
        return diff, low, high, stats.verdict(low, high, better)  # non-overlap <=> 0 outside
    ma, mb = (read_table(out / u.checkpoint / "metrics.parquet") for u in (a, b))
    pairs = ma.merge(mb, on="video", suffixes=("_a", "_b"))
    diff, low, high = stats.paired_difference(
        pairs[f"{metric}_a"], pairs[f"{metric}_b"], resamples, BOOTSTRAP_SEED
    )
    return diff, low, high, stats.verdict(low, high, higher_is_better(metric))


def winner(out: Path, scores: pd.DataFrame, metric: str, resamples: int) -> str:
    """The best unit on `metric` when it beats every other one (`compare`), else why not."""
    ranked = scores.dropna(subset=[metric])
    if len(ranked) < 2:
        return "no winner (fewer than two units with a value)"
    rows = ranked.sort_values(metric, ascending=not higher_is_better(metric))
    best, ties = rows.iloc[0], []
    for _, other in rows.iloc[1:].iterrows():
        if compare(out, other, best, metric, resamples)[3] != "better":
            ties.append(other.checkpoint)
    if ties:
        return (
            f"no winner: {best.checkpoint} is best but not beyond the interval of {', '.join(ties)}"
        )
    return f"**{best.checkpoint}** beats every other checkpoint and the base"


def _cell(value: float, low: float, high: float, digits: int) -> str:
    if not np.isfinite(value):
        return "-"
    bounds = f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else ""
    return f"{value:.{digits}f}{bounds}"


def write_report(
    out: Path,
    cfg: PipelineConfig,
    ekey: str,
    run: str,
    scores: pd.DataFrame,
    prompts: list[str],
    paired: list[str] | None = None,
    reference: int = 0,
) -> None:
    """`report.md`: every metric with its 95% interval per checkpoint, each checkpoint
    against the base model, the winner per metric, the human A/B win rates so far (the
    rating page rewrites that section as ratings come in), and `metrics_vs_step.png`.

    Args:
        paired: ic-lora and tic-ft runs: the held-out clip_id each prompt was conditioned
            on; None: the checkpoints were sampled text-to-video.
        reference: how many held-out clips the prompts were paired with (i mod this).
    """
    ec, names = cfg.evaluate, metric_names(cfg.evaluate)
    fd, notes = names[-1], scores.fd_note.dropna().unique()
    suite = (
        f"captions of {len(prompts)} held-out clips" if ec.heldout else f"{len(prompts)} prompts"
    )
    lines = [
        f"# Evaluation of run `{run}`",
        "",
        f"Eval key `{ekey}`, model `{cfg.model}`, CLIP `{ec.clip_model}`: {suite} x "
        f"{len(ec.seeds)} seeds, {ec.frames} frames {ec.height}x{ec.width}, {ec.steps} steps, "
        f"guidance {ec.guidance}. Intervals: 95% bootstrap over videos ({ec.bootstrap} "
        f"resamples). {fd}: {'; '.join(map(str, notes)) or 'to the held-out clips'}.",
        "",
        *conditioning(cfg, paired, reference),
        "![metrics against step](metrics_vs_step.png)",
        "",
        *_table(out, scores, names),
    ]
    lines += against_base(out, scores, names, ec.bootstrap)
    lines += ["", "## Winner per metric", ""]
    lines += [f"- {m.replace('_', ' ')}: {winner(out, scores, m, ec.bootstrap)}" for m in names]
    lines += ["", ratings_section(Workspace(cfg.workspace), ekey, run)]  # cogpipe rate refreshes it
    on = paired or [None] * len(prompts)
    lines += ["Prompts:", ""] + [
        f"{i}. {p}" + (f" (conditioned on held-out clip `{c}`)" if c else "")
        for i, (p, c) in enumerate(zip(prompts, on, strict=True))
    ]
    plot_metrics(scores, names, out / "metrics_vs_step.png")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _table(out: Path, scores: pd.DataFrame, names: list[str]) -> list[str]:
    """The report's first table: each unit's metrics with intervals and its pictures."""
    lines = [
        "| checkpoint | step | "
        + " | ".join(n.replace("_", " ") for n in names)
        + " | videos | contact sheet | A/B |",
        "| --- | ---: |" + " ---: |" * len(names) + " ---: | --- | --- |",
    ]
    for _, r in scores.iterrows():
        ab = (
            f"[png]({r.checkpoint}/ab_grid.png)"
            if (out / r.checkpoint / "ab_grid.png").is_file()
            else ""
        )
        cells = [
            _cell(r[m], r[f"{m}_low"], r[f"{m}_high"], 4 if m != "clip_score" else 2) for m in names
        ]
        lines.append(
            f"| {r.checkpoint} | {r.step} | "
            + " | ".join(cells)
            + f" | {r.videos} | [png]({r.checkpoint}/contact_sheet.png) | {ab} |"
        )
    return lines


def conditioning(cfg: PipelineConfig, paired: list[str] | None, reference: int) -> list[str]:
    """The report's paragraph on how an IC-LoRA or TIC-FT run's checkpoints were sampled
    (none for text-to-video runs)."""
    mode = cfg.train.mode
    if paired is None:
        return []
    if cfg.evaluate.heldout:
        pairing = "each prompt is conditioned on the held-out clip its caption belongs to"
    else:
        pairing = (
            f"prompt i is conditioned on held-out clip i mod {reference} of the "
            f"{reference} reference clips (the first held-out clips by clip_id)"
        )
    if mode == "tic-ft":
        t = cfg.train.tic_ft
        what = (
            f"its first {4 * (t.condition_frames - 1) + 1} frames are the condition of a "
            f"{t.video_frames}-frame sequence ({t.condition_frames} condition + "
            f"{t.buffer_frames} buffer + {t.target_frames} target latent frames); the "
            f"{4 * t.target_frames} target frames are the video scored"
        )
    else:
        what = (
            f"its {cfg.evaluate.frames} frames through the run's condition function "
            f"`{cfg.precompute.reference}` are the reference video"
        )
    return [
        f"**Conditioned evaluation** (train.mode {mode}): every checkpoint video is sampled on a "
        f"held-out clip's condition; {pairing}, and {what}. `pNN-sS.mp4` is the result alone "
        "(what is scored), `pNN-sS-side.mp4` the condition beside it, and the contact sheets "
        "show condition | result. The base model has no conditioned mode: it is sampled "
        "text-to-video, so the A/B and every comparison with the base set the conditioned "
        "checkpoint against the unconditioned base.",
        "",
    ]


def against_base(out: Path, scores: pd.DataFrame, names: list[str], resamples: int) -> list[str]:
    """The report's table of each checkpoint minus the base model, with its verdict."""
    base = scores[scores.checkpoint == BASE]
    if not len(base) or len(scores) < 2:
        return []
    lines = [
        "",
        "## Against the base model",
        "",
        "Checkpoint minus base, 95% interval, verdict. Per-video metrics: paired bootstrap of "
        "the difference over the same (prompt, seed) videos; a Fréchet distance: the two "
        "intervals must not overlap. A checkpoint beats the base only when the interval "
        "excludes 0.",
        "",
        "| checkpoint | " + " | ".join(n.replace("_", " ") for n in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for _, r in scores[scores.checkpoint != BASE].iterrows():
        cells = []
        for m in names:
            diff, low, high, verdict = compare(out, base.iloc[0], r, m, resamples)
            text = {"better": "**beats base**", "worse": "worse than base"}.get(verdict, verdict)
            cells.append(
                "-" if not np.isfinite(diff) else f"{diff:+.4f} [{low:+.4f}, {high:+.4f}] {text}"
            )
        lines.append(f"| {r.checkpoint} | " + " | ".join(cells) + " |")
    return lines


# What each per-video metric can take (`cogpipe.metrics`); a Fréchet distance is >= 0.
METRIC_RANGE = {
    "clip_score": (0.0, 100.0),
    "temporal_consistency": (-1.0, 1.0),
    "dynamic_degree": (0.0, 1.0),
}
MIN_SPAN = 0.05  # the least y-span: of the metric's range, or of a Fréchet distance's size
PAD = 0.08  # of the span, above and below


def metric_limits(metric: str, values: np.ndarray) -> tuple[float, float]:
    """The y-range of a metric's panel: every value and interval bound with padding, and
    never narrower than MIN_SPAN of the metric's range (a Fréchet distance: of its largest
    value), kept inside that range: differences well inside the intervals then look as
    small as they are instead of filling the panel."""
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    bottom, top = METRIC_RANGE.get(metric, (0.0, np.inf))
    scale = top - bottom if np.isfinite(top) else max(abs(lo), abs(hi), 1e-9)
    span = max(hi - lo, MIN_SPAN * scale)
    mid = (lo + hi) / 2
    lo, hi = mid - span * (0.5 + PAD), mid + span * (0.5 + PAD)
    if hi > top:  # slide inside the metric's range
        lo, hi = lo - (hi - top), top
    if lo < bottom:
        lo, hi = bottom, min(hi + (bottom - lo), top)
    return lo, hi


def _plot_metric(ax, tuned: pd.DataFrame, base: pd.DataFrame, m: str) -> None:
    """One panel: checkpoints against the step with their 95% intervals, the base model as a
    dashed line with its band."""
    from cogpipe.plots import count_axis

    value = tuned[m].astype(float).to_numpy()
    low, high = tuned[f"{m}_low"].astype(float), tuned[f"{m}_high"].astype(float)
    bounds = [value, low.to_numpy(), high.to_numpy()]
    ax.fill_between(tuned.step, low, high, alpha=0.25, label="checkpoint 95% interval")
    err = np.abs(np.vstack([value - low, high - value]))
    ax.errorbar(
        tuned.step, value, yerr=np.nan_to_num(err), marker="o", capsize=3, label="checkpoint"
    )
    if len(base) and np.isfinite(base[m].iloc[0]):
        b = base.iloc[0]
        ax.axhline(b[m], color="grey", linestyle="--", label="base")
        if np.isfinite(b[f"{m}_low"]):
            ax.axhspan(
                b[f"{m}_low"], b[f"{m}_high"], color="grey", alpha=0.15, label="base 95% interval"
            )
        bounds.append(np.array([b[m], b[f"{m}_low"], b[f"{m}_high"]], float))
    ax.set_ylim(*metric_limits(m, np.concatenate(bounds).astype(float)))
    ax.set_xlabel("step")
    ax.set_xlim(0, max(ax.get_xlim()[1], 1))  # the base model is step 0; steps are whole
    count_axis(ax.xaxis)
    ax.set_title(m.replace("_", " ") + (" (lower is better)" if not higher_is_better(m) else ""))
    ax.grid(alpha=0.3)


def metrics_figure(scores: pd.DataFrame, names: list[str]):
    """The figure of `plot_metrics`: one panel per metric with a value (legend on the first)."""
    from cogpipe.plots import figure

    shown = [m for m in names if scores[m].notna().any()]
    fig = figure(4 * max(len(shown), 1), 3.4)
    axes = fig.subplots(1, max(len(shown), 1), squeeze=False)[0]
    tuned, base = scores[scores.checkpoint != BASE], scores[scores.checkpoint == BASE]
    for ax, m in zip(axes, shown, strict=False):
        _plot_metric(ax, tuned, base, m)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=4, fontsize=8)  # off the data
    return fig


def plot_metrics(scores: pd.DataFrame, names: list[str], path: Path) -> None:
    """`metrics_vs_step.png`: each metric against the training step, checkpoints with their
    95% intervals, the base model as a dashed line with its band."""
    from cogpipe.plots import save

    save(metrics_figure(scores, names), path)


# --------------------------------------------------------------------------- sheets


def sheet_row(frames: np.ndarray, text: str) -> np.ndarray:
    """[F, H, W, 3] -> one contact-sheet row [h, n * w, 3]: n frames spread over the video,
    `text` on a dark band in its top-left corner."""
    from PIL import Image, ImageDraw

    from cogpipe.plots import frame_strip

    strip = frame_strip(frames, min(SHEET_FRAMES, len(frames)), THUMB_WIDTH)
    row = Image.fromarray(strip)  # [th, n * tw, 3]
    pen = ImageDraw.Draw(row)
    box = pen.textbbox((2, 1), text)
    pen.rectangle((0, 0, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    pen.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(row)


def label(name: str, request) -> str:
    """`checkpoint-000200 | seed 42 | a fighter slaps his opp...`: what a grid row shows."""
    prompt = request.prompt
    if len(prompt) > LABEL_CHARS:
        prompt = prompt[: LABEL_CHARS - 3] + "..."
    return f"{name} | seed {request.seed} | {prompt}"
