"""FP8 linears for generation (`evaluate.fp8_linears`, `models.speed.fp8_linears`): keyed
only when on, refused off a CUDA GPU with the reason, and on a GPU (the device machine) a
video close to the exact one, with a LoRA that loads onto the FP8 blocks and unloads."""

from __future__ import annotations

import pytest
import torch
from test_evaluate import make_lora

from cogpipe import base_suite, sampling
from cogpipe.config import EvaluateConfig
from cogpipe.eval_models import load_pipeline, lora
from cogpipe.models import speed

PROMPT = "A fighter slaps his opponent and the crowd cheers."
VIDEO = dict(steps=4, frames=9, height=64, width=64, guidance=6.0)


def test_speed_options_are_keyed_only_when_on():
    plain = EvaluateConfig().key_fields()
    assert "compile" not in plain and "fp8_linears" not in plain
    on = EvaluateConfig(compile=True, fp8_linears=True).key_fields()
    assert on["compile"] is True and on["fp8_linears"] is True
    plain_settings = base_suite.video_settings(EvaluateConfig())
    assert set(plain_settings) == set(base_suite.VIDEO_FIELDS)  # base keys as before
    assert base_suite.video_settings(EvaluateConfig(fp8_linears=True))["fp8_linears"] is True


@pytest.mark.parametrize("cache", ["pab", "faster"])
def test_a_retracing_cache_with_compile_is_refused_with_the_reason(cache):
    with pytest.raises(ValueError, match=f"{cache} with compile re-traces"):
        EvaluateConfig(compile=True, step_cache=cache)
    EvaluateConfig(step_cache=cache)  # eager: fine
    EvaluateConfig(compile=True, step_cache="first_block")  # traced once, then reused


def test_fp8_off_a_cuda_gpu_is_refused_with_the_reason(tiny_models):
    pipe = load_pipeline(str(tiny_models["cogvideox"]), "cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*the model is on cpu"):
        speed.fp8_linears(pipe.transformer)
    assert not any(type(m.weight) is not torch.nn.Parameter for m in _linears(pipe))


def _linears(pipe) -> list[torch.nn.Linear]:
    return [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]


def _denoised(pipe, seed: int = 3):
    request = sampling.request_for(EvaluateConfig(**VIDEO), PROMPT, seed)
    return sampling.denoise(pipe, request).double()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.gpu
def test_fp8_video_is_close_to_the_exact_one_and_takes_a_lora(tiny_models, tmp_path):
    model = str(tiny_models["cogvideox"])
    exact_pipe = load_pipeline(model, "cuda")
    exact = _denoised(exact_pipe)
    pipe = load_pipeline(model, "cuda", EvaluateConfig(fp8_linears=True))
    for block in pipe.transformer.transformer_blocks:  # attention and feed-forward: FP8
        for linear in (block.attn1.to_q, block.attn1.to_out[0], block.ff.net[2]):
            assert type(linear.weight) is not torch.nn.Parameter, type(linear.weight)
    assert type(pipe.transformer.proj_out.weight) is torch.nn.Parameter  # outside blocks
    base = _denoised(pipe)
    assert torch.isfinite(base).all()
    deviation = _rel(base, exact)
    assert 0 < deviation < 0.25, deviation  # FP8 rounds; a broken matmul is far off

    checkpoint = make_lora(tiny_models["cogvideox"], tmp_path / "lora", seed=1).parent
    with lora(exact_pipe, checkpoint, "a"):
        exact_lora = _denoised(exact_pipe)
    with lora(pipe, checkpoint, "a"):
        with_lora = _denoised(pipe)
    assert _rel(with_lora, base) > 10 * deviation  # the adapter is applied on FP8 blocks
    assert _rel(with_lora, exact_lora) < 0.25
    assert not [n for n, _ in pipe.transformer.named_modules() if "lora_" in n]
    torch.testing.assert_close(_denoised(pipe), base)  # unloaded: the FP8 base again


def test_fp8_base_is_for_a_lora_and_keyed_only_when_on():
    from cogpipe.config import TrainConfig

    assert "fp8_base" not in TrainConfig().key_fields()
    assert TrainConfig(fp8_base=True).key_fields()["fp8_base"] is True
    with pytest.raises(ValueError, match="fp8_base runs the frozen base linears under a LoRA"):
        TrainConfig(fp8_base=True, mode="full")


def _lora_losses(model: str, fp8: bool, steps: int = 3) -> tuple[list[float], object]:
    """Losses of `steps` LoRA steps on one fixed batch (bf16 weights, on the GPU), and the
    trainer."""
    from cogpipe import train
    from cogpipe.config import TrainConfig
    from cogpipe.models import cogvideox

    t = TrainConfig(
        rank=4,
        alpha=4,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        max_steps=steps,
        gradient_checkpointing="off",
        fp8_base=fp8,
        device="cuda",
    )
    g = torch.Generator().manual_seed(0)
    batch = [
        (torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), (64, 64, 3))
    ]
    transformer = cogvideox.load_transformer(model, "cuda", torch.bfloat16)
    trainer = train.build_trainer(transformer, cogvideox.load_scheduler(model), t, 0, "cuda")
    return [trainer.step(s, batch)[0].item() for s in range(1, steps + 1)], trainer


@pytest.mark.gpu
def test_fp8_base_trains_the_lora_as_bf16_does(tiny_models):
    model = str(tiny_models["cogvideox"])
    bf16, _ = _lora_losses(model, fp8=False)
    fp8, trainer = _lora_losses(model, fp8=True)
    kinds = {type(m).__name__ for m in trainer.transformer.modules()}
    assert "Float8Linear" in kinds  # the frozen base linears
    trained = [n for n, p in trainer.transformer.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)  # only the LoRA trains
    assert fp8 == pytest.approx(bf16, rel=0.05), (fp8, bf16)  # FP8 rounding, same curve
    assert fp8 != bf16  # the FP8 path ran
