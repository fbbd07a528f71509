"""Conditioned evaluation on the tiny CogVideoX: an IC-LoRA and a TIC-FT run are evaluated
as they were trained, each prompt on a held-out clip's condition (the same prompt and seed
on two clips give two videos), with `-side.mp4` beside each result and a report that says
so; TIC-FT's shorter target videos are scored as written; no held-out clip fails clearly.

The checkpoints are random LoRAs saved like the trainer's (sampling does not care how a
LoRA was trained), the check and filter outputs tables written by the test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_sampling
from test_evaluate import PROMPT, _heldout_check, add_checkpoint, decode, make_lora
from test_evaluate_suite import _filter_for

from cogpipe import evaluate
from cogpipe.config import EvaluateConfig, PipelineConfig, TicFtConfig
from cogpipe.workspace import StageResult, Workspace, read_table, write_table

TINY_TIC_FT = TicFtConfig(condition_frames=1, buffer_frames=2, target_frames=2)  # 17 frames
MODES = {  # mode -> (train fields, precompute fields)
    "ic-lora": ({}, {"reference": "cogpipe.condition:canny"}),
    "tic-ft": ({"tic_ft": TINY_TIC_FT.model_dump()}, {"frames": TINY_TIC_FT.video_frames}),
}


@pytest.fixture(scope="module")
def lora_file(tiny_models, tmp_path_factory) -> Path:
    return make_lora(tiny_models["cogvideox"], tmp_path_factory.mktemp("lora"), seed=0)


def make_cfg(root: Path, models: dict[str, Path], mode: str, **evaluate_fields):
    train, precompute = MODES[mode]
    fields = tiny_sampling(prompts=[PROMPT, PROMPT], seeds=[42], fps=8, bootstrap=100)
    fields |= {"clip_model": str(models["clip"])} | evaluate_fields
    return PipelineConfig.model_validate(
        {
            "workspace": root,
            "model": str(models["cogvideox"]),
            "precompute": precompute,
            "train": {"mode": mode, "validation_every": 0, **train},
            "evaluate": EvaluateConfig(**fields).model_dump(),
        }
    )


def upstream(run_dir: Path, check: StageResult, filter: StageResult | None = None) -> dict:
    out = {"train": StageResult("train", run_dir.name, str(run_dir)), "check": check}
    return out | ({"filter": filter} if filter else {})


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b).mean())


def test_ic_lora_checkpoints_are_sampled_on_each_prompts_heldout_clip(
    tmp_path, tiny_models, lora_file, sample_videos
):
    cfg = make_cfg(tmp_path / "ws", tiny_models, "ic-lora")
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-ic"
    add_checkpoint(run_dir, "checkpoint-000002", lora_file)
    check = _heldout_check(tmp_path / "check", sample_videos, 3)  # clip1..clip3 held out
    result = evaluate.run_evaluate(ws, cfg, upstream(run_dir, check))

    out, unit = Path(result.path), Path(result.path) / "checkpoint-000002"
    as_lora = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mode": "lora"})})
    assert out.parent.name == evaluate.eval_key(cfg) != evaluate.eval_key(as_lora)  # another way
    assert sorted(p.name for p in unit.glob("*.mp4")) == [
        "p00-s42-side.mp4",
        "p00-s42.mp4",
        "p01-s42-side.mp4",
        "p01-s42.mp4",
    ]
    assert sorted(p.name for p in (out / "base").glob("*.mp4")) == ["p00-s42.mp4", "p01-s42.mp4"]
    first, second = decode(unit / "p00-s42.mp4"), decode(unit / "p01-s42.mp4")
    assert first.shape == second.shape == (9, 64, 64, 3)
    assert diff(first, second) > 1.0  # same prompt and seed, clip1's edges vs clip2's
    base = decode(out / "base" / "p00-s42.mp4")
    np.testing.assert_array_equal(base, decode(out / "base" / "p01-s42.mp4"))  # text-to-video
    assert decode(unit / "p00-s42-side.mp4").shape == (9, 64, 128, 3)  # condition | result
    metrics = read_table(unit / "metrics.parquet")
    assert list(metrics.condition_clip) == ["clip1", "clip2"]
    from PIL import Image

    assert Image.open(unit / "contact_sheet.png").size == (2 * 8 * 64, 2 * 64)
    assert Image.open(unit / "ab_grid.png").size == (3 * 8 * 64, 2 * 64)
    report = (out / "report.md").read_text()
    assert "**Conditioned evaluation** (train.mode ic-lora)" in report
    assert "held-out clip i mod 3 of the 3 reference clips" in report
    assert "against the unconditioned base" in report
    assert "1. " + PROMPT + " (conditioned on held-out clip `clip2`)" in report


def test_tic_ft_heldout_suite_scores_the_target_frames(
    tmp_path, tiny_models, lora_file, sample_videos
):
    cfg = make_cfg(tmp_path / "ws", tiny_models, "tic-ft", prompts="heldout", heldout_clips=2)
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-tic"
    add_checkpoint(run_dir, "checkpoint-000002", lora_file)
    check = _heldout_check(tmp_path / "check", sample_videos, 3)
    (tmp_path / "filter").mkdir()
    captions = {"clip1": ("a slap", True), "clip2": ("a slap", True), "clip3": ("b", False)}
    up = upstream(run_dir, check, _filter_for(tmp_path / "filter", captions))
    result = evaluate.run_evaluate(ws, cfg, up)

    unit = Path(result.path) / "checkpoint-000002"
    first, second = decode(unit / "p00-s42.mp4"), decode(unit / "p01-s42.mp4")
    assert first.shape == (8, 64, 64, 3)  # 2 target latent frames of the 17-frame sequence
    assert diff(first, second) > 1.0  # the caption's own clip is the condition
    assert decode(unit / "p00-s42-side.mp4").shape == (8, 64, 128, 3)
    assert decode(Path(result.path) / "base" / "p00-s42.mp4").shape == (9, 64, 64, 3)
    metrics = read_table(unit / "metrics.parquet")
    assert list(metrics.condition_clip) == ["clip1", "clip2"]
    assert metrics[["clip_score", "temporal_consistency", "dynamic_degree"]].notna().all().all()
    report = (Path(result.path) / "report.md").read_text()
    assert "**Conditioned evaluation** (train.mode tic-ft)" in report
    assert "conditioned on the held-out clip its caption belongs to" in report
    assert "17-frame sequence" in report and "the 8 target frames are the video scored" in report


def test_a_conditioned_run_without_heldout_clips_fails_with_the_way_out(tmp_path, tiny_models):
    cfg = make_cfg(tmp_path / "ws", tiny_models, "ic-lora")
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-none"
    run_dir.mkdir(parents=True)
    rows = [
        {
            "clip_id": f"c{i}",
            "path": "x.mp4",
            "start": 0.0,
            "end": 1.0,
            "split": "train",
            "keep": i < 3,
        }
        for i in range(4)
    ]
    write_table(tmp_path / "check" / "clips.parquet", pd.DataFrame(rows))
    check = StageResult("check", "c0", str(tmp_path / "check"))
    with pytest.raises(ValueError, match=r"4 clips, 3 kept, 0 held out.*check\.heldout_fraction"):
        evaluate.run_evaluate(ws, cfg, upstream(run_dir, check))
