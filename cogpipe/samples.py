"""Tiny sample data and tiny random models, so the whole pipeline runs offline on a CPU.

Nothing here downloads anything: the videos are drawn with numpy and encoded with PyAV,
and the models are randomly initialised (seeded) from small configs that keep the real
classes and folder layouts, so every stage loads them exactly as it would load a hub id.

    from pathlib import Path
    from cogpipe.samples import write_sample_videos, write_tiny_models

    videos = write_sample_videos(Path("demo/videos"))   # {"shapes_00.mp4": Path, ...}
    models = write_tiny_models(Path("demo/models"))     # {"cogvideox": Path, "llava": Path, "clip": Path}

Both functions are idempotent: a file or model folder that is already complete is left
untouched (same bytes, same mtime), and every write goes to a temporary name first and is
renamed into place, so an interrupted run never leaves something that looks complete.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cogpipe.video import write_mp4

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

WIDTH, HEIGHT, FPS, NUM_FRAMES = 128, 96, 8, 24  # pixels, pixels, frames/s, frames (3 s)

# One transformer size for every tiny tower (CLIP text and vision, LLaVA's Llama and vision).
TINY_TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = dict(TINY_TOWER, image_size=32, patch_size=8)  # 4x4 = 16 patches + CLS
TINY_IMAGE_PROCESSOR = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
# LLaVA-NeXT "anyres": an image is resized to the best of these and cut into 32-px tiles.
TINY_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

# Fight-video vocabulary (plus the colour and shape words of the sample clips) the tiny
# word-level tokenizers are trained on; any other word becomes <unk>.
VOCAB_SENTENCES = [
    "Two fighters face each other across a podium in a bright arena.",
    "The fighter winds up and delivers an open-hand slap to his opponent's cheek.",
    "The opponent's head snaps sideways on impact and he staggers back.",
    "A bald fighter in black shorts stands square with his hands behind his back.",
    "The referee watches closely and steps in after the strike.",
    "The crowd erupts in the background under bright lights.",
    "The camera frames both competitors from the side in a medium shot.",
    "The camera slowly zooms in on the receiver's face after the impact.",
    "He plants his feet, sets his stance and measures the distance with his palm.",
    "The wind-up is long and the swing is fast, with the right hand.",
    "The strike lands flush with a loud crack and the receiver blinks hard.",
    "The receiver's reaction is delayed: his knees buckle and he drops to the floor.",
    "Officials rush in while the referee waves off the round.",
    "A tall fighter with a beard wears a red shirt and a white towel.",
    "The left hand swings in a wide arc and connects with the jaw.",
    "The striker steps forward, rotates his hips and follows through.",
    "Spectators stand up, cheer and point at the stage.",
    "The announcer calls the round while the judges take notes.",
    "A slow motion replay shows the cheek ripple on impact.",
    "The camera pans from the striker to the receiver and back.",
    "Both men wear shorts and stand on a blue mat behind a table.",
    "The receiver holds the edge of the table and keeps his chin level.",
    "The striker chalks his hand before the slap.",
    "The crowd goes quiet as the fighter raises his arm.",
    "He shakes off the hit, nods and gets ready to strike back.",
    "The referee checks the receiver's eyes and signals the next turn.",
    "The arena is dark except for spotlights on the stage.",
    "A handheld camera moves around the fighters at eye level.",
    "The shot is steady and wide, showing the whole stage and the crowd.",
    "The video shows a quick, powerful slap and a dazed opponent.",
    "A red circle moves left across a green background.",
    "A blue rectangle slides up and a yellow square drifts down.",
    "An orange circle and a purple rectangle bounce on a grey background.",
    "Small white shapes move fast while a large black shape moves slowly.",
    "A pink ball rolls right over a cyan and brown gradient.",
    "The shapes change direction, speed and size over time.",
    "A fighter slaps, the crowd cheers and the camera shakes.",
    "The competitor in the red corner wins by knockout.",
    "The match ends with a handshake and a hug between the two fighters.",
    "The scene is lit from above and the colours are bright and vivid.",
    "The user asks the assistant to describe the system of the video.",
]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}SYSTEM: "
    "{% elif message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'video' %}<video>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}"
    "{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------- videos


def _shapes_clip(index: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Moving coloured shapes over a bright gradient, different for every `index`.

    Returns:
        [num_frames, HEIGHT, WIDTH, 3] uint8 RGB.
    """
    rng = np.random.default_rng(1000 + index)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)  # [H, W] pixel coordinates
    # A gradient whose direction changes per clip decides most of the perceptual hash,
    # so clips differ structurally, not only in colour. Kept bright (luma >> 16).
    angle = index * np.pi / 3 + rng.uniform(-0.2, 0.2)
    ramp = np.cos(angle) * (xs / WIDTH - 0.5) + np.sin(angle) * (ys / HEIGHT - 0.5)  # ~[-0.7, 0.7]
    c0, c1 = rng.uniform(110, 240, 3), rng.uniform(40, 140, 3)
    background = c0 + (ramp[..., None] + 0.7) / 1.4 * (c1 - c0)  # [H, W, 3] float

    shapes = []
    for _ in range(rng.integers(2, 5)):
        shapes.append(
            dict(
                kind=rng.choice(["circle", "rect"]),
                colour=rng.uniform(0, 255, 3),
                size=rng.uniform(8, 26),  # radius or half-side, pixels
                pos=rng.uniform([10, 10], [WIDTH - 10, HEIGHT - 10]),  # (x, y), pixels
                vel=rng.uniform(-4, 4, 2) * rng.uniform(0.5, 1.5),  # pixels/frame
            )
        )
    frame_size = np.array([WIDTH, HEIGHT], np.float64)  # (x, y) extent, pixels
    frames = np.empty((num_frames, HEIGHT, WIDTH, 3), np.uint8)
    for t in range(num_frames):
        img = background.copy()
        for s in shapes:
            # Bounce off the borders: fold the straight-line path back into [0, size].
            free = (s["pos"] + s["vel"] * t) % (2 * frame_size)  # (x, y), in [0, 2 * size)
            x, y = frame_size - np.abs(free - frame_size)
            if s["kind"] == "circle":
                mask = (xs - x) ** 2 + (ys - y) ** 2 <= s["size"] ** 2
            else:
                mask = (np.abs(xs - x) <= s["size"]) & (np.abs(ys - y) <= 0.6 * s["size"])
            img[mask] = s["colour"]
        frames[t] = img.clip(0, 255).astype(np.uint8)
    return frames


