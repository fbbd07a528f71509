"""Evaluate stage on tiny random models: files written, A/B against base, incremental runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_sampling
from PIL import Image

from cogpipe import evaluate, pipeline
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.samples import write_tiny_models
from cogpipe.workspace import StageResult, Workspace, read_table, write_table

PROMPT = "A fighter slaps his opponent and the crowd cheers."


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("models"))


def make_lora(
    model_dir: Path,
    out_dir: Path,
    seed: int,
    rank: int = 4,
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
) -> Path:
    """A LoRA of `rank` (alpha 4) on the tiny transformer's `targets` with random non-zero
    lora_B, saved like the trainer does."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = CogVideoXTransformer3DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=4, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    CogVideoXPipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return out_dir / evaluate.LORA_FILE


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [make_lora(models["cogvideox"], root / f"lora{i}", seed=i) for i in range(3)]


def make_cfg(ws_root: Path, models: dict[str, Path], **evaluate_fields) -> PipelineConfig:
    fields = tiny_sampling(prompts=[PROMPT], seeds=[42], fps=8, clip_model=str(models["clip"]))
    settings = EvaluateConfig(**fields | evaluate_fields)
    return PipelineConfig(workspace=ws_root, model=str(models["cogvideox"]), evaluate=settings)


def add_checkpoint(run_dir: Path, name: str, lora_file: Path) -> None:
    (run_dir / name).mkdir(parents=True)
    shutil.copy(lora_file, run_dir / name / evaluate.LORA_FILE)


def upstream_for(run_dir: Path) -> dict[str, StageResult]:
    """A fresh train result per call, as the task layer would pass it."""
    return {
        "train": StageResult("train", run_dir.name, str(run_dir)),  # folder = cfg.name or key
        "check": StageResult("check", "checkkey0001", str(run_dir.parent.parent / "check")),
        "filter": StageResult("filter", "filterkey001", str(run_dir.parent.parent / "filter")),
    }


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_clip_score_properties(models):
    clip = evaluate.load_clip(str(models["clip"]), "cpu")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 48, 40, 3), dtype=np.uint8)

    score = evaluate.clip_score(clip, frames, PROMPT)
    assert score == evaluate.clip_score(clip, frames.copy(), PROMPT)  # deterministic
    assert 0.0 <= score <= 100.0
    # A mean over frames: order does not matter, a repeated frame scores as the frame alone.
    assert evaluate.clip_score(clip, frames[::-1], PROMPT) == pytest.approx(score, abs=1e-4)
    single = evaluate.clip_score(clip, frames[:1], PROMPT)
    assert evaluate.clip_score(clip, np.repeat(frames[:1], 4, 0), PROMPT) == pytest.approx(
        single, abs=1e-4
    )
    # Past CLIP's 77 tokens the text is truncated, not an error.
    assert 0.0 <= evaluate.clip_score(clip, frames, " ".join([PROMPT] * 40)) <= 100.0


def test_lora_changes_video_and_unload_restores_base(models, loras):
    ec = make_cfg(Path("unused"), models).evaluate
    pipe = evaluate.load_pipeline(str(models["cogvideox"]), "cpu")
    base = evaluate.generate(pipe, ec, PROMPT, 42, "cpu")
    assert base.shape == (9, 64, 64, 3) and base.dtype == np.uint8
    with evaluate.lora(pipe, loras[0].parent, "step_000002"):
        tuned = evaluate.generate(pipe, ec, PROMPT, 42, "cpu")
    assert np.abs(tuned.astype(int) - base).mean() > 1.0  # pixels, 0-255
    assert not [n for n, _ in pipe.transformer.named_modules() if "lora_" in n]
    np.testing.assert_array_equal(evaluate.generate(pipe, ec, PROMPT, 42, "cpu"), base)


class NanPipe:
    """Stands in for a pipeline whose fp16 activations overflowed."""

    transformer = SimpleNamespace(config=SimpleNamespace(max_text_seq_length=16))

    def __call__(self, **kwargs):
        return SimpleNamespace(frames=np.full((1, 9, 8, 8, 3), np.nan, dtype=np.float32))


