"""Validation during training on the tiny CogVideoX: files written, training left exactly as it was.

The transformer is built as training builds it (frozen base, `add_lora`), with a random
non-zero lora_B so the adapter changes the videos, and in train mode.
"""

from __future__ import annotations

import gc
import weakref
from contextlib import nullcontext
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import tiny_sampling

from cogpipe import evaluate, train, validation
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.models import cogvideox

PROMPTS = [
    "A fighter slaps his opponent and the crowd cheers.",
    "Two men face each other on a podium under bright lights.",
]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_cfg(models: dict[str, Path], **evaluate_fields) -> PipelineConfig:
    fields = tiny_sampling(prompts=PROMPTS[:1], seeds=[42], fps=8, clip_model=str(models["clip"]))
    settings = EvaluateConfig(**fields | evaluate_fields)
    return PipelineConfig(model=str(models["cogvideox"]), evaluate=settings)


def lora_transformer(model: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(transformer with a rank-4, alpha-8 LoRA whose B is random, in train mode; LoRA params)."""
    transformer = cogvideox.load_transformer(str(model), device, dtype)
    params = cogvideox.add_lora(transformer, 4, 8, TARGETS, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:  # zero at init: the adapter would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return transformer.train(), params


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_run_writes_every_prompt_and_seed_and_leaves_training_as_it_was(tmp_path, tiny_models):
    cfg = make_cfg(tiny_models, prompts=PROMPTS, seeds=[42, 7])
    v = validation.prepare(cfg, "cpu", torch.float32)
    transformer, _ = lora_transformer(tiny_models["cogvideox"])
    transformer.patch_embed.eval()  # a module training keeps in eval stays in eval
    weights = {k: t.clone() for k, t in transformer.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in transformer.named_parameters()}
    modes = {n: m.training for n, m in transformer.named_modules()}
    rng = torch.get_rng_state()

    stats = validation.run(v, transformer, tmp_path / "run", step=12)

    assert stats["videos"] == 4 and stats["seconds"] > 0
    assert stats["gpu_memory_before_gb"] is None and stats["gpu_memory_after_gb"] is None
    folder = tmp_path / "run" / "validation" / "step-000012"
    assert validation.folder_of(tmp_path / "run", 12) == folder
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == [  # no temporary folder left
        "p00-s42.mp4",
        "p00-s7.mp4",
        "p01-s42.mp4",
        "p01-s7.mp4",
        "step-000012",
        "validation",
    ]
    videos = {p.name: decode(p) for p in folder.iterdir()}
    assert all(video.shape == (9, 64, 64, 3) for video in videos.values())
    assert np.abs(videos["p00-s42.mp4"].astype(int) - videos["p00-s7.mp4"]).mean() > 1.0

    state = transformer.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)  # base and LoRA
    assert {n: p.requires_grad for n, p in transformer.named_parameters()} == trainable
    assert {n: m.training for n, m in transformer.named_modules()} == modes
    assert transformer.active_adapters() == ["default"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert v.vae.device.type == "cpu"

    # A second pass at the same step (a resumed run) replaces the folder with the same videos.
    assert validation.run(v, transformer, tmp_path / "run", step=12)["videos"] == 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(videos)
    assert all(np.array_equal(decode(folder / name), video) for name, video in videos.items())


@pytest.mark.parametrize("cache", ["none", "first_block"])
def test_videos_are_what_evaluate_makes_of_the_saved_lora(tmp_path, tiny_models, cache):
    """With evaluate's step cache too (a threshold that reuses every step after the first)."""
    cfg = make_cfg(tiny_models, steps=3, step_cache=cache, step_cache_threshold=1e6)
    transformer, _ = lora_transformer(tiny_models["cogvideox"])
    cogvideox.save_lora(tmp_path / "checkpoint-000012", transformer, 4, 8)
    v = validation.prepare(cfg, "cpu", torch.float32)
    pipe = validation.pipeline(v, transformer)
    with validation.sampling(transformer):
        got = validation.decode(pipe, validation.denoise(pipe, v, 0, 42), PROMPTS[0], 42)

    base = evaluate.load_pipeline(str(tiny_models["cogvideox"]), "cpu")
    request = evaluate.Request(0, PROMPTS[0], 42, cfg.evaluate, "cpu")
    with evaluate.lora(base, tmp_path / "checkpoint-000012", "step_000012"):
        expected = evaluate.sample(base, request)
        exact = evaluate.sample(base, request.plain)  # the base suite's way: never cached
    assert got.shape == (9, 64, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)  # the same numbers, not just close
    assert np.array_equal(got, exact) == (cache == "none")


def test_prepare_keeps_embeddings_and_vae_on_the_cpu_and_drops_t5(tiny_models, monkeypatch):
    from diffusers import CogVideoXPipeline

    encoders = []
    load_text_encoder = cogvideox.load_text_encoder

    def spy(*args):
        tokenizer, encoder = load_text_encoder(*args)
        encoders.append(weakref.ref(encoder))
        return tokenizer, encoder

    monkeypatch.setattr(cogvideox, "load_text_encoder", spy)
    v = validation.prepare(make_cfg(tiny_models, prompts=PROMPTS), "cpu", torch.float32)
    gc.collect()
    assert len(encoders) == 1 and encoders[0]() is None  # T5 was freed, not just left unused
    assert v.prompt_embeds.shape == (2, 16, 32) and v.negative_embeds.shape == (1, 16, 32)
    assert (
        v.prompt_embeds.device.type == v.negative_embeds.device.type == v.vae.device.type == "cpu"
    )

    # The embeddings are the ones the pipeline computes from the prompts itself.
    pipe = CogVideoXPipeline.from_pretrained(str(tiny_models["cogvideox"]))
    embeds, negative = pipe.encode_prompt(PROMPTS, max_sequence_length=16, device="cpu")
    torch.testing.assert_close(v.prompt_embeds, embeds)
    torch.testing.assert_close(v.negative_embeds, negative[:1])
    assert type(v.scheduler) is type(pipe.scheduler)


def test_validation_prompts_replace_a_heldout_suite(tiny_models):
    cfg = make_cfg(tiny_models, prompts="heldout")
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"validation_prompts": PROMPTS})}
    )
    v = validation.prepare(cfg, "cpu", torch.float32)
    assert v.settings.prompts == PROMPTS and v.prompt_embeds.shape == (2, 16, 32)


