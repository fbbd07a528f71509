"""Every use of another library's private API, in one place, each pinned by
tests/test_compat.py: when an upgrade moves one, that test names it.

Each is here because no public API does the job in the pinned versions:
- transformers 5.24: video processors need torchvision (`BaseVideoProcessor` is declared
  `requires torchvision`); `NumpyFrames` overrides its `_prepare_input_videos` and
  `_preprocess` so that machines without a working torchvision caption video models
  (cogpipe.vlm).
- diffusers 0.42: `DiffusionPipeline._execution_device` is the device a pipeline computes on
  once offloading hooks moved its modules; `pipe.device` is the first module's.
- torch: `torch._dynamo.config` is where torch.compile's recompile limit is set.
- argparse: `HelpFormatter` sizes its command column without the commands' own indent.
- Prefect 3.8: the file lease storage lists its leases only through `_load_expiration_index`.

Nothing else in cogpipe, tasks or flows touches a private attribute of another library.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def execution_device(pipe):
    """The device a diffusers pipeline computes on (offloaded modules included)."""
    return pipe._execution_device


def dynamo_config():
    """torch.compile's settings module (recompile_limit, cache sizes)."""
    import torch

    return torch._dynamo.config


async def lease_expiration_index(storage) -> dict[str, str]:
    """{lease id: expiry} of a Prefect file lease storage: every lease it knows."""
    return await storage._load_expiration_index()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (examples keep their lines); room for long command names."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        """As argparse's, counting the commands' own indent (argparse leaves it out, which
        puts the help of `evaluate-checkpoints` on a line of its own)."""
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction) and action.help is not argparse.SUPPRESS:
            longest = max(map(len, action.choices), default=0)
            indent = self._current_indent + 2 * self._indent_increment
            self._action_max_length = max(self._action_max_length, longest + indent)


class NumpyFrames:
    """Mixin over a transformers video processor: its preprocessing on numpy frames, via PIL."""

    def _prepare_input_videos(
        self, videos, do_convert_rgb=None, input_data_format=None, device=None
    ):
        out = []
        for video in videos:  # [F, H, W, C] or [F, C, H, W], numpy or torch
            v = np.asarray(video)
            if v.shape[-1] in (1, 3, 4) and v.shape[1] not in (1, 3, 4):
                v = v.transpose(0, 3, 1, 2)  # channels first, as the torchvision path keeps them
            if v.shape[1] == 1:
                v = np.repeat(v, 3, axis=1)
            out.append(np.ascontiguousarray(v[:, :3]))
        return out

    def _preprocess(
        self,
        videos,
        do_resize,
        size,
        resample,
        do_center_crop,
        crop_size,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        return_tensors=None,
        **kwargs,
    ):
        from transformers.feature_extraction_utils import BatchFeature
        from transformers.image_processing_backends import PilBackend

        out = []
        for video in videos:
            frames = []
            for frame in video:  # [C, H, W] uint8
                if do_resize:
                    frame = PilBackend.resize(self, frame, size=size, resample=resample)
                if do_center_crop:
                    frame = PilBackend.center_crop(self, frame, crop_size)
                frames.append(frame)
            v = np.stack(frames).astype(np.float32)  # [F, C, H, W]
            if do_rescale:
                v = v * rescale_factor
            if do_normalize:
                mean = np.asarray(image_mean, np.float32).reshape(1, -1, 1, 1)
                std = np.asarray(image_std, np.float32).reshape(1, -1, 1, 1)
                v = (v - mean) / std
            out.append(v)
        return BatchFeature(data={"pixel_values_videos": out}, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["video_processor_type"] = type(self).__name__  # the real class's name
        return out
