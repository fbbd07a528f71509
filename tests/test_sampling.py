"""The shared sampler on the tiny CogVideoX: plain, IC-LoRA and TIC-FT videos, the noise
levels TIC-FT's buffer frames are fed, validation and `cogpipe generate` with conditions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_flags, tiny_sampling
from test_evaluate import make_lora
from test_validation import decode as read_mp4
from test_validation import lora_transformer

from cogpipe import evaluate, sampling, train, validation
from cogpipe.cli import main
from cogpipe.config import EvaluateConfig, PipelineConfig, TicFtConfig, TrainConfig
from cogpipe.video import write_mp4

PROMPT = "A fighter slaps his opponent and the crowd cheers."
LAYOUT = TicFtConfig(condition_frames=1, buffer_frames=2, target_frames=2)  # 17 frames
SETTINGS = EvaluateConfig(**tiny_sampling(prompts=[PROMPT], seeds=[42], fps=8, clip_model="unused"))


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return evaluate.load_pipeline(str(tiny_models["cogvideox"]), "cpu")


def frames_of(seed: int, count: int = 9) -> np.ndarray:
    """uint8 [count, 64, 64, 3]: a seeded random video."""
    return np.random.default_rng(seed).integers(0, 256, (count, 64, 64, 3), dtype=np.uint8)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b).mean())


def test_plain_sampling_is_what_evaluate_generates(pipe):
    expected = evaluate.generate(pipe, SETTINGS, PROMPT, 42, "cpu")
    got = sampling.sample(pipe, sampling.request_for(SETTINGS, PROMPT, 42))
    assert got.shape == (9, 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)  # the same numbers, not just close


def test_ic_lora_feeds_the_clean_reference_and_follows_it(pipe):
    black, white = np.zeros((9, 64, 64, 3), np.uint8), np.full((9, 64, 64, 3), 255, np.uint8)
    reference = sampling.Condition("ic-lora", frames=black)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        first = sampling.sample(
            pipe, sampling.request_for(SETTINGS, PROMPT, 42, condition=reference)
        )
    finally:
        handle.remove()
    assert first.shape == (9, 64, 64, 3)
    latents = sampling.condition_latents(
        pipe,
        sampling.request_for(SETTINGS, PROMPT, 42, condition=reference),
        3,
        "cpu",
        torch.float32,
    )
    assert len(seen) == 2 and all(x.shape == (2, 6, 4, 8, 8) for x in seen)  # guidance: 2 rows
    assert all(torch.equal(x[:, :3], latents.expand(2, -1, -1, -1, -1)) for x in seen)  # clean
    other = sampling.Condition("ic-lora", frames=white)
    second = sampling.sample(pipe, sampling.request_for(SETTINGS, PROMPT, 42, condition=other))
    assert diff(first, second) > 1.0  # the reference steers the video
    plain = evaluate.generate(pipe, SETTINGS, PROMPT, 42, "cpu")
    assert diff(first, plain) > 1.0
    with pytest.raises(ValueError, match="3 latent frames, needs 5"):
        sampling.sample(
            pipe, sampling.request_for(SETTINGS, PROMPT, 42, frames=17, condition=reference)
        )


def _tic_ft(condition: np.ndarray, seed: int = 42) -> sampling.SampleRequest:
    c = sampling.Condition("tic-ft", frames=condition, layout=LAYOUT)
    return sampling.request_for(SETTINGS, PROMPT, seed, frames=17, condition=c)


def test_tic_ft_condition_steers_the_target(pipe):
    first = sampling.sample(pipe, _tic_ft(np.zeros((1, 64, 64, 3), np.uint8)))
    assert first.shape == (8, 64, 64, 3)  # 2 target latent frames: 4 video frames each
    second = sampling.sample(pipe, _tic_ft(np.full((1, 64, 64, 3), 255, np.uint8)))
    assert diff(first, second) > 1.0
    with pytest.raises(ValueError, match="no room for a target after 1 condition"):
        sampling.sample(
            pipe,
            sampling.request_for(
                SETTINGS, PROMPT, 42, frames=9, condition=_tic_ft(frames_of(1, 1)).condition
            ),
        )


def test_tic_ft_buffer_frames_are_fed_the_training_noise_levels(pipe, monkeypatch):
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    monkeypatch.setattr(
        pipe, "scheduler", CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    )
    levels, fed = [], []
    frame_levels = sampling.frame_levels

    def spy(t, *args):
        levels.append((int(t), frame_levels(t, *args)))
        return levels[-1][1]

    monkeypatch.setattr(sampling, "frame_levels", spy)
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: fed.append((kw["hidden_states"][1].clone(), kw["timestep"])),
        with_kwargs=True,
    )
    request = _tic_ft(frames_of(1, 1))
    try:
        sampling.sample(pipe, request)
    finally:
        handle.remove()

    assert [t.tolist() for _, t in fed] == [[999, 999], [499, 499]]  # told the target's t
    for (
        t,
        frame,
    ) in levels:  # the condition clean, the buffer at the training levels, the target at t
        expected = train.buffer_timesteps(torch.tensor([t]), 2, 1000)[0].tolist()
        assert frame.tolist() == [0, *expected, t, t]
    assert {t for t, _ in levels} == {999, 499, -1}  # each step's levels and the next's

    # The first input: the buffer noised from its clean estimate at exactly those levels.
    context = sampling.condition_latents(pipe, request, 3, "cpu", torch.float32)  # [1, 3, ...]
    noise = randn_tensor((1, 5, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(42))
    x = fed[0][0]  # [5, 4, 8, 8]: condition, 2 buffer, 2 target frames
    assert torch.equal(x[0], context[0, 0])
    for f, tau in ((1, 333), (2, 666)):
        mixes = pipe.scheduler.add_noise(
            context[0, f].expand(1000, -1, -1, -1),
            noise[0, f].expand(1000, -1, -1, -1),
            torch.arange(1000),
        )
        assert [s for s in range(1000) if torch.equal(mixes[s], x[f])] == [tau]
    torch.testing.assert_close(x[3:], noise[0, 3:])  # pure noise
    # At t = 499 the frame at 333 still waits, as it was; the one at 666 moved to 499.
    assert torch.equal(fed[1][0][1], x[1]) and not torch.equal(fed[1][0][2], x[2])
    assert torch.equal(fed[1][0][0], x[0])  # the condition stays clean


def test_side_by_side_holds_the_condition_beside_the_result():
    result = frames_of(3)
    out = sampling.side_by_side(frames_of(4, 1)[:, :32], result)  # a 32x64 condition image
    assert out.shape == (9, 64, 128 + 64, 3)
    np.testing.assert_array_equal(out[:, :, 128:], result)
    assert all(np.array_equal(out[0, :, :128], out[i, :, :128]) for i in range(9))  # held


def test_tic_ft_validation_writes_videos(tmp_path, tiny_models):
    cfg = PipelineConfig(
        model=str(tiny_models["cogvideox"]),
        evaluate=SETTINGS.model_copy(update={"seeds": [1, 2]}),
        train=TrainConfig(mode="tic-ft", tic_ft=LAYOUT, validation_every=1),
        precompute={"frames": 17},
    )
    sample = torch.randn(
        5, 4, 8, 8, generator=torch.Generator().manual_seed(0)
    )  # a sample's latents
    v = validation.prepare(cfg, "cpu", torch.float32, [sample])
    transformer, _ = lora_transformer(tiny_models["cogvideox"])
    stats = validation.run(v, transformer, tmp_path, step=1)
    folder = validation.folder_of(tmp_path, 1)
    assert stats["videos"] == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "p00-condition.mp4",
        "p00-s1.mp4",
        "p00-s2.mp4",
    ]
    assert read_mp4(folder / "p00-s1.mp4").shape == (8, 64, 64, 3)
    assert read_mp4(folder / "p00-condition.mp4").shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="mode tic-ft: no condition latents for 1 prompts"):
        validation.prepare(cfg, "cpu", torch.float32)


def _run(tmp_path: Path, model: Path, mode: str) -> Path:
    """A LoRA checkpoint with the run.json training writes beside it, in `mode`."""
    run = tmp_path / f"run-{mode}"
    make_lora(model, run / "checkpoint-000002", seed=0)
    config = {"train": TrainConfig(mode=mode, tic_ft=LAYOUT).model_dump(mode="json")}
    (run / "run.json").write_text(json.dumps({"key": "k", "config": config}))
    return run / "checkpoint-000002"


def test_generate_with_reference_and_condition_through_the_cli(tmp_path, tiny_models, capsys):
    model = tiny_models["cogvideox"]
    tiny = cli_flags(model=model, steps=2, height=64, width=64, device="cpu", prompt=PROMPT)
    edges = tmp_path / "edges.mp4"
    write_mp4(edges, frames_of(5, 12), 8)
    ic = _run(tmp_path, model, "ic-lora")
    out = tmp_path / "ic.mp4"
    args = [*tiny, "--frames", "9", "--lora", str(ic), "--reference", str(edges)]
    assert main(["generate", *args, "--output", str(out)]) == 0
    assert read_mp4(out).shape == (9, 64, 64, 3)
    assert read_mp4(tmp_path / "ic-side.mp4").shape == (9, 64, 128, 3)

    image = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(frames_of(6, 1)[0]).save(image)
    tic = _run(tmp_path, model, "tic-ft")
    out = tmp_path / "tic.mp4"
    args = [*tiny, "--frames", "17", "--lora", str(tic), "--condition", str(image)]
    assert main(["generate", *args, "--output", str(out)]) == 0
    assert read_mp4(out).shape == (8, 64, 64, 3)  # the target frames
    assert read_mp4(tmp_path / "tic-side.mp4").shape == (8, 64, 128, 3)

    cases = {  # a condition the checkpoint's mode does not take fails before anything loads
        ("--lora", str(ic)): "was trained in mode ic-lora: give --reference VIDEO",
        ("--lora", str(tic), "--reference", str(edges)): "trained in mode tic-ft: give --condition",
        ("--reference", str(edges)): "--reference needs an ic-lora LoRA; no --lora",
        ("--lora", str(ic), "--reference", str(tmp_path / "no.mp4")): "no such file",
    }
    for extra, message in cases.items():
        assert main(["generate", *tiny, "--frames", "9", *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
