"""Training sweeps: grid cells as configs, the ranking, and the flow on the tiny models
(in-process on Prefect's ephemeral API): every cell trained and evaluated once, a grown
grid trains only its new cells."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cogpipe import train_sweep as sweeps
from cogpipe.config import ConfigError, PipelineConfig
from cogpipe.evaluate import eval_key
from cogpipe.workspace import Workspace, write_table


def test_cells_cover_the_grid_with_validated_configs_and_stable_names():
    base = PipelineConfig(name="slap")
    grid = {"train.learning_rate": [1e-4, 5e-4, 1e-3], "train.rank": [64, 128, 256]}
    cells = sweeps.cells(base, grid)
    assert len(cells) == 9
    names = [n for n, _ in cells]
    assert names[1] == "slap-learning_rate0.0001-rank128" and len(set(names)) == 9
    for name, cfg in cells:
        assert cfg.name == name and cfg.precompute == base.precompute
    assert {(c.train.learning_rate, c.train.rank) for _, c in cells} == {
        (lr, r) for lr in grid["train.learning_rate"] for r in grid["train.rank"]
    }
    with pytest.raises(ConfigError, match="'train.ranks' is not a config field"):
        sweeps.cells(base, {"train.ranks": [1]})
    with pytest.raises(ConfigError, match="rank"):
        sweeps.cells(base, {"train.rank": [0]})  # rank >= 1
    with pytest.raises(ConfigError, match="at least one value"):
        sweeps.cells(base, {"train.rank": []})


def test_results_pick_each_cells_best_checkpoint_and_rank_the_cells(tmp_path):
    base = PipelineConfig(workspace=tmp_path, name="s")
    grid = {"train.rank": [4, 8, 16]}
    ek = eval_key(base)
    rows = [  # rank 16 was never evaluated; an old row (no interval columns) reads as NaN
        ("s-rank4", "checkpoint-000100", 0.20, 300.0),
        ("s-rank4", "checkpoint-000200", 0.25, 200.0),
        ("s-rank8", "checkpoint-000100", 0.30, 250.0),
        ("s-rank8", "base", 0.10, 10.0),
        ("other-rank4", "checkpoint-000100", 0.99, 1.0),
    ]
    index = pd.DataFrame(
        [
            {
                "ekey": ek,
                "run": r,
                "checkpoint": c,
                "step": 0 if c == "base" else int(c[-6:]),
                "clip_score": s,
                "clip_score_low": s - 0.01,
                "clip_score_high": s + 0.01,
                "temporal_consistency": 0.5,
                "dynamic_degree": 0.1,
                "fd_videomae": f,
                "fd_videomae_low": f - 5,
                "fd_videomae_high": f + 5,
                "videos": 2,
                "evaluated_at": "",
            }
            for r, c, s, f in rows
        ],
    )
    write_table(tmp_path / "evaluate" / "index.parquet", index)
    ws = Workspace(tmp_path)

    by_clip = sweeps.results(ws, base, grid, "clip_score")
    assert list(by_clip.run) == ["s-rank8", "s-rank4", "s-rank16"]
    assert list(by_clip.checkpoint[:2]) == ["checkpoint-000100", "checkpoint-000200"]
    assert math.isnan(by_clip.clip_score.iloc[2]) and pd.isna(by_clip.checkpoint.iloc[2])
    assert by_clip.clip_score_low.iloc[0] == pytest.approx(0.29)
    assert math.isnan(by_clip.temporal_consistency_low.iloc[0])  # not in the old rows
    by_fd = sweeps.results(ws, base, grid, "fd_videomae")  # lower is better
    assert list(by_fd.run[:2]) == ["s-rank4", "s-rank8"] and by_fd.fd_videomae.iloc[0] == 200.0

    markdown = sweeps.write_report(tmp_path / "report", by_clip, "clip_score", grid)
    assert "Best: **s-rank8** (train.rank = 8) at checkpoint-000100: clip_score 0.3000" in markdown
    assert "**s-rank8** beats every other cell" in markdown  # [0.29, 0.31] vs [0.24, 0.26]
    assert "it beats the base model (intervals apart)" in markdown
    assert (tmp_path / "report" / "results.parquet").is_file()
    with pytest.raises(ConfigError, match="not one of"):
        sweeps.results(ws, base, grid, "loss")

    # Two cells whose best checkpoints score the same: no winner.
    same = index.assign(clip_score=0.3, clip_score_low=0.29, clip_score_high=0.31)
    write_table(tmp_path / "evaluate" / "index.parquet", same)
    table = sweeps.results(ws, base, grid, "clip_score")
    markdown = sweeps.write_report(tmp_path / "report", table, "clip_score", grid)
    assert "No winner: the 95% intervals of s-rank4 and s-rank8 overlap" in markdown


@pytest.mark.prefect
@pytest.mark.slow
def test_sweep_flow_trains_and_evaluates_each_cell_once(demo_config, tmp_path):
    from cogpipe_flows.train_sweep import train_sweep

    cfg = demo_config(name="tiny", train={"max_steps": 2, "checkpoint_every": 2})
    cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"prompts": ["a slap"]})}
    )
    grid = {"train.learning_rate": [1e-3, 1e-2]}
    ranked = train_sweep(cfg, grid)
    assert sorted(r["run"] for r in ranked) == ["tiny-learning_rate0.001", "tiny-learning_rate0.01"]
    assert all(r["checkpoint"] == "checkpoint-000002" for r in ranked)
    assert ranked[0]["clip_score"] >= ranked[1]["clip_score"]
    report = (cfg.workspace / "sweeps" / "train" / "tiny" / "report.md").read_text()
    assert "Best: **" + ranked[0]["run"] in report
    runs = cfg.workspace / "train"
    trained = {str(p.relative_to(runs)): p.stat().st_mtime_ns for p in runs.glob("*/checkpoint-*")}
    assert len(trained) == 2

    grown = {"train.learning_rate": [1e-3, 1e-2, 1e-4]}
    ranked = train_sweep(cfg, grown)
    assert len(ranked) == 3 and all(r["checkpoint"] == "checkpoint-000002" for r in ranked)
    now = {str(p.relative_to(runs)): p.stat().st_mtime_ns for p in runs.glob("*/checkpoint-*")}
    assert {k: now[k] for k in trained} == trained  # the old cells were not trained again
    assert len(now) == 3
