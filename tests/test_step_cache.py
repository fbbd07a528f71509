"""Step-reuse caches on the tiny CogVideoX: "none" is the exact path untouched, every
option samples a whole video and leaves the transformer as it found it, first_block's
threshold decides whether it skips, the deviation numbers, evaluate's key and the bench."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cogpipe import evaluate, sampling, step_cache
from cogpipe.config import EvaluateConfig
from cogpipe.workspace import sha256_json

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "A fighter slaps his opponent and the crowd cheers."
FOUR_STEPS = sampling.SampleRequest(PROMPT, 42, frames=9, height=64, width=64, steps=4)
REFERENCE = np.zeros((9, 64, 64, 3), np.uint8)  # an ic-lora reference: sampled by `_loop`
CACHES = [o for o in step_cache.OPTIONS if o != "none"]


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return evaluate.load_pipeline(str(tiny_models["cogvideox"]), "cpu")


@pytest.fixture(scope="module")
def exact(pipe):
    """The exact latents and frames of FOUR_STEPS, plain and ic-lora, made first."""
    return {mode: run(pipe, request_of(mode)) for mode in ("plain", "ic-lora")}


def request_of(mode: str, **fields) -> sampling.SampleRequest:
    condition = sampling.Condition("ic-lora", frames=REFERENCE) if mode == "ic-lora" else None
    return replace(FOUR_STEPS, condition=condition, **fields)


def run(pipe, request) -> tuple[torch.Tensor, np.ndarray]:
    latents = sampling.denoise(pipe, request)
    return latents, sampling.decode(pipe, latents, request)


def hooks_on(transformer) -> list[str]:
    """The modules under the transformer that carry a diffusers hook or a forward pre-hook."""
    return [
        name or "transformer"
        for name, module in transformer.named_modules()
        if module._forward_pre_hooks
        or getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
    ]


@pytest.mark.parametrize("mode", ["plain", "ic-lora"])
def test_none_is_the_exact_path_untouched(pipe, exact, mode):
    seen = []  # whether a cache was on at each transformer call
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(m.is_cache_enabled), with_kwargs=True
    )
    try:
        latents, frames = run(pipe, request_of(mode, step_cache="none"))
    finally:
        handle.remove()
    assert seen == [False] * 4
    assert torch.equal(latents, exact[mode][0])  # bit-identical, not close
    np.testing.assert_array_equal(frames, exact[mode][1])
    if mode == "plain":  # and the pipeline's own call, as evaluate makes a video
        settings = EvaluateConfig(steps=4, frames=9, height=64, width=64, device="cpu")
        np.testing.assert_array_equal(frames, evaluate.generate(pipe, settings, PROMPT, 42, "cpu"))


@pytest.mark.parametrize("option", CACHES)
@pytest.mark.parametrize("mode", ["plain", "ic-lora"])
def test_each_option_samples_and_leaves_no_hook(pipe, exact, option, mode):
    latents, frames = run(pipe, request_of(mode, step_cache=option, step_cache_threshold=1e9))
    assert latents.shape == exact[mode][0].shape and torch.isfinite(latents).all()
    assert frames.shape == (9, 64, 64, 3) and frames.dtype == np.uint8
    assert not torch.equal(latents, exact[mode][0])  # something was reused
    assert not pipe.transformer.is_cache_enabled and hooks_on(pipe.transformer) == []
    again, _ = run(pipe, request_of(mode))
    assert torch.equal(again, exact[mode][0])


def test_first_block_threshold_decides_whether_it_skips(pipe, exact):
    never, _ = run(pipe, request_of("plain", step_cache="first_block", step_cache_threshold=0))
    assert torch.equal(never, exact["plain"][0])  # 0: every block runs every step
    always, frames = run(
        pipe, request_of("plain", step_cache="first_block", step_cache_threshold=1e9)
    )
    found = step_cache.deviation(exact["plain"][0], always, exact["plain"][1], frames)
    assert found["rel_l2"] > 1e-3 and np.isfinite(found["psnr_db"])


def test_the_cache_comes_off_on_an_error(pipe, exact):
    with pytest.raises(RuntimeError, match="stop"):
        with step_cache.cached(pipe.transformer, "first_block", 0.1, steps=4):
            assert pipe.transformer.is_cache_enabled and hooks_on(pipe.transformer)
            raise RuntimeError("stop")
    assert not pipe.transformer.is_cache_enabled and hooks_on(pipe.transformer) == []
    assert torch.equal(run(pipe, request_of("plain"))[0], exact["plain"][0])


def test_bad_settings_are_refused(pipe):
    with pytest.raises(ValueError, match="known are none, first_block, pab, faster"):
        step_cache.cache_config("teacache", 0.1)
    with pytest.raises(ValueError, match="threshold -1"):
        step_cache.cache_config("first_block", -1)
    with pytest.raises(ValueError, match="1 denoising step, it needs 2"):
        with step_cache.cached(pipe.transformer, "pab", 0.1, steps=1):
            pass
    assert hooks_on(pipe.transformer) == []


def test_psnr_and_deviation_on_known_inputs():
    a = np.full((2, 4, 4, 3), 100, np.uint8)
    assert step_cache.psnr(a, a) == float("inf")
    assert step_cache.psnr(a, a + 1) == pytest.approx(20 * np.log10(255))  # MSE 1: 48.13 dB
    assert step_cache.psnr(a, a + 10) == pytest.approx(20 * np.log10(25.5))  # MSE 100: 28.13 dB
    with pytest.raises(ValueError, match="uint8"):
        step_cache.psnr(a, a.astype(np.float32))
    latents = torch.arange(1.0, 9.0).reshape(1, 2, 4)
    found = step_cache.deviation(latents, latents * 1.1, a, a + 1)
    assert found["rel_l2"] == pytest.approx(0.1)
    assert found["psnr_db"] == pytest.approx(48.1308, abs=1e-4)


def test_evaluate_key_has_the_cache_only_when_on():
    default = EvaluateConfig()
    # the key of every existing workspace: the fields before step_cache existed
    assert sha256_json(default.key_fields()) == (
        "0cd2d6a2bd66f3a8e7263de976c7f95788e83c0eeeb9737ef0056aa74720c20e"
    )
    assert EvaluateConfig(step_cache_threshold=0.5).key_fields() == default.key_fields()
    first = EvaluateConfig(step_cache="first_block").key_fields()
    assert first == default.key_fields() | {
        "step_cache": "first_block",
        "step_cache_threshold": 0.1,
    }
    assert EvaluateConfig(step_cache="first_block", step_cache_threshold=0.2).key_fields() != first
    pab = EvaluateConfig(step_cache="pab", step_cache_threshold=0.5).key_fields()
    assert pab == default.key_fields() | {"step_cache": "pab"}  # its threshold is not read
    assert set(EvaluateConfig.model_fields["step_cache"].annotation.__args__) == set(
        step_cache.OPTIONS
    )


def test_evaluate_caches_checkpoint_videos_and_asks_the_base_exactly(pipe):
    exact = EvaluateConfig(steps=4, frames=9, height=64, width=64, device="cpu")
    cached = exact.model_copy(update={"step_cache": "first_block", "step_cache_threshold": 1e9})
    request = evaluate.Request(0, PROMPT, 42, cached, "cpu")
    base = request.plain.settings  # the base suite: the exact reference
    assert base.step_cache == "none" and base.key_fields() == exact.key_fields()
    frames = evaluate.sample(pipe, request)
    assert frames.shape == (9, 64, 64, 3) and hooks_on(pipe.transformer) == []
    assert not np.array_equal(frames, evaluate.generate(pipe, exact, PROMPT, 42, "cpu"))


def test_bench_prints_a_line_per_option():
    cmd = [sys.executable, "bench/generate.py", "--dry", "--models", "2b", "--steps", "4"]
    cmd += ["--variants", "plain", "--step-cache", "first_block,pab"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["case"] for line in lines] == [
        "cogvideox-2b 4 steps 9x64x64 plain",
        "cogvideox-2b 4 steps 9x64x64 plain step_cache first_block 0.1",
        "cogvideox-2b 4 steps 9x64x64 plain step_cache pab",
    ]
    for line in lines[1:]:
        assert line["metric"] == "s_per_video" and line["ratio"] > 0
        assert line["rel_l2"] >= 0 and (line["psnr_db"] is None or line["psnr_db"] > 0)
