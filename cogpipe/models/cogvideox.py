"""CogVideoX seams: loading components, precision, encoding video and prompts, rotary
embeddings, LoRA export and full weights. Every stage that touches CogVideoX goes through
here, so a second model family is a second module, not a flag.

Components load from a hub id (`THUDM/CogVideoX-2b`) or a local folder in diffusers
layout, through the same `from_pretrained(model, subfolder=...)` calls.

Layouts follow the diffusers CogVideoX LoRA example: pixels are uint8 `[B, F, H, W, 3]`,
latents are stored and fed to the transformer as `[B, F', C, H/8, W/8]` with
F' = (F - 1) / 4 + 1, already multiplied by the VAE's `scaling_factor`. CogVideoX 1.5
(temporal patch 2) is fed F' padded to even with copies of the first latent frame in front
(`pad_frames`); an image-to-video model is fed its first frame's latents [B, 1, C, h, w]
(`encode_image`) in the first latent frame and zeros after, on the channels
(`image_condition`). What sets a generation apart is read from its configs (`Shape`).

LoRA files carry their adapter config (rank, alpha, targets) as safetensors metadata,
so `CogVideoXPipeline.load_lora_weights(folder)` applies scale alpha / rank by itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: computing keys must not pay for it
    import torch

from cogpipe.config import hub_id as hub_id  # re-exported: short model names live in config
from cogpipe.models import quiet_local_load
from cogpipe.workspace import model_fingerprint

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
VAE_SCALE_SPATIAL = 8  # every CogVideoX VAE: 8x spatial, 4x temporal compression


@dataclass(frozen=True)
class Shape:
    """What sets a CogVideoX generation apart, read from its configs, never its name.

    - image_to_video: the transformer takes the image latents on the channels (its
      in_channels are twice the VAE's latent channels).
    - temporal_patch: latent frames per token (2 for CogVideoX 1.5, else 1); the latent
      frame count is padded up to a multiple of it.
    - ofs: the transformer has an `ofs` embedding (1.5-I2V) and must be given one.
    - fixed_size: (height, width) in pixels where learned positional embeddings fix the
      size (5B-I2V: 480x720), else None.
    """

    image_to_video: bool
    temporal_patch: int
    ofs: bool
    fixed_size: tuple[int, int] | None


def model_shape(
    transformer_config: Mapping[str, Any], vae_config: Mapping[str, Any] | None = None
) -> Shape:
    """The Shape of a model from its configs.

    Without `vae_config` (a trainer holds only the transformer), the latent channels are
    the transformer's `out_channels`: every CogVideoX predicts as many as its VAE makes.
    """
    t = transformer_config
    latent_channels = (vae_config or {}).get("latent_channels", t["out_channels"])
    learned = bool(t.get("use_learned_positional_embeddings"))
    return Shape(
        image_to_video=t["in_channels"] == 2 * latent_channels,
        temporal_patch=t.get("patch_size_t") or 1,
        ofs=t.get("ofs_embed_dim") is not None,
        fixed_size=(t["sample_height"] * VAE_SCALE_SPATIAL, t["sample_width"] * VAE_SCALE_SPATIAL)
        if learned
        else None,
    )


def shape_of(model: str) -> Shape:
    """The Shape of a model (hub id or folder), from its transformer and VAE configs."""
    return model_shape(transformer_config(model), vae_config(model))


def check_fits(cfg, shape: Shape) -> None:
    """Refuse settings the model cannot take, before anything is encoded or trained.

    Args:
        cfg: the PipelineConfig (uses `model`, `precompute` and `train.mode`).
        shape: the model's Shape.

    Raises:
        ConfigError: one line naming the field: a temporal patch of 2 (CogVideoX 1.5) and
            a frame count not 16k+1; learned positional embeddings (5B-I2V) and a bucket
            other than their size; an image-to-video model and a mode that feeds other
            frames before the video's first (ic-lora, tic-ft).
    """
    from cogpipe.config import ConfigError

    p, mode = cfg.precompute, cfg.train.mode
    bad = [n for n in p.frame_counts() if (n - 1) % 16]
    if shape.temporal_patch == 2 and bad:
        raise ConfigError(
            f"precompute: {cfg.model} has a temporal patch of 2 (CogVideoX 1.5): every frame"
            f" count must be 16k+1 (17, 33, 49, 65, 81, ...); {', '.join(map(str, bad))} of"
            f" frames {p.frames} and frame_buckets {p.frame_buckets} are not"
        )
    other = [f"{h}x{w}" for h, w in p.all_buckets() if (h, w) != shape.fixed_size]
    if shape.fixed_size is not None and other:
        h, w = shape.fixed_size
        raise ConfigError(
            f"precompute: {cfg.model} has learned positional embeddings fixed at {h}x{w}"
            f" (CogVideoX-5B-I2V): precompute.height/width and precompute.buckets must all be"
            f" {h}x{w}; {', '.join(other)} are not"
        )
    if shape.image_to_video and mode in ("ic-lora", "tic-ft"):
        raise ConfigError(
            f"train.mode {mode}: {cfg.model} is image-to-video, its image latents condition"
            f" the first latent frame, where {mode} puts its condition frames; use mode lora"
            f" or full with this model, or {mode} with a text-to-video model"
        )


def is_5b_type(transformer_config) -> bool:
    """5B-type models use rotary positional embeddings (and bf16); 2B-type do not (fp16).

    Takes a loaded model's config object or the plain dict `transformer_config()` reads.
    """
    key = "use_rotary_positional_embeddings"
    if isinstance(transformer_config, Mapping):
        return bool(transformer_config.get(key, False))
    return bool(getattr(transformer_config, key, False))


def weight_dtype(mixed_precision: str, transformer_config, device: str) -> torch.dtype:
    """The dtype of frozen weights: auto gives fp16 for 2B-type, bf16 for 5B-type on GPU, fp32 on CPU."""
    import torch

    if mixed_precision == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if is_5b_type(transformer_config) else torch.float16
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# --------------------------------------------------------------------------- loading


def component_fingerprint(model: str, *subfolders: str) -> dict[str, Any]:
    """What identifies some components of a model: their folders' listings, or the hub id.

    Caches of latents key on the VAE alone and text embeddings on the tokenizer and text
    encoder alone, so swapping the transformer keeps them.
    """
    root = Path(model).expanduser()
    if not root.is_dir():
        return {"id": model, "components": list(subfolders)}
    return {name: model_fingerprint(str(root / name)) for name in subfolders}


@contextmanager
def loading(model: str, components: dict[str, bool], field: str = "model") -> Iterator[None]:
    """Turn a failed load of `components` ({subfolder: weights read}) into a ModelLoadError
    naming `field` and, where the model-folder check (`cogpipe.model_files`) finds it, the
    missing or wrong file (diffusers' own message names `diffusion_pytorch_model.bin` in
    the model's root for a VAE whose safetensors file is missing). A local folder loads
    without library bars."""
    try:
        with quiet_local_load(model):
            yield
    except (OSError, ValueError) as e:
        from cogpipe.config import ConfigError
        from cogpipe.errors import ModelLoadError, load_failed
        from cogpipe.model_files import check_cogvideox

        try:
            check_cogvideox(field, model, components, pipeline=False)
        except ConfigError as precise:
            raise ModelLoadError(str(precise)) from e
        raise load_failed(field, model, e) from e


def transformer_config(model: str) -> dict[str, Any]:
    """The transformer's config (max_text_seq_length, patch sizes, ...) without its weights."""
    from diffusers import CogVideoXTransformer3DModel

    with loading(model, {"transformer": False}):
        return dict(CogVideoXTransformer3DModel.load_config(model, subfolder="transformer"))


def vae_config(model: str) -> dict[str, Any]:
    from diffusers import AutoencoderKLCogVideoX

    with loading(model, {"vae": False}):
        return dict(AutoencoderKLCogVideoX.load_config(model, subfolder="vae"))


def load_vae(model: str, device: str, dtype: torch.dtype):
    """The frozen VAE in eval mode on `device`."""
    from diffusers import AutoencoderKLCogVideoX

    with loading(model, {"vae": True}):
        vae = AutoencoderKLCogVideoX.from_pretrained(model, subfolder="vae", dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(model: str, device: str, dtype: torch.dtype):
    """(tokenizer, frozen T5 encoder on `device`)."""
    from transformers import AutoTokenizer, T5EncoderModel

    with loading(model, {"tokenizer": False, "text_encoder": True}):
        tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
        encoder = T5EncoderModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_transformer(model: str, device: str, dtype: torch.dtype):
    """The transformer with every base weight frozen, cast to `dtype`, on `device`."""
    from diffusers import CogVideoXTransformer3DModel

    with loading(model, {"transformer": True}):
        transformer = CogVideoXTransformer3DModel.from_pretrained(
            model, subfolder="transformer", dtype=dtype
        )
    return transformer.requires_grad_(False).to(device)


def load_scheduler(model: str):
    """The training noise schedule (CogVideoXDPMScheduler, v-prediction)."""
    from diffusers import CogVideoXDPMScheduler

    with loading(model, {"scheduler": False}):
        return CogVideoXDPMScheduler.from_pretrained(model, subfolder="scheduler")


# --------------------------------------------------------------------------- encoding


def encode_video(
    vae,
    frames: torch.Tensor,
    generators: Sequence[torch.Generator] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled VAE latents of uint8 videos, all of them in one `vae.encode` call.

    Args:
        vae: an AutoencoderKLCogVideoX.
        frames: uint8 [B, F, H, W, 3], F = 4k + 1, H and W multiples of 8.
        generators: B CPU generators, one per clip, seeding each clip's sample from the
            latent distribution (None: the global RNG).
        scale: what the latents are multiplied by; None: the VAE's `scaling_factor`.

    Returns:
        [B, F', C, H/8, W/8] in the VAE's dtype, F' = (F - 1) / 4 + 1.
    """
    import torch

    x = frames.to(vae.device).float() / 255.0 * 2.0 - 1.0  # [0, 255] -> [-1, 1]
    x = x.permute(0, 4, 1, 2, 3).to(vae.dtype)  # [B, F, H, W, C] -> [B, C, F, H, W]
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    # latent_dist.sample(generator), with the noise drawn in fp32 on the CPU, per clip: fp16
    # draws are another sequence, and a batch-wide draw would tie a clip's sample to its
    # batch. So a clip's latents are the same on every device, dtype and batch size.
    shape = dist.mean.shape[1:]  # [C, F', h, w]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators or [None] * len(x)])
    scale = vae.config.scaling_factor if scale is None else scale
    latents = (dist.mean + dist.std * noise.to(dist.mean)) * scale
    return latents.permute(0, 2, 1, 3, 4).contiguous()  # [B, C, F', h, w] -> [B, F', C, h, w]


def image_scale(vae_config: Mapping[str, Any]) -> float:
    """What image latents are multiplied by: the VAE's `scaling_factor`, or its inverse
    where the VAE config sets `invert_scale_latents` (CogVideoX1.5-5B-I2V), as
    `CogVideoXImageToVideoPipeline` does, so training feeds what inference will
    (CogVideo's finetune trainers multiply by `scaling_factor` for every I2V model, then
    validate through this pipeline, which for 1.5-I2V divides).

    Takes `vae.config` (a FrozenDict) or the dict `vae_config()` reads.
    """
    factor = vae_config["scaling_factor"]
    return 1 / factor if vae_config.get("invert_scale_latents", False) else factor


def encode_image(
    vae, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None
) -> torch.Tensor:
    """Image-to-video condition latents: each image encoded as a 1-frame video.

    Args:
        vae: an AutoencoderKLCogVideoX.
        images: uint8 [B, H, W, 3] (a sample's first frame).
        generators: B CPU generators, one per image (see `encode_video`).

    Returns:
        [B, 1, C, H/8, W/8] in the VAE's dtype, scaled by `image_scale`.
    """
    return encode_video(vae, images[:, None], generators, image_scale(vae.config))


def pad_frames(latents: torch.Tensor, temporal_patch: int) -> torch.Tensor:
    """Latents padded to a multiple of the temporal patch with copies of their first frame
    in front, as CogVideo's 1.5 trainers pad them (81 frames: 21 latent frames -> 22).

    Args:
        latents: [B, F', C, h, w].
        temporal_patch: latent frames per token (`Shape.temporal_patch`; 1: unchanged).

    Returns:
        [B, F' + n, C, h, w], n = -F' mod temporal_patch (the reference's F' mod 2 for a
        patch of 2); the input itself when n is 0.
    """
    import torch

    n = -latents.shape[1] % temporal_patch
    if n == 0:
        return latents
    return torch.cat([latents[:, :1].expand(-1, n, -1, -1, -1), latents], dim=1)


def image_condition(image_latents: torch.Tensor, frames: int) -> torch.Tensor:
    """The channels an image-to-video transformer takes beside the video latents: the image
    latents in the first latent frame, zeros in the others.

    Args:
        image_latents: [B, 1, C, h, w].
        frames: latent frames fed (after `pad_frames`).

    Returns:
        [B, frames, C, h, w], to concatenate after the noisy latents along dim 2.
    """
    import torch

    zeros = image_latents.new_zeros((image_latents.shape[0], frames - 1, *image_latents.shape[2:]))
    return torch.cat([image_latents, zeros], dim=1)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pixels of scaled latents, the inverse of `encode_video` (up to the VAE's loss).

    Args:
        vae: an AutoencoderKLCogVideoX.
        latents: [B, F', C, H/8, W/8] as `encode_video` returns them, on any device.

    Returns:
        float32 [B, F, H, W, 3] on the CPU in 0..255 (not rounded; NaN stays NaN).
    """
    import torch

    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    with torch.no_grad():
        x = vae.decode(z.permute(0, 2, 1, 3, 4)).sample  # [B, C, F', h, w] -> [B, C, F, H, W]
    x = ((x.float() + 1.0) * 127.5).clamp(0, 255)  # [-1, 1] -> [0, 255]
    return x.permute(0, 2, 3, 4, 1).cpu()  # -> [B, F, H, W, C]


def encode_prompt(tokenizer, text_encoder, captions: list[str], max_len: int) -> torch.Tensor:
    """T5 embeddings exactly as CogVideoXPipeline computes them (padded, no attention mask).

    Args:
        captions: B strings.
        max_len: the transformer's `max_text_seq_length` (226 for CogVideoX).

    Returns:
        [B, max_len, D] in the encoder's dtype.
    """
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=max_len,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    import torch

    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


def rotary_embeddings(
    transformer_config, height: int, width: int, frames: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """3D rotary embeddings (cos, sin) for 5B-type models, None for 2B-type.

    Same numbers as `CogVideoXPipeline._prepare_rotary_positional_embeddings` and the
    diffusers LoRA example (whose base grid 720x480 px is `sample_width x sample_height`).

    Args:
        transformer_config: the transformer's config (object or dict).
        height, width: pixel size of the video (the latent is 8x smaller).
        frames: latent frames F'.
    """
    cfg = transformer_config
    get = (
        cfg.get if isinstance(cfg, dict) else lambda name, default=None: getattr(cfg, name, default)
    )
    if not get("use_rotary_positional_embeddings", False):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = get("patch_size"), get("patch_size_t")
    grid_h, grid_w = height // (VAE_SCALE_SPATIAL * p), width // (VAE_SCALE_SPATIAL * p)
    base_w, base_h = get("sample_width") // p, get("sample_height") // p
    if p_t is None:  # CogVideoX 1.0
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(
            embed_dim=get("attention_head_dim"),
            crops_coords=crops,
            grid_size=(grid_h, grid_w),
            temporal_size=frames,
            device=device,
        )
    return get_3d_rotary_pos_embed(  # CogVideoX 1.5
        embed_dim=get("attention_head_dim"),
        crops_coords=None,
        grid_size=(grid_h, grid_w),
        temporal_size=(frames + p_t - 1) // p_t,
        grid_type="slice",
        max_size=(base_h, base_w),
        device=device,
    )


# --------------------------------------------------------------------------- LoRA


def lora_metadata(rank: int, alpha: float, target_modules: list[str]) -> dict[str, Any]:
    """The LoraConfig fields diffusers rebuilds the adapter from when loading a file.

    Only fields every peft release knows, so a file loads with an older or newer peft.
    """
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def add_lora(
    transformer, rank: int, alpha: float, target_modules: list[str], seed: int = 0
) -> list[torch.nn.Parameter]:
    """Give the transformer a LoRA adapter ("default"); return its parameters, cast to fp32.

    A is drawn from a generator seeded with `seed` (the global RNG is left as it was); B
    starts at zero, so the adapted model equals the base model until the first step.
    """
    import torch
    from peft import LoraConfig

    config = LoraConfig(**lora_metadata(rank, alpha, target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights in fp32, frozen ones stay in weight_dtype
    return params


def save_lora(path: Path, transformer, rank: int, alpha: float) -> Path:
    """Write `path/pytorch_lora_weights.safetensors` with rank, alpha and targets in its metadata.

    Raises:
        ValueError: `rank` or `alpha` is not what the transformer's adapter was built with.
    """
    from diffusers import CogVideoXPipeline
    from peft import get_peft_model_state_dict

    config = transformer.peft_config["default"]
    if (config.r, config.lora_alpha) != (rank, alpha):
        raise ValueError(
            f"adapter has r={config.r}, alpha={config.lora_alpha}; asked to save {rank}, {alpha}"
        )
    CogVideoXPipeline.save_lora_weights(
        str(path),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=lora_metadata(rank, alpha, list(config.target_modules)),
    )
    return Path(path) / LORA_FILE


def load_lora(transformer, path: Path) -> None:
    """Load the weights of a saved LoRA (a folder or the file) into the "default" adapter.

    Raises:
        ValueError: the file does not match the adapter (other rank or targets).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    state = {k.removeprefix("transformer."): v for k, v in load_file(file).items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{file} does not match the adapter: unexpected {list(result.unexpected_keys)[:3]}, "
            f"missing {missing[:3]}"
        )


def load_lora_checked(transformer, file: Path) -> None:
    """`load_lora` from a LoRA file made elsewhere (another run, another model), checked
    tensor by tensor first, so a LoRA of another architecture or other targets fails
    naming the tensor and both shapes instead of deep inside peft.

    Raises:
        ValueError: a tensor the adapter lacks, one it needs that the file lacks, or one
            of another shape (one line, naming the file).
    """
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    ours = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(transformer).items()}
    with safe_open(str(file), "pt") as f:
        theirs = {
            k.removeprefix("transformer."): tuple(f.get_slice(k).get_shape()) for k in f.keys()
        }
    extra, lacking = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    if extra or lacking:
        where = f"has {extra[0]}, which" if extra else f"lacks {lacking[0]}, which"
        raise ValueError(
            f"{file} {where} the model's adapter {'does not have' if extra else 'needs'}"
            f" ({len(extra)} extra, {len(lacking)} missing tensors): other targets or another"
            f" architecture"
        )
    for name, shape in ours.items():
        if theirs[name] != shape:
            raise ValueError(
                f"{file}: {name} is {list(theirs[name])}, the model's adapter needs"
                f" {list(shape)}: another architecture"
            )
    load_lora(transformer, file)


# --------------------------------------------------------------------------- full weights

FULL_FOLDER = "transformer"  # a full fine-tune checkpoint's weights, in diffusers layout


def save_full(path: Path, transformer, state_dict: dict | None = None) -> Path:
    """Write the whole transformer to `path/transformer/` (config.json and safetensors, in
    the weights' own dtype), loadable with `CogVideoXTransformer3DModel.from_pretrained`.

    `state_dict`: the weights to write instead of the transformer's own, e.g. those of a
    transformer sharded over processes, gathered (`distributed.full_weights`).
    """
    folder = Path(path) / FULL_FOLDER
    if state_dict is not None:
        import torch
        from diffusers import CogVideoXTransformer3DModel

        with torch.device("meta"):  # no memory: the tensors are the state dict's own
            transformer = CogVideoXTransformer3DModel.from_config(transformer.config)
        transformer.load_state_dict(state_dict, assign=True)
    transformer.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_full(transformer, path: Path) -> None:
    """Copy the weights of `path/transformer/` (one file or shards) into `transformer`.

    Raises:
        ValueError: the folder holds no weights, or they do not match the transformer.
    """
    from safetensors.torch import load_file

    folder = Path(path) / FULL_FOLDER
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no safetensors weights")
    state: dict = {}
    for file in files:
        state |= load_file(file)
    result = transformer.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{folder} does not match the transformer: missing {list(result.missing_keys)[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
