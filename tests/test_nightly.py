"""The nightly `evaluate-checkpoints` flow on Prefect's ephemeral API: checkpoints arrive
over time in two training runs and each flow run evaluates only what is new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_evaluate import make_lora

from cogpipe.config import CheckConfig, EvaluateConfig, IngestConfig, PipelineConfig
from cogpipe.evaluate import LORA_FILE, eval_key, read_index
from cogpipe.pipeline import run_stage
from cogpipe.workspace import StageNotReady, Workspace

pytestmark = pytest.mark.prefect


def add_checkpoint(run_dir: Path, step: int, lora: Path) -> None:
    """Written the way the trainer commits it: a temporary folder renamed into place."""
    tmp = run_dir / f".tmp-checkpoint-{step:06d}-0000"
    tmp.mkdir(parents=True)
    shutil.copy(lora, tmp / LORA_FILE)
    tmp.rename(run_dir / f"checkpoint-{step:06d}")


def new_run(ws: Workspace, name: str, key: str) -> Path:
    run_dir = ws.root / "train" / name
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"key": key}))
    return run_dir


def test_each_nightly_run_evaluates_only_new_checkpoints(tmp_path, sample_videos, tiny_models):
    from cogpipe_flows.evaluate_checkpoints import evaluate_checkpoints

    videos = Path(next(iter(sample_videos.values()))).parent
    evaluate = EvaluateConfig(prompts=["a slap"], seeds=[42], steps=2, frames=9, height=64,
                              width=64, clip_model=str(tiny_models["clip"]), device="cpu")  # fmt: skip
    cfg = PipelineConfig(workspace=tmp_path / "ws", model=str(tiny_models["cogvideox"]),
                         ingest=IngestConfig(source=videos, workers=1),
                         check=CheckConfig(workers=1), evaluate=evaluate)  # fmt: skip
    with pytest.raises(StageNotReady, match="check stage finished"):
        evaluate_checkpoints(cfg)
    run_stage(cfg, "ingest")
    run_stage(cfg, "check")

    ws = Workspace(cfg.workspace)
    loras = [make_lora(tiny_models["cogvideox"], tmp_path / f"lora{i}", seed=i) for i in range(3)]
    run_a = new_run(ws, "run-a", "key-a")
    add_checkpoint(run_a, 100, loras[0])
    add_checkpoint(run_a, 200, loras[1])
    (run_a / ".tmp-checkpoint-000300-1234").mkdir()  # being written: not picked up

    assert evaluate_checkpoints(cfg) == {"run-a": 2}
    assert evaluate_checkpoints(cfg) == {"run-a": 0}
    add_checkpoint(run_a, 300, loras[2])
    run_b = new_run(ws, "run-b", "key-b")  # a second run starts with nothing committed
    assert evaluate_checkpoints(cfg) == {"run-a": 1, "run-b": 0}

    index = read_index(ws)
    assert (index.ekey == eval_key(cfg)).all()
    assert index[["run", "checkpoint"]].values.tolist() == [
        ["run-a", "base"], ["run-a", "checkpoint-000100"], ["run-a", "checkpoint-000200"],
        ["run-a", "checkpoint-000300"], ["run-b", "base"],
    ]  # fmt: skip
    out = ws.root / "evaluate" / eval_key(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["run-a", "run-b"]
    assert (out / "run-a" / "checkpoint-000300" / "p00-s42.mp4").is_file()
    assert not run_b.joinpath("checkpoint-000100").exists()
