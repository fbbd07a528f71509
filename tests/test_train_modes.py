"""Training modes on the tiny CogVideoX: full fine-tune, IC-LoRA and TIC-FT.

For each mode: the loss falls on a two-sample overfit set, an interrupted run resumes to
the same numbers and weights, and the checkpoint holds what evaluation loads. IC-LoRA's
loss has no gradient at the reference positions; TIC-FT's buffer frames are fed at the
scheduled noise levels. The precompute output is written by the test (seeded random
latents in the real shard and index format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fake_precompute, seeded_loss, tiny_sampling, tiny_train
from safetensors.torch import load_file

from cogpipe import evaluate, generate, precompute, train
from cogpipe.config import ConfigError, PipelineConfig, TicFtConfig, TrainConfig, load_config
from cogpipe.models import cogvideox
from cogpipe.workspace import StageResult, Workspace

ROOT = Path(__file__).resolve().parents[1]
TARGETS = TrainConfig().target_modules
TINY_TIC_FT = TicFtConfig(condition_frames=1, buffer_frames=2, target_frames=2)  # 5 latent frames
TRAIN = tiny_train(
    learning_rate=1e-2, lr_scheduler="constant", max_steps=10, checkpoint_every=5, batch_size=2
)
MODES = {  # mode -> (train overrides, precompute overrides, latent frames, with references)
    "full": (dict(learning_rate=1e-3), {}, 3, False),
    "ic-lora": ({}, dict(reference="cogpipe.condition:canny"), 3, True),
    "tic-ft": (dict(tic_ft=TINY_TIC_FT.model_dump()), dict(frames=17), 5, False),
}


@pytest.fixture
def setup(tmp_path, tiny_models):
    """(workspace, make(mode, name, **train overrides) -> config, make_upstream(mode))."""
    ws = Workspace(tmp_path / "ws")

    def make(mode: str, name: str | None = None, **overrides) -> PipelineConfig:
        train_fields, pre_fields, _, _ = MODES[mode]
        t = TrainConfig(**(TRAIN | {"mode": mode} | train_fields | overrides))
        return PipelineConfig.model_validate(
            {
                "workspace": ws.root,
                "name": name,
                "model": str(tiny_models["cogvideox"]),
                "train": t.model_dump(),
                "precompute": pre_fields,
            }
        )

    def upstream(mode: str) -> dict:
        _, _, frames, references = MODES[mode]
        folder = ws.root / "precompute" / mode
        if not (folder / "index.parquet").is_file():
            fake_precompute(folder, latent_frames=frames, references=references)
        return {"precompute": StageResult("precompute", "p1", str(folder))}

    return ws, make, upstream


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def _stop_at(step_to_stop: int):
    def progress(step, total, note):
        if step == step_to_stop:
            raise KeyboardInterrupt(f"killed at step {step}")

    return progress


def _fixed_loss(transformer, model: str, cfg: PipelineConfig, pre: Path, draws: int = 16) -> float:
    """The mode's loss on both samples averaged over fixed timestep and noise draws."""
    t = cfg.train
    samples = train.load_samples(pre)
    batch = train.load_batch(pre, samples, [0, 1], t.mode == "ic-lora")
    scheduler = cogvideox.load_scheduler(model)
    reference = batch[2] if t.mode == "ic-lora" else None
    tic_ft = t.tic_ft if t.mode == "tic-ft" else None
    with torch.no_grad():
        losses = [
            seeded_loss(
                transformer, scheduler, batch[0], batch[1], d, reference=reference, tic_ft=tic_ft
            ).item()
            for d in range(draws)
        ]
    return sum(losses) / draws


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    files = [checkpoint / cogvideox.LORA_FILE]
    if evaluate.is_full(checkpoint):
        files = sorted((checkpoint / cogvideox.FULL_FOLDER).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("mode", ["full", "ic-lora", "tic-ft"])
def test_loss_falls_and_an_interrupted_run_resumes_to_the_same_weights(
    setup, tiny_models, mode, monkeypatch
):
    ws, make, upstream = setup
    model = str(tiny_models["cogvideox"])
    sequences = []
    make_sequence = train.tic_ft_sequence

    def spy(scheduler, latents, noise, timesteps, layout):
        sequences.append(layout)
        return make_sequence(scheduler, latents, noise, timesteps, layout)

    monkeypatch.setattr(train, "tic_ft_sequence", spy)
    cfg = make(mode, "whole")
    whole = train.run_train(ws, cfg, upstream(mode))
    run = Path(whole.path)
    assert sequences == ([TINY_TIC_FT] * 10 if mode == "tic-ft" else [])  # each step is TIC-FT
    assert whole.stats["mode"] == mode
    expected = _losses(run)
    assert len(expected) == 10 and sum(expected[-3:]) < 0.9 * sum(expected[:3])

    # Killed after step 7: resumes from checkpoint 5 to the same losses and weights.
    resumed_cfg = make(mode, "resumed")
    with pytest.raises(KeyboardInterrupt):
        train.run_train(ws, resumed_cfg, upstream(mode), _stop_at(7))
    resumed = train.run_train(ws, resumed_cfg, upstream(mode))
    assert resumed.stats["resumed_from_step"] == 5
    assert _losses(Path(resumed.path)) == expected
    a, b = _weights(run / "checkpoint-000010"), _weights(Path(resumed.path) / "checkpoint-000010")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The trained weights, loaded the way evaluation loads them, lower the loss on fixed draws.
    pre = Path(upstream(mode)["precompute"].path)
    base = cogvideox.load_transformer(model, "cpu", torch.float32)
    before = _fixed_loss(base, model, cfg, pre)
    if mode == "full":
        from diffusers import CogVideoXTransformer3DModel

        trained = CogVideoXTransformer3DModel.from_pretrained(
            str(run / "checkpoint-000010" / "transformer")
        )
    else:
        trained = cogvideox.load_transformer(model, "cpu", torch.float32)
        cogvideox.add_lora(trained, 4, 8, TARGETS)
        cogvideox.load_lora(trained, run / "checkpoint-000010")
    after = _fixed_loss(trained, model, cfg, pre)
    assert after < 0.85 * before


def test_full_checkpoints_hold_the_transformer_and_evaluate_and_generate_load_it(
    setup, tiny_models
):
    from diffusers import CogVideoXPipeline

    ws, make, upstream = setup
    model = str(tiny_models["cogvideox"])
    res = train.run_train(ws, make("full", max_steps=4, checkpoint_every=2), upstream("full"))
    run = Path(res.path)
    ckpt = run / "checkpoint-000004"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "state.json",
        "training_state.pt",
        "transformer",
    ]
    assert sorted(p.name for p in (ckpt / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert res.stats["lora_scale"] is None
    assert res.stats["trainable_params"] == sum(
        p.numel() for p in cogvideox.load_transformer(model, "cpu", torch.float32).parameters()
    )
    saved = _weights(ckpt)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert list(evaluate.list_checkpoints(run)) == ["checkpoint-000002", "checkpoint-000004"]

    pipe = evaluate.load_pipeline(model, "cpu")
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with evaluate.lora(pipe, ckpt, "step_000004"):
        inside = pipe.transformer.state_dict()
        assert inside.keys() == saved.keys() and all(
            torch.equal(inside[k], saved[k]) for k in saved
        )
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)  # the base is back

    loaded = generate.load(generate.GenerateOptions(model=model, transformer=ckpt, device="cpu"))
    assert isinstance(loaded, CogVideoXPipeline)
    state = loaded.transformer.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    with pytest.raises(generate.GenerateError, match="full fine-tune .* pass it as --transformer"):
        generate.lora_file(ckpt)
    with pytest.raises(generate.GenerateError, match="no transformer there"):
        generate.transformer_folder(run)


def test_full_fine_tune_with_bf16_weights(setup):
    ws, make, upstream = setup
    res = train.run_train(
        ws, make("full", max_steps=2, checkpoint_every=2, master_weights="bf16"), upstream("full")
    )
    assert all(
        v.dtype == torch.bfloat16 for v in _weights(Path(res.path) / "checkpoint-000002").values()
    )
    assert all(map(torch.isfinite, map(torch.tensor, _losses(Path(res.path)))))


def test_ic_lora_loss_has_no_gradient_at_the_reference_positions(tiny_models):
    model = str(tiny_models["cogvideox"])
    transformer = cogvideox.load_transformer(model, "cpu", torch.float32)
    cogvideox.add_lora(transformer, 4, 8, TARGETS)
    scheduler = cogvideox.load_scheduler(model)
    g = torch.Generator().manual_seed(0)
    latents, reference = (
        torch.randn(2, 3, 4, 8, 8, generator=g),
        torch.randn(2, 3, 4, 8, 8, generator=g),
    )
    embeds = torch.randn(2, 16, 32, generator=g)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["input"] = kwargs["hidden_states"]
        output[0].retain_grad()
        seen["output"] = output[0]

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    loss = seeded_loss(transformer, scheduler, latents, embeds, 1, reference=reference)
    loss.backward()
    handle.remove()
    fed, grad = seen["input"], seen["output"].grad
    assert fed.shape == grad.shape == (2, 6, 4, 8, 8)  # reference then target along frames
    assert torch.equal(fed[:, :3], reference)  # clean
    assert (fed[:, 3:] - latents).abs().mean() > 0.01  # noised
    assert torch.count_nonzero(grad[:, :3]) == 0  # exactly zero: the loss covers the target only
    assert torch.count_nonzero(grad[:, 3:]) == grad[:, 3:].numel()


def test_buffer_timesteps_rise_from_clean_to_the_target():
    t = torch.tensor([999, 600, 250, 100, 0])
    assert train.buffer_timesteps(t, 3, 1000).tolist() == [
        [250, 500, 750],
        [250, 500, 600],
        [250, 250, 250],
        [100, 100, 100],
        [0, 0, 0],
    ]
    assert train.buffer_timesteps(t[:1], 1, 1000).tolist() == [[500]]
    assert train.buffer_timesteps(t, 0, 1000).shape == (5, 0)
    levels = train.buffer_timesteps(torch.arange(1000), 4, 1000)
    assert (levels.diff(dim=1) >= 0).all() and (levels <= torch.arange(1000)[:, None]).all()


def test_tic_ft_feeds_buffer_frames_at_their_scheduled_noise_levels(tiny_models):
    model = str(tiny_models["cogvideox"])
    transformer = cogvideox.load_transformer(model, "cpu", torch.float32)
    scheduler = cogvideox.load_scheduler(model)
    layout = TicFtConfig(condition_frames=1, buffer_frames=3, target_frames=2)
    latents = torch.randn(2, 6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))

    def draws(seed: int):  # the timesteps and noise diffusion_loss draws from its generator
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 1000, (2,), generator=g), torch.randn(latents.shape, generator=g)

    # A seed whose targets sit above every buffer level and between the last two of them.
    seed = next(s for s in range(1000) if draws(s)[0][0] > 750 and 500 < draws(s)[0][1] < 750)
    timesteps, noise = draws(seed)
    seen = {}
    handle = transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True
    )
    with torch.no_grad():
        seeded_loss(transformer, scheduler, latents, embeds, seed, tic_ft=layout)
    handle.remove()
    fed = seen["hidden_states"]
    assert torch.equal(seen["timestep"], timesteps)  # the model is told the target's timestep

    def level(b: int, f: int) -> list[int]:
        """Every timestep whose noise mix of this frame's latents and noise is the frame fed."""
        x, n = latents[b, f].expand(1000, -1, -1, -1), noise[b, f].expand(1000, -1, -1, -1)
        mixes = scheduler.add_noise(x, n, torch.arange(1000))
        return [tau for tau in range(1000) if torch.equal(mixes[tau], fed[b, f])]

    expected = train.buffer_timesteps(timesteps, 3, 1000).tolist()
    assert expected[0] == [250, 500, 750] and expected[1] == [250, 500, int(timesteps[1])]
    for b in range(2):
        assert torch.equal(fed[b, 0], latents[b, 0])  # the condition frame stays clean
        assert [level(b, f) for f in (1, 2, 3)] == [[tau] for tau in expected[b]]
        assert [level(b, f) for f in (4, 5)] == [[int(timesteps[b])]] * 2


