"""One typed configuration for the whole pipeline.

The same pydantic models are the YAML file (`cogpipe run CONFIG`), the Prefect flow
parameters (the UI renders them as a form) and the input of every stage's key. A wrong
value fails at load time with the field name and the reason.

Fields marked `keyed=False` (see `_unkeyed`) change how a stage runs, never what it
writes, so they are left out of the stage key: raising `precompute.batch_size` of a
finished run does not recompute it. (`caption.batch_size` is keyed: with left padding a
caption can depend on the other clips of its batch.) Models enter keys by fingerprint
(`workspace.model_fingerprint`, which the stages' `key_of` put in place of the path), never
by path, so moving a model folder keeps every key.

This module imports nothing of cogpipe: it is the bottom layer every other module reads.

    from cogpipe.config import load_config
    cfg = load_config("demo/demo.yaml")
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

STAGES = (
    "ingest",
    "check",
    "caption",
    "recaption",
    "filter",
    "precompute",
    "train",
    "evaluate",
)
Stage = Literal[
    "ingest", "check", "caption", "recaption", "filter", "precompute", "train", "evaluate"
]
Precision = Literal["auto", "no", "fp16", "bf16"]
StepCache = Literal["none", "first_block", "pab", "faster"]  # cogpipe.step_cache.OPTIONS

# Short names for the hub's CogVideoX models, accepted wherever a model is named.
MODELS = {
    "2b": "THUDM/CogVideoX-2b",
    "5b": "THUDM/CogVideoX-5b",
    "5b-i2v": "THUDM/CogVideoX-5b-I2V",
    "1.5-5b": "THUDM/CogVideoX1.5-5B",
    "1.5-5b-i2v": "THUDM/CogVideoX1.5-5B-I2V",
}


def hub_id(model: str) -> str:
    """The hub id of a short name (`1.5-5b` -> `THUDM/CogVideoX1.5-5B`); anything else as given."""
    return MODELS.get(model.lower(), model)


def _unkeyed(**kwargs: Any) -> Any:
    """A field that does not change a stage's output (batching, devices, progress)."""
    return Field(json_schema_extra={"keyed": False}, **kwargs)


def default_caption_prompt() -> str:
    return files("cogpipe").joinpath("prompts/power_slap.txt").read_text().strip()


def default_retry_prompt() -> str:
    return files("cogpipe").joinpath("prompts/power_slap_strict.txt").read_text().strip()


def file_fingerprint(path: Path, field: str) -> str:
    """A small input file (captions to import, overrides) by its content.

    Raises:
        ConfigError: the file cannot be read (the message names the field and the file).
    """
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from e


def check_step_cache(step_cache: str, compile: bool) -> None:
    """Refuse a step cache that re-traces compiled blocks as it skips.

    Raises:
        ValueError: pab or faster with compile.
    """
    if compile and step_cache in ("pab", "faster"):
        raise ValueError(
            f"step_cache: {step_cache} with compile re-traces the compiled blocks as it skips"
            f" (2B on an H200: faster 46 s compiled against 23 s eager); use first_block with"
            f" compile, or {step_cache} without"
        )