def _resize(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, height, width, 3] uint8, bilinear."""
    from PIL import Image

    return np.stack(
        [np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames]
    )


def write_sample_videos(folder: Path) -> dict[str, Path]:
    """Write the sample clips used by tests and the demo config.

    Six good clips (`shapes_00.mp4`..`shapes_05.mp4`) and one of each kind the check
    stage must reject: `black.mp4`, `frozen.mp4`, `shapes_00_reencoded.mp4` (near
    duplicate of shapes_00 at 160x120 and low bitrate), `corrupt.mp4` (a truncated mp4)
    and `notes.txt` (not a video). Clips are 128x96 at 8 fps, 24 frames, deterministic.
    A file that already exists with non-zero size is not rewritten.

    Args:
        folder: Created if missing.

    Returns:
        File name -> path, for every file above.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    def emit(name: str, write) -> None:
        path = folder / name
        out[name] = path
        if path.is_file() and path.stat().st_size > 0:
            return
        tmp = folder / f".{name}.partial{path.suffix}"  # suffix kept: PyAV picks the muxer by it
        write(tmp)
        tmp.replace(path)

    for i in range(6):
        emit(f"shapes_{i:02d}.mp4", lambda p, i=i: write_mp4(p, _shapes_clip(i), FPS))
    emit(
        "black.mp4",
        lambda p: write_mp4(p, np.zeros((NUM_FRAMES, HEIGHT, WIDTH, 3), np.uint8), FPS),
    )
    still = _shapes_clip(7, num_frames=1)  # [1, H, W, 3]
    emit("frozen.mp4", lambda p: write_mp4(p, np.repeat(still, NUM_FRAMES, axis=0), FPS))
    emit(
        "shapes_00_reencoded.mp4",
        lambda p: write_mp4(p, _resize(_shapes_clip(0), 160, 120), FPS, bitrate=8_000),
    )

    def corrupt(p: Path) -> None:
        write_mp4(p, _shapes_clip(0), FPS)
        p.write_bytes(p.read_bytes()[:300])  # ftyp + the start of mdat; no moov box

    emit("corrupt.mp4", corrupt)
    emit(
        "notes.txt",
        lambda p: p.write_text("Sample folder for cogpipe. This file is not a video.\n"),
    )
    return out


