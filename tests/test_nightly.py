"""The nightly `evaluate-checkpoints` flow on Prefect's ephemeral API: checkpoints arrive
over time in training runs of two base models; each run is evaluated against its own base,
a broken run is reported without stopping the others, and each flow run evaluates only
what is new."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_sampling
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


def new_run(ws: Workspace, name: str, key: str, model: Path | None = None) -> Path:
    """A run folder with the trainer's run.json (the resolved config: here its base model)."""
    run_dir = ws.root / "train" / name
    run_dir.mkdir(parents=True)
    config = {"model": str(model)} if model else {}
    (run_dir / "run.json").write_text(json.dumps({"key": key, "config": config}))
    return run_dir


def second_model(models: dict[str, Path], folder: Path) -> Path:
    """A copy of the tiny CogVideoX whose transformer weights are moved (seeded): another
    base model, with another fingerprint."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    shutil.copytree(models["cogvideox"], folder)
    transformer = CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    transformer.save_pretrained(folder / "transformer")
    return folder


def test_each_nightly_run_evaluates_only_new_checkpoints(tmp_path, sample_videos, tiny_models):
    from cogpipe_flows.evaluate_checkpoints import RunsFailed, evaluate_checkpoints

    videos = Path(next(iter(sample_videos.values()))).parent
    settings = tiny_sampling(prompts=["a slap"], seeds=[42], clip_model=str(tiny_models["clip"]))
    evaluate = EvaluateConfig(**settings, bootstrap=100)
    cfg = PipelineConfig(
        workspace=tmp_path / "ws",
        model=str(tiny_models["cogvideox"]),
        ingest=IngestConfig(source=videos, workers=1),
        check=CheckConfig(workers=1),
        precompute={"frames": 9},
        evaluate=evaluate,
    )
    with pytest.raises(StageNotReady, match="check stage finished"):
        evaluate_checkpoints(cfg)
    run_stage(cfg, "ingest")
    run_stage(cfg, "check")

    ws = Workspace(cfg.workspace)
    other = second_model(tiny_models, tmp_path / "other-model")
    loras = [make_lora(tiny_models["cogvideox"], tmp_path / f"lora{i}", seed=i) for i in range(3)]
    run_a = new_run(ws, "run-a", "key-a")
    add_checkpoint(run_a, 100, loras[0])
    add_checkpoint(run_a, 200, loras[1])
    (run_a / ".tmp-checkpoint-000300-1234").mkdir()  # being written: not picked up
    broken = new_run(ws, "run-broken", "key-x")
    add_checkpoint(broken, 100, loras[0])
    (broken / "checkpoint-000100" / LORA_FILE).write_bytes(b"not safetensors")
    run_b = new_run(ws, "run-c", "key-c", model=other)  # trained on the other base model
    add_checkpoint(run_b, 100, loras[2])

    with pytest.raises(RunsFailed, match="1 of 3 runs failed: .*run-broken"):
        evaluate_checkpoints(cfg)  # the broken run fails; run-c after it is still evaluated
    index = read_index(ws)
    ekey_a, ekey_c = eval_key(cfg), eval_key(cfg.model_copy(update={"model": str(other)}))
    assert ekey_a != ekey_c
    assert index[["ekey", "run", "checkpoint"]].values.tolist() == [
        [ekey_a, "run-a", "base"],
        [ekey_a, "run-a", "checkpoint-000100"],
        [ekey_a, "run-a", "checkpoint-000200"],
        [ekey_a, "run-broken", "base"],  # committed before its checkpoint failed
        [ekey_c, "run-c", "base"],
        [ekey_c, "run-c", "checkpoint-000100"],
    ]
    base_a = ws.root / "evaluate" / ekey_a / "run-a" / "base" / "p00-s42.mp4"
    base_c = ws.root / "evaluate" / ekey_c / "run-c" / "base" / "p00-s42.mp4"
    assert base_a.read_bytes() != base_c.read_bytes()  # each run against its own base

    shutil.rmtree(broken)
    assert evaluate_checkpoints(cfg) == {"run-a": 0, "run-c": 0}
    add_checkpoint(run_a, 300, loras[2])
    new_run(ws, "run-b", "key-b")  # a second run starts with nothing committed
    assert evaluate_checkpoints(cfg) == {"run-a": 1, "run-b": 0, "run-c": 0}
    index = read_index(ws)
    assert index[index.run == "run-a"].checkpoint.tolist()[-1] == "checkpoint-000300"
    assert index[index.run == "run-b"].checkpoint.tolist() == ["base"]
    assert len(list((ws.root / "cache" / "evaluate-base").glob("*.mp4"))) == 2  # one per model
