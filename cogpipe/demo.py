"""`cogpipe demo`: sample videos, tiny random models and a config that points at them.

Everything is written once and reused: a second `cogpipe demo` rewrites nothing, so
every stage key stays the same and the whole pipeline is reused.

    demo/
      videos/      moving shapes + a black, a frozen, a re-encoded duplicate, a corrupt
                   file and a text file
      models/      cogvideox/ (diffusers layout), llava/ and clip/ (transformers layout)
      demo.yaml    the config (relative paths, so the folder can move)
      workspace/   every stage's output
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

# Sizes match the tiny models (sample 8x8 latent = 64x64 px, 9 frames); steps are few so
# the whole pipeline runs in a few minutes on two CPU cores.
DEMO_CONFIG = {
    "workspace": "./workspace",
    "name": None,
    "seed": 42,
    "model": "./models/cogvideox",
    "ingest": {"source": "./videos"},
    "check": {"sample_frames": 8, "min_duration": 1.0, "min_size": 64, "heldout_fraction": 0.2},
    "caption": {
        "model": "./models/llava",
        "num_frames": 4,
        "max_new_tokens": 40,
        "batch_size": 2,
        "no_repeat_ngram_size": 3,
    },
    # The tiny random LLaVA writes random words to its token limit: the demo's gate
    # keeps only the length and repetition rules.
    "filter": {
        "min_words": 5,
        "max_words": 80,
        "max_repetition": 0.5,
        "ideal_words": [10, 40],
        "reject_truncated": False,
        "min_english": 0,
        "min_domain_terms": 0,
        "refusal_phrases": [],
        "assistant_phrases": [],
        "still_image_phrases": [],
    },
    # min_psnr 0: the tiny random VAE does not reconstruct, so its spot check is only recorded.
    "precompute": {
        "frames": 9,
        "fps": 8,
        "height": 64,
        "width": 64,
        "shard_size": 2,
        "min_psnr": 0,
    },
    "train": {
        "rank": 8,
        "alpha": 8,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "max_steps": 6,
        "checkpoint_every": 3,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
    },
    "evaluate": {
        "prompts": [
            "a fighter slaps his opponent across the cheek",
            "the referee watches as the crowd cheers in the arena",
        ],
        "seeds": [42],
        "steps": 2,
        "frames": 9,
        "height": 64,
        "width": 64,
        "fps": 8,
        "clip_model": "./models/clip",
    },
}


def prepare_demo(root: Path) -> Path:
    """Write (once) the sample videos, tiny models and `demo.yaml` under `root`; return the config path."""
    from cogpipe.samples import write_sample_videos, write_tiny_models

    root.mkdir(parents=True, exist_ok=True)
    write_sample_videos(root / "videos")
    with quiet_model_writing():
        write_tiny_models(root / "models")
    path = root / "demo.yaml"
    text = "# Written by `cogpipe demo`: tiny random models, sample videos.\n"
    text += yaml.safe_dump(DEMO_CONFIG, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


@contextmanager
def quiet_model_writing() -> Iterator[None]:
    """transformers' output while the tiny random models are written, off for the block:
    its "Writing model shards" bars and its notices that an image processor falls back to
    PIL without torchvision mean nothing to someone trying the demo (nothing is downloaded
    here, so no download progress is hidden). Restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