# --------------------------------------------------------------------------- models


def build_word_tokenizer(
    sentences: list[str],
    specials: dict[str, str],
    max_length: int,
    *,
    add_bos: bool = False,
    add_eos: bool = False,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer trained on `sentences`.

    Lower-cases, splits on whitespace and punctuation, and maps every unseen word to the
    unknown token. Special tokens get the first ids, in the order of `specials`.

    Args:
        sentences: Training text.
        specials: Tokenizer attribute -> token, e.g. {"pad_token": "<pad>", "eos_token":
            "</s>", "unk_token": "<unk>"}. Must include "unk_token". Non-standard names
            ("image_token") become named extra special tokens (`tokenizer.image_token`).
        max_length: `model_max_length`.
        add_bos: Prepend `bos_token` to every encoded sequence.
        add_eos: Append `eos_token` to every encoded sequence.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    tok.train_from_iterator(
        sentences, trainers.WordLevelTrainer(special_tokens=list(specials.values()))
    )
    if add_bos or add_eos:
        bos, eos = specials.get("bos_token"), specials.get("eos_token")
        single = " ".join(([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else []))
        pair = " ".join(([bos] if add_bos else []) + ["$A", "$B"] + ([eos] if add_eos else []))
        used = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in used]
        )
    standard = set(PreTrainedTokenizerFast.SPECIAL_TOKENS_ATTRIBUTES)
    named = {k: v for k, v in specials.items() if k in standard}
    extra = {k: v for k, v in specials.items() if k not in standard}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        extra_special_tokens=extra or None,
        **named,
    )


def _write_atomically(target: Path, marker: str, write) -> Path:
    """Run `write(tmp_folder)` and rename it to `target`, unless `target/marker` exists."""
    if (target / marker).is_file():
        return target
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted run
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)  # incomplete folder without the marker
    tmp.rename(target)
    return target


# The shapes that tell CogVideoX generations apart, on a tiny transformer. Sizes in
# latent units (pixels / 8). On the hub: 2B (no RoPE, fp16), 5B (RoPE), 5B-I2V (RoPE and
# learned positional embeddings fixed at 60x90, image latents on the channels), 1.5-5B
# (RoPE at a 300x300 base grid, temporal patch 2), 1.5-5B-I2V (and an `ofs` embedding).
# RoPE splits a head into 1/4 time, 3/8 height, 3/8 width, each even: heads of 16.
_ROPE = dict(use_rotary_positional_embeddings=True, num_attention_heads=2, attention_head_dim=16)
_V15 = dict(  # CogVideoX 1.5: temporal patch 2, RoPE at its own base grid
    **_ROPE,
    patch_size_t=2,
    patch_bias=False,
    sample_width=32,
    sample_height=32,
    sample_frames=81,
)
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "2b": {},
    "1.5": _V15,
    "i2v": dict(**_ROPE, use_learned_positional_embeddings=True, in_channels=8),
    # 1.5-I2V: image latents on the channels, an `ofs` embedding added to the time embedding
    "1.5-i2v": dict(**_V15, in_channels=8, time_embed_dim=8, ofs_embed_dim=8),
}


