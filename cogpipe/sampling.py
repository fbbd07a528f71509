"""Sampling: one video from a loaded CogVideoX pipeline, in the mode its weights were trained in.

One function makes every video of the project: `cogpipe generate`, sweeps (through
`generate.generate_one`), validation during training and, through `condition_for`,
evaluation of held-out clips.

    request = SampleRequest(prompt="A slap.", seed=42, frames=49, height=480, width=720,
                            steps=50, guidance=6.0, condition=Condition("ic-lora", frames=edges))
    frames = sample(pipe, request)          # [F, H, W, 3] uint8
    latents = denoise(pipe, request)        # or in two phases (validation: VAE on the GPU
    frames = decode(pipe, latents, request) #   only for the second)

Modes, all with the model's own scheduler (`pipe.scheduler`, v-prediction) and
classifier-free guidance against the empty prompt:

- plain (lora, full, base): the pipeline's own call, so a video has exactly the numbers
  `cogpipe.evaluate.generate` gives it;
- IC-LoRA (`Condition("ic-lora", ...)`): the clean reference latents [1, F', C, h, w] go
  before the noised target along frames at every step, [1, 2F', C, h, w], with rotary
  embeddings for all 2F' frames, exactly as training feeds them; the model's output on the
  reference is dropped and only the target is stepped and decoded. The target has the
  reference's length and size.
- TIC-FT (`Condition("tic-ft", ...)`): one sequence of `condition_frames` clean latent
  frames, `buffer_frames` buffer frames and the target frames (the rest of `frames`: the
  request's `frames` is the whole sequence, as training's `precompute.frames`). With the
  target at timestep t, buffer frame k (1..B) sits at `tic_ft.buffer_timesteps(t)` =
  min(k / (B + 1) of the schedule, t), as in training, and the model is told t. The
  buffer starts from its clean estimate (given latents after the condition's, else the
  condition's last frame held) noised to those levels; the target starts from pure noise.
  A buffer frame waits at its level while the target is noisier; on the step the target
  passes below it, it moves by a DDIM (eta 0) update from its own level to the target's
  next one, and from then on steps with the target. Only the target frames are decoded
  out: 4 per target latent frame (49 frames with 1 + 3 latent frames: 36).

Step reuse: a request's `step_cache` (`cogpipe.step_cache`: first_block, pab, faster) puts
one of diffusers' caches on the transformer for the video and takes it off after; "none",
the default, is the exact path, untouched.

For evaluation: `condition_for(cfg, clip)` turns a held-out clip into its mode's condition,
and `side_by_side(condition_frames, frames)` puts condition and result in one video.

The model's generation decides the rest, read from its configs (`model_traits`), never
its name:

- image-to-video (5B-I2V, 1.5-5B-I2V): `CogVideoXImageToVideoPipeline` (`pipeline_class`),
  and every plain request carries its image (`SampleRequest.image`, uint8 [H, W, 3] at the
  request's size), which the pipeline encodes into the first latent frame; a text-to-video
  pipeline refuses one. Conditioned modes (IC-LoRA, TIC-FT) are text-to-video only.
- CogVideoX 1.5 (temporal patch 2) takes 16k+1 frames and sizes up to 768x1360 in either
  orientation; the pipeline pads the latent frames to whole temporal patches and `_plain`
  drops the padding. Learned positional embeddings (5B-I2V) fix the size (`check_fits`).
- without settings of its own, a video takes the model's native ones (`native`): the
  transformer's `sample_frames` (49, 81 for 1.5) and 480x720, 768x1360 for 1.5, at 8 fps
  (16 for 1.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cogpipe.compat import execution_device
from cogpipe.config import PipelineConfig, TicFtConfig
from cogpipe.models.cogvideox import VAE_SCALE_SPATIAL, Shape, model_shape
from cogpipe.step_cache import cached, step_context
from cogpipe.tic_ft import buffer_timesteps, tic_ft_sequence

TEMPORAL = 4  # video frames per latent frame after the first (CogVideoX VAE)
LARGEST_15 = (768, 1360)  # CogVideoX 1.5's largest trained size (short side, long side)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
StepCallback = Callable[[int, int], None] | None  # (denoising steps done, steps)


@dataclass(frozen=True)
class Condition:
    """What a conditioned video is given: frames (encoded here) or latents (used as they are).

    ic-lora: the reference video, already the condition function's output, frames uint8
    [F, H, W, 3] of the request's frames, height and width, or latents [F', C, h, w].
    tic-ft: frames uint8 [F, H, W, 3] of at least 4 * (condition_frames - 1) + 1 frames
    (the first ones are used; the last is held for the buffer's clean estimate), or latents
    [F', C, h, w] of at least condition + buffer frames (a training sample's own).
    """

    mode: Literal["ic-lora", "tic-ft"]
    frames: np.ndarray | None = None  # uint8 [F, H, W, 3]
    latents: Any = None  # torch [F', C, h, w], scaled as precompute stores them
    layout: TicFtConfig | None = None  # tic-ft: condition and buffer latent frames

    def __post_init__(self) -> None:
        if (self.frames is None) == (self.latents is None):
            raise ValueError("a Condition takes frames or latents, exactly one of them")
        if self.mode == "tic-ft" and self.layout is None:
            raise ValueError("a tic-ft Condition needs the run's layout (train.tic_ft)")


@dataclass(frozen=True)
class SampleRequest:
    """One video: prompt, seed and sampler settings, and an optional condition."""

    prompt: str
    seed: int = 42
    frames: int = 49  # video frames (tic-ft: of the whole condition + buffer + target sequence)
    height: int = 480
    width: int = 720
    steps: int = 50
    guidance: float = 6.0  # classifier-free guidance scale; <= 1: none
    fps: int = 8  # of the written mp4 (not read by the sampler)
    condition: Condition | None = None
    embeds: tuple | None = None  # (prompt [1, L, D], empty prompt [1, L, D]); None: T5 here
    image: np.ndarray | None = None  # image-to-video: uint8 [height, width, 3], the first frame
    step_cache: str = "none"  # reuse work across steps (`step_cache.OPTIONS`); none: exact
    step_cache_threshold: float = 0.1  # first_block's residual threshold (`step_cache`)


def request_for(settings, prompt: str, seed: int, **fields) -> SampleRequest:
    """A request with the sampler settings of an EvaluateConfig or GenerateOptions, its step
    cache included where the settings have one (evaluate's, so validation caches as it does)."""
    names = ("frames", "height", "width", "steps", "guidance", "fps")
    names += tuple(n for n in ("step_cache", "step_cache_threshold") if hasattr(settings, n))
    return SampleRequest(prompt, seed, **{n: getattr(settings, n) for n in names} | fields)


def sample(pipe, request: SampleRequest, device=None, on_step: StepCallback = None) -> np.ndarray:
    """One video. Returns [F, H, W, 3] uint8 (tic-ft: the target frames only).

    Args:
        pipe: a CogVideoXPipeline (a text encoder only when `request.embeds` is None).
        device: where the noise is drawn; default the pipeline's execution device.
        on_step: called as (steps done, steps) at the start and after every denoising step.

    Raises:
        FloatingPointError: non-finite pixels (fp16 overflow, a broken LoRA).
        ValueError: a condition that does not fit the request (see `Condition`).
    """
    return decode(pipe, denoise(pipe, request, device, on_step), request)


def denoise(pipe, request: SampleRequest, device=None, on_step: StepCallback = None):
    """The denoised latents to decode: [1, F', C, h, w] (tic-ft: the whole sequence).
    `on_step(steps done, steps)`: at the start and after every step (a person waits)."""
    import torch

    check_image(pipe, request)
    device = torch.device(device or execution_device(pipe))
    on_step = on_step or (lambda done, steps: None)
    on_step(0, request.steps)
    cache = (request.step_cache, request.step_cache_threshold, request.steps, request.guidance > 1)
    with torch.no_grad(), cached(pipe.transformer, *cache):
        if request.condition is None:
            return _plain(pipe, request, device, on_step)
        return _conditioned(pipe, request, device, on_step)


def is_image_to_video(pipe) -> bool:
    """Whether a pipeline's transformer takes image latents (from its and the VAE's configs)."""
    return model_shape(pipe.transformer.config, pipe.vae.config).image_to_video


def check_image(pipe, request: SampleRequest) -> None:
    """Refuse a request whose image does not fit the model: none for an image-to-video
    model, one for a text-to-video model, one of another size, or a condition with one.

    Raises:
        ValueError: naming what is missing or extra.
    """
    wanted, image = is_image_to_video(pipe), request.image
    if wanted and request.condition is not None:
        raise ValueError(
            f"{request.condition.mode} sampling is text-to-video only; this model is image-to-video"
        )
    if wanted and image is None:
        raise ValueError("the model is image-to-video: the request needs an image")
    if not wanted and image is not None:
        raise ValueError("the model is text-to-video: the request takes no image")
    if image is not None and image.shape != (request.height, request.width, 3):
        raise ValueError(
            f"image of shape {list(image.shape)}, the request is "
            f"{request.height}x{request.width} RGB"
        )


def decode(pipe, latents, request: SampleRequest) -> np.ndarray:
    """[1, F', C, h, w] latents -> [F, H, W, 3] uint8 (the VAE must be on their device)."""
    import torch

    from cogpipe.video import to_uint8

    with torch.no_grad():
        video = pipe.decode_latents(latents)  # [1, 3, F, H, W] in [-1, 1]
    frames = pipe.video_processor.postprocess_video(video=video, output_type="np")[0]
    frames = to_uint8(frames, request.prompt, request.seed)  # [F, H, W, 3]
    c = request.condition
    if c is not None and c.mode == "tic-ft":  # drop the condition's and the buffer's frames
        target = latents.shape[1] - c.layout.condition_frames - c.layout.buffer_frames
        frames = frames[len(frames) - TEMPORAL * target :]
    return frames


def _plain(pipe, request: SampleRequest, device, on_step: Callable[[int, int], None]):
    """Text-to-video through the pipeline's own call: [1, F', C, h, w], padding dropped."""
    import torch

    def stepped(pipe, i: int, t, tensors: dict) -> dict:  # diffusers' callback_on_step_end
        on_step(i + 1, request.steps)
        return tensors

    text = {
        "prompt": request.prompt,
        "max_sequence_length": pipe.transformer.config.max_text_seq_length,
    }
    if request.embeds is not None:
        text = {
            "prompt_embeds": request.embeds[0].to(device),
            "negative_prompt_embeds": request.embeds[1].to(device),
        }
    if request.image is not None:  # already at the request's size: the pipeline's resize is a no-op
        from PIL import Image

        text["image"] = Image.fromarray(request.image)
    latents = pipe(
        **text,
        num_frames=request.frames,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        generator=torch.Generator(device).manual_seed(request.seed),
        output_type="latent",
        callback_on_step_end=stepped,
    ).frames  # [1, F' + padding, C, h, w]
    # CogVideoX 1.5 pads F' to whole temporal patches in front; the pipeline drops the
    # padding only when it decodes itself.
    frames = (request.frames - 1) // pipe.vae_scale_factor_temporal + 1
    return latents[:, latents.shape[1] - frames :]


# --------------------------------------------------------------------------- conditioned


def prompt_embeds(pipe, request: SampleRequest, device):
    """[2, L, D] (empty prompt, prompt) with guidance, else [1, L, D]."""
    import torch

    if request.embeds is not None:
        positive, negative = (e.to(device) for e in request.embeds)
    else:
        positive, negative = pipe.encode_prompt(
            request.prompt,
            do_classifier_free_guidance=request.guidance > 1,
            max_sequence_length=pipe.transformer.config.max_text_seq_length,
            device=device,
        )
    return torch.cat([negative, positive]) if request.guidance > 1 else positive


def frame_levels(t, prefix: int, buffer: int, target: int, num_train_timesteps: int):
    """Each fed latent frame's timestep with the target at `t`: int64 [prefix + buffer + target].

    The clean prefix (reference or condition) at 0, buffer frames at
    `tic_ft.buffer_timesteps(t)`, the target at t; a negative t (past the last step) is clean.
    """
    import torch

    t = torch.as_tensor(t, dtype=torch.int64).reshape(1)
    levels = buffer_timesteps(t, buffer, num_train_timesteps)[0]  # [buffer]
    return torch.cat([torch.zeros(prefix, dtype=torch.int64), levels, t.expand(target)])


def condition_latents(pipe, request: SampleRequest, needed: int, device, dtype):
    """The condition's latents [1, >= needed, C, h, w] on `device` (frames: VAE-encoded here)."""
    import torch

    from cogpipe.models.cogvideox import encode_video

    c = request.condition
    if c.latents is not None:
        latents = c.latents[None]
    else:
        frames = c.frames
        if c.mode == "tic-ft":  # hold the condition's last frame over the buffer's frames
            count = TEMPORAL * (needed - 1) + 1
            first = TEMPORAL * (c.layout.condition_frames - 1) + 1
            if len(frames) < first:
                raise ValueError(
                    f"tic-ft condition: {len(frames)} frames, the layout needs {first}"
                )
            frames = frames[:first][np.minimum(np.arange(count), first - 1)]
        g = torch.Generator().manual_seed(request.seed)
        latents = encode_video(pipe.vae, torch.from_numpy(np.ascontiguousarray(frames))[None], [g])
    if latents.shape[1] < needed:
        raise ValueError(f"{c.mode} condition: {latents.shape[1]} latent frames, needs {needed}")
    return latents.to(device, dtype)


def _conditioned(pipe, request: SampleRequest, device, on_step: Callable[[int, int], None]):
    """IC-LoRA or TIC-FT: the sequence of `Condition`, denoised by `_loop`.

    With a temporal patch of 2 (CogVideoX 1.5) the sequence is padded as training pads it
    (`cogvideox.pad_frames`): ic-lora, the reference and the target each get copies of
    their first frame in front; tic-ft, the whole sequence does, one more clean condition
    frame. The padding is stripped from what is returned.

    Returns ic-lora: the target latents [1, F', C, h, w]; tic-ft: the whole sequence
    [1, condition + buffer + target, C, h, w].
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from cogpipe.models.cogvideox import pad_frames

    c, scheduler = request.condition, pipe.scheduler
    embeds = prompt_embeds(pipe, request, device)
    scheduler.set_timesteps(request.steps, device=device)
    t0 = scheduler.timesteps[:1].long()  # [1]: where every sequence starts
    g = torch.Generator(device).manual_seed(request.seed)
    frames = (request.frames - 1) // TEMPORAL + 1  # latent frames of the request
    patch = pipe.transformer.config.patch_size_t or 1
    pad = -frames % patch  # frames put in front of the target (ic-lora) or the sequence
    shape = (
        1,
        frames,
        pipe.transformer.config.in_channels,
        request.height // pipe.vae_scale_factor_spatial,
        request.width // pipe.vae_scale_factor_spatial,
    )
    noise = randn_tensor(
        (1, frames + pad, *shape[2:]), generator=g, device=device, dtype=embeds.dtype
    )
    if c.mode == "ic-lora":
        prefix, buffer, target = frames + pad, 0, frames + pad
        reference = condition_latents(pipe, request, frames, device, embeds.dtype)
        if reference.shape != shape:
            raise ValueError(
                f"ic-lora reference latents {list(reference.shape[1:])} do not fit "
                f"the request's {list(shape[1:])} (frames, height, width)"
            )
        reference = pad_frames(reference, patch)
        x = torch.cat([reference, noise * scheduler.init_noise_sigma], dim=1)  # [1, 2F', C, h, w]
    else:
        prefix, buffer = c.layout.condition_frames, c.layout.buffer_frames
        target = frames - prefix - buffer
        if target < 1:
            raise ValueError(
                f"tic-ft: {request.frames} frames are {frames} latent frames, no room "
                f"for a target after {prefix} condition + {buffer} buffer frames"
            )
        context = condition_latents(pipe, request, prefix + buffer, device, embeds.dtype)
        clean = torch.cat([context[:, : prefix + buffer], torch.zeros_like(noise[:, :target])], 1)
        clean, prefix = pad_frames(clean, patch), prefix + pad
        layout = TicFtConfig(condition_frames=prefix, buffer_frames=buffer, target_frames=target)
        x = tic_ft_sequence(scheduler, clean, noise, t0, layout)  # buffer at the training levels
        x[:, prefix + buffer :] = noise[:, prefix + buffer :] * scheduler.init_noise_sigma

    def levels(t):
        n = scheduler.config.num_train_timesteps
        return frame_levels(t, prefix, buffer, target, n).to(device)

    x = _loop(pipe, x, prefix, levels, embeds, request, g, on_step)
    return x[:, prefix + pad :] if c.mode == "ic-lora" else x[:, pad:]


def _loop(pipe, x, fixed: int, levels, embeds, request: SampleRequest, generator, on_step):
    """The denoising loop of `CogVideoXPipeline.__call__` over a whole sequence x [1, L, C, h, w]
    whose first `fixed` frames stay as given; `levels(t)` gives every frame's timestep [L]."""
    from cogpipe.models.cogvideox import rotary_embeddings

    scheduler = pipe.scheduler
    timesteps = scheduler.timesteps
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    rotary = rotary_embeddings(
        pipe.transformer.config, request.height, request.width, x.shape[1], x.device
    )  # every fed frame, as in training
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    x0 = None  # the last step's clean predictions [1, L, C, h, w] (the DPM solver's history)
    for i, t in enumerate(timesteps):
        v = velocity(pipe.transformer, x, t, embeds, rotary, request.guidance)
        back = timesteps[i - 1] if i > 0 else None
        x, x0 = _step(scheduler, x, v, levels(t), levels(t - stride), (t, back, x0, fixed), extra)
        on_step(i + 1, len(timesteps))
    return x


def velocity(transformer, x, t, embeds, rotary, guidance: float):
    """The guided v-prediction of every fed frame, fp32 [1, L, C, h, w]; the model is told t."""
    import torch

    guided = guidance > 1
    fed = torch.cat([x, x]) if guided else x  # [2, L, C, h, w]: empty prompt, prompt
    with step_context(transformer):  # a step cache's state, when one is on (`step_cache`)
        v = transformer(
            hidden_states=fed,
            encoder_hidden_states=embeds,
            timestep=t.expand(len(fed)),
            image_rotary_emb=rotary,
            return_dict=False,
        )[0].float()
    if not guided:
        return v
    uncond, cond = v.chunk(2)
    return uncond + guidance * (cond - uncond)


def _step(scheduler, x, v, now, after, state: tuple, extra: dict):
    """Move every frame from its level `now` [L] to `after` [L]: frames at the target's level
    by the scheduler's own step, buffer frames the target passes by `ddim`; the rest wait.

    Returns (x [1, L, C, h, w], clean predictions [1, L, C, h, w]).
    """
    import torch
    from diffusers import CogVideoXDPMScheduler

    t, back, x0, fixed = state
    moving, joining = now == t, (now < t) & (after < now)
    moving[:fixed] = joining[:fixed] = False
    new = x.clone()
    pred = torch.zeros_like(v) if x0 is None else x0.clone()
    if isinstance(scheduler, CogVideoXDPMScheduler):  # multistep: it keeps the last x0
        old = None if back is None else x0[:, moving]
        out, pred[:, moving] = scheduler.step(
            v[:, moving], old, t, back, x[:, moving], **extra, return_dict=False
        )
    else:
        out = scheduler.step(v[:, moving], t, x[:, moving], **extra, return_dict=False)[0]
    new[:, moving] = out.to(x.dtype)
    for f in joining.nonzero().flatten().tolist():
        new[:, f], pred[:, f] = ddim(scheduler, x[:, f], v[:, f], int(now[f]), int(after[f]))
    return new, pred


def ddim(scheduler, x, v, level: int, to: int):
    """A DDIM (eta 0) move of v-predicted latents from timestep `level` to `to` (< 0: clean).

    Returns (the moved latents in x's dtype, the clean prediction in fp32).
    """
    a = float(scheduler.alphas_cumprod[level])
    b = float(scheduler.alphas_cumprod[to] if to >= 0 else scheduler.final_alpha_cumprod)
    clean = a**0.5 * x.float() - (1 - a) ** 0.5 * v  # v-prediction -> x0 and noise
    noise = (1 - a) ** 0.5 * x.float() + a**0.5 * v
    return (b**0.5 * clean + (1 - b) ** 0.5 * noise).to(x.dtype), clean


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Traits:
    """What sampling needs to know of a model: its generation and its native settings."""

    shape: Shape
    native: tuple[int, int, int]  # (frames, height, width) a video takes by default
    fps: int = 8  # of its videos: 16 for CogVideoX 1.5, else 8


def native(shape: Shape, transformer_config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(frames, height, width) of a model's own videos: the transformer's `sample_frames`
    (49; 81 for 1.5), its fixed size, 768x1360 for 1.5 (whose `sample_*` is a RoPE grid of
    2400 px, not a video size) or else its `sample_*` size (480x720)."""
    frames = transformer_config["sample_frames"]
    if shape.fixed_size is not None:
        return (frames, *shape.fixed_size)
    if shape.temporal_patch > 1:
        return (frames, *LARGEST_15)
    t = transformer_config
    return frames, t["sample_height"] * VAE_SCALE_SPATIAL, t["sample_width"] * VAE_SCALE_SPATIAL


def traits_of(transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any]) -> Traits:
    shape = model_shape(transformer_config, vae_config)
    return Traits(shape, native(shape, transformer_config), 16 if shape.temporal_patch > 1 else 8)


@lru_cache(maxsize=16)
def model_traits(model: str) -> Traits:
    """A model's `Traits` from its transformer and VAE configs (a hub id or a folder)."""
    from cogpipe.models.cogvideox import transformer_config, vae_config

    return traits_of(transformer_config(model), vae_config(model))


def pipeline_class(shape: Shape):
    """CogVideoXImageToVideoPipeline for an image-to-video model, else CogVideoXPipeline."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    return CogVideoXImageToVideoPipeline if shape.image_to_video else CogVideoXPipeline


def check_fits(shape: Shape, frames: int, height: int, width: int) -> tuple[str, str] | None:
    """Why a model cannot make videos of this length or size: (the setting, the reason),
    or None. Sizes and 8k+1 frames are checked where they are given; this adds the
    model's own limits."""
    size = f"{height}x{width}"
    if shape.temporal_patch > 1 and (frames - 1) % (TEMPORAL * 4):
        return "frames", (
            f"{frames}: CogVideoX 1.5 (temporal patch {shape.temporal_patch}) "
            f"takes 16k+1 frames (17, 33, 49, 65, 81)"
        )
    short, long = LARGEST_15
    if shape.temporal_patch > 1 and (min(height, width) > short or max(height, width) > long):
        return "size", f"{size}: CogVideoX 1.5 makes videos up to {short}x{long} or {long}x{short}"
    if shape.fixed_size is not None and (height, width) != shape.fixed_size:
        h, w = shape.fixed_size
        return "size", (
            f"{size}: the model's learned positional embeddings fix its size at {h}x{w}"
        )
    return None


def read_image(path: str | Path, height: int, width: int, flag: str = "--image") -> np.ndarray:
    """An image file, or a video's first frame, resized and centre-cropped to height x width:
    uint8 [H, W, 3].

    Raises:
        ValueError: the file is missing or cannot be decoded (naming `flag` and the file).
    """
    from cogpipe.video import probe_video, read_frames, resize_center_crop

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            frame = np.array(Image.open(path).convert("RGB"))  # writable, for torch
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"{flag} {path}: not a readable image ({e})") from None
    else:
        _, reason = probe_video(path)
        if reason:
            raise ValueError(f"{flag} {path}: {reason}")
        frame = read_frames(path, [0.0])[0]
    return resize_center_crop(frame[None], height, width)[0]


# --------------------------------------------------------------------------- evaluation


def side_by_side(condition_frames: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """The condition (left, scaled to the result's height) beside the result.

    Args:
        condition_frames: uint8 [Fc, Hc, Wc, 3]: a reference video (as long as the result)
            or TIC-FT condition frames (shorter: its last frame is held).
        frames: uint8 [F, H, W, 3], the sampled video.

    Returns:
        uint8 [F, H, Wc' + W, 3], Wc' = Wc * H / Hc rounded to an even width (for mp4).
    """
    from cogpipe.video import resize_center_crop

    f, h = frames.shape[:2]
    fc, hc, wc = condition_frames.shape[:3]
    width = max(2, round(wc * h / hc / 2) * 2)
    left = resize_center_crop(condition_frames, h, width)[np.minimum(np.arange(f), fc - 1)]
    return np.concatenate([left, frames], axis=2)


def _field(row, name: str):
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def condition_for(cfg: PipelineConfig, clip) -> Condition | None:
    """The condition a held-out clip gives a checkpoint of `cfg.train.mode`; None for lora, full.

    The clip's window from its start at `precompute.fps` (spread over the clip when it is
    shorter), resized and centre-cropped to evaluate's height x width: ic-lora takes
    `evaluate.frames` frames through the run's condition function (`precompute.reference`
    with `reference_options`), tic-ft the first 4 * (condition_frames - 1) + 1 frames.

    Args:
        cfg: the pipeline config of the run.
        clip: a row of check's clips.parquet (mapping or named tuple: path, start, end).

    Raises:
        VideoError: the clip cannot be decoded; ConditionError: the condition function failed.
    """
    from cogpipe import condition
    from cogpipe.video import even_times, read_frames, resize_center_crop, window_times

    t, ec, p = cfg.train, cfg.evaluate, cfg.precompute
    if t.mode not in ("ic-lora", "tic-ft"):
        return None
    count = ec.frames if t.mode == "ic-lora" else TEMPORAL * (t.tic_ft.condition_frames - 1) + 1
    start, end = float(_field(clip, "start")), float(_field(clip, "end"))
    times = window_times(start, end, p.fps, count) or even_times(start, end, count)
    frames = resize_center_crop(read_frames(_field(clip, "path"), times), ec.height, ec.width)
    if t.mode == "tic-ft":
        return Condition("tic-ft", frames=frames, layout=t.tic_ft)
    fn = condition.load(p.reference)
    return Condition(
        "ic-lora", frames=condition.apply(fn, frames, p.reference_options, p.reference)
    )