def test_sizes_the_model_cannot_generate_fail_before_training(tiny_models):
    ec = make_cfg(tiny_models, height=48, width=64).evaluate
    validation.check_shape(ec, {"patch_size": 2})
    with pytest.raises(ValueError, match="multiples of 32"):
        validation.check_shape(ec, {"patch_size": 4})


def _two_steps(model: Path, v: validation.Validation | None, out: Path) -> list[float]:
    """Losses of two training steps with compiled blocks, validating between them when v is given."""
    transformer, params = lora_transformer(model)
    for block in transformer.transformer_blocks:
        block.compile(backend="eager")  # Dynamo's tracing and guards without Inductor
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = cogvideox.load_scheduler(str(model))
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    losses = []
    for step in (1, 2):
        if step == 2 and v is not None:
            graphs = dict(torch._dynamo.utils.counters["stats"])
            validation.run(v, transformer, out, step=1)
            assert dict(torch._dynamo.utils.counters["stats"]) == graphs  # nothing compiled
        # After validation the training graphs are used as they are.
        stance = torch.compiler.set_stance("fail_on_recompile") if step == 2 else nullcontext()
        with stance:
            loss = train.diffusion_loss(
                transformer, scheduler, latents, embeds, None, train.generator("step", 0, step)
            )
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_training_neither_recompiles_nor_changes_its_losses(tmp_path, tiny_models):
    v = validation.prepare(make_cfg(tiny_models), "cpu", torch.float32)
    model = tiny_models["cogvideox"]
    torch._dynamo.reset()
    try:
        assert _two_steps(model, v, tmp_path) == _two_steps(model, None, tmp_path)
    finally:
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_validation_on_gpu_releases_memory_and_keeps_compiled_training(tmp_path, tiny_models):
    cfg = make_cfg(tiny_models, prompts=PROMPTS, seeds=[42, 7])
    model = tiny_models["cogvideox"]
    transformer, _ = lora_transformer(model, "cuda", torch.float16)  # fp16 base, fp32 LoRA
    transformer.enable_gradient_checkpointing()
    for block in transformer.transformer_blocks:
        block.compile()  # Inductor, as training compiles on the GPU
    scheduler = cogvideox.load_scheduler(str(model))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 8, generator=g).to("cuda", torch.float16)
    embeds = torch.randn(2, 16, 32, generator=g).to("cuda", torch.float16)

    def step(n: int) -> float:  # a training step (forward and backward)
        loss = train.diffusion_loss(
            transformer, scheduler, latents, embeds, None, train.generator("step", 0, n)
        )
        loss.backward()
        transformer.zero_grad(set_to_none=True)
        return loss.item()

    torch._dynamo.reset()
    try:
        first = step(1)  # compiles; the GPU's workspaces exist before validation, as in training
        start = torch.cuda.memory_allocated()
        v = validation.prepare(cfg, torch.device("cuda"), torch.float16)
        assert torch.cuda.memory_allocated() == start  # T5 was on the GPU, used and freed
        before = torch.cuda.memory_allocated()

        stats = validation.run(v, transformer, tmp_path / "run", step=5)

        after = torch.cuda.memory_allocated()
        with torch.compiler.set_stance("fail_on_recompile"):
            assert step(1) == first  # the same graphs, the same loss
    finally:
        torch._dynamo.reset()
    assert stats["videos"] == 4
    folder = validation.folder_of(tmp_path / "run", 5)
    assert all(decode(p).shape == (9, 64, 64, 3) for p in folder.iterdir())
    assert v.vae.device.type == "cpu" and transformer.training
    assert abs(after - before) <= 2**20, (before, after)  # bytes: pipeline, latents, VAE gone
    assert stats["gpu_memory_before_gb"] == pytest.approx(before / 2**30, abs=1e-3)
    assert stats["gpu_memory_after_gb"] == pytest.approx(after / 2**30, abs=1e-3)