# The 2B-shaped tiny transformer: latent [B, F', 4, H/8, W/8] with F' = (F - 1) / 4 + 1;
# sample_* are in latent units. `TINY_VARIANTS` changes it into the other generations.
TINY_TRANSFORMER: dict[str, Any] = (
    dict(num_attention_heads=4, attention_head_dim=8, num_layers=2)  # width 32
    | dict(in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=32)
    | dict(sample_width=8, sample_height=8, sample_frames=9)
    | dict(patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16)
)
SCHEDULER_2B: dict[str, Any] = dict(  # THUDM/CogVideoX-2b scheduler_config.json
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    set_alpha_to_one=True,
    clip_sample=False,
    snr_shift_scale=3.0,
)


def _write_cogvideox(folder: Path, variant: str = "2b") -> None:
    """A tiny CogVideoX pipeline of the given generation (`TINY_VARIANTS`): 8x spatial /
    4x temporal VAE with 4 latent channels, 2-layer transformer; image-to-video variants
    are saved as a `CogVideoXImageToVideoPipeline`."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    # T5 convention: pad 0, eos 1, unk 2; every prompt ends with </s>.
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer = build_word_tokenizer(VOCAB_SENTENCES, specials, 16, add_eos=True)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, vocab_size=len(tokenizer))
    )
    transformer = CogVideoXTransformer3DModel(**(TINY_TRANSFORMER | TINY_VARIANTS[variant]))
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDPMScheduler(**SCHEDULER_2B)
    components = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    image_to_video = transformer.config.in_channels == 2 * vae.config.latent_channels
    pipeline_class = CogVideoXImageToVideoPipeline if image_to_video else CogVideoXPipeline
    pipeline_class(transformer=transformer, **components).save_pretrained(folder)


def write_tiny_cogvideox(folder: Path, variant: str = "2b") -> Path:
    """A tiny random CogVideoX of one generation (a key of `TINY_VARIANTS`) in diffusers
    layout, written once (skipped when complete)."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown CogVideoX variant {variant!r}; one of {sorted(TINY_VARIANTS)}")
    write = functools.partial(_write_cogvideox, variant=variant)
    return _write_atomically(Path(folder), "model_index.json", write)


