"""The models evaluation loads: CLIP, the base pipeline, a checkpoint on it.

The base pipeline is the model's own class (`sampling.pipeline_class`, from its configs):
CogVideoXImageToVideoPipeline for an image-to-video model, else CogVideoXPipeline.

A checkpoint is a LoRA loaded onto the base pipeline for a block and unloaded after
(`lora`; the unload is checked: no `lora_` module may be left), or a full fine-tune's
`transformer/` swapped in for the block (`full_weights`; on a GPU the base transformer
waits on the CPU, so one transformer holds GPU memory at a time). `generate` is plain
text-to-video through the pipeline's own call, the numbers `sampling.sample` reproduces
for an unconditioned request; `video.to_uint8` refuses NaN or inf pixels rather than writing
black frames that would then be scored. Re-exported by `cogpipe.evaluate`.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cogpipe.config import EvaluateConfig
from cogpipe.models import quiet_local_load
from cogpipe.models.cogvideox import FULL_FOLDER, LORA_FILE, transformer_config, weight_dtype
from cogpipe.video import to_uint8


def is_full(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds a full fine-tune's transformer (not a LoRA)."""
    return (Path(checkpoint) / FULL_FOLDER / "config.json").is_file()


class Clip(NamedTuple):
    model: Any  # transformers.CLIPModel
    tokenizer: Any
    processor: Any  # image processor
    device: str


def load_clip(name: str, device: str) -> Clip:
    """CLIP model, tokenizer and image processor from a hub id or a local folder (fp32)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    with quiet_local_load(name):
        model = CLIPModel.from_pretrained(name).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(name)
    return Clip(model, AutoTokenizer.from_pretrained(name), processor, device)


def load_pipeline(model: str, device: str, ec: EvaluateConfig | None = None):
    """The base pipeline of the model's class at its weight dtype (fp16 2B / bf16 5B on
    GPU, fp32 on CPU), its transformer sped up as `ec` asks (`speed_up`)."""
    from cogpipe.sampling import model_traits, pipeline_class

    dtype = weight_dtype("auto", transformer_config(model), device)
    pipe_class = pipeline_class(model_traits(model).shape)  # a diffusers pipeline class
    # `dtype`: diffusers 0.42.0 and later take it; `torch_dtype` warns as deprecated.
    with quiet_local_load(model):
        pipe = pipe_class.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()  # 49x480x720 decodes in tiles; a no-op below the tile size
    if ec is not None:
        speed_up(pipe.transformer, ec)
    return pipe


def speed_up(transformer, ec: EvaluateConfig):
    """The evaluate speed options that change the transformer itself, in place: FP8 linears
    (`evaluate.fp8_linears`), then compiled blocks (`evaluate.compile`). A transformer
    put in later (a full fine-tune's) gets the same, so every video of a run is made alike."""
    from cogpipe.models import speed

    if ec.fp8_linears:
        speed.fp8_linears(transformer)
    if ec.compile:
        speed.compile_blocks(transformer)  # a LoRA loaded later recompiles once per checkpoint
    return transformer


def sampler_args(ec: EvaluateConfig, seed: int, device) -> dict[str, Any]:
    """The pipeline arguments of one video besides its prompt: size, steps, guidance, generator.

    Shared with `cogpipe.validation`, so videos made during training use the same settings.
    """
    import torch

    return dict(
        num_frames=ec.frames,
        height=ec.height,
        width=ec.width,
        num_inference_steps=ec.steps,
        guidance_scale=ec.guidance,
        generator=torch.Generator(device).manual_seed(seed),
    )


def generate(
    pipe, ec: EvaluateConfig, prompt: str, seed: int, device: str, image: np.ndarray | None = None
) -> np.ndarray:
    """One video for (prompt, seed) with whatever adapter is loaded (an image-to-video
    pipeline: from `image`, uint8 [H, W, 3] at the video's size). Returns [F, H, W, 3] uint8.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    given = {}
    if image is not None:  # already at the video's size: the pipeline's resize is a no-op
        from PIL import Image

        given["image"] = Image.fromarray(image)
    video = pipe(
        **given,
        prompt=prompt,
        **sampler_args(ec, seed, device),
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        output_type="np",
    ).frames[0]  # [F, H, W, 3] float in [0, 1]
    return to_uint8(video, prompt, seed)


@contextmanager
def full_weights(pipe, checkpoint: Path, ec: EvaluateConfig | None = None):
    """Put a full fine-tune checkpoint's transformer (in the pipeline's dtype, sped up as
    `ec` asks) in the pipeline for the block, then the base one back; on a GPU the base
    waits on the CPU."""
    from diffusers import CogVideoXTransformer3DModel

    base = pipe.transformer
    device, dtype = base.device, base.dtype
    loaded = CogVideoXTransformer3DModel.from_pretrained(
        str(Path(checkpoint) / FULL_FOLDER), dtype=dtype
    )
    if device.type == "cuda":
        base.to("cpu")  # one transformer on the GPU at a time
    pipe.transformer = loaded.to(device).eval()
    if ec is not None:
        speed_up(pipe.transformer, ec)
    try:
        yield pipe
    finally:
        pipe.transformer = base.to(device)
        del loaded
        release_memory(str(device))


@contextmanager
def lora(pipe, checkpoint: Path | None, adapter_name: str, ec: EvaluateConfig | None = None):
    """Load a checkpoint's LoRA for the block, then unload it; None is the base model, and
    a full fine-tune's checkpoint swaps in its transformer (`full_weights`, sped up as `ec`
    asks)."""
    if checkpoint is not None and is_full(checkpoint):
        with full_weights(pipe, checkpoint, ec):
            yield pipe
        return
    if checkpoint is not None:
        pipe.load_lora_weights(str(checkpoint), weight_name=LORA_FILE, adapter_name=adapter_name)
    try:
        yield pipe
    finally:
        if checkpoint is not None:
            pipe.unload_lora_weights()  # restores the original modules, not just disables
            left = [n for n, _ in pipe.transformer.named_modules() if "lora_" in n]
            if left:
                raise RuntimeError(f"LoRA layers left after unloading {checkpoint}: {left[:3]}")


def release_memory(device: str) -> None:
    """Collect garbage and, on a GPU, hand cached blocks back to the driver."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