def test_tic_ft_loss_covers_the_target_frames_only(tiny_models):
    model = str(tiny_models["cogvideox"])
    transformer = cogvideox.load_transformer(model, "cpu", torch.float32)
    cogvideox.add_lora(transformer, 4, 8, TARGETS)
    scheduler = cogvideox.load_scheduler(model)
    latents = torch.randn(1, 5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    seen = {}

    def hook(module, args, kwargs, output):
        output[0].retain_grad()
        seen["output"] = output[0]

    transformer.register_forward_hook(hook, with_kwargs=True)
    seeded_loss(transformer, scheduler, latents, embeds, 2, tic_ft=TINY_TIC_FT).backward()
    grad = seen["output"].grad  # [1, 5, 4, 8, 8]: condition, 2 buffers, 2 targets
    assert torch.count_nonzero(grad[:, :3]) == 0
    assert torch.count_nonzero(grad[:, 3:]) == grad[:, 3:].numel()


def test_tic_ft_run_writes_validation_videos_of_its_target_frames(setup, tiny_models):
    from test_validation import decode

    from cogpipe import validation
    from cogpipe.config import EvaluateConfig

    ws, make, upstream = setup
    evaluate_cfg = EvaluateConfig(
        **tiny_sampling(prompts=["a slap"], seeds=[1], clip_model="unused")
    )
    cfg = make("tic-ft", max_steps=2, checkpoint_every=2, validation_every=2)
    res = train.run_train(ws, cfg.model_copy(update={"evaluate": evaluate_cfg}), upstream("tic-ft"))
    assert res.counts["validations"] == 1
    folder = validation.folder_of(Path(res.path), 2)
    assert sorted(p.name for p in folder.iterdir()) == ["p00-condition.mp4", "p00-s1.mp4"]
    assert decode(folder / "p00-s1.mp4").shape == (8, 64, 64, 3)  # 2 target latent frames


def test_modes_refuse_samples_they_cannot_use(setup):
    ws, make, upstream = setup
    with pytest.raises(
        ValueError, match=r"index.parquet has no reference latents: train.mode ic-lora"
    ):
        train.run_train(ws, make("ic-lora"), upstream("full"))
    error = r"index.parquet: sample clip0 has 3 latent frames, but train.tic_ft asks for .* = 5"
    with pytest.raises(ValueError, match=error):
        train.run_train(ws, make("tic-ft"), upstream("full"))


# --------------------------------------------------------------------------- configs


def test_lora_configs_keep_their_keys():
    """Pinned before modes existed: a LoRA config's precompute and train keys (and with
    them every cached result) are what they were."""
    cfg = PipelineConfig()
    assert precompute.key_of(cfg, {"filter": "f", "check": "c"}) == "5dbc70b50379"
    assert train.key_of(cfg, {"precompute": "p"}) == "925ac8c6ee07"
    lora = PipelineConfig(
        train=TrainConfig(tic_ft=TicFtConfig(buffer_frames=5), master_weights="bf16")
    )
    assert train.key_of(lora, {"precompute": "p"}) == "925ac8c6ee07"  # other modes' fields


def test_each_mode_keys_only_its_own_fields():
    full = TrainConfig(mode="full")
    assert "rank" not in full.key_fields() and full.key_fields()["master_weights"] == "fp32"
    assert TrainConfig(mode="full", rank=8).key_fields() == full.key_fields()
    tic = TrainConfig(mode="tic-ft").key_fields()
    assert tic["mode"] == "tic-ft" and tic["tic_ft"] == {
        "condition_frames": 1,
        "buffer_frames": 3,
        "target_frames": 12,
    }
    assert "tic_ft" not in TrainConfig(mode="ic-lora").key_fields()


@pytest.mark.parametrize(
    ("yaml_text", "error"),
    [
        ("train:\n  mode: ic-lora\n", r"train.mode ic-lora needs precompute.reference"),
        ("train:\n  mode: tic-ft\n", r"needs precompute.frames 61, got 49"),
        (
            "train:\n  mode: tic-ft\n  tic_ft:\n    buffer_frames: 1\n    target_frames: 4\n"
            "precompute:\n  frames: 61\n",
            r"1 condition \+ 1 buffer \+ 4 target .*frames 21, got 61",
        ),
        ("train:\n  mode: qlora\n", r"train.mode"),
        ("precompute:\n  reference: not a path\n", r"precompute.reference"),
        ("precompute:\n  reference_options: {low: 5}\n", r"reference_options given without"),
    ],
)
def test_mode_settings_fail_at_load_with_the_reason(tmp_path, yaml_text, error):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=error) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_shipped_strategy_configs():
    conservative = load_config(ROOT / "configs" / "power-slap-conservative.yaml")
    aggressive = load_config(ROOT / "configs" / "power-slap-aggressive.yaml")
    tic_ft = load_config(ROOT / "configs" / "power-slap-tic-ft.yaml")
    t = conservative.train
    assert (t.mode, t.rank, t.learning_rate) == ("lora", 64, 1e-4)
    assert conservative.filter.select_top == 100
    t = aggressive.train
    assert (t.mode, t.rank, t.optimizer) == ("lora", 256, "adamw")
    assert t.learning_rate >= 5e-4 and t.weight_decay > 0
    assert t.max_steps > conservative.train.max_steps
    assert aggressive.filter.select_top >= 1000
    t = tic_ft.train
    assert t.mode == "tic-ft" and t.tic_ft == TicFtConfig(
        condition_frames=1, buffer_frames=3, target_frames=12
    )
    assert tic_ft.precompute.frames == 61 == t.tic_ft.video_frames  # 1 + 12 + 48 video frames
    assert t.validation_every == 500 and len(t.validation_prompts) == 3  # conditioned validation
    for c in (conservative, aggressive, tic_ft):  # held-out clips as the yardstick
        assert c.evaluate.heldout and c.evaluate.heldout_clips >= c.evaluate.fd_min_samples
    keys = {train.key_of(c, {"precompute": "p"}) for c in (conservative, aggressive, tic_ft)}
    assert len(keys) == 3