class Section(BaseModel):
    # No inf or NaN in any number: `learning_rate: .inf` fails at load, not in the optimizer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def key_fields(self) -> dict[str, Any]:
        """The fields that decide this section's output, as JSON-ready values."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("keyed") is False:
                data.pop(name, None)
        return data


class IngestConfig(Section):
    source: Path = Field(
        Path("videos"),
        description=(
            "A folder (scanned recursively, links followed; a video's sibling <stem>.txt is"
            " its caption), a list file (.csv / .jsonl / .json records or a .txt of paths,"
            " with an optional caption), or a dataset folder: diffusers / CogVideo /"
            " finetrainers (prompt.txt | prompts.txt | caption.txt | captions.txt paired line"
            " by line with video.txt | videos.txt) or HF / finetrainers (metadata.csv,"
            " metadata.jsonl or metadata.json)."
        ),
    )
    layout: Literal["auto", "folder", "list", "diffusers", "metadata"] = Field(
        "auto",
        description=(
            "How to read `source`. auto: tell by what is there. folder: every file under it,"
            " a video's sibling <stem>.txt read as its caption (caption-file pairs). list: one"
            " .csv / .jsonl / .json / .txt list file. diffusers: a caption list (prompt(s).txt"
            " or caption(s).txt) paired line by line with a video list (video(s).txt)."
            " metadata: metadata.csv / .jsonl / .json records with a path and a caption."
        ),
    )
    extensions: list[str] = Field(
        [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"],
        description="Suffixes probed as video; other files are rejected rows, not dropped.",
    )
    workers: int = _unkeyed(default=0, ge=0, description="Probe processes; 0: one per CPU core.")
    timeout: float = _unkeyed(
        default=120.0, gt=0, description="Seconds one file may take to hash and probe."
    )


class CheckConfig(Section):
    sample_frames: int = Field(
        8, ge=2, le=64, description="Frame pairs sampled per clip (keyframes first)."
    )
    max_decode_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Decoding budget of the sampling, as a fraction of a video's frames.",
    )
    black_luma: float = Field(
        16.0, ge=0, le=255, description="A frame whose mean luma (0-255) is below this is black."
    )
    max_black_ratio: float = Field(
        0.5, ge=0, le=1, description="Reject a clip when more of its sampled frames are black."
    )
    trim_black: bool = Field(True, description="Cut black leaders and trailers off the clip span.")
    frozen_diff: float = Field(
        0.5, ge=0, description="Mean abs difference (0-255) under which two frames count as equal."
    )
    max_frozen_ratio: float = Field(
        0.8, ge=0, le=1, description="Reject a clip when more of its frame pairs are frozen."
    )
    min_motion: float = Field(
        0.0, ge=0, description="Reject a clip whose motion score (mean |frame diff|) is below."
    )
    min_duration: float = Field(1.0, ge=0, description="Shortest accepted clip, in seconds.")
    max_duration: float = Field(
        30.0, gt=0, description="Longer shots are cut into equal clips no longer than this."
    )
    min_size: int = Field(64, ge=1, description="Smallest accepted width and height, in pixels.")
    max_size: int = Field(
        4096, ge=1, description="Largest accepted width or height; larger videos are rejected."
    )
    scenes: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "Shot detection (PySceneDetect ContentDetector). auto: full-decode only the gaps"
            " between sampled frames whose content changed; always: every frame."
        ),
    )
    scene_threshold: float = Field(
        27.0, gt=0, description="ContentDetector threshold (HSV change, 0-255) for a cut."
    )
    phash_bits: int = Field(
        4,
        ge=0,
        le=64,
        description="Near duplicates: mean Hamming distance of 64-bit frame pHashes at most this.",
    )
    heldout_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of clips held out for evaluation, stable by clip_id."
    )
    workers: int = _unkeyed(default=0, ge=0, description="Check processes; 0: one per CPU core.")
    timeout: float = _unkeyed(
        default=300.0, gt=0, description="Seconds one video may take to check."
    )


class CaptionConfig(Section):
    model: str = Field(
        "llava-hf/LLaVA-NeXT-Video-7B-hf", description="Captioner: hub id or local folder."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    prompt: str = Field(
        default_factory=default_caption_prompt, description="Instruction given with the frames."
    )
    num_frames: int = Field(8, ge=1, le=64, description="Frames sampled evenly from each clip.")
    max_new_tokens: int = Field(160, ge=1, le=2048, description="Generation budget per caption.")
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Forbid repeating n-grams of this size (0 turns it off)."
    )
    batch_size: int = Field(8, ge=1, description="Clips per generate call and per committed part.")
    shards: int = Field(
        1, ge=1, description="Batches dealt to shards in turn; each shard is its own run."
    )
    temperature: float = Field(
        0.0, ge=0, description="0: greedy decoding; above 0: sampling, seeded per batch."
    )
    seed: int = Field(0, ge=0, description="Seed of sampled decoding (with `temperature`).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _unkeyed(
        default="auto", description="auto: bfloat16 on GPU, float32 on CPU."
    )
    device: str = _unkeyed(default="auto", description="auto: cuda when available, else cpu.")
    decode_workers: int = _unkeyed(
        default=0, ge=0, description="Threads decoding frames ahead of the GPU; 0: one per core."
    )
    existing: Literal["fill", "use", "ignore"] = Field(
        "fill",
        description=(
            "Captions that come with the data (the dataset's own, or `import_file`). fill:"
            " caption only the clips without one; use: never caption (a clip without one is"
            " rejected); ignore: caption every clip. Existing captions pass the same quality gate."
        ),
    )
    import_file: Path | None = Field(
        None,
        description=(
            "Captions of an earlier run to reuse: a CSV, JSONL or Parquet file with a caption"
            " column (caption, prompt, text or description) and a clip_id, video_id or path"
            " column; paths relative to the file, to ingest.source, or absolute. They take"
            " precedence over the dataset's own captions."
        ),
    )

    def key_fields(self) -> dict[str, Any]:
        """As Section's, with the model by fingerprint (`model_fp`, added by the stage), not
        by where it lives; `existing` and `import_file` enter the key only when not the
        defaults (the import by its content), so a key from before they existed holds."""
        data = super().key_fields()
        data.pop("model")
        if self.existing == "fill":
            data.pop("existing")
        if self.import_file is None:
            data.pop("import_file")
        else:
            data["import_file"] = file_fingerprint(self.import_file, "caption.import_file")
        return data

    @model_validator(mode="after")
    def _prompt_not_empty(self) -> CaptionConfig:
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        return self


class FilterConfig(Section):
    min_words: int = Field(40, ge=0, description="Fewer words than this rejects a caption.")
    max_words: int = Field(120, ge=1, description="More words than this rejects a caption.")
    max_repetition: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Reject when this share of word trigrams repeats an earlier trigram.",
    )
    ideal_words: tuple[int, int] = Field(
        (50, 100), description="Word counts that score highest (CogVideoX's 50-100 words)."
    )
    refusal_phrases: list[str] = Field(
        [
            "i'm sorry",
            "i am sorry",
            "as an ai",
            "as a language model",
            "i cannot",
            "i can't",
            "unable to",
            "i apologize",
            "i'm not able",
        ],
        description="Case-insensitive phrases that mark a refusal.",
    )
    assistant_phrases: list[str] = Field(
        [
            "certainly!",
            "sure, here",
            "sure! here",
            "here is a description",
            "here's a description",
            "i hope this helps",
            "let me know if",
            "feel free to",
        ],
        description="Case-insensitive phrases of a chat assistant, not a description.",
    )
    still_image_phrases: list[str] = Field(
        [
            "the image shows",
            "the image depicts",
            "in this image",
            "in the image",
            "this image",
            "in this picture",
            "the picture shows",
            "in this photo",
            "the photo shows",
            "this photograph",
            "the still",
        ],
        description="Case-insensitive phrases describing a still image instead of motion.",
    )
    reject_truncated: bool = Field(
        True, description="Reject captions that hit the token limit or end mid-sentence."
    )
    min_english: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Reject when fewer than this share of words are common English words "
        "(or under 90% of letters are ASCII); 0 turns the check off.",
    )
    domain_terms: list[str] = Field(
        [
            "slap",
            "strike",
            "hit",
            "hand",
            "palm",
            "arm",
            "swing",
            "wind",
            "face",
            "cheek",
            "head",
            "jaw",
            "opponent",
            "fighter",
            "stance",
            "impact",
            "react",
            "stagger",
            "fall",
            "knock",
            "block",
            "flinch",
            "referee",
            "camera",
            "crowd",
            "stage",
            "table",
        ],
        description="The domain's vocabulary; a term matches words that start with it.",
    )
    min_domain_terms: int = Field(
        2, ge=0, description="Reject when fewer distinct domain terms appear; 0 turns it off."
    )
    max_tokens: int = Field(
        226,
        ge=0,
        description="Reject above this many T5 tokens (the model's tokenizer; CogVideoX "
        "reads 226); 0 turns it off.",
    )
    retries: int = Field(
        1,
        ge=0,
        le=3,
        description="Re-caption rejected clips up to this many times with `retry_prompt` "
        "(round 1 greedy, later rounds sampled); a clip keeps its first accepted caption.",
    )
    retry_prompt: str = Field(
        default_factory=default_retry_prompt,
        description="The stricter instruction of a re-caption pass.",
    )
    select_top: int = Field(
        0,
        ge=0,
        description="Select at most this many accepted captions, spread over the categories "
        "(held-out clips count too); 0 selects every accepted caption.",
    )
    categories: dict[str, list[str]] = Field(
        {
            "knockout": [
                "knock",
                "fall",
                "fell",
                "collaps",
                "stagger",
                "stumbl",
                "drop",
                "unconscious",
                "crumpl",
                "slump",
                "faint",
                "wobbl",
                "buckl",
                "floor",
            ],
            "block": ["block", "flinch", "brace", "bracing", "duck", "dodg", "guard", "shield"],
            "strike": [
                "slap",
                "strike",
                "struck",
                "hit",
                "swing",
                "swung",
                "palm",
                "smack",
                "blow",
                "impact",
            ],
            "reaction": [
                "react",
                "recoil",
                "snap",
                "jerk",
                "wince",
                "grimac",
                "shake",
                "shook",
                "shaking",
                "rub",
            ],
            "referee": ["referee", "official", "judge", "umpire", "announc", "commentat", "host"],
            "scene": [
                "crowd",
                "audience",
                "spectator",
                "fans",
                "cheer",
                "applau",
                "arena",
                "camera",
                "replay",
                "close-up",
                "zoom",
            ],
        },
        description="Domain-keyword categories for curation; a term matches words that start "
        "with it. A caption's category is the one with the most matching terms (ties: the "
        "earlier one, so specific events come first), 'other' when none matches.",
    )
    motion_groups: int = Field(
        3,
        ge=1,
        le=10,
        description="select_top also spreads picks over this many motion groups (quantiles of"
        " check's motion score among accepted clips: 3 = low / mid / high); 1 turns it off.",
    )
    overrides: Path | None = Field(
        None,
        description="A YAML file of a person's corrections, applied after the gate: clip_id or"
        " source path -> a caption, or -> {reject: reason}. `cogpipe captions CONFIG --export"
        " FILE` writes the current captions in this format.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) > max_words ({self.max_words})")
        if self.ideal_words[0] > self.ideal_words[1]:
            raise ValueError(f"ideal_words {list(self.ideal_words)} is not a low, high pair")
        for name, terms in self.categories.items():
            if not name.strip() or name == "other":
                raise ValueError(f"category name {name!r} is empty or 'other' (kept for the rest)")
            bad = [t for t in terms if not t or t != t.lower() or len(t.split()) != 1]
            if not terms or bad:
                raise ValueError(
                    f"category {name!r}: needs lowercase one-word terms, got {bad or 'none'}"
                )
        return self

    def key_fields(self) -> dict[str, Any]:
        """As Section's, with categories as [name, terms] pairs (their order breaks ties) and
        the overrides by content (what they say, not where the file is)."""
        data = super().key_fields()
        data["categories"] = [[name, terms] for name, terms in self.categories.items()]
        if self.overrides is None:
            data.pop("overrides")
        else:
            data["overrides"] = file_fingerprint(self.overrides, "filter.overrides")
        return data

    GATE_FIELDS: ClassVar[tuple[str, ...]] = (
        "min_words",
        "max_words",
        "max_repetition",
        "ideal_words",
        "refusal_phrases",
        "assistant_phrases",
        "still_image_phrases",
        "reject_truncated",
        "min_english",
        "domain_terms",
        "min_domain_terms",
        "max_tokens",
        "retries",
        "retry_prompt",
    )

    def gate_fields(self) -> dict[str, Any]:
        """The fields that decide whether a caption passes and how rejected ones are
        re-captioned (the recaption stage's key), without the curation's."""
        data = super().key_fields()
        return {name: data[name] for name in self.GATE_FIELDS}


class PrecomputeConfig(Section):
    frames: int = Field(49, ge=1, description="Frames per sample; CogVideoX wants 4k+1.")
    fps: float = Field(8.0, gt=0, description="Clips are resampled to this frame rate.")
    height: int = Field(480, ge=8, description="Bucket height in pixels (multiple of 8).")
    width: int = Field(720, ge=8, description="Bucket width in pixels (multiple of 8).")
    buckets: list[tuple[int, int]] = Field(
        [],
        description=(
            "More (height, width) buckets besides height x width; each clip goes to the bucket"
            " nearest its aspect ratio (multiples of 16)."
        ),
    )
    frame_buckets: list[int] = Field(
        [],
        description=(
            "Shorter frame counts for clips too short for `frames` (e.g. [33, 25, 17]): a clip"
            " gets the longest that fits at `fps`, and training batches keep one shape. Each"
            " 8k+1 (16k+1 for a model with a temporal patch of 2) and under `frames`. Empty:"
            " every sample has `frames` and check rejects shorter clips."
        ),
    )
    windows: Literal["first", "all"] | int = Field(
        "first",
        description=(
            "Samples per clip. first: one window from the clip's start. all, or a number N:"
            " check splits a clip long enough for several windows into spans of about one"
            " window each (all of them, or at most N), each with its own caption and sample."
        ),
    )
    shard_size: int = Field(16, ge=1, description="Samples per committed safetensors shard.")
    splits: list[Literal["train", "heldout"]] = Field(
        ["train"], description="Which check splits are encoded for training."
    )
    vae_tiling: bool = Field(
        False, description="Encode in overlapping spatial tiles (less memory, blended seams)."
    )
    min_psnr: float = Field(
        20.0,
        ge=0,
        description=(
            "Decode-back spot check: one latent per shard is decoded and compared with its"
            " source frames; a PSNR under this (dB) stops the stage. 0: record it only."
        ),
    )
    batch_size: int = _unkeyed(
        default=1,
        ge=1,
        description=(
            "Clips per VAE encode call. 1 is fastest with the compiled encoder (an H200: 1.72"
            " clips/s at 1, 1.43 at 4, which needs twice the memory)."
        ),
    )
    workers: int = _unkeyed(
        default=1,
        ge=1,
        description=(
            "GPU runs the shards are split over (shard i goes to part i mod workers): with a"
            " gpu pool, each part is its own flow run, so N GPU workers encode at once."
        ),
    )
    vae_slicing: bool = _unkeyed(
        default=False, description="Encode a batch one clip at a time inside the VAE (less memory)."
    )
    compile: bool = _unkeyed(
        default=True,
        description=(
            "torch.compile the VAE encoder (GPU only): ~1.9x faster encodes after about a"
            " minute of compilation per clip shape."
        ),
    )
    reference: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$",
        description=(
            "IC-LoRA references: a condition function by dotted path (module:function or"
            " module.function), e.g. cogpipe.condition:canny, that turns a sample's frames"
            " [F, H, W, 3] uint8 into a reference video of the same shape; every sample then"
            " also stores the reference's latents. None: no references."
        ),
    )
    reference_options: dict[str, Any] = Field(
        {},
        description="Keyword arguments of the condition function (canny: low, high, blur).",
    )
    device: str = _unkeyed(default="auto", description="auto: cuda when available, else cpu.")

    def key_fields(self) -> dict[str, Any]:
        """As Section's; without references, frame buckets or windows the key is what it was
        before they existed."""
        data = super().key_fields()
        if self.reference is None:
            data.pop("reference")
            data.pop("reference_options")
        if not self.frame_buckets:
            data.pop("frame_buckets")
        if self.windows == "first":
            data.pop("windows")
        return data

    def frame_counts(self) -> list[int]:
        """Every frame count a sample may have, longest first (`frames`, then the buckets)."""
        return sorted({self.frames, *self.frame_buckets}, reverse=True)

    def window_seconds(self, frames: int | None = None) -> float:
        """Seconds of clip a window of `frames` (default: `frames`) frames at `fps` spans."""
        return ((frames or self.frames) - 1) / self.fps

    def window_need(self) -> dict[str, Any]:
        """What check must know of the training windows (part of its key): the shortest
        clip that yields a sample, and how long clips are split into windows."""
        return {
            "min_seconds": round(self.window_seconds(min(self.frame_counts())), 6),
            "window_seconds": round(self.window_seconds(), 6),
            "windows": self.windows,
        }

    @model_validator(mode="after")
    def _shape(self) -> PrecomputeConfig:
        if (self.frames - 1) % 4:
            raise ValueError(f"frames must be 4k+1 (CogVideoX VAE), got {self.frames}")
        for h, w in [(self.height, self.width), *self.buckets]:
            if h % 16 or w % 16 or h <= 0 or w <= 0:
                raise ValueError(
                    f"bucket sizes must be positive multiples of 16 (VAE 8x, patch 2), got {h}x{w}"
                )
        if self.reference_options and self.reference is None:
            raise ValueError("reference_options given without a reference function")
        bad = [f for f in self.frame_buckets if (f - 1) % 8 or f < 9 or f > self.frames]
        if bad:
            raise ValueError(
                f"frame_buckets must be 8k+1 frame counts from 9 up to frames ({self.frames}),"
                f" got {bad}"
            )
        if isinstance(self.windows, int) and self.windows < 1:
            raise ValueError(f"windows must be first, all or a number >= 1, got {self.windows}")
        return self

    def all_buckets(self) -> list[tuple[int, int]]:
        """(height, width) of every bucket, the default first, without repeats."""
        return list(dict.fromkeys([(self.height, self.width), *self.buckets]))


class TicFtConfig(Section):
    """The temporal layout of a TIC-FT sample, in latent frames (1 latent frame = the first
    video frame, every later one = 4 video frames)."""

    condition_frames: int = Field(
        1, ge=1, description="Clean condition latent frames at the start of each sample."
    )
    buffer_frames: int = Field(
        3,
        ge=0,
        description=(
            "Buffer latent frames after the condition, noised at k / (buffer_frames + 1) of the"
            " schedule (k = 1..buffer_frames), capped at the target's timestep."
        ),
    )
    target_frames: int = Field(
        12, ge=1, description="Target latent frames at the sampled timestep; the loss covers them."
    )

    @property
    def latent_frames(self) -> int:
        return self.condition_frames + self.buffer_frames + self.target_frames

    @property
    def video_frames(self) -> int:
        """The precompute.frames this layout needs (CogVideoX VAE: 4 frames per latent
        frame, the first frame alone)."""
        return 4 * (self.latent_frames - 1) + 1


TrainMode = Literal["lora", "full", "ic-lora", "tic-ft"]
LORA_MODES = ("lora", "ic-lora", "tic-ft")  # modes that train a LoRA adapter


CHECKPOINTING = ("off", "full", "selective", "attention")
# The schema the UI validates against also takes the legacy booleans the loader maps to
# full / off (TrainConfig._checkpointing_bool), so a pasted older config is not refused.
Checkpointing = Annotated[
    Literal["off", "full", "selective", "attention"],
    WithJsonSchema({"enum": [*CHECKPOINTING, True, False]}),
]


class TrainConfig(Section):
    @model_validator(mode="before")
    @classmethod
    def _checkpointing_bool(cls, data: Any) -> Any:
        """`gradient_checkpointing: true/false` (older configs) means full / off."""
        if isinstance(data, dict) and isinstance(data.get("gradient_checkpointing"), bool):
            data = {
                **data,
                "gradient_checkpointing": "full" if data["gradient_checkpointing"] else "off",
            }
        return data

    mode: TrainMode = Field(
        "lora",
        description=(
            "lora: a LoRA adapter on the transformer. full: every transformer weight (see"
            " master_weights; memory: gradient_checkpointing, optimizer adamw8bit). ic-lora: a"
            " LoRA conditioned on reference videos (precompute.reference): the clean reference"
            " latents precede the noised target along frames and the loss covers the target."
            " tic-ft: temporal in-context fine-tuning (arXiv 2506.00996) with a LoRA: each sample"
            " is clean condition frames, buffer frames of rising noise and target frames (tic_ft)."
        ),
    )
    rank: int = Field(128, ge=1, description="LoRA rank.")
    alpha: float = Field(64, gt=0, description="LoRA alpha; the scale is alpha / rank.")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], description="Transformer modules given adapters."
    )
    optimizer: Literal["adam", "adamw", "adamw8bit"] = Field(
        "adamw", description="adam, adamw, or adamw8bit (bitsandbytes, GPU only)."
    )
    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="Peak learning rate (1e-4..1e-3; at most 1)."
    )
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="Adam betas, each in [0, 1)."
    )
    weight_decay: float = Field(
        1e-4, ge=0, le=1, description="Decoupled weight decay (adamw), at most 1."
    )
    epsilon: float = Field(1e-8, gt=0, le=1, description="Adam epsilon, at most 1.")
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"
    ] = Field("cosine_with_restarts", description="A diffusers learning-rate schedule.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    lr_num_cycles: int = Field(1, ge=1, description="Cycles for cosine_with_restarts.")
    max_steps: int = Field(4000, ge=1, description="Optimizer steps in the run.")
    batch_size: int = Field(1, ge=1, description="Samples per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient-norm clip.")
    mixed_precision: Precision = Field(
        "auto", description="auto: fp16 for 2B-type, bf16 for 5B-type models on GPU; no on CPU."
    )
    gradient_checkpointing: Checkpointing = _unkeyed(
        default="selective",
        description=(
            "Activation recomputation in the backward pass. off: keep everything (fastest, most"
            " memory); selective: keep attention and narrow matmul outputs, recompute the"
            " feed-forward up-projection and elementwise ops; attention: keep only attention"
            " outputs; full: recompute each checkpointed block (least memory, slowest)."
            " true / false (older configs) mean full / off."
        ),
    )
    checkpointed_blocks: float = _unkeyed(
        default=1.0,
        ge=0,
        le=1,
        description=(
            "Fraction of transformer blocks checkpointed (the first ones); the rest keep all"
            " their activations."
        ),
    )
    compile: bool = _unkeyed(
        default=True, description="torch.compile each transformer block (GPU only)."
    )
    attention_backend: Literal["auto", "cudnn", "flash", "efficient", "math"] = _unkeyed(
        default="auto",
        description="Scaled-dot-product attention kernel; auto picks cuDNN on Hopper.",
    )
    fp8_base: bool = Field(
        False,
        description=(
            "Run the frozen base linears of the transformer blocks in FP8 under the LoRA"
            " (torchao float8 training, per-tensor scales; the LoRA and its gradients stay in"
            " their dtype). Needs an H100/L4-class GPU and torchao. Experimental: not yet"
            " measured at full size (its compilation took over 2 minutes on an H200 and the"
            " benchmark did not finish); bench/train_step.py -fp8 variants measure it."
        ),
    )
    validation_every: int = _unkeyed(
        default=0,
        ge=0,
        description=(
            "Steps between validation videos (validation_prompts, else evaluate's prompts; evaluate's seeds and sampler settings),"
            " written under the run's validation/ folder; 0: never. ic-lora and tic-ft condition"
            " prompt i on training sample i (its reference; its condition and buffer frames)"
            " and take that sample's size and length."
        ),
    )
    validation_prompts: list[str] = _unkeyed(
        default=[],
        description=(
            "Prompts of the validation videos; empty: evaluate's prompt list (required with"
            " evaluate.prompts: heldout, whose captions are known only once the data is read)."
        ),
    )
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_states: int = Field(
        2,
        ge=1,
        description="Full training states kept (LoRA weights of every checkpoint are kept).",
    )
    master_weights: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "mode full: dtype of the trained weights. fp32: fp32 weights under fp16/bf16 autocast"
            " (weights 4 + gradients 4 + AdamW 8 bytes per parameter; adamw8bit: 2); bf16: weights,"
            " gradients and optimizer states in bf16 (half the memory, coarser updates)."
        ),
    )
    tic_ft: TicFtConfig = Field(
        default_factory=TicFtConfig,
        description="mode tic-ft: condition, buffer and target latent frames of each sample.",
    )
    init_from: Path | None = Field(
        None,
        description=(
            "Existing weights to start from instead of the base model: a LoRA file"
            " (.safetensors), a checkpoint folder, a run folder (its last checkpoint), a"
            " training sweep's folder (sweeps/train/<sweep>: its first-ranked cell's best"
            " checkpoint) or, for mode full, a folder holding transformer/. The optimizer,"
            " schedule and step count start fresh; the weights enter the key by content."
            " A run that has its own checkpoints resumes from them instead."
        ),
    )
    device: str = _unkeyed(default="auto", description="auto: cuda when available, else cpu.")
    strategy: Literal["auto", "single", "ddp", "fsdp"] = _unkeyed(
        default="auto",
        description=(
            "How several processes share a run. single: one process. ddp: each process holds the"
            " whole model and gradients are averaged. fsdp: weights, gradients and optimizer"
            " states are sharded (FSDP2; mode full only). auto: single with one process, else"
            " fsdp for mode full and ddp for the LoRA modes."
        ),
    )
    num_processes: int = _unkeyed(
        default=0,
        ge=0,
        description=(
            "Processes, one GPU each, that every step's gradient_accumulation_steps micro-batches"
            " are split over (each takes an equal, contiguous share), so the global batch stays"
            " batch_size x gradient_accumulation_steps and the result does not depend on it."
            " 0: one per GPU in this process's CUDA_VISIBLE_DEVICES, lowered to the largest"
            " count that divides gradient_accumulation_steps (1 on the CPU)."
        ),
    )

    @model_validator(mode="after")
    def _processes(self) -> TrainConfig:
        n, accum = self.num_processes, self.gradient_accumulation_steps
        if self.strategy == "single" and n > 1:
            raise ValueError(f"strategy single runs one process; num_processes is {n}")
        if self.strategy == "fsdp" and self.mode != "full":
            raise ValueError(
                f"strategy fsdp shards a full fine-tune; mode {self.mode} trains a LoRA: use ddp"
            )
        if self.strategy == "fsdp" and self.validation_every:
            raise ValueError(
                "strategy fsdp makes no validation videos (no process holds the whole model);"
                " set validation_every to 0 and evaluate the checkpoints"
            )
        if self.fp8_base and self.mode == "full":
            raise ValueError(
                "fp8_base runs the frozen base linears under a LoRA in FP8; mode full trains"
                " those weights: use master_weights bf16 for a lighter full fine-tune"
            )
        if self.strategy == "fsdp" and self.optimizer == "adamw8bit":
            raise ValueError("strategy fsdp: optimizer adamw8bit does not take sharded weights")
        if n > 1 and accum % n:
            raise ValueError(
                f"num_processes {n} must divide gradient_accumulation_steps ({accum}): each"
                f" process takes an equal share of every step's micro-batches"
            )
        return self

    def validation_settings(self, evaluate: EvaluateConfig) -> EvaluateConfig:
        """Evaluate's sampler settings and seeds with the validation prompts."""
        prompts = self.validation_prompts or evaluate.prompts
        return evaluate.model_copy(update={"prompts": prompts})

    def key_fields(self) -> dict[str, Any]:
        """As Section's, with only the fields of the configured mode: a LoRA config keeps the
        key it had before modes existed, and a full fine-tune ignores the LoRA fields;
        `init_from` only when given (`train.key_of` puts its weights' fingerprint there)."""
        data = super().key_fields()
        if self.mode == "lora":
            data.pop("mode")
        if self.mode == "full":
            for name in ("rank", "alpha", "target_modules"):
                data.pop(name)
        else:
            data.pop("master_weights")
        if self.mode != "tic-ft":
            data.pop("tic_ft")
        if self.init_from is None:
            data.pop("init_from")  # a run from the base model keeps its key
        if not self.fp8_base:
            data.pop("fp8_base")  # keyed only when on: bf16 runs keep their keys
        return data


class EvaluateConfig(Section):
    prompts: list[str] | Literal["heldout"] = Field(
        [
            "A bald fighter in black shorts delivers an open-hand slap to his opponent's cheek, "
            "the opponent's head snaps sideways as the referee watches.",
            "Two men face each other across a podium, one winds up and strikes, the crowd "
            "erupts in the background under bright arena lights.",
        ],
        min_length=1,
        description=(
            "Prompt suite generated for every checkpoint, or `heldout`: the captions of the"
            " first `heldout_clips` accepted held-out clips (by clip_id), so the generated"
            " videos are compared with the real clips they describe."
        ),
    )
    heldout_clips: int = Field(
        32,
        ge=1,
        description=(
            "Held-out clips whose captions are the suite with prompts: heldout. 32 x one seed"
            " meets fd_min_samples, so the Fréchet distance is reported (about 40 min of"
            " generation per 5B checkpoint on an H200)."
        ),
    )
    seeds: list[int] = Field([42], min_length=1, description="Seeds per prompt.")
    steps: int = Field(50, ge=1, description="Sampler steps.")
    guidance: float = Field(6.0, ge=0, description="Classifier-free guidance scale.")
    frames: int = Field(49, ge=1, description="Frames per generated video (8k+1).")
    height: int = Field(480, ge=8, description="Generated height.")
    width: int = Field(720, ge=8, description="Generated width.")
    fps: int = Field(8, ge=1, description="Frame rate of the written mp4.")
    step_cache: StepCache = Field(
        "none",
        description=(
            "Reuse transformer work across denoising steps for the checkpoints' videos"
            " (cogpipe.step_cache): first_block, pab (pyramid attention broadcast) or faster"
            " (FasterCache); none: the exact path. Faster at a deviation from the exact video"
            " (bench/generate.py --step-cache reports it); the base model's videos stay exact."
        ),
    )
    step_cache_threshold: float = Field(
        0.1,
        ge=0,
        description=(
            "first_block's threshold: the blocks after the first are skipped while the first"
            " block's residual changed by less than this (relative); 0 never skips. Unused by"
            " pab and faster."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "torch.compile the transformer blocks for the videos (GPU): about 1.2-1.3x per"
            " video at 49x480x720 after a minute of compilation per checkpoint (a LoRA changes"
            " the blocks). Float rounding differs slightly from eager, so it is keyed when on."
        ),
    )
    fp8_linears: bool = Field(
        False,
        description=(
            "Run the transformer blocks' linears in FP8 (torchao float8, per-row scales, per"
            " tensor for fp16 models; needs an H100/L4-class GPU and torchao). With compile:"
            " true, 5B on an H200: 63.6 s a video against 73.6 s (latents rel-L2 0.014, frames"
            " 46 dB from the bf16 video), after 262 s of compilation, which a LoRA's load may"
            " repeat per checkpoint: it pays from about 26 videos a checkpoint. Applies to the"
            " base model's suite too (keyed)."
        ),
    )
    clip_model: str = Field(
        "openai/clip-vit-base-patch32", description="CLIP for frame-text similarity."
    )
    video_features: str | None = Field(
        None,
        description=(
            "A VideoMAE (hub id or folder, e.g. MCG-NJU/videomae-base) whose features give each"
            " checkpoint a Fréchet distance to the check stage's held-out clips; none: skip it."
        ),
    )
    feature_extractor: str = Field(
        "videomae",
        description=(
            "What turns videos into the Fréchet distance's features: videomae (built in) or a"
            " module:callable called as (video_features, device); the distance is reported as"
            " fd_<name> (fd_videomae)."
        ),
    )
    real_clips: int = Field(
        64,
        ge=2,
        description=(
            "Held-out clips (the first by clip_id) for the Fréchet distance; with prompts:"
            " heldout the reference is exactly the suite's clips instead."
        ),
    )
    fd_min_samples: int = Field(
        32,
        ge=2,
        description="Fewest generated and real videos for a Fréchet distance; below: NaN and why.",
    )
    bootstrap: int = Field(
        1000, ge=100, description="Bootstrap resamples (over videos) for every 95% interval."
    )
    device: str = _unkeyed(default="auto", description="auto: cuda when available, else cpu.")

    def key_fields(self) -> dict[str, Any]:
        """As Section's, with the speed options (compile, fp8_linears, the step cache) only
        when on (an exact evaluation keeps the key it had before they existed) and the
        cache's threshold only where it is read (first_block)."""
        data = super().key_fields()
        for name in ("compile", "fp8_linears"):  # speed options: keyed only when on
            if not data[name]:
                data.pop(name)
        if self.step_cache == "none":
            data.pop("step_cache")
        if self.step_cache != "first_block":
            data.pop("step_cache_threshold")
        return data

    @property
    def heldout(self) -> bool:
        """Whether the suite is the held-out clips' captions (prompts: heldout)."""
        return self.prompts == "heldout"

    @model_validator(mode="after")
    def _shape(self) -> EvaluateConfig:
        if (self.frames - 1) % 8:
            raise ValueError(
                f"frames must be 8k+1 (9, 17, 25, 33, 41, 49), got {self.frames}: the VAE decodes"
                f" an even number of latent frames into 3 frames more than asked"
            )
        if self.height % 16 or self.width % 16:
            raise ValueError(
                f"height and width must be multiples of 16, got {self.height}x{self.width}"
            )
        if self.feature_extractor != "videomae" and ":" not in self.feature_extractor:
            raise ValueError(
                f"feature_extractor must be videomae or a module:callable path, got"
                f" {self.feature_extractor!r}"
            )
        check_step_cache(self.step_cache, self.compile)
        return self


class PipelineConfig(BaseModel):
    """The whole pipeline; one section per stage."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    workspace: Path = Field(Path("workspace"), description="Where every stage writes.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Training run name; defaults to its key."
    )
    seed: int = Field(42, description="Seed for splits, noise and data order.")
    model: str = Field(
        "THUDM/CogVideoX-2b",
        description="Base CogVideoX: 2b, 5b, 5b-i2v, 1.5-5b, 1.5-5b-i2v, a hub id or a local"
        " diffusers folder.",
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("model")
    @classmethod
    def _hub_id(cls, model: str) -> str:
        """A short name is its hub id from here on, so keys and logs name the real model."""
        return hub_id(model)

    @model_validator(mode="after")
    def _mode_needs(self) -> PipelineConfig:
        """What a training mode asks of the precompute section."""
        t, p = self.train, self.precompute
        shortest = p.window_seconds(min(p.frame_counts()))
        if shortest > self.check.max_duration:
            raise ValueError(
                f"precompute's shortest window ({min(p.frame_counts())} frames at {p.fps:g} fps:"
                f" {shortest:.2f} s) is longer than check.max_duration ({self.check.max_duration:g}"
                " s), so every clip would be too short: raise max_duration or shorten the window"
            )
        if t.mode == "ic-lora" and p.reference is None:
            raise ValueError(
                "train.mode ic-lora needs precompute.reference, the condition function that makes"
                " each sample's reference video (e.g. cogpipe.condition:canny)"
            )
        if t.mode == "tic-ft" and p.frames != t.tic_ft.video_frames:
            c = t.tic_ft
            raise ValueError(
                f"train.mode tic-ft with {c.condition_frames} condition + {c.buffer_frames}"
                f" buffer + {c.target_frames} target latent frames needs precompute.frames"
                f" {c.video_frames}, got {p.frames}"
            )
        if self.evaluate.heldout and t.validation_every and not t.validation_prompts:
            raise ValueError(
                "train.validation_every makes its videos of evaluate.prompts, and with"
                " evaluate.prompts: heldout there is no prompt list before the data is read:"
                " give train.validation_prompts, or set train.validation_every to 0"
            )
        if t.mode == "tic-ft" and p.frame_buckets:
            raise ValueError(
                "train.mode tic-ft needs every sample at its layout's frame count; drop"
                f" precompute.frame_buckets {p.frame_buckets}"
            )
        return self


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate."""


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML file into a PipelineConfig.

    Relative `workspace` and `ingest.source` paths are taken relative to the file, so a
    config works from any current directory.

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is wrong (the message
            names the file, the field and why).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config (not text)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    _read_prompt_files(raw, path)
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_field_error(err) for err in e.errors()]
        if len(lines) == 1:  # the usual case: one line, as the CLI prints it
            raise ConfigError(f"{path}: {lines[0]}") from None
        raise ConfigError(f"{path}: invalid config\n  " + "\n  ".join(lines)) from None
    return resolve_paths(cfg, path.parent)


