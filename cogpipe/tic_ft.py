"""TIC-FT's noise layout (temporal in-context fine-tuning, arXiv 2506.00996), shared by
training (`cogpipe.train`) and sampling (`cogpipe.sampling`).

A TIC-FT sequence is clean condition frames, then buffer frames whose noise rises with
their position, then the target frames at the sampled timestep. Training builds such a
sequence from clean latents (`tic_ft_sequence`); sampling feeds each frame its level
(`sampling.frame_levels`). Both read the buffer's levels from `buffer_timesteps`, so they
live here, below both, rather than in train (which sampling would then import).

    levels = buffer_timesteps(torch.tensor([999]), 3, 1000)  # [[250, 500, 750]]
"""

from __future__ import annotations

from cogpipe.config import TicFtConfig


def buffer_timesteps(timesteps, buffer_frames: int, num_train_timesteps: int):
    """TIC-FT buffer noise levels: the k-th of `buffer_frames` buffer frames (k = 1..B) sits
    at k / (B + 1) of the schedule, never above the target's timestep.

    With 1000 timesteps and 3 buffer frames: 250, 500, 750 under a target at 999; 250,
    500, 600 under one at 600; the target's own level under one below 250. A sequence
    thus rises from clean (condition) to the target's noise, as it does at the start of
    sampling and at every later point where the target has reached `timesteps`.

    Args:
        timesteps: the targets' timesteps, int64 [B].

    Returns:
        int64 [B, buffer_frames], non-decreasing along frames.
    """
    import torch

    k = torch.arange(1, buffer_frames + 1, device=timesteps.device)
    levels = k * num_train_timesteps // (buffer_frames + 1)  # [buffer_frames]
    return torch.minimum(levels[None, :], timesteps[:, None])


def tic_ft_sequence(scheduler, latents, noise, timesteps, layout: TicFtConfig):
    """The TIC-FT model input: condition frames clean, buffer frames at `buffer_timesteps`,
    target frames at `timesteps`.

    Args:
        latents, noise: [B, F', C, h, w] with F' = condition + buffer + target frames.
        timesteps: int64 [B], the targets' timesteps.

    Returns:
        [B, F', C, h, w] in the latents' dtype.
    """
    import torch

    c, nb = layout.condition_frames, layout.buffer_frames
    levels = buffer_timesteps(timesteps, nb, scheduler.config.num_train_timesteps)  # [B, nb]
    buffers = [
        scheduler.add_noise(latents[:, f : f + 1], noise[:, f : f + 1], levels[:, f - c])
        for f in range(c, c + nb)
    ]
    target = scheduler.add_noise(latents[:, c + nb :], noise[:, c + nb :], timesteps)
    return torch.cat([latents[:, :c], *buffers, target], dim=1)