def test_generate_fails_loudly_on_non_finite_pixels():
    with pytest.raises(FloatingPointError, match="non-finite"):
        evaluate.generate(NanPipe(), EvaluateConfig(), PROMPT, 42, "cpu")


def test_evaluate_incremental_runs(tmp_path, models, loras):
    cfg = make_cfg(tmp_path / "ws", models)
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-a"
    add_checkpoint(run_dir, "checkpoint-000002", loras[0])
    add_checkpoint(run_dir, "checkpoint-000004", loras[1])
    add_checkpoint(run_dir, ".tmp-checkpoint-000009-1a2b3c4d", loras[2])  # still being written
    (run_dir / "checkpoint-000003").mkdir()  # no weights: not a checkpoint
    ekey = evaluate.eval_key(cfg)
    out = ws.root / "evaluate" / ekey / "run-a"

    # 1: base + two checkpoints.
    r1 = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))
    assert r1.counts == {"checkpoints_evaluated": 2, "checkpoints_total": 2, "videos": 3}
    assert Path(r1.path) == out and not r1.reused
    assert set(r1.stats["clip_score"]) == {"base", "checkpoint-000002", "checkpoint-000004"}
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS.json",
        "base",
        "checkpoint-000002",
        "checkpoint-000004",
        "metrics_vs_step.png",
        "report.md",
    ]
    for name in ("base", "checkpoint-000002", "checkpoint-000004"):
        ab = [] if name == "base" else ["ab_grid.png"]  # base | checkpoint at the same seeds
        assert sorted(p.name for p in (out / name).iterdir()) == [
            *ab,
            "contact_sheet.png",
            "metrics.parquet",
            "p00-s42.mp4",
            "summary.json",
        ]
        video = decode(out / name / "p00-s42.mp4")
        assert video.shape == (9, 64, 64, 3)
        assert Image.open(out / name / "contact_sheet.png").size == (
            8 * 64,
            64,
        )  # 8 frames, 1 video
        metrics = read_table(out / name / "metrics.parquet")
        assert list(metrics.columns) == [
            "checkpoint",
            "prompt_index",
            "prompt",
            "seed",
            "video",
            "clip_score",
            "temporal_consistency",
            "dynamic_degree",
            "seconds",
        ]
        assert -1 <= metrics.temporal_consistency[0] <= 1 and 0 <= metrics.dynamic_degree[0] <= 1
        summary = json.loads((out / name / "summary.json").read_text())
        assert np.isnan(summary["fd_videomae"]) and summary["fd_note"].startswith("off")
        assert metrics[["checkpoint", "prompt_index", "seed", "video"]].values.tolist() == [
            [name, 0, 42, "p00-s42.mp4"]
        ]
        assert 0 <= metrics.clip_score[0] <= 100
    base_video = decode(out / "base" / "p00-s42.mp4").astype(int)
    assert np.abs(decode(out / "checkpoint-000002" / "p00-s42.mp4") - base_video).mean() > 1.0
    report = (out / "report.md").read_text()
    assert "| checkpoint-000004 | 4 |" in report and "| base | 0 |" in report
    assert "[png](checkpoint-000004/ab_grid.png)" in report and "metrics_vs_step.png" in report
    assert "## Human A/B ratings against the base model\n\nNo ratings yet" in report
    assert Image.open(out / "checkpoint-000002" / "ab_grid.png").size == (2 * 8 * 64, 64)
    marker = json.loads((out / "_SUCCESS.json").read_text())
    inputs = {"train": "run-a", "check": "checkkey0001", "filter": "filterkey001"}
    assert marker["key"] == r1.key == evaluate.key_of(cfg, inputs)
    assert evaluate.output_dir(ws, cfg, r1.key, inputs) == out
    assert pipeline.finished(ws, cfg, "evaluate", r1.key, inputs).counts == r1.counts
    index = evaluate.read_index(ws)
    assert list(index.columns) == evaluate.INDEX_COLUMNS
    assert index[["ekey", "run", "checkpoint", "step", "videos"]].values.tolist() == [
        [ekey, "run-a", "base", 0, 1],
        [ekey, "run-a", "checkpoint-000002", 2, 1],
        [ekey, "run-a", "checkpoint-000004", 4, 1],
    ]

    # 2: nothing new; the finished result is returned and nothing is touched.
    r2 = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))
    assert r2.reused and r2.key == r1.key and r2.counts == r1.counts
    assert evaluate.read_index(ws).equals(index)
    assert evaluate.is_current(ws, cfg, ws.read_success(out))

    # 3: a new checkpoint arrives; only it is generated, the base is not redone.
    base_mtime = (out / "base" / "p00-s42.mp4").stat().st_mtime_ns
    add_checkpoint(run_dir, "checkpoint-000006", loras[2])
    assert not evaluate.is_current(ws, cfg, ws.read_success(out))  # the marker is stale now
    r3 = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))
    assert r3.counts == {"checkpoints_evaluated": 1, "checkpoints_total": 3, "videos": 1}
    assert not r3.reused and r3.key == r1.key
    assert list(evaluate.read_index(ws).checkpoint) == [
        "base",
        "checkpoint-000002",
        "checkpoint-000004",
        "checkpoint-000006",
    ]
    assert (out / "base" / "p00-s42.mp4").stat().st_mtime_ns == base_mtime
    assert r3.stats["checkpoints"] == [
        "base",
        "checkpoint-000002",
        "checkpoint-000004",
        "checkpoint-000006",
    ]
    assert not list(out.glob(".tmp-*"))

    # A crash after committing units but before the index append: the committed folders
    # are taken back into the index from their metrics, nothing is generated again.
    evaluate.index_path(ws).unlink()
    (out / "_SUCCESS.json").unlink()
    r4 = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))
    assert r4.counts["videos"] == 0 and len(evaluate.read_index(ws)) == 4
    assert r4.stats["clip_score"] == r3.stats["clip_score"]