def with_fields(
    cfg: PipelineConfig, values: dict[str, Any], base: Path | None = None, what: str = "override"
) -> PipelineConfig:
    """`cfg` with dotted fields (`train.learning_rate`) set and the whole validated again;
    relative paths in the new values resolve against `base` when given (the config
    file's folder). `what` starts every error message ("override", "sweep grid").

    Raises:
        ConfigError: a field that does not exist, or a value that does not validate (the
            message names the field and why).
    """
    raw = cfg.model_dump(mode="json")
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"{what}: {dotted!r} is not a config field")
        node[leaf] = value
    try:
        new = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(
            f"{what}: " + "; ".join(_field_error(err) for err in e.errors())
        ) from None
    return resolve_paths(new, base) if base is not None else new


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["train.max_steps=500", "train.target_modules=[to_q]"]` -> {field: value}; each value
    is read as YAML (numbers, booleans, lists), as in the config file.

    Raises:
        ConfigError: an item without `=` or with an empty field name.
    """
    out: dict[str, Any] = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.max_steps=500")
        try:
            out[field.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[field.strip()] = text
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _field_error(err: dict[str, Any]) -> str:
    """'train.learning_rate: Input should be less than or equal to 1 (got 1e+39)'."""
    where = ".".join(str(p) for p in err["loc"]) or "<root>"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, int | float | str) and not isinstance(value, bool) and err["loc"]:
        shown = f"{value:g}" if isinstance(value, float) else repr(value)
        if isinstance(value, str) and _is_number(value):  # YAML reads 1e39 as a string
            shown = value
        if len(shown) <= 40 and err["type"] != "extra_forbidden":
            message += f" (got {shown})"
    return f"{where}: {message}"


PROMPT_FILES = {
    ("caption", "prompt_file"): "prompt",
    ("filter", "retry_prompt_file"): "retry_prompt",
}


def _read_prompt_files(raw: dict[str, Any], path: Path) -> None:
    """`caption.prompt_file` / `filter.retry_prompt_file` (relative to the config file)
    become the prompt text itself, so the stage keys hash what the model reads."""
    for (section, name), target in PROMPT_FILES.items():
        values = raw.get(section)
        if not isinstance(values, dict) or name not in values:
            continue
        file = path.parent / Path(str(values.pop(name))).expanduser()
        if target in values:
            raise ConfigError(f"{path}: {section}: give {target} or {name}, not both")
        try:
            values[target] = file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"{path}: {section}.{name}: cannot read {file}: {e.strerror}") from e


def _local(value: str, base: Path) -> str:
    """A model given as ./x, ../x or ~/x is a folder relative to the config file."""
    if value.startswith(("./", "../", "~")):
        return str((base / Path(value).expanduser()).resolve())
    return value


def _file(value: Path | None, base: Path) -> Path | None:
    return None if value is None else (base / value.expanduser()).resolve()


def resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Make the workspace, source and local model folders absolute, relative to `base`."""
    ws = cfg.workspace if cfg.workspace.is_absolute() else (base / cfg.workspace)
    src = cfg.ingest.source if cfg.ingest.source.is_absolute() else (base / cfg.ingest.source)
    return cfg.model_copy(
        update={
            "workspace": ws.resolve(),
            "model": _local(cfg.model, base),
            "ingest": cfg.ingest.model_copy(update={"source": src.resolve()}),
            "caption": cfg.caption.model_copy(
                update={
                    "model": _local(cfg.caption.model, base),
                    "import_file": _file(cfg.caption.import_file, base),
                }
            ),
            "filter": cfg.filter.model_copy(
                update={"overrides": _file(cfg.filter.overrides, base)}
            ),
            "train": cfg.train.model_copy(update={"init_from": _file(cfg.train.init_from, base)}),
            "evaluate": cfg.evaluate.model_copy(
                update={"clip_model": _local(cfg.evaluate.clip_model, base)}
            ),
        }
    )


def dump_config(cfg: PipelineConfig) -> str:
    """The config as YAML, every default spelt out."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=100)
