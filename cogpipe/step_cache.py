"""Step reuse: diffusers' caches that skip transformer work a denoising step shares with
an earlier one, and how far a cached video lands from the exact one.

Generation is at its bf16 floor (issue 24); what is left is to reuse work across steps
where the user accepts a deviation. Every option is a diffusers hook config
(`diffusers.hooks`), put on the transformer for one video and taken off after it:

    with cached(pipe.transformer, "first_block", 0.1, steps=50):
        latents = ...  # each transformer call inside step_context(pipe.transformer)
    deviation(exact_latents, latents, exact_frames, frames)  # {"rel_l2": ..., "psnr_db": ...}

Options (`OPTIONS`):

- none: no hook at all; the exact path.
- first_block (First Block Cache): every step runs the first block; when its residual
  moved less than `threshold` (mean absolute change relative to the last computed one)
  the other blocks' residual from the last full step is reused. 0 never skips; larger
  skips more.
- pab (Pyramid Attention Broadcast): the blocks' attention output is computed every
  second call while the timestep is within 100-800 and reused in between, the settings
  of diffusers' CogVideoX example. `threshold` is unused.
- faster (FasterCache): attention is extrapolated from the last two computed steps every
  second call below timestep 681, and with guidance the unconditional half of the batch
  is skipped 4 calls in 5 below timestep 781 (approximated from the conditional half's
  frequencies), as in diffusers' CogVideoX example. `threshold` is unused.

PAB and FasterCache decide by the current timestep: `cached` records the one each
transformer call is given (a forward pre-hook, removed on exit). Hook state is keyed by
the cache context's name; cogpipe batches the unconditional and conditional passes in
one call, as diffusers' `CogVideoXPipeline` does, so both use `CONTEXT`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

OPTIONS = ("none", "first_block", "pab", "faster")
CONTEXT = "cond_uncond"  # the cache context of a call with both guidance halves batched


def cache_config(option: str, threshold: float, timestep=lambda: 0, guided: bool = True):
    """The diffusers hook config of a cache option (None for "none").

    Args:
        option: one of `OPTIONS`.
        threshold: first_block's residual threshold; unused by pab and faster.
        timestep: returns the timestep of the transformer call being run (pab, faster).
        guided: whether calls batch the unconditional and conditional halves (faster
            skips the unconditional half only then).

    Raises:
        ValueError: an unknown option or a negative threshold.
    """
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
    )

    if option not in OPTIONS:
        raise ValueError(f"step cache {option!r}: known are {', '.join(OPTIONS)}")
    if threshold < 0:
        raise ValueError(f"step cache threshold {threshold}: must be >= 0")
    if option == "first_block":
        return FirstBlockCacheConfig(threshold=threshold)
    if option == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep,
        )
    if option == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=timestep,
            attention_weight_callback=lambda _: 0.3,
            unconditional_batch_skip_range=5,
            unconditional_batch_timestep_skip_range=(-1, 781),
            tensor_format="BFCHW",  # the transformer's output [B, F, C, h, w]
            is_guidance_distilled=not guided,
        )
    return None


@contextmanager
def cached(
    transformer, option: str, threshold: float, steps: int, guided: bool = True
) -> Iterator[None]:
    """The transformer with a step cache for the block, taken off on exit (an error
    included), so it computes exactly as before afterwards; "none" touches nothing.

    Args:
        transformer: a diffusers CogVideoX transformer (a `CacheMixin`).
        option, threshold, guided: as `cache_config`.
        steps: the video's denoising steps; a cache reuses one step's work in a later
            step, so it needs 2 or more.

    Raises:
        ValueError: an unknown option, a negative threshold, or fewer than 2 steps.
    """
    if option == "none":
        yield
        return
    if steps < 2:
        raise ValueError(f"step cache {option}: {steps} denoising step, it needs 2 or more")
    seen: dict[str, Any] = {"timestep": 1000}

    def record(module, args, kwargs) -> None:  # the timestep of the call about to run
        seen["timestep"] = float(kwargs["timestep"].flatten()[0])

    config = cache_config(option, threshold, lambda: seen["timestep"], guided)
    handle = transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        transformer.enable_cache(config)
        yield
    finally:
        handle.remove()
        if transformer.is_cache_enabled:
            transformer.disable_cache()


def step_context(transformer):
    """Where one transformer call runs: its cache context when a cache is on, else
    nothing (the exact path stays as it was)."""
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context(CONTEXT)
    return nullcontext()


# --------------------------------------------------------------------------- deviation


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos of one shape, in dB (inf: equal).

    Raises:
        ValueError: frames of different shapes or not uint8.
    """
    if a.shape != b.shape or a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"psnr takes two uint8 arrays of one shape, got {a.shape}, {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def deviation(exact_latents, latents, exact_frames: np.ndarray, frames: np.ndarray) -> dict:
    """How far an option's video is from the exact one of the same seed.

    Args:
        exact_latents, latents: denoised latents of one shape (torch), e.g. [1, F', C, h, w].
        exact_frames, frames: the decoded videos, uint8 [F, H, W, 3].

    Returns:
        {"rel_l2": ||latents - exact|| / ||exact|| (fp64), "psnr_db": `psnr` of the frames}.
    """
    exact, got = exact_latents.double(), latents.double()
    rel_l2 = float((got - exact).norm() / exact.norm())
    return {"rel_l2": rel_l2, "psnr_db": psnr(exact_frames, frames)}