def _vision(arch: str):
    """The tiny vision tower: CLIP for the LLaVA family, SigLIP for OneVision (as on the hub)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    return (
        SiglipVisionConfig(**TINY_VISION)
        if arch == "llava_onevision"
        else CLIPVisionConfig(**TINY_VISION)
    )


def _text(arch: str, vocab_size: int, token_ids: dict[str, int]):
    """The tiny language model: Qwen2 for OneVision, Llama for the others (Vicuna, Yi)."""
    from transformers import LlamaConfig, Qwen2Config

    cls = Qwen2Config if arch == "llava_onevision" else LlamaConfig
    return cls(**TINY_TOWER, num_key_value_heads=4, vocab_size=vocab_size, **token_ids)


def _captioner_config(arch: str, vision, text, ids: dict[str, int]):
    """The model config of one of the four architectures, with hub-like settings at tiny size."""
    from transformers import (
        LlavaConfig,
        LlavaNextConfig,
        LlavaNextVideoConfig,
        LlavaOnevisionConfig,
    )

    common = dict(vision_config=vision, text_config=text, image_token_index=ids["image_token"])
    grid = dict(image_grid_pinpoints=TINY_GRID_PINPOINTS)
    if arch == "llava":
        return LlavaConfig(
            **common, vision_feature_select_strategy="default", vision_feature_layer=-1
        )
    if arch == "llava_next":
        return LlavaNextConfig(
            **common, **grid, vision_feature_select_strategy="default", vision_feature_layer=-1
        )
    if arch == "llava_next_video":  # frames pooled 2x2: 4 tokens per 32-px frame
        return LlavaNextVideoConfig(
            **common,
            **grid,
            video_token_index=ids["video_token"],
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            spatial_pool_mode="average",
            spatial_pool_stride=2,
        )
    return LlavaOnevisionConfig(
        **common,
        **grid,
        video_token_index=ids["video_token"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )


def _captioner_processor(arch: str, tokenizer):
    """The processor the hub ships for `arch`, at 32 pixels, with a USER/ASSISTANT template."""
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaNextVideoProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaProcessor,
    )
    from transformers.models.llava_next_video.video_processing_llava_next_video import (
        LlavaNextVideoVideoProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )
    from transformers.utils import is_torchvision_available

    from cogpipe.vlm import numpy_video_class, without_torchvision

    if not is_torchvision_available():  # the same classes, running on numpy (see cogpipe.vlm)
        LlavaNextVideoVideoProcessor = numpy_video_class(LlavaNextVideoVideoProcessor)  # noqa: N806
        LlavaOnevisionVideoProcessor = numpy_video_class(LlavaOnevisionVideoProcessor)  # noqa: N806
        LlavaNextVideoProcessor = without_torchvision(LlavaNextVideoProcessor)  # noqa: N806
        LlavaOnevisionProcessor = without_torchvision(LlavaOnevisionProcessor)  # noqa: N806
    clip_like = dict(
        patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )  # the CLS token, dropped by "default"
    template = dict(chat_template=LLAVA_CHAT_TEMPLATE)
    if arch == "llava":
        image = CLIPImageProcessor(**TINY_IMAGE_PROCESSOR)
        return LlavaProcessor(image_processor=image, tokenizer=tokenizer, **clip_like, **template)
    if arch in ("llava_next", "llava_next_video"):
        image = LlavaNextImageProcessor(
            **TINY_IMAGE_PROCESSOR, image_grid_pinpoints=TINY_GRID_PINPOINTS
        )
        if arch == "llava_next":
            return LlavaNextProcessor(
                image_processor=image, tokenizer=tokenizer, **clip_like, **template
            )
        video = LlavaNextVideoVideoProcessor(**TINY_IMAGE_PROCESSOR)
        return LlavaNextVideoProcessor(
            video_processor=video,
            image_processor=image,
            tokenizer=tokenizer,
            **clip_like,
            **template,
        )
    square = {"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]}
    image = LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=TINY_GRID_PINPOINTS)
    return LlavaOnevisionProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=square),
        num_image_tokens=(TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2,
        vision_feature_select_strategy="full",
        **template,
    )


def _write_captioner(folder: Path, arch: str) -> None:
    """A tiny captioner of architecture `arch` (model_type): vision tower + 2-layer LM."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
    specials |= {"image_token": "<image>", "video_token": "<video>"}  # read by the processors
    tokenizer = build_word_tokenizer(VOCAB_SENTENCES, specials, 4096, add_bos=True)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in specials.items()}
    token_ids = dict(
        pad_token_id=ids["pad_token"], bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"]
    )
    config = _captioner_config(arch, _vision(arch), _text(arch, len(tokenizer), token_ids), ids)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    # With the default init (std 0.02) the LM barely looks past the last token, so greedy
    # decoding is a map token -> next token and falls into a loop of 1-5 words within a
    # few steps. Std 0.4 on the text model and projector makes attention and the image
    # features matter: every sample clip gets a different caption with almost no repeated
    # trigrams. Zero lm_head rows give the special tokens logit 0, which never wins the
    # argmax over ~200 random logits: no <unk>/<image> in captions, and no </s> either, so
    # a caption always runs to max_new_tokens.
    with torch.no_grad():
        for module in [
            *model.model.language_model.modules(),
            *model.model.multi_modal_projector.modules(),
        ]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.4)
        model.lm_head.weight.normal_(0.0, 0.4)
        model.lm_head.weight[list(ids.values())] = 0.0
    model.generation_config = GenerationConfig(**token_ids)
    model.save_pretrained(folder)
    _captioner_processor(arch, tokenizer).save_pretrained(folder)


