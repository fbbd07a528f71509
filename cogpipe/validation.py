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
- denoising and decoding are two phases, the VAE is on the GPU only for the second (an
  image-to-video model's for both: the pipeline encodes the image), and
  afterwards the pipeline goes, garbage is collected and the CUDA cache emptied (other
  trainers hold 8-10 GB more after validation);
- every draw comes from the explicit generators and the global RNG is forked, so a run
  with validation has exactly the losses of one without.

    v = validation.prepare(cfg, device, dtype)                 # before the loop
    stats = validation.run(v, transformer, out, step)          # every validation_every steps

Evaluate's step cache (`evaluate.step_cache`) is on for validation videos as for
evaluation's; its other speed options are not: `fp8_linears` would quantise the weights in
training, and training compiles its blocks by `train.compile`.

Every video is made by the shared sampler (`cogpipe.sampling`) from the precomputed
embeddings. Conditioned modes take one training sample per prompt (training passes
sample i % samples for prompt i) and the sample's size and length instead of evaluate's:

- ic-lora: the sample's reference latents precede the noised target along frames at
  every step, exactly as training feeds them; the decoded reference is written beside
  the videos as `p00-reference.mp4`;
- tic-ft: the sample's condition latents stay clean and its buffer latents start at the
  training noise levels (`tic_ft.buffer_timesteps`) and are denoised with the target; the
  videos hold the target frames, and the decoded condition is written as
  `p00-condition.mp4`.

A full fine-tune (`train.mode: full`) samples its fp32 weights under autocast to the
frozen weights' dtype on a GPU.

An image-to-video model (5B-I2V, 1.5-5B-I2V; read from its configs) samples through
CogVideoXImageToVideoPipeline, as evaluate does: prompt i starts from the first frame of
held-out clip i mod N of check's reference clips (`heldout_images`), resized to the
validation size. Evaluate's frames and size must fit the model (`check_shape`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used, like every stage module
    import torch

from cogpipe import evaluate
from cogpipe import sampling as sampler
from cogpipe.config import EvaluateConfig, PipelineConfig, TicFtConfig
from cogpipe.models import cogvideox
from cogpipe.stages import upstream_results
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
    conditions: list[torch.Tensor] | None = None  # ic-lora, tic-ft: [F', C, h, w] per prompt, CPU
    autocast: bool = False  # full fine-tune on a GPU: weights in another dtype than `dtype`
    mode: str = "lora"  # train.mode
    layout: TicFtConfig | None = None  # tic-ft: condition and buffer latent frames
    images: list[np.ndarray] | None = None  # image-to-video: uint8 [H, W, 3] per prompt


def folder_of(out: Path, step: int) -> Path:
    """`out/validation/step-{step:06d}/`: the videos of one validation."""
    return Path(out) / FOLDER / f"step-{step:06d}"


def check_shape(
    ec: EvaluateConfig, transformer_config: dict[str, Any], vae_config: dict[str, Any] | None = None
) -> None:
    """Fail before training when the model cannot generate `ec`'s videos.

    EvaluateConfig has already checked 4k+1 frames and sizes in multiples of 16; this adds
    what depends on the model: sizes in whole transformer patches of VAE pixels and, with
    the VAE's config, the generation's own limits (`sampling.check_fits`).

    Raises:
        ValueError: naming the setting and what the model needs.
    """
    multiple = cogvideox.VAE_SCALE_SPATIAL * transformer_config["patch_size"]
    if ec.height % multiple or ec.width % multiple:
        raise ValueError(
            f"evaluate height and width must be multiples of {multiple} for this model "
            f"(VAE 8x, patch {transformer_config['patch_size']}), got {ec.height}x{ec.width}"
        )
    if vae_config is None:
        return
    shape = cogvideox.model_shape(transformer_config, vae_config)
    wrong = sampler.check_fits(shape, ec.frames, ec.height, ec.width)
    if wrong is not None:
        field = "evaluate.frames" if wrong[0] == "frames" else "evaluate.height/width"
        raise ValueError(f"{field} {wrong[1]}")


def heldout_images(cfg: PipelineConfig, ec: EvaluateConfig, check=None) -> list[np.ndarray]:
    """An image-to-video model's validation images: prompt i's is the first frame of
    held-out clip i mod N of check's reference clips, at `ec`'s size, uint8 [H, W, 3].

    Args:
        check: check's StageResult; None: this config's, finished.

    Raises:
        ValueError: check has not finished for this config, or kept no held-out clip.
    """
    from cogpipe.heldout import first_frames, paired_clips
    from cogpipe.workspace import StageNotReady

    try:
        check = check or upstream_results(cfg, "precompute")["check"]
    except (StageNotReady, OSError) as e:  # not run yet; its source gone
        raise ValueError(
            f"validation of image-to-video model {cfg.model} takes its images from "
            f"check's held-out clips: {e}"
        ) from None
    paired, _ = paired_clips(cfg, check, None, list(ec.prompts))
    return first_frames(paired, ec.height, ec.width)


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


def prepare(
    cfg: PipelineConfig, device, dtype: torch.dtype, conditions=None, images=None
) -> Validation:
    """Everything validation needs, once, before training starts.

    Args:
        cfg: the pipeline config (uses `model`, `evaluate` and `train.mode`).
        device: where the transformer trains (e.g. `accelerator.device`).
        dtype: the frozen weights' dtype (fp16 for 2B-type, bf16 for 5B-type models on GPU).
        conditions: ic-lora and tic-ft: one training sample's latents [F', C, h, w] per
            prompt (CPU tensors): ic-lora its reference latents, tic-ft its own latents
            (their condition and buffer frames are used).
        images: an image-to-video model's first frame per prompt, uint8 [H, W, 3] at
            evaluate's size; None: `heldout_images`.

    Returns:
        A Validation holding CPU tensors and modules only.

    Raises:
        ValueError: the model cannot generate evaluate's frames, height and width; or
            conditions missing in a conditioned mode, or not one per prompt; an
            image-to-video model without its images (`heldout_images`) or in a conditioned
            mode.
    """
    import torch

    ec, mode = cfg.train.validation_settings(cfg.evaluate), cfg.train.mode
    transformer_config = cogvideox.transformer_config(cfg.model)
    vae_config = cogvideox.vae_config(cfg.model)
    check_shape(ec, transformer_config, vae_config)
    conditioned = mode in ("ic-lora", "tic-ft")
    if conditioned and (conditions is None or len(conditions) != len(ec.prompts)):
        count = "no" if conditions is None else len(conditions)
        raise ValueError(f"mode {mode}: {count} condition latents for {len(ec.prompts)} prompts")
    if cogvideox.model_shape(transformer_config, vae_config).image_to_video:
        if conditioned:
            raise ValueError(
                f"train.mode {mode}: validation samples it text-to-video only, and "
                f"model {cfg.model} is image-to-video"
            )
        images = images if images is not None else heldout_images(cfg, ec)
        if len(images) != len(ec.prompts):
            raise ValueError(f"{len(images)} validation images for {len(ec.prompts)} prompts")
    else:
        images = None
    embeds, negative = encode_prompts(cfg.model, ec.prompts, device, dtype)
    vae = cogvideox.load_vae(cfg.model, "cpu", dtype)
    vae.enable_tiling()  # as evaluate's pipeline: 49x480x720 decodes in tiles
    scheduler = load_sampler(cfg.model)
    device = torch.device(device)
    autocast = mode == "full" and device.type == "cuda"
    layout = cfg.train.tic_ft if mode == "tic-ft" else None
    return Validation(
        ec,
        embeds,
        negative,
        vae,
        scheduler,
        device,
        dtype,
        conditions if conditioned else None,
        autocast,
        mode,
        layout,
        images,
    )


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
                        self.config,
                        h * cogvideox.VAE_SCALE_SPATIAL,
                        w * cogvideox.VAE_SCALE_SPATIAL,
                        x.shape[1],
                        x.device,
                    )
                out = self.transformer(hidden_states=x, image_rotary_emb=image_rotary_emb, **kwargs)
                return (out[0][:, -f:],)  # return_dict=False: the target's outputs

        _WITH_REFERENCE = WithReference
    return _WITH_REFERENCE(transformer, reference)


