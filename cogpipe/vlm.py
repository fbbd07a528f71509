"""Vision-language captioners through transformers: LLaVA-1.5, LLaVA-NeXT (incl. 34B),
LLaVA-NeXT-Video and LLaVA-OneVision, chosen by hub id or local folder.

What is notable:
- One loading path for all four: `AutoProcessor` and `AutoModelForImageTextToText` read the
  folder's `config.json` and pick the classes, so a user's `llava-hf/LLaVA-NeXT-Video-7B-hf`
  and a test's tiny folder go through the same code.
- Video-native models (LLaVA-NeXT-Video, LLaVA-OneVision) get the frames as one video;
  image models get them as a sequence of images in one prompt.
- transformers' video processors are written against torchvision. Where torchvision does
  not import (CPU-only machines with a CUDA torchvision wheel, or none), the processor is
  assembled from its parts with `NumpyVideoProcessor`: the same class, defaults and saved
  settings, with resize / crop / normalize done per frame by the PIL backend the image
  processors already use. Resizing goes through PIL either way for the image processors;
  for video, torchvision's bicubic and PIL's bicubic differ by at most a few levels per
  pixel (checked on the GPU host, where both import).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from cogpipe.compat import NumpyFrames
from cogpipe.models import quiet_local_load

VIDEO_MODEL_TYPES = {"llava_next_video", "llava_onevision"}  # take frames as one video
ARCHITECTURES = {"llava", "llava_next", "llava_next_video", "llava_onevision"}
CAPTIONERS = tuple(sorted(ARCHITECTURES))  # the model types a caption.model may have


@dataclass
class Captioner:
    """A loaded vision-language model and what generation needs to know about it."""

    processor: Any
    model: Any
    device: str
    video: bool  # frames go in as one video, not as separate images
    eos_ids: set[int]


def dtype_of(name: str, device: str):
    """The torch dtype for a config's `dtype` ('auto': bfloat16 on GPU, float32 on CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_captioner(
    model_id: str, revision: str | None, device: str, dtype: str, field: str = "caption.model"
) -> Captioner:
    """Load processor and model from a hub id or local folder, ready for batched generation.

    Args:
        model_id: hub id or local folder of one of the four architectures.
        revision: hub revision (branch, tag or commit), or None.
        device: a torch device string ("cuda", "cuda:1", "cpu").
        dtype: "auto", "float32", "float16" or "bfloat16".
        field: the config field that names the model, for the error.

    Returns:
        The Captioner, in eval mode on its device, with left padding and SDPA attention.

    Raises:
        ModelLoadError: the model cannot be loaded (not one of the four LLaVA architectures,
            a missing file, not in the hub cache offline); the message names `field`.
    """
    try:
        return _load_captioner(model_id, revision, device, dtype)
    except (OSError, ValueError) as e:
        raise _load_error(field, model_id, revision, e) from e


def _load_error(field: str, model_id: str, revision: str | None, error: BaseException):
    """The ModelLoadError of a failed load: the model-folder check's precise one (the
    missing file, the wrong model type) when it finds one, else the loader's first line."""
    from cogpipe.config import ConfigError
    from cogpipe.errors import ModelLoadError, load_failed
    from cogpipe.model_files import check_transformers_model

    try:
        check_transformers_model(field, model_id, revision, CAPTIONERS, "a supported captioner")
    except ConfigError as precise:
        return ModelLoadError(str(precise))
    return load_failed(field, model_id, error)


def _load_captioner(model_id: str, revision: str | None, device: str, dtype: str) -> Captioner:
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_id, revision=revision)
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"{model_id}: model type {config.model_type!r} is not a supported captioner "
            f"({', '.join(sorted(ARCHITECTURES))})"
        )
    processor = load_processor(model_id, revision, config.model_type)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    with quiet_local_load(model_id):
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, revision=revision, dtype=dtype_of(dtype, device), attn_implementation="sdpa"
        )
    model = model.to(device).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    return Captioner(processor, model, device, config.model_type in VIDEO_MODEL_TYPES, eos_ids)


def load_processor(model_id: str, revision: str | None, model_type: str):
    """`AutoProcessor`, or where torchvision is missing the same processor built from parts."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available() or model_type not in VIDEO_MODEL_TYPES:
        return AutoProcessor.from_pretrained(model_id, revision=revision)
    return _processor_from_parts(model_id, revision, model_type)


def _processor_from_parts(model_id: str, revision: str | None, model_type: str):
    """The model's processor, built from its parts with a NumpyFrames video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.video_processing_utils import BaseVideoProcessor

    cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    settings, _ = cls.get_processor_dict(model_id, revision=revision)
    video_settings, _ = BaseVideoProcessor.get_video_processor_dict(model_id, revision=revision)
    video_cls = numpy_video_class(
        video_processor_class(video_settings["video_processor_type"], model_type)
    )
    parts = {
        "tokenizer": AutoTokenizer.from_pretrained(model_id, revision=revision),
        "image_processor": AutoImageProcessor.from_pretrained(model_id, revision=revision),
        "video_processor": video_cls.from_dict(video_settings),
    }
    accepted = set(inspect.signature(cls.__init__).parameters) - set(parts)
    return without_torchvision(cls)(**parts, **{k: v for k, v in settings.items() if k in accepted})


@functools.cache
def without_torchvision(cls: type) -> type:
    """A processor class that also accepts a NumpyFrames video processor.

    ProcessorMixin checks each part against `transformers.VideoProcessorMixin`, which does
    not resolve when torchvision is missing; the subclass keeps the class's name, so what
    it saves loads as the original class.
    """

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, NumpyFrames):
            return type(argument)
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    attrs = {"check_argument_for_proper_class": check_argument_for_proper_class}
    return type(cls.__name__, (cls,), attrs | {"__module__": cls.__module__})


@functools.cache
def numpy_video_class(real: type) -> type:
    """`real` (a transformers video processor class) running on numpy frames, under its name."""
    return type(real.__name__, (NumpyFrames, real), {"__module__": __name__})


def video_processor_class(name: str, model_type: str) -> type:
    """A transformers video processor class by name, imported from its model's own module
    (the top-level name is a placeholder that raises when torchvision is missing)."""
    module = importlib.import_module(
        f"transformers.models.{model_type}.video_processing_{model_type}"
    )
    return getattr(module, name)


def chat_text(cap: Captioner, num_frames: int, prompt: str) -> str:
    """The chat-formatted prompt: the frames (one video or `num_frames` images), then the text."""
    media = [{"type": "video"}] if cap.video else [{"type": "image"}] * num_frames
    messages = [{"role": "user", "content": [*media, {"type": "text", "text": prompt}]}]
    return cap.processor.apply_chat_template(messages, add_generation_prompt=True)


def release(cap: Captioner) -> None:
    """Free the model's GPU memory for the stages that run next in the same process."""
    import torch

    cap.model = None
    if cap.device.startswith("cuda"):
        torch.cuda.empty_cache()