def test_eval_key_follows_eval_settings_only(tmp_path, models):
    cfg = make_cfg(tmp_path, models)
    assert evaluate.eval_key(cfg) == evaluate.eval_key(make_cfg(tmp_path, models, device="cuda"))
    assert evaluate.eval_key(cfg) != evaluate.eval_key(make_cfg(tmp_path, models, steps=3))
    # One eval key covers every run: the train key changes key_of only.
    k1 = evaluate.key_of(cfg, {"train": "a", "check": "c"})
    assert k1 != evaluate.key_of(cfg, {"train": "b", "check": "c"})
    assert (
        evaluate.output_dir(Workspace(tmp_path), cfg, k1, {"train": "a", "check": "c"}).name == "a"
    )


def test_rejects_shapes_the_model_cannot_generate(tmp_path, models):
    with pytest.raises(ValueError, match="8k\\+1"):
        make_cfg(tmp_path, models, frames=10)
    with pytest.raises(ValueError, match="got 13: the VAE decodes"):  # 4k+1, comes out as 16
        make_cfg(tmp_path, models, frames=13)
    with pytest.raises(ValueError, match="multiples of 16"):
        make_cfg(tmp_path, models, height=72)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_on_gpu_in_half_precision_and_releases_memory(tmp_path, models, loras):
    ec = make_cfg(tmp_path, models, device="cuda").evaluate
    pipe = evaluate.load_pipeline(str(models["cogvideox"]), "cuda")
    assert pipe.transformer.dtype == torch.float16  # 2B-type on GPU
    base = evaluate.generate(pipe, ec, PROMPT, 42, "cuda")
    with evaluate.lora(pipe, loras[0].parent, "step_000002"):
        tuned = evaluate.generate(pipe, ec, PROMPT, 42, "cuda")
    assert np.abs(tuned.astype(int) - base).mean() > 1.0
    np.testing.assert_array_equal(evaluate.generate(pipe, ec, PROMPT, 42, "cuda"), base)
    del pipe
    torch.cuda.empty_cache()

    cfg = make_cfg(tmp_path / "ws", models, device="cuda")
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-gpu"
    add_checkpoint(run_dir, "checkpoint-000002", loras[0])
    before = torch.cuda.memory_allocated()
    result = evaluate.run_evaluate(ws, cfg, upstream_for(run_dir))
    assert result.counts == {"checkpoints_evaluated": 1, "checkpoints_total": 1, "videos": 2}
    assert torch.cuda.memory_allocated() <= before  # pipeline and CLIP released


