"""Generate: text- or image-to-video with a base CogVideoX and an optional LoRA, from Python
or the CLI.

    cogpipe generate --prompt "A fighter slaps his opponent." --model 2b --output slap.mp4
    cogpipe generate --prompts-dir prompts/ --lora train/run/checkpoint-004000 --output out/
    cogpipe generate --model 5b-i2v --image first.png --prompt "The fighter turns." --output t.mp4

    options = GenerateOptions(model="5b", lora="train/run/checkpoint-004000", seed=7)
    pipe = load(options)
    frames = generate_one(pipe, "A fighter slaps his opponent.", options)  # [F, H, W, 3] uint8

A video is sampled exactly as `cogpipe.evaluate` samples one (the same sampler arguments,
generator on the sampling device, uint8 conversion), so the same model, LoRA, settings and
seed give the video the evaluation of that checkpoint wrote. What is notable:

- frames must be 8k+1: the VAE decodes an even number of latent frames into 4 per
  latent frame, 3 more than 4k+1 (13 frames would come out as 16);
- the model's generation is read from its configs (`sampling.model_traits`): frames,
  height, width and fps not given are the model's own (49x480x720 at 8 fps; CogVideoX 1.5:
  81x768x1360 at 16); CogVideoX 1.5 takes 16k+1 frames up to 768x1360 in either
  orientation, 5B-I2V only its fixed 480x720 (`fit`);
- an image-to-video model (5B-I2V, 1.5-5B-I2V) loads as CogVideoXImageToVideoPipeline and
  needs `--image`: a PNG/JPEG (or a video: its first frame) resized and centre-cropped to
  the video's size, the same image for every prompt (and every sweep cell); a
  text-to-video model refuses one;
- weights load at the model's own precision on a GPU (fp16 for 2B-type, bf16 for
  5B-type: `cogvideox.weight_dtype`) and in fp32 on the CPU;
- a LoRA's scale defaults to 1.0, which is the alpha / rank stored in its file; the
  scale is diffusers' adapter weight, set per video (a sweep can vary it), and 0 gives
  the base model's video exactly;
- memory: model CPU offload (one component on the GPU at a time), sequential offload
  (one layer at a time: slowest, least memory), VAE tiling (on by default; a no-op below
  the tile size) and slicing; speed: the transformer blocks compiled with static shapes
  (`models.speed.compile_blocks`, as training compiles them). Offload and compile need a
  CUDA GPU and are refused on the CPU;
- faster at a deviation from the exact video (as evaluate's options of the same names):
  a step cache (`step_cache`: first_block, pab, faster; per video, so a sweep can compare
  them) and FP8 linears (`fp8_linears`: quantised at load, after the pipeline is placed
  on the GPU and before the LoRA wraps them and the blocks compile; an FP8 GPU such as an
  H100 and no offload, refused before anything loads otherwise).

Conditioned LoRAs (`cogpipe.sampling` samples every mode): the mode is read from the
run's `run.json` beside the checkpoint folder (`train/<run>/run.json`), and a LoRA trained
with a condition must be given one:

    cogpipe generate --lora train/edges/checkpoint-004000 --reference edges.mp4 --prompt ...
    cogpipe generate --lora train/tic/checkpoint-004000 --condition first.png --prompt ...

- `--reference VIDEO` (ic-lora): the reference video itself, already the condition
  function's output (e.g. canny edges: `cogpipe.condition.canny`); its first `--frames`
  frames at `--fps`, resized and centre-cropped to `--height` x `--width`;
- `--condition VIDEO|IMAGE` (tic-ft): the first 4 * (condition_frames - 1) + 1 frames of a
  video at `--fps`, or an image (repeated); `--frames` counts the whole condition + buffer
  + target sequence, as training's `precompute.frames`, and the video written holds the
  target frames (4 per target latent frame).

A conditioned video is written twice: `<name>.mp4`, the result alone (what a sweep scores),
and `<name>-side.mp4`, the condition on the left beside it.

Every mp4 is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cogpipe import evaluate, sampling
from cogpipe.config import EvaluateConfig, StepCache, TicFtConfig, check_step_cache
from cogpipe.models import quiet_local_load
from cogpipe.models.cogvideox import (
    FULL_FOLDER,
    LORA_FILE,
    hub_id,
    transformer_config,
    weight_dtype,
)
from cogpipe.sampling import IMAGE_SUFFIXES
from cogpipe.video import probe_video, read_frames, resize_center_crop, write_mp4
from cogpipe.workspace import Progress, atomic_path, no_progress, resolve_device

ADAPTER = "lora"  # the adapter name of `--lora` on the pipeline
DEFAULT_OUTPUT = Path("generated")
# Options read per video (a sweep may vary them); the others decide how the pipeline loads.
PER_VIDEO = ("steps", "guidance", "frames", "height", "width", "fps", "seed", "lora_scale")
PER_VIDEO += ("step_cache", "step_cache_threshold")


class GenerateError(ValueError):
    """Bad input to generation: a missing prompt file, a model folder, an option the device lacks."""


class GenerateOptions(BaseModel):
    """How to generate: the model, sampler settings, LoRA, device, memory and speed options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "2b",
        description="2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v, a hub id or a local diffusers folder.",
    )
    steps: int = Field(50, ge=1, description="Sampler steps.")
    guidance: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    frames: int | None = Field(
        None,
        ge=1,
        description=(
            "Frames per video (8k+1; 16k+1 for CogVideoX 1.5); default: the model's (49, 81"
            " for 1.5)."
        ),
    )
    height: int | None = Field(
        None,
        ge=16,
        description=(
            "Height in pixels (a multiple of 16); default: the model's (480, 768 for 1.5)."
        ),
    )
    width: int | None = Field(
        None,
        ge=16,
        description=(
            "Width in pixels (a multiple of 16); default: the model's (720, 1360 for 1.5)."
        ),
    )
    fps: int | None = Field(
        None,
        ge=1,
        description="Frame rate of the written mp4; default: the model's (8, 16 for 1.5).",
    )
    seed: int = Field(42, description="Seed of the sampling noise.")
    image: Path | None = Field(
        None,
        description=(
            "An image-to-video model's first frame: an image, or a video (its first frame),"
            " resized and centre-cropped to height x width."
        ),
    )
    lora: Path | None = Field(
        None, description="A LoRA: a checkpoint folder or its .safetensors file."
    )
    lora_scale: float = Field(
        1.0, description="LoRA weight: 1.0 applies the alpha/rank stored in the file, 0 is off."
    )
    transformer: Path | None = Field(
        None,
        description=(
            "A full fine-tune: a checkpoint folder (its transformer/) or a diffusers transformer"
            " folder, used instead of the model's transformer."
        ),
    )
    reference: Path | None = Field(
        None,
        description=(
            "An ic-lora LoRA's reference video, already the condition function's output (e.g."
            " canny edges); its first frames at fps, resized to height x width."
        ),
    )
    condition: Path | None = Field(
        None,
        description=(
            "A tic-ft LoRA's condition: a video (its first frames) or an image (repeated);"
            " frames then counts condition + buffer + target frames."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda when available, else cpu."
    )
    offload: Literal["none", "model", "sequential"] = Field(
        "none", description="CPU offload: one model or one layer at a time on the GPU."
    )
    vae_tiling: bool = Field(True, description="Decode in tiles (less memory at 480x720).")
    vae_slicing: bool = Field(False, description="Decode one video of a batch at a time.")
    compile: bool = Field(False, description="torch.compile the transformer blocks (GPU).")
    fp8_linears: bool = Field(
        False,
        description=(
            "The transformer blocks' linears in FP8 (torchao; an H100-class GPU): faster at a"
            " deviation, after minutes of compilation with --compile."
        ),
    )
    step_cache: StepCache = Field(
        "none",
        description=(
            "Reuse transformer work across steps (cogpipe.step_cache): first_block, pab or"
            " faster, each at a deviation from the exact video; none is exact."
        ),
    )
    step_cache_threshold: float = Field(
        0.1, ge=0, description="first_block's threshold (0 never skips)."
    )

    @field_validator("frames")
    @classmethod
    def _frames(cls, v: int | None) -> int | None:
        if v is None:
            return v
        # 4 frames per latent frame after the first, and the VAE decodes latent frames in
        # pairs after an odd first batch: an even count (13 frames: 4) decodes to 4 per
        # latent frame (16 frames). 8k+1 gives exactly the frames asked for.
        if (v - 1) % 8:
            why = f"the VAE would decode {v} frames as {v + 3}" if (v - 1) % 4 == 0 else f"got {v}"
            raise ValueError(f"must be 8k+1 (9, 17, 25, 33, 41, 49): {why}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _size(cls, v: int | None) -> int | None:
        if v is not None and v % 16:
            raise ValueError(f"must be a multiple of 16, got {v}")
        return v

    @model_validator(mode="after")
    def _speed(self) -> GenerateOptions:
        check_step_cache(self.step_cache, self.compile)
        if self.fp8_linears and self.offload != "none":
            raise ValueError(
                f"fp8_linears with offload {self.offload}: the linears are quantised on the GPU"
                f" and stay there; use offload none"
            )
        return self


# --------------------------------------------------------------------------- prompts


def prompt_name(text: str, words: int = 8) -> str:
    """A file name for a prompt given as text: its first words, lower case, dash-joined."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words]) or "prompt"


def read_prompt(path: Path) -> str:
    """One prompt from a text file; line breaks and runs of spaces become single spaces.

    Raises:
        GenerateError: the file is empty or not UTF-8 text.
    """
    try:
        text = " ".join(Path(path).read_text(encoding="utf-8").split())
    except UnicodeDecodeError:
        raise GenerateError(f"{path}: not UTF-8 text") from None
    if not text:
        raise GenerateError(f"{path}: empty prompt file")
    return text


def find_prompt_file(name: str) -> Path:
    """`prompts/NAME.txt` under the current folder, else NAME as a path.

    Raises:
        GenerateError: neither is a file.
    """
    candidates = [Path("prompts") / f"{name}.txt", Path(name).expanduser()]
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    raise GenerateError(f"--prompt-file {name}: no such file (looked for {tried})")


def read_prompts(
    prompt: str | None = None, prompt_file: str | None = None, prompts_dir: str | Path | None = None
) -> dict[str, str]:
    """The prompts to generate, by output name (exactly one source must be given).

    Args:
        prompt: a prompt as text, named after its first words.
        prompt_file: NAME of `prompts/NAME.txt`, or a path; named after the file's stem.
        prompts_dir: every `.txt` in the folder, one prompt each, named after its stem.

    Raises:
        GenerateError: a file or folder is missing or empty.
    """
    if sum(x is not None for x in (prompt, prompt_file, prompts_dir)) != 1:
        raise GenerateError("give exactly one of --prompt, --prompt-file, --prompts-dir")
    if prompt is not None:
        if not prompt.strip():
            raise GenerateError("--prompt: empty prompt")
        return {prompt_name(prompt): " ".join(prompt.split())}
    if prompt_file is not None:
        path = find_prompt_file(prompt_file)
        return {path.stem: read_prompt(path)}
    folder = Path(prompts_dir).expanduser()
    if not folder.is_dir():
        raise GenerateError(f"--prompts-dir {folder}: no such folder")
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise GenerateError(f"--prompts-dir {folder}: no .txt prompt files in it")
    return {p.stem: read_prompt(p) for p in files}


def output_paths(names: list[str], output: str | Path | None) -> dict[str, Path]:
    """Where each prompt's video goes: `output` itself if it is an .mp4, else `output/<name>.mp4`.

    Raises:
        GenerateError: an .mp4 output for more than one prompt.
    """
    output = Path(output) if output is not None else DEFAULT_OUTPUT
    if output.suffix == ".mp4":
        if len(names) != 1:
            raise GenerateError(
                f"--output {output} is one file, but there are {len(names)} prompts: give a folder"
            )
        return {names[0]: output}
    return {name: output / f"{name}.mp4" for name in names}


# --------------------------------------------------------------------------- loading


def resolve_model(model: str) -> str:
    """The hub id or local folder `model` names (2b and 5b are aliases of the THUDM models).

    Raises:
        GenerateError: a local path that does not exist or holds no diffusers pipeline.
    """
    model = hub_id(model)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise GenerateError(
                f"--model {model}: not a diffusers model folder (no model_index.json)"
            )
        return str(path)
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise GenerateError(f"--model {model}: no such model folder (a hub id is owner/name)")
    return model


def lora_file(path: str | Path) -> Path:
    """The LoRA weights file of a checkpoint folder, or the file itself.

    Raises:
        GenerateError: no such folder or file, or not a .safetensors file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / FULL_FOLDER / "config.json").is_file():
            raise GenerateError(
                f"--lora {path}: the folder holds a full fine-tune ({FULL_FOLDER}/), not a LoRA; "
                f"pass it as --transformer"
            )
        if not (path / LORA_FILE).is_file():
            raise GenerateError(f"--lora {path}: the folder holds no {LORA_FILE}")
        return path / LORA_FILE
    if not path.is_file():
        raise GenerateError(f"--lora {path}: no such file or folder")
    if path.suffix != ".safetensors":
        raise GenerateError(f"--lora {path}: not a .safetensors file")
    return path


def transformer_folder(path: str | Path) -> Path:
    """The diffusers transformer folder of a full fine-tune checkpoint, or the folder itself.

    Raises:
        GenerateError: neither holds a config.json.
    """
    path = Path(path).expanduser()
    for folder in (path / FULL_FOLDER, path):
        if (folder / "config.json").is_file():
            return folder
    raise GenerateError(
        f"--transformer {path}: no transformer there (neither {FULL_FOLDER}/config.json nor "
        f"config.json)"
    )


def check_device(options: GenerateOptions, device: str) -> None:
    """Refuse options the device cannot honour, before anything loads.

    Raises:
        GenerateError: offload, compile or FP8 linears without a CUDA GPU, compile with
            sequential offload.
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {options.device}: no CUDA GPU is available")
    wanted = [f"--offload {options.offload}"] if options.offload != "none" else []
    wanted += ["--compile"] if options.compile else []
    wanted += ["--fp8-linears"] if options.fp8_linears else []
    if wanted and not device.startswith("cuda"):
        why = "no CUDA GPU found" if options.device == "auto" else f"--device {options.device}"
        raise GenerateError(f"{' and '.join(wanted)} needs a CUDA GPU ({why})")
    if options.compile and options.offload == "sequential":
        raise GenerateError(
            "--compile does not work with --offload sequential (weights move in per layer); "
            "use --offload model"
        )


def model_traits(model: str) -> sampling.Traits:
    """The model's generation and native settings, from its configs.

    Raises:
        GenerateError: the model or its configs cannot be found.
    """
    model = resolve_model(model)
    try:
        return sampling.model_traits(model)
    except (OSError, ValueError) as e:  # hub id unknown or unreachable, config missing
        raise GenerateError(
            f"--model {model}: cannot read its configs: {str(e).strip()[:300]}"
        ) from e


def fit(options: GenerateOptions, traits: sampling.Traits) -> GenerateOptions:
    """The options with the model's native frames, height, width and fps where none are given,
    checked against the model: its frame counts and sizes, an image exactly for an
    image-to-video model.

    Raises:
        GenerateError: a setting the model cannot take, or an image missing or extra.
    """
    native = dict(zip(("frames", "height", "width"), traits.native, strict=True))
    native["fps"] = traits.fps
    update = {k: v for k, v in native.items() if getattr(options, k) is None}
    fitted = options.model_copy(update=update)
    if traits.shape.image_to_video and fitted.image is None:
        raise GenerateError(f"model {options.model} is image-to-video: give --image")
    if not traits.shape.image_to_video and fitted.image is not None:
        raise GenerateError(f"--image: model {options.model} is text-to-video; it takes no image")
    wrong = sampling.check_fits(traits.shape, fitted.frames, fitted.height, fitted.width)
    if wrong is not None:
        flag = "--frames" if wrong[0] == "frames" else "--height/--width"
        raise GenerateError(f"{flag} {wrong[1]} (model {options.model})")
    return fitted


def fit_model(options: GenerateOptions) -> GenerateOptions:
    """`fit` with the traits of `options.model` (its configs are read, no weights)."""
    return fit(options, model_traits(options.model))


def load(options: GenerateOptions):
    """The pipeline `options` describe (CogVideoXImageToVideoPipeline for an image-to-video
    model, else CogVideoXPipeline), with its LoRA, offload, VAE and compile settings.

    Raises:
        GenerateError: the model or LoRA cannot be found or loaded, or the device cannot
            honour the options.
    """
    device = resolve_device(options.device)
    check_device(options, device)
    model = resolve_model(options.model)
    lora = lora_file(options.lora) if options.lora is not None else None
    full = transformer_folder(options.transformer) if options.transformer is not None else None
    pipeline = sampling.pipeline_class(model_traits(model).shape)
    try:
        dtype = weight_dtype("auto", transformer_config(model), device)
        components = {}
        if full is not None:
            from diffusers import CogVideoXTransformer3DModel

            components["transformer"] = CogVideoXTransformer3DModel.from_pretrained(
                str(full), dtype=dtype
            )
        # `dtype`: diffusers 0.42.0 and later take it; `torch_dtype` warns as deprecated.
        with quiet_local_load(model):  # a local folder: no library bars beside ours
            pipe = pipeline.from_pretrained(model, dtype=dtype, **components)
    except OSError as e:  # hub id unknown or unreachable, files missing
        raise GenerateError(f"--model {model}: cannot load: {str(e).strip()[:300]}") from e
    pipe.set_progress_bar_config(disable=True)
    if options.offload == "none":  # placed first: the LoRA loads as the service loads one
        pipe.to(device)  # (onto the placed pipeline): the same adapter weights, bit for bit
    if options.fp8_linears:  # before the LoRA (it wraps the FP8 linears) and compiling
        from cogpipe.models.speed import fp8_linears

        try:
            fp8_linears(pipe.transformer)
        except RuntimeError as e:  # a GPU without FP8 tensor cores, no torchao
            raise GenerateError(f"--fp8-linears: {e}") from None
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name=ADAPTER)
    if options.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif options.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.compile:
        from cogpipe.models.speed import compile_blocks

        compile_blocks(pipe.transformer)  # one graph per video size; LoRA scales are guards
    return pipe


# --------------------------------------------------------------------------- conditions


def trained_mode(checkpoint: str | Path) -> tuple[str, TicFtConfig] | None:
    """(train.mode, train.tic_ft) of the run a checkpoint folder (or its LoRA file) belongs
    to, from `run.json` beside the checkpoint folder; None when there is none."""
    import json

    path = Path(checkpoint).expanduser()
    folder = path if path.is_dir() else path.parent
    try:
        train = json.loads((folder.parent / "run.json").read_text())["config"]["train"]
    except (OSError, ValueError, KeyError):
        return None
    return train.get("mode", "lora"), TicFtConfig(**train.get("tic_ft", {}))


def read_input(path: Path, count: int, options: GenerateOptions, flag: str) -> np.ndarray:
    """The first `count` frames of a video at `options.fps` (an image: itself, once), resized
    and centre-cropped to height x width. Returns uint8 [count or 1, H, W, 3].

    Raises:
        GenerateError: the file is missing, unreadable or too short.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise GenerateError(f"{flag} {path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        frames = np.array(Image.open(path).convert("RGB"))[None]  # writable, for torch
    else:
        info, reason = probe_video(path)
        need = (count - 1) / options.fps
        if reason or info["duration"] < need:
            why = reason or f"{info['duration']:.2f} s, needs {need:.2f} s ({count} frames at fps)"
            raise GenerateError(f"{flag} {path}: {why}")
        frames = read_frames(path, [k / options.fps for k in range(count)])
    return resize_center_crop(frames, options.height, options.width)


def condition_of(options: GenerateOptions) -> sampling.Condition | None:
    """The condition `--reference` / `--condition` give, checked against the checkpoint's mode.

    Raises:
        GenerateError: both given; a mode that needs one without it, or one given to a
            checkpoint of another mode; a tic-ft condition without the run's layout.
    """
    if options.reference is not None and options.condition is not None:
        raise GenerateError("give --reference (ic-lora) or --condition (tic-ft), not both")
    checkpoint = options.lora or options.transformer
    trained = trained_mode(checkpoint) if checkpoint is not None else ("base", None)
    wanted = "ic-lora" if options.reference else "tic-ft" if options.condition else None
    flag = {"ic-lora": "--reference VIDEO", "tic-ft": "--condition VIDEO|IMAGE"}
    if trained is not None and trained[0] in flag and wanted != trained[0]:
        raise GenerateError(
            f"{checkpoint} was trained in mode {trained[0]}: give {flag[trained[0]]}"
        )
    if wanted is None:
        return None
    if trained is not None and trained[0] != wanted:
        what = f"{checkpoint} was trained in mode {trained[0]}" if checkpoint else "no --lora"
        raise GenerateError(f"{flag[wanted].split()[0]} needs an {wanted} LoRA; {what}")
    if wanted == "ic-lora":
        frames = read_input(options.reference, options.frames, options, "--reference")
        if len(frames) != options.frames:
            raise GenerateError(f"--reference {options.reference}: a video, not an image")
        return sampling.Condition("ic-lora", frames=frames)
    if trained is None:
        raise GenerateError(
            f"--condition: no run.json beside {checkpoint}, so the tic-ft "
            f"layout (condition and buffer frames) is unknown"
        )
    layout = trained[1]
    count = sampling.TEMPORAL * (layout.condition_frames - 1) + 1
    frames = read_input(options.condition, count, options, "--condition")
    frames = frames[np.minimum(np.arange(count), len(frames) - 1)]  # an image, repeated
    return sampling.Condition("tic-ft", frames=frames, layout=layout)


# --------------------------------------------------------------------------- generating


def sampler_settings(options: GenerateOptions) -> EvaluateConfig:
    """The options as evaluate's sampler settings, so both sample a video the same way
    (frames, size and fps not given: the model's own, `fit_model`)."""
    if None in (options.frames, options.height, options.width, options.fps):
        options = fit_model(options)
    return EvaluateConfig(
        steps=options.steps,
        guidance=options.guidance,
        frames=options.frames,
        height=options.height,
        width=options.width,
        fps=options.fps,
        device=options.device,
        step_cache=options.step_cache,
        step_cache_threshold=options.step_cache_threshold,
    )


def image_of(options: GenerateOptions) -> np.ndarray | None:
    """`--image` at the video's size, uint8 [H, W, 3] (None without one); `options` fitted.

    Raises:
        GenerateError: the file is missing or cannot be decoded.
    """
    if options.image is None:
        return None
    try:
        return sampling.read_image(options.image, options.height, options.width)
    except ValueError as e:
        raise GenerateError(str(e)) from None


def generate_one(
    pipe,
    prompt: str,
    options: GenerateOptions,
    condition: sampling.Condition | None = None,
    on_step: Callable[[int, int], None] | None = None,
    image: np.ndarray | None = None,
) -> np.ndarray:
    """One video of `prompt` with the per-video options (size, steps, guidance, seed, LoRA scale).

    Args:
        pipe: from `load`; options that decide loading (model, LoRA, offload) are not read.
        prompt: the text.
        options: the settings of this video; frames and size not given are the model's
            own (`fit`, from the pipeline's configs).
        condition: the video's condition; None: `condition_of(options)` (read per call).
        on_step: called as (denoising steps done, steps) at the start and after each step.
        image: an image-to-video model's first frame at the video's size; None: `--image`
            read now.

    Returns:
        [F, H, W, 3] uint8 RGB (tic-ft: the target frames).

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
        GenerateError: a condition the checkpoint's mode does not take (`condition_of`), a
            setting or image the model does not take (`fit`).
    """
    traits = sampling.traits_of(pipe.transformer.config, pipe.vae.config)
    options = fit(options, traits)
    if ADAPTER in getattr(pipe.transformer, "peft_config", {}):
        pipe.set_adapters([ADAPTER], [options.lora_scale])
    device = resolve_device(options.device)  # offloaded pipelines sample on the GPU too
    condition = condition if condition is not None else condition_of(options)
    image = image if image is not None else image_of(options)
    request = sampling.request_for(options, prompt, options.seed, condition=condition, image=image)
    try:
        return sampling.sample(pipe, request, device, on_step)
    except ValueError as e:  # a condition on an image-to-video model
        raise GenerateError(str(e)) from None


def side_path(path: Path) -> Path:
    """`<name>-side.mp4` beside `<name>.mp4`: a conditioned video's condition | result."""
    return Path(path).with_name(f"{Path(path).stem}-side.mp4")


def write_video(path: Path, frames: np.ndarray, fps: float) -> Path:
    """Write an mp4 under a temporary name, then rename it: a file on disk is complete."""
    with atomic_path(Path(path)) as tmp:
        write_mp4(tmp, frames, fps)
    return Path(path)


def run_generate(
    prompts: dict[str, str],
    options: GenerateOptions,
    output: str | Path | None = None,
    on_video: Callable[[Path, float], None] | None = None,
    on_step: Progress = no_progress,
) -> list[Path]:
    """Generate one video per prompt with one loaded pipeline; existing files are overwritten.

    Args:
        prompts: {output name: prompt}, e.g. from `read_prompts`.
        options: model, sampler, LoRA, device, memory and speed options.
        output: an .mp4 path for one prompt, else a folder (default `generated/`).
        on_video: called with (path, seconds of sampling) after each video is written.
        on_step: called as (denoising steps done, steps, output name) at the start of each
            video and after each of its steps: sampling takes minutes on a CPU.

    Returns:
        The written paths, in prompt order (a conditioned video's `-side.mp4` not listed).

    Raises:
        GenerateError: bad input (see `load` and `output_paths`), before anything is generated.
    """
    paths = output_paths(list(prompts), output)
    device = resolve_device(options.device)
    options = fit_model(options)  # the model's configs only: a wrong size fails in seconds
    condition = condition_of(options)  # before loading: a wrong flag fails in milliseconds
    image = image_of(options)
    pipe = load(options)
    written = []
    try:
        for name, prompt in prompts.items():
            t0 = time.time()
            step = lambda done, steps, name=name: on_step(done, steps, name)  # noqa: E731
            frames = generate_one(pipe, prompt, options, condition, step, image)
            seconds = time.time() - t0
            written.append(write_video(paths[name], frames, options.fps))
            if condition is not None:  # condition | result, beside the result alone
                side = sampling.side_by_side(condition.frames, frames)
                write_video(side_path(paths[name]), side, options.fps)
            if on_video is not None:
                on_video(paths[name], seconds)
    finally:
        del pipe
        evaluate.release_memory(device)
    return written