def pipeline(v: Validation, transformer):
    """The model's pipeline (CogVideoXImageToVideoPipeline for an image-to-video model, else
    CogVideoXPipeline) over the training transformer, without a text encoder."""
    shape = cogvideox.model_shape(transformer.config, v.vae.config)
    pipe = sampler.pipeline_class(shape)(
        tokenizer=None, text_encoder=None, vae=v.vae, transformer=transformer, scheduler=v.scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def request(v: Validation, index: int, seed: int) -> sampler.SampleRequest:
    """The sampler's request for prompt `index` and `seed`: evaluate's settings, or with a
    condition the size and length of the condition's training sample."""
    ec = v.settings
    fields: dict[str, Any] = {"embeds": (v.prompt_embeds[index : index + 1], v.negative_embeds)}
    if v.images is not None:
        fields["image"] = v.images[index]
    if v.conditions is not None:
        latents = v.conditions[index]  # [F', C, h, w]
        f, _, h, w = latents.shape
        spatial = cogvideox.VAE_SCALE_SPATIAL
        fields |= dict(
            frames=(f - 1) * sampler.TEMPORAL + 1,
            height=h * spatial,
            width=w * spatial,
            condition=sampler.Condition(v.mode, latents=latents, layout=v.layout),
        )
    return sampler.request_for(ec, ec.prompts[index], seed, **fields)


def denoise(pipe, v: Validation, index: int, seed: int) -> torch.Tensor:
    """Latents of prompt `index` and `seed` on the device, to `decode` (see `sampling.denoise`)."""
    return sampler.denoise(pipe, request(v, index, seed), v.device)


def decode(pipe, latents: torch.Tensor, prompt: str, seed: int):
    """Plain [1, F', C, h, w] latents -> [F, H, W, 3] uint8 (the VAE must be on their device)."""
    return sampler.decode(pipe, latents, sampler.SampleRequest(prompt, seed))


def condition_video(pipe, v: Validation, index: int) -> tuple[str, np.ndarray]:
    """(file name, frames) of what prompt `index` was given: the decoded reference (ic-lora)
    or condition frames (tic-ft)."""
    latents = v.conditions[index][None].to(v.device, v.dtype)  # [1, F', C, h, w]
    if v.mode == "tic-ft":
        latents = latents[:, : v.layout.condition_frames]
    name = "reference" if v.mode == "ic-lora" else "condition"
    return f"p{index:02d}-{name}.mp4", decode(pipe, latents, v.settings.prompts[index], 0)


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
    pipe = pipeline(v, transformer)
    devices = [v.device] if v.device.type == "cuda" else []
    videos, latents = 0, []
    autocast = v.dtype if v.autocast else None
    try:
        with torch.random.fork_rng(devices=devices), sampling(transformer, autocast):
            jobs = [(i, request(v, i, s)) for i in range(len(ec.prompts)) for s in ec.seeds]
            if v.images is not None:  # the pipeline encodes each image on the device
                v.vae.to(v.device)
            for _, job in jobs:  # all before the VAE moves (image-to-video: it has)
                latents.append(sampler.denoise(pipe, job, v.device))
            v.vae.to(v.device)
            with atomic_path(folder_of(out, step)) as tmp:
                tmp.mkdir()
                for (i, job), x in zip(jobs, latents, strict=True):
                    frames = sampler.decode(pipe, x, job)  # [F, H, W, 3] uint8
                    write_mp4(tmp / evaluate.video_name(i, job.seed), frames, ec.fps)
                    videos += 1
                for i in range(len(ec.prompts) if v.conditions is not None else 0):
                    name, frames = condition_video(pipe, v, i)  # what the videos were given
                    write_mp4(tmp / name, frames, ec.fps)
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