def _write_clip(folder: Path) -> None:
    """A CLIP with 32 px images and a word-level text tower, for frame-text similarity."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}
    tokenizer = build_word_tokenizer(VOCAB_SENTENCES, specials, 77, add_bos=True, add_eos=True)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in specials.items()}
    # The text tower pools at the first eos_token_id, so it must be our </s>.
    text_config = dict(TINY_TOWER, max_position_embeddings=77, vocab_size=len(tokenizer))
    text_config.update(
        {f"{name}_id": ids[name] for name in ("pad_token", "bos_token", "eos_token")}
    )
    config = CLIPConfig(text_config=text_config, vision_config=TINY_VISION, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(**TINY_IMAGE_PROCESSOR).save_pretrained(folder)


def _write_videomae(folder: Path) -> None:
    """A VideoMAE encoder on 4-frame 32 px clips (tubelets 2x8x8: 2x4x4 = 32 tokens)."""
    from transformers import VideoMAEConfig, VideoMAEImageProcessor, VideoMAEModel

    config = VideoMAEConfig(
        **TINY_VISION, num_frames=4, tubelet_size=2, use_mean_pooling=False
    )  # MCG-NJU/videomae-base keeps the final layer norm, as use_mean_pooling=False does
    torch.manual_seed(0)
    VideoMAEModel(config).save_pretrained(folder)
    # MCG-NJU's processor settings at 32 px; loads as the PIL backend without torchvision.
    imagenet = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    VideoMAEImageProcessor(**TINY_IMAGE_PROCESSOR, **imagenet).save_pretrained(folder)


def write_tiny_videomae(folder: Path) -> Path:
    """Write a tiny random VideoMAE to `folder`, loadable by `VideoMAEModel` and
    `AutoImageProcessor` (the video feature extractor of `cogpipe.metrics`).

    Hidden size 32, 2 layers, 4 heads, 32 px images in 8 px patches, 4 frames in tubelets
    of 2; seeded. Written under a temporary name and renamed; skipped when complete.
    """
    return _write_atomically(Path(folder), "config.json", _write_videomae)


def write_tiny_captioner(folder: Path, arch: str) -> Path:
    """Write a tiny random captioner of `arch` (llava, llava_next, llava_next_video or
    llava_onevision) to `folder`, loadable by `AutoProcessor` / `AutoModelForImageTextToText`."""
    if arch not in {"llava", "llava_next", "llava_next_video", "llava_onevision"}:
        raise ValueError(f"unknown captioner architecture {arch!r}")
    return _write_atomically(Path(folder), "config.json", lambda f: _write_captioner(f, arch))


def write_tiny_models(folder: Path) -> dict[str, Path]:
    """Write tiny random CogVideoX, LLaVA and CLIP folders that load like hub checkpoints.

    - cogvideox: diffusers layout for `CogVideoXPipeline.from_pretrained`; a 2-step
      9x64x64 generation takes about a second on a CPU.
    - llava: `AutoProcessor` / `AutoModelForImageTextToText` (LlavaProcessor +
      LlavaForConditionalGeneration) with a USER/ASSISTANT chat template. Greedy decoding
      gives a different, varied caption per clip from the tiny vocabulary and never emits
      </s>, so captions are always `max_new_tokens` words long (see `_write_captioner`).
    - clip: `CLIPModel`, `AutoTokenizer`, `AutoImageProcessor` (and `AutoProcessor`).

    Weights are seeded, so the same transformers/diffusers versions write the same bytes.
    A folder is written under a temporary name and renamed, and skipped when complete.

    Args:
        folder: Parent folder; created if missing.

    Returns:
        {"cogvideox": folder/"cogvideox", "llava": folder/"llava", "clip": folder/"clip"}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "cogvideox": write_tiny_cogvideox(folder / "cogvideox"),
        "llava": write_tiny_captioner(folder / "llava", "llava"),
        "clip": _write_atomically(folder / "clip", "config.json", _write_clip),
    }
