"""Validation during training: evaluate's prompts and seeds, generated with the LoRA in training.

`prepare` runs once before the loop: it encodes the prompts and the empty negative prompt
with T5 and drops the encoder (T5-XXL is ~9.5 GB and must not stay resident while
training), and loads the VAE and the sampling scheduler, both kept on the CPU. `run` is
called every `train.validation_every` steps with the training transformer itself, no
copy and no text encoder:

    train/<run>/validation/step-{step:06d}/p00-s42.mp4 ...   one per prompt x seed

Each video is made exactly as `cogpipe.evaluate` makes it (the same scheduler, sampler
settings and seeded generator), so the validation videos of step N match the evaluation
of `checkpoint-{N:06d}` up to numerics. What keeps training as it was:

- the transformer is sampled under `torch.no_grad` with compiled blocks forced eager
  (no recompilation), in eval mode, and every module's mode is restored afterwards;
- denoising and decoding are two phases, the VAE is on the GPU only for the second, and
  afterwards the pipeline goes, garbage is collected and the CUDA cache emptied (other
  trainers hold 8-10 GB more after validation);
- every draw comes from the explicit generators and the global RNG is forked, so a run
  with validation has exactly the losses of one without.

    v = validation.prepare(cfg, device, dtype)                 # before the loop
    stats = validation.run(v, transformer, out, step)          # every validation_every steps

IC-LoRA (`train.mode: ic-lora`): `prepare` takes one reference latent per prompt (training
passes the precomputed references of the first samples). Each video is then sampled by
the same pipeline with the transformer behind `with_reference`, which puts the clean
reference latents before the noised latents along frames at every step and hands back
the target's outputs only, exactly as training feeds it. The video takes the reference's
size and length, and the decoded reference is written beside it as `p00-reference.mp4`.
A full fine-tune (`train.mode: full`) samples its fp32 weights under autocast to the
frozen weights' dtype on a GPU.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used, like every stage module
    import torch

from cogpipe import evaluate
from cogpipe.config import EvaluateConfig, PipelineConfig
from cogpipe.models import cogvideox
from cogpipe.video import write_mp4
from cogpipe.workspace import atomic_path

FOLDER = "validation"


@dataclass
class Validation:
    """What validation needs besides the transformer; nothing here is on the GPU between runs."""

    settings: EvaluateConfig  # prompts, seeds, steps, guidance, frames, height, width, fps
    prompt_embeds: torch.Tensor  # [P, L, D] on the CPU, one row per prompt
    negative_embeds: torch.Tensor  # [1, L, D] on the CPU: the empty prompt
    vae: Any  # AutoencoderKLCogVideoX on the CPU, tiling on
    scheduler: Any  # the sampling scheduler of the model's pipeline
    device: torch.device  # where the transformer is and the videos are sampled
    dtype: torch.dtype  # of the embeddings, the latents and the VAE
    references: list[torch.Tensor] | None = None  # ic-lora: [F', C, h, w] per prompt, on the CPU
    autocast: bool = False  # full fine-tune on a GPU: weights in another dtype than `dtype`


def folder_of(out: Path, step: int) -> Path:
    """`out/validation/step-{step:06d}/`: the videos of one validation."""
    return Path(out) / FOLDER / f"step-{step:06d}"


def check_shape(ec: EvaluateConfig, transformer_config: dict[str, Any]) -> None:
    """Fail before training when the model cannot generate `ec`'s videos.

    EvaluateConfig has already checked 4k+1 frames and sizes in multiples of 16; this adds
    what depends on the model: sizes in whole transformer patches of VAE pixels.

    Raises:
        ValueError: naming the size and the multiple the model needs.
    """
    multiple = cogvideox.VAE_SCALE_SPATIAL * transformer_config["patch_size"]
    if ec.height % multiple or ec.width % multiple:
        raise ValueError(
            f"evaluate height and width must be multiples of {multiple} for this model "
            f"(VAE 8x, patch {transformer_config['patch_size']}), got {ec.height}x{ec.width}"
        )


def load_sampler(model: str):
    """The scheduler the model's own pipeline samples with (model_index.json), as in evaluate.

    Training uses CogVideoXDPMScheduler for the noise schedule; sampling uses whatever the
    model ships (CogVideoXDDIMScheduler for THUDM/CogVideoX-2b), a separate object.
    """
    import diffusers

    library, name = diffusers.CogVideoXPipeline.load_config(model)["scheduler"]
    if library != "diffusers":
        raise ValueError(f"{model}: scheduler {library}.{name} is not a diffusers class")
    return getattr(diffusers, name).from_pretrained(model, subfolder="scheduler")


def encode_prompts(model: str, prompts: list[str], device, dtype: torch.dtype):
    """(prompt embeddings [P, L, D], empty-prompt embeddings [1, L, D]), both on the CPU.

    T5 is loaded on `device`, used once and released before this returns.
    """
    import torch

    max_len = cogvideox.transformer_config(model)["max_text_seq_length"]
    tokenizer, encoder = cogvideox.load_text_encoder(model, str(device), dtype)
    try:
        # One prompt at a time, like CogVideoXPipeline: the same numbers as evaluate's.
        rows = [cogvideox.encode_prompt(tokenizer, encoder, [p], max_len).cpu() for p in prompts]
        negative = cogvideox.encode_prompt(tokenizer, encoder, [""], max_len).cpu()
    finally:
        del encoder
        evaluate.release_memory(str(device))
    return torch.cat(rows), negative


def prepare(cfg: PipelineConfig, device, dtype: torch.dtype, references=None) -> Validation:
    """Everything validation needs, once, before training starts.

    Args:
        cfg: the pipeline config (uses `model`, `evaluate` and `train.mode`).
        device: where the transformer trains (e.g. `accelerator.device`).
        dtype: the frozen weights' dtype (fp16 for 2B-type, bf16 for 5B-type models on GPU).
        references: ic-lora: one reference latent [F', C, h, w] per prompt (CPU tensors).

    Returns:
        A Validation holding CPU tensors and modules only.

    Raises:
        ValueError: the model cannot generate evaluate's frames, height and width; or
            references that are not one per prompt.
    """
    import torch

    ec = cfg.evaluate
    check_shape(ec, cogvideox.transformer_config(cfg.model))
    if references is not None and len(references) != len(ec.prompts):
        raise ValueError(f"{len(references)} reference latents for {len(ec.prompts)} prompts")
    embeds, negative = encode_prompts(cfg.model, ec.prompts, device, dtype)
    vae = cogvideox.load_vae(cfg.model, "cpu", dtype)
    vae.enable_tiling()  # as evaluate's pipeline: 49x480x720 decodes in tiles
    scheduler = load_sampler(cfg.model)
    device = torch.device(device)
    autocast = cfg.train.mode == "full" and device.type == "cuda"
    return Validation(ec, embeds, negative, vae, scheduler, device, dtype, references, autocast)


@contextmanager
def sampling(transformer, autocast_dtype=None):
    """Eval mode, no autograd, compiled code run eagerly; every module's mode restored after.

    With `autocast_dtype` (a full fine-tune's fp32 weights on a GPU), under autocast to it.
    """
    import torch

    modes = {m: m.training for m in transformer.modules()}
    # force_eager: torch.compile'd blocks neither compile an eval-mode graph now nor
    # recompile when training resumes (no set_stance before torch 2.6).
    stance = getattr(torch.compiler, "set_stance", None)
    autocast = (
        torch.autocast("cuda", dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    transformer.eval()
    try:
        with torch.no_grad(), stance("force_eager") if stance else nullcontext(), autocast:
            yield
    finally:
        for module, training in modes.items():
            module.training = training


_WITH_REFERENCE: type | None = None


def with_reference(transformer, reference: torch.Tensor):
    """The transformer with clean `reference` latents [1, F', C, h, w] before its input
    along frames, returning the outputs of the input's frames only (an nn.Module the
    pipeline can sample with; `.reference` may be swapped between videos)."""
    global _WITH_REFERENCE
    if _WITH_REFERENCE is None:
        import torch

        class WithReference(torch.nn.Module):
            def __init__(self, transformer, reference):
                super().__init__()
                self.transformer, self.reference = transformer, reference

            @property
            def config(self):
                return self.transformer.config

            @property
            def device(self):
                return self.transformer.device

            @property
            def dtype(self):
                return self.transformer.dtype

            def cache_context(self, name: str):
                return self.transformer.cache_context(name)

            def forward(self, hidden_states, image_rotary_emb=None, **kwargs):
                b, f, _, h, w = hidden_states.shape  # [B, F', C, h, w]
                ref = self.reference.to(hidden_states).expand(b, -1, -1, -1, -1)
                x = torch.cat([ref, hidden_states], dim=1)  # [B, F'_ref + F', C, h, w]
                if image_rotary_emb is not None:  # for every frame fed, as in training
                    image_rotary_emb = cogvideox.rotary_embeddings(
                        self.config, h * cogvideox.VAE_SCALE_SPATIAL,
                        w * cogvideox.VAE_SCALE_SPATIAL, x.shape[1], x.device,
                    )  # fmt: skip
                out = self.transformer(hidden_states=x, image_rotary_emb=image_rotary_emb, **kwargs)
                return (out[0][:, -f:],)  # return_dict=False: the target's outputs

        _WITH_REFERENCE = WithReference
    return _WITH_REFERENCE(transformer, reference)


def pipeline(v: Validation, transformer):
    """A CogVideoXPipeline over the training transformer, without a text encoder."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=v.vae, transformer=transformer, scheduler=v.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoise(pipe, v: Validation, index: int, seed: int) -> torch.Tensor:
    """Latents of prompt `index` and `seed`: [1, F', C, h, w] on the device, padding dropped.

    With references, `pipe.transformer` must be `with_reference(...)` holding prompt
    `index`'s reference; the video then has the reference's size and length.
    """
    args = evaluate.sampler_args(v.settings, seed, v.device)
    if v.references is not None:
        f, _, h, w = v.references[index].shape  # [F', C, h, w]
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        args |= dict(num_frames=(f - 1) * temporal + 1, height=h * spatial, width=w * spatial)
    latents = pipe(
        prompt_embeds=v.prompt_embeds[index : index + 1].to(v.device),
        negative_prompt_embeds=v.negative_embeds.to(v.device),
        **args,
        output_type="latent",
    ).frames  # [1, F' + padding, C, h, w]
    # CogVideoX 1.5 pads F' to whole temporal patches in front; the pipeline drops the
    # padding only when it decodes itself.
    frames = (args["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    return latents[:, latents.shape[1] - frames :]


def decode(pipe, latents: torch.Tensor, prompt: str, seed: int):
    """[1, F', C, h, w] latents -> [F, H, W, 3] uint8 frames (the VAE must be on their device)."""
    video = pipe.decode_latents(latents)  # [1, 3, F, H, W] in [-1, 1]
    frames = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
    return evaluate.to_uint8(frames, prompt, seed)  # [F, H, W, 3]


def gpu_memory_gb(device) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / 2**30, 3)


def run(v: Validation, transformer, out: Path, step: int) -> dict[str, Any]:
    """Generate every prompt x seed with the transformer as it is, and release the memory after.

    Args:
        v: from `prepare`.
        transformer: the training transformer with its LoRA (unwrapped from DDP; compiled
            blocks and activation checkpointing are fine), on `v.device`.
        out: the run folder; videos go to `out/validation/step-{step:06d}/`, committed
            as one folder (a folder left from an earlier pass at this step is replaced).
        step: the training step.

    Returns:
        {"videos": count, "seconds": wall time, "gpu_memory_before_gb": allocated on
        entry, "gpu_memory_after_gb": allocated after the release}, memory None off GPU.

    Raises:
        FloatingPointError: non-finite pixels (fp16 overflow, a diverging LoRA).
    """
    import torch

    tic, ec = time.perf_counter(), v.settings
    before = gpu_memory_gb(v.device)
    wrapped = None if v.references is None else with_reference(transformer, None)
    pipe = pipeline(v, transformer if wrapped is None else wrapped)
    devices = [v.device] if v.device.type == "cuda" else []
    videos, latents = 0, []
    autocast = v.dtype if v.autocast else None
    try:
        with torch.random.fork_rng(devices=devices), sampling(transformer, autocast):
            jobs = [(i, p, s) for i, p in enumerate(ec.prompts) for s in ec.seeds]
            for i, _, s in jobs:  # all before the VAE moves
                if wrapped is not None:
                    wrapped.reference = v.references[i][None].to(v.device, v.dtype)
                latents.append(denoise(pipe, v, i, s))
            v.vae.to(v.device)
            with atomic_path(folder_of(out, step)) as tmp:
                tmp.mkdir()
                for (i, prompt, seed), x in zip(jobs, latents, strict=True):
                    frames = decode(pipe, x, prompt, seed)  # [F, H, W, 3] uint8
                    write_mp4(tmp / evaluate.video_name(i, seed), frames, ec.fps)
                    videos += 1
                for i, prompt in enumerate(ec.prompts if v.references is not None else []):
                    reference = v.references[i][None].to(v.device, v.dtype)
                    frames = decode(pipe, reference, prompt, 0)  # what the videos were given
                    write_mp4(tmp / f"p{i:02d}-reference.mp4", frames, ec.fps)
    finally:
        v.vae.to("cpu")
        del pipe, latents
        evaluate.release_memory(str(v.device))
    return {
        "videos": videos,
        "seconds": round(time.perf_counter() - tic, 3),
        "gpu_memory_before_gb": before,
        "gpu_memory_after_gb": gpu_memory_gb(v.device),
    }