def _heldout_check(folder: Path, videos: dict[str, Path], n: int) -> StageResult:
    """A check output whose held-out split is the first `n` shapes clips (and one kept-out)."""
    from cogpipe.video import probe_video

    rows = []
    for i in range(1, n + 2):
        path = videos[f"shapes_{i:02d}.mp4"]
        info, _ = probe_video(path)
        rows.append(
            {
                "clip_id": f"clip{i}",
                "path": str(path),
                "start": 0.0,
                "end": info["duration"],
                "split": "heldout",
                "keep": i <= n,
            }
        )
    write_table(folder / "clips.parquet", pd.DataFrame(rows))
    return StageResult("check", f"check-{n}", str(folder))


def test_frechet_distance_to_held_out_clips(tmp_path, models, loras, sample_videos):
    from cogpipe.samples import write_tiny_videomae

    features = write_tiny_videomae(tmp_path / "videomae")
    cfg = make_cfg(
        tmp_path / "ws", models, seeds=[1, 2], video_features=str(features), fd_min_samples=2
    )
    ws = Workspace(cfg.workspace)
    run_dir = ws.root / "train" / "run-f"
    add_checkpoint(run_dir, "checkpoint-000002", loras[0])

    upstream = {
        "train": StageResult("train", "run-f", str(run_dir)),
        "check": _heldout_check(tmp_path / "check3", sample_videos, 3),
    }
    result = evaluate.run_evaluate(ws, cfg, upstream)
    index = evaluate.read_index(ws)
    fd = index.fd_videomae
    assert len(index) == 2 and (fd > 0).all() and np.isfinite(fd).all()
    assert (index.fd_videomae_low <= index.fd_videomae_high).all() and index.fd_note.isna().all()
    (cache,) = (ws.root / "evaluate" / evaluate.eval_key(cfg)).glob("real-features-*.npy")
    assert np.load(cache).shape == (3, 32)  # three held-out clips, tiny VideoMAE width
    assert "| fd videomae |" in (Path(result.path) / "report.md").read_text()


def test_index_holds_one_row_per_unit_in_step_order(tmp_path):
    """Whichever process commits first, the index reads the same: one row per (ekey, run,
    checkpoint), each run's rows by step, runs in the order they first appeared; an index
    doubled by concurrent runs of an older version is repaired at the next write."""
    ws = Workspace(tmp_path)
    summary = {"clip_score": 30.0, "videos": 1}
    base = {"ekey": "e", "run": "r", "checkpoint": "base", "step": 0, **summary}
    write_table(evaluate.index_path(ws), pd.DataFrame([base, base]))
    for name in ("checkpoint-000004", "checkpoint-000002"):  # committed out of order
        evaluate.upsert_index(ws, "e", "r", name, summary)
    evaluate.upsert_index(ws, "e", "q", "base", summary)
    evaluate.upsert_index(ws, "e", "r", "checkpoint-000002", summary | {"clip_score": 31.0})
    evaluate.upsert_index(ws, "e", "r", "base", summary | {"clip_score": 9.0}, replace=False)
    index = evaluate.read_index(ws)
    assert list(index.columns) == evaluate.INDEX_COLUMNS
    assert index[["run", "checkpoint", "step", "clip_score"]].values.tolist() == [
        ["r", "base", 0, 30.0],
        ["r", "checkpoint-000002", 2, 31.0],
        ["r", "checkpoint-000004", 4, 30.0],
        ["q", "base", 0, 30.0],
    ]
