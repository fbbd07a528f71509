"""Model-family seams: one module per family (load, encode, rotary embeddings, save LoRA)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def quiet_local_load(model: str) -> Iterator[None]:
    """diffusers' and transformers' loading bars off while `model` is read from a local
    folder: seconds of reading, beside the stage's own progress that a person watches. A
    hub id keeps them, since there they also show the download."""
    if not Path(model).expanduser().is_dir():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [
        lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()
    ]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()
