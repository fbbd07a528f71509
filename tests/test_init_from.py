"""`train.init_from`: a new run that continues a LoRA or a full fine-tune from existing
weights, keyed by their content, refusing weights the config cannot take.

Continuation is checked on a one-sample dataset with the draws of the source's last
step replayed as the new run's first (`train.generator` patched): the new run's first
loss is then the source's last loss computed again, from the checkpoint that step
started from, and a fresh run given the same draws is measurably off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import fake_precompute, tiny_run_config, tiny_train
from safetensors.torch import load_file, save_file

from cogpipe import train
from cogpipe import train_sweep as sweeps
from cogpipe.config import ConfigError, PipelineConfig, TrainConfig, load_config
from cogpipe.evaluate import eval_key
from cogpipe.workspace import Workspace, no_progress, write_table

LORA = "pytorch_lora_weights.safetensors"
TRAIN = tiny_train(
    learning_rate=1e-2, lr_scheduler="constant", max_steps=3, checkpoint_every=1, batch_size=1
)


@pytest.fixture
def setup(tmp_path, tiny_models):
    ws = Workspace(tmp_path / "ws")
    # one 9 x 64 x 64 sample (latents [3, 4, 8, 8], embeds [16, 32])
    upstream = {"precompute": fake_precompute(ws.root / "precompute" / "one", 1, key="one")}

    def make(name: str, **overrides) -> PipelineConfig:
        return tiny_run_config(ws.root, tiny_models["cogvideox"], name, **TRAIN | overrides)

    def run(name: str, progress=no_progress, **overrides):
        return train.run_train(ws, make(name, **overrides), upstream, progress)

    return ws, make, run


def _losses(result) -> list[float]:
    lines = (Path(result.path) / "losses.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _replay_step(monkeypatch, source_step: int) -> None:
    """Give step 1 of every run the draws of step `source_step` (same seed)."""
    real = train.generator

    def replayed(*parts):
        if parts[0] == "step" and parts[2] == 1:
            parts = ("step", parts[1], source_step)
        return real(*parts)

    monkeypatch.setattr(train, "generator", replayed)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_new_run_continues_where_the_source_left_off(setup, monkeypatch, mode):
    ws, make, run = setup
    source = run("source", mode=mode)
    last = _losses(source)[-1]  # step 3, computed from the weights of checkpoint-000002
    _replay_step(monkeypatch, 3)

    cont = run("cont", mode=mode, max_steps=1, init_from=Path(source.path) / "checkpoint-000002")
    assert _losses(cont) == [pytest.approx(last, rel=1e-5)]
    assert cont.stats["resumed_from_step"] == 0  # a new run: step and optimizer start fresh
    fresh = run("fresh", mode=mode, max_steps=1)  # the base model on the same batch and draws
    assert abs(_losses(fresh)[0] - last) > 1e-3 * last

    record = json.loads((Path(cont.path) / "run.json").read_text())["init_from"]
    assert record["kind"] == mode and "checkpoint-000002" in record["chosen"]


def test_the_key_holds_the_weights_content_not_their_path(setup, tmp_path):
    ws, make, run = setup
    source = Path(run("source").path)
    copy = tmp_path / "elsewhere" / "my.safetensors"
    copy.parent.mkdir()
    shutil.copy(source / "checkpoint-000003" / LORA, copy)

    def key(init_from) -> str:
        return train.key_of(make("x", init_from=init_from), {"precompute": "one"})

    # A run folder means its last checkpoint; a copy of the same file is the same weights.
    assert key(source) == key(source / "checkpoint-000003") == key(copy)
    assert key(source / "checkpoint-000002") != key(copy)
    assert key(None) == train.key_of(make("x"), {"precompute": "one"})
    assert "init_from" not in TrainConfig().key_fields()  # earlier runs keep their keys
    save_file({k: v + 1 for k, v in load_file(copy).items()}, str(copy))
    assert key(copy) != key(source)

    # Relative to the config file, as the workspace is.
    (tmp_path / "c.yaml").write_text("train: {init_from: elsewhere/my.safetensors}\n")
    assert load_config(tmp_path / "c.yaml").train.init_from == copy

    # A full transformer: a folder holding transformer/ (a model, a full checkpoint) or that folder.
    model = Path(make("x").model)
    for given in (model, model / "transformer"):
        assert train.init_source(given, "full")[:2] == ("full", model)


def test_the_sweeps_best_cell_seeds_the_full_run(setup):
    ws, make, run = setup
    base, grid = make("s", max_steps=2), {"train.learning_rate": [1e-2, 1e-3]}
    cells = sweeps.cells(base, grid)
    for name, cell in cells:
        run(name, **cell.train.model_dump(include={"learning_rate", "max_steps"}))
    ek, scores = eval_key(base), {"checkpoint-000001": 0.2, "checkpoint-000002": 0.4}
    index = pd.DataFrame(
        [
            {
                "ekey": ek,
                "run": name,
                "checkpoint": c,
                "step": int(c[-6:]),
                "clip_score": s + i / 10,
                "clip_score_low": s + i / 10 - 0.01,
                "clip_score_high": s + i / 10 + 0.01,
                "videos": 2,
                "evaluated_at": "",
            }
            for i, (name, _) in enumerate(cells)
            for c, s in scores.items()
        ]
    )
    write_table(ws.root / "evaluate" / "index.parquet", index)
    folder = ws.root / "sweeps" / "train" / "s"
    sweeps.write_report(folder, sweeps.results(ws, base, grid, "clip_score"), "clip_score", grid)

    seeded = run("all-data", max_steps=1, init_from=folder)
    best = ws.root / "train" / cells[1][0] / "checkpoint-000002"  # lr 1e-3 scores higher
    record = json.loads((Path(seeded.path) / "run.json").read_text())["init_from"]
    assert record["weights"] == str(best / LORA) and "first-ranked cell" in record["chosen"]
    assert seeded.key == train.key_of(make("x", max_steps=1, init_from=best), {"precompute": "one"})


def test_resume_wins_over_init_from(setup):
    ws, make, run = setup
    start = Path(run("source").path) / "checkpoint-000002"
    uninterrupted = run("whole", init_from=start)

    def stop_at_2(step, total, note):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("cut", stop_at_2, init_from=start)
    resumed = run("cut", init_from=start)
    assert resumed.stats["resumed_from_step"] == 2
    assert _losses(resumed) == _losses(uninterrupted)


def test_weights_the_config_cannot_take_are_refused_naming_both_values(setup, tmp_path):
    ws, make, run = setup
    lora_run = Path(run("source", max_steps=1).path)
    lora = lora_run / "checkpoint-000001"
    full = Path(run("full", mode="full", max_steps=1).path) / "checkpoint-000001"

    def refused(match: str, name: str, **overrides) -> None:
        with pytest.raises(ConfigError, match=match):
            run(name, max_steps=1, **overrides)
        assert not (ws.root / "train" / name / "checkpoint-000001").exists()

    file = lora / LORA
    refused(rf"{file} is a LoRA with rank 4, train.rank is 8", "r8", init_from=lora, rank=8)
    refused(r"alpha 8.0, train.alpha is 4", "a4", init_from=lora, alpha=4)
    refused(
        r"target_modules \['to_k', 'to_out.0', 'to_q', 'to_v'\], train.target_modules is "
        r"\['to_q', 'to_v'\]",
        "t2",
        init_from=lora,
        target_modules=["to_q", "to_v"],
    )
    refused(r"is a LoRA, but train.mode full", "lf", init_from=lora, mode="full")
    refused(r"holds a whole transformer, but train.mode lora", "fl", init_from=full)
    refused(r"does not exist", "none", init_from=tmp_path / "nothing")
    generation_sweep = tmp_path / "sweeps" / "guidance"  # `cogpipe sweep`'s table: no runs
    generation_sweep.mkdir(parents=True)
    write_table(generation_sweep / "results.parquet", pd.DataFrame([{"cell": "guidance=1"}]))
    refused(r"is not a training sweep's report folder", "gen", init_from=generation_sweep)

    # Another architecture: a LoRA whose tensors have other shapes, a transformer of other size.
    other = tmp_path / "other.safetensors"
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    tensors[name] = torch.zeros(4, 64)
    save_file(tensors, str(other), metadata=_metadata(file))
    refused(
        rf"{other}: {name.removeprefix('transformer.')} is \[4, 64\], the model's adapter"
        r" needs \[4, 32\]: another architecture",
        "arch",
        init_from=other,
    )
    bare = tmp_path / "bare.safetensors"  # no adapter metadata: the rank is read from the shapes
    save_file(load_file(file), str(bare))
    refused(rf"{bare} is a LoRA with rank 4, train.rank is 8", "bare", init_from=bare, rank=8)
    bigger = tmp_path / "bigger"
    shutil.copytree(full, bigger)
    config = bigger / "transformer" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"num_layers": 4}))
    refused(
        rf"{config} has num_layers 4, the model \(.*\) 2: another architecture",
        "arch-full",
        init_from=bigger,
        mode="full",
    )
    # A config.json of another diffusers release leaves out keys at their defaults: the same.
    config.write_text(
        (full / "transformer" / "config.json").read_text().replace('"patch_bias": true,', "")
    )
    assert "patch_bias" not in config.read_text()
    train.check_init(train.init_source(bigger, "full"), make("x", mode="full"))


def _metadata(file: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return f.metadata()
