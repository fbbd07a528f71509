"""Condition functions: a clip's frames in, its reference video out (IC-LoRA).

A condition function takes the frames precompute decoded for a sample, uint8
[F, H, W, 3] in its resolution bucket, and returns the reference video the IC-LoRA is
conditioned on, uint8 of the same shape. Precompute runs it in its decode threads and
VAE-encodes the result beside the target, so the reference and its target always have
the same size and length.

`canny` is the built-in example (edges as white on black). Any function can take its
place by dotted path in the config, with keyword arguments:

    precompute:
      reference: cogpipe.condition:canny     # or mypackage.refs:depth, mypackage.refs.depth
      reference_options: {low: 50, high: 150}

A function is identified in cache and stage keys by its path, its options and a hash of
its source code, so editing it re-encodes its references and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from cogpipe.workspace import sha256_json


class ConditionError(ValueError):
    """A condition function that cannot be loaded or returns the wrong thing."""


def canny(frames: np.ndarray, low: float = 100, high: float = 200, blur: int = 3) -> np.ndarray:
    """Canny edges of every frame, as white edges on black in all three channels.

    Args:
        frames: uint8 [F, H, W, 3] RGB.
        low, high: the hysteresis thresholds of cv2.Canny on the grey image (0..255 scale).
        blur: side of the Gaussian blur before edge detection in pixels (odd; 0 or 1: none),
            so compression noise does not come out as edges.

    Returns:
        uint8 [F, H, W, 3], 255 on edges and 0 elsewhere.
    """
    import cv2

    if blur not in (0, 1) and blur % 2 == 0:
        raise ConditionError(f"canny: blur must be odd (or 0), got {blur}")
    out = np.empty_like(frames)
    for i, frame in enumerate(frames):
        grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        if blur > 1:
            grey = cv2.GaussianBlur(grey, (blur, blur), 0)
        out[i] = cv2.Canny(grey, low, high)[..., None]  # [H, W] -> [H, W, 1], broadcast to 3
    return out


def load(path: str) -> Callable[..., np.ndarray]:
    """The function at `module:function` or `module.function`.

    Raises:
        ConditionError: the module does not import or has no such callable.
    """
    module_name, _, name = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not name:
        raise ConditionError(f"precompute.reference {path!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConditionError(
            f"precompute.reference {path!r}: cannot import {module_name}: {e}"
        ) from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConditionError(f"precompute.reference {path!r}: {module_name} has no function {name}")
    return fn


def fingerprint(path: str, options: dict[str, Any]) -> str:
    """What identifies a condition: its path, its options and a hash of its source code."""
    fn = load(path)
    try:
        source = hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):  # a builtin or C function: its path stands for it
        source = None
    return sha256_json({"path": path, "options": options, "source": source})


def apply(fn: Callable[..., np.ndarray], frames: np.ndarray, options: dict[str, Any], name: str):
    """`fn(frames, **options)`, checked: uint8 and the shape of `frames`.

    Raises:
        ConditionError: naming the function (`name`) and what came back.
    """
    out = fn(frames, **options)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != frames.shape:
        got = (
            f"{out.dtype} {list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
        )
        raise ConditionError(
            f"precompute.reference {name}: must return uint8 {list(frames.shape)} "
            f"(the frames' shape), returned {got}"
        )
    return out
