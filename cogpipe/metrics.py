"""Video metrics for checkpoint evaluation: CLIP score, temporal consistency, dynamic degree
and the Fréchet distance between two sets of clips.

Every metric is a pure function of uint8 RGB videos `[F, H, W, 3]` and of the models it is
handed; nothing here reads or writes the workspace.

    from cogpipe.eval_models import load_clip
    from cogpipe.metrics import VideoMAEFeatures, frechet_distance, video_metrics

    clip = load_clip("openai/clip-vit-base-patch32", "cuda")
    video_metrics(clip, frames, prompt)  # {"clip_score": ..., "temporal_consistency": ..., "dynamic_degree": ...}
    features = VideoMAEFeatures("MCG-NJU/videomae-base", "cuda")
    frechet_distance(features(generated), features(real))  # lists of videos -> [N, D] each

What is notable:
- CLIP reads at most 77 tokens and CogVideoX prompts run to ~226, so a long prompt is cut
  into chunks that each fit the text tower (BOS + ids + EOS), and the prompt's embedding
  is the renormalised mean of the chunks' unit embeddings. A prompt that fits is one chunk
  and scores exactly as a plain CLIPScore does.
- The Fréchet distance with fewer samples than dimensions (the usual case for an
  evaluation suite against a 768-dim extractor, where both covariances are singular) never
  forms a covariance: tr((S_a S_b)^1/2) is then the nuclear norm of the small
  cross-product A B^T of the centred feature rows, real and finite, so a bootstrap of a
  32-clip suite is a few milliseconds per resample, not a 768x768 matrix square root.
  With more samples than dimensions it is scipy's matrix square root of S_a S_b.
- Intervals are percentile bootstraps over videos (`bootstrap_mean`, `bootstrap_frechet`:
  both sets resampled), seeded. A comparison of two checkpoints is a paired bootstrap of
  the difference (`paired_difference`): both are resampled with the same (prompt, seed)
  indices, and one wins only when the 95% interval of the difference excludes 0.
- The Fréchet distance refuses small sets (`frechet_refusal`): below the minimum it is a
  reason, not a number.
- Feature extractors are pluggable (`load_features`): a registry name (`videomae`) or a
  `module:callable` path called as (model, device); the distance is named after them
  (`fd_videomae`).
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cogpipe.models import quiet_local_load
from cogpipe.video import even_indices

if TYPE_CHECKING:
    import torch

    from cogpipe.eval_models import Clip

MOTION_SIZE = 64  # pixels: dynamic degree compares frames as 64x64 grayscale
LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's "L" mode


# --------------------------------------------------------------------------- CLIP


def text_chunks(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """Token ids of `text` cut into chunks of at most `max_length` ids, BOS/EOS on each.

    The prompt is tokenized without truncation or special tokens, split into runs of
    `max_length - 2` ids (fewer without a BOS token), and each run gets the tokenizer's BOS
    and EOS back, so every chunk reads like a short prompt to the text tower. A prompt
    that fits, and the empty prompt, is one chunk equal to the tokenizer's own encoding.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    head = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    tail = [tokenizer.eos_token_id]
    width = max_length - len(head) - len(tail)  # ids per chunk
    return [head + ids[i : i + width] + tail for i in range(0, max(len(ids), 1), width)]


def clip_embeddings(clip: Clip, frames: np.ndarray, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit CLIP embeddings of every frame and of the (possibly long) prompt, in one pass.

    Args:
        clip: from `cogpipe.eval_models.load_clip`.
        frames: [F, H, W, 3] uint8 RGB.
        text: the prompt, any length (see `text_chunks`).

    Returns:
        (image [F, D], text [D]) float tensors of unit norm, on the CLIP's device.
    """
    import torch

    tok = clip.tokenizer
    max_len = min(tok.model_max_length, clip.model.config.text_config.max_position_embeddings)
    chunks = text_chunks(tok, text, max_len)
    tokens = tok.pad({"input_ids": chunks}, return_tensors="pt")  # [C, L], right-padded
    pixels = clip.processor(images=list(frames), return_tensors="pt").pixel_values  # [F, 3, S, S]
    with torch.inference_mode():
        out = clip.model(
            input_ids=tokens["input_ids"].to(clip.device),
            attention_mask=tokens["attention_mask"].to(clip.device),
            pixel_values=pixels.to(clip.device),
        )
    text_embed = out.text_embeds.mean(0)  # [D]; the chunks' unit embeddings, averaged
    # One chunk is unit-norm already; keeping its bits keeps short prompts' scores unchanged.
    if len(chunks) > 1:
        text_embed = text_embed / text_embed.norm()
    return out.image_embeds, text_embed


def image_embeddings(clip: Clip, frames: np.ndarray) -> torch.Tensor:
    """Unit CLIP image embeddings of every frame: [F, H, W, 3] uint8 -> [F, D]."""
    import torch

    pixels = clip.processor(images=list(frames), return_tensors="pt").pixel_values  # [F, 3, S, S]
    with torch.inference_mode():
        embeds = clip.model.get_image_features(pixel_values=pixels.to(clip.device)).pooler_output
    return embeds / embeds.norm(dim=-1, keepdim=True)


def _clip_score(image: torch.Tensor, text: torch.Tensor) -> float:
    cos = (image @ text[:, None])[:, 0]  # [F]; both unit-norm
    return float((100 * cos).clamp(min=0).mean())


def _temporal_consistency(image: torch.Tensor) -> float:
    if len(image) < 2:
        raise ValueError(f"temporal consistency needs at least 2 frames, got {len(image)}")
    return float((image[:-1] * image[1:]).sum(-1).mean())  # cos of frames t and t+1, averaged


def clip_score(clip: Clip, frames: np.ndarray, text: str) -> float:
    """CLIPScore of a video: per frame max(100 * cos(image, text), 0), averaged over frames.

    A prompt longer than the text tower's 77 tokens is embedded in chunks (`text_chunks`),
    so its tail counts instead of being cut off; a prompt that fits scores exactly as the
    plain truncating CLIPScore.

    Args:
        clip: from `cogpipe.eval_models.load_clip`.
        frames: [F, H, W, 3] uint8 RGB.
        text: the prompt.

    Returns:
        A float in [0, 100] (about 20-35 for real CLIP models on matching pairs).
    """
    return _clip_score(*clip_embeddings(clip, frames, text))


def temporal_consistency(clip: Clip, frames: np.ndarray) -> float:
    """Mean cosine similarity of the CLIP image embeddings of adjacent frames.

    Args:
        clip: from `cogpipe.eval_models.load_clip`.
        frames: [F, H, W, 3] uint8 RGB, F >= 2.

    Returns:
        A float in [-1, 1]: 1 for a static clip, lower the more the content jumps between
        frames (flicker, cuts, objects popping in and out).

    Raises:
        ValueError: fewer than 2 frames.
    """
    return _temporal_consistency(image_embeddings(clip, frames))


# --------------------------------------------------------------------------- motion


def _small_gray(frames: np.ndarray, size: int) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, size, size] float32 luma in [0, 255], area-averaged."""
    from PIL import Image

    luma = frames.astype(np.float32) @ LUMA  # [F, H, W]
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BOX)) for f in luma])


def dynamic_degree(frames: np.ndarray) -> float:
    """How much a video moves: mean absolute difference of adjacent frames' grayscale.

    Frames are converted to luma and area-resized to 64x64 (any resolution and aspect
    ratio compare on the same scale), then |frame[t+1] - frame[t]| is averaged over
    pixels and frame pairs and divided by 255. Cheap and dependency-free; it is not
    optical flow: it grows with both the speed and the area of moving content (and with
    flicker), not with displacement alone.

    Args:
        frames: [F, H, W, 3] uint8 RGB, F >= 2.

    Returns:
        A float in [0, 1]: 0 for a static clip, 1 only for frames alternating between black
        and white. Moving shapes and camera pans are typically 0.01-0.1.

    Raises:
        ValueError: fewer than 2 frames.
    """
    if len(frames) < 2:
        raise ValueError(f"dynamic degree needs at least 2 frames, got {len(frames)}")
    gray = _small_gray(frames, MOTION_SIZE)  # [F, 64, 64]
    return float(np.abs(np.diff(gray, axis=0)).mean() / 255)


def video_metrics(clip: Clip, frames: np.ndarray, prompt: str) -> dict[str, float]:
    """The per-video metrics of one generated video, with one CLIP forward pass.

    Args:
        clip: from `cogpipe.eval_models.load_clip`.
        frames: [F, H, W, 3] uint8 RGB, F >= 2.
        prompt: the prompt it was generated from.

    Returns:
        {"clip_score": [0, 100], "temporal_consistency": [-1, 1], "dynamic_degree": [0, 1]};
        see `clip_score`, `temporal_consistency` and `dynamic_degree`.
    """
    image, text = clip_embeddings(clip, frames, prompt)
    return {
        "clip_score": _clip_score(image, text),
        "temporal_consistency": _temporal_consistency(image),
        "dynamic_degree": dynamic_degree(frames),
    }


# --------------------------------------------------------------------------- Fréchet distance


class FeatureExtractor(Protocol):
    """Maps videos to one feature vector each; any callable of this shape will do."""

    def __call__(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """N videos [F, H, W, 3] uint8 (sizes and lengths may differ) -> [N, D] float64."""
        ...


class VideoMAEFeatures:
    """VideoMAE features through transformers: the mean of the last hidden state.

    Each video is sampled to the model's `num_frames` evenly over its length (frames repeat
    when it is shorter) and resized / cropped / normalised by the checkpoint's image
    processor (its PIL backend where torchvision is missing: both resize bilinearly, within
    a few levels per pixel of each other).

        features = VideoMAEFeatures("MCG-NJU/videomae-base", "cuda")
        features([video_a, video_b])  # [2, 768]
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 8):
        """
        Args:
            model: a VideoMAE hub id or local folder (`VideoMAEModel`, with a preprocessor
                config).
            device: torch device.
            batch_size: videos per forward pass.
        """
        from transformers import AutoImageProcessor, VideoMAEModel

        with quiet_local_load(model):
            self.model = VideoMAEModel.from_pretrained(model).to(device).eval()  # fp32
        self.processor = AutoImageProcessor.from_pretrained(model)
        self.device = device
        self.batch_size = batch_size
        self.num_frames = self.model.config.num_frames

    def __call__(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        """N videos [F, H, W, 3] uint8 -> [N, hidden_size] float64."""
        import torch

        feats = []
        for i in range(0, len(videos), self.batch_size):
            batch = [
                [v[j] for j in even_indices(0, len(v), self.num_frames)]  # num_frames x [H, W, 3]
                for v in videos[i : i + self.batch_size]
            ]
            pixels = self.processor(batch, return_tensors="pt").pixel_values  # [B, T, 3, S, S]
            with torch.inference_mode():
                hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state
            feats.append(hidden.mean(1).double().cpu().numpy())  # [B, tokens, D] -> [B, D]
        if not feats:
            raise ValueError("no videos to extract features from")
        return np.concatenate(feats)


def _gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] -> mean [D] and sample covariance [D, D] (ddof 1), float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need [N, D] features with N >= 2, got shape {feats.shape}")
    return feats.mean(0), np.atleast_2d(np.cov(feats, rowvar=False))


def _trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((S_a S_b)^1/2) for symmetric PSD S_a, S_b (`scipy.linalg.sqrtm`).

    S_a S_b has real eigenvalues >= 0, so the root's trace is real up to rounding (its
    imaginary part, ~1e-9, is dropped). A constant feature makes a covariance singular:
    scipy warns that the root may be inaccurate, yet its trace stays right (the singular
    directions add 0), so that warning is silenced.
    """
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.trace(root).real)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID / FVD).

    d = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), with sample means and
    covariances (ddof 1), computed in float64. With fewer samples than dimensions the
    covariances are singular; the cross-product route handles that without NaN, but the
    estimate is then biased: compare distances at equal set sizes.

    Args:
        feats_a: [N_a, D] features, N_a >= 2 (e.g. `VideoMAEFeatures` of generated clips).
        feats_b: [N_b, D] features, N_b >= 2 (e.g. of held-out real clips).

    Returns:
        A float >= 0 (rounding below 0 is clipped), 0 for identical sets, in squared
        feature units.

    Raises:
        ValueError: a set with fewer than 2 rows, or different feature sizes.
    """
    a, b = _rows(feats_a), _rows(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mean_term = float(((a.mean(0) - b.mean(0)) ** 2).sum())
    if min(len(a), len(b)) <= a.shape[1]:  # fewer samples than dimensions: the small route
        ca, cb = a - a.mean(0), b - b.mean(0)  # centred rows [N, D]
        na, nb = len(a) - 1, len(b) - 1
        # eig(S_a S_b) = eig(A^T A B^T B) / (na nb): nonzero ones are sigma(A B^T)^2 / (na nb)
        cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(na * nb)
        cov_term = float((ca**2).sum() / na + (cb**2).sum() / nb) - 2 * float(cross)
        return max(mean_term + cov_term, 0.0)
    (_, cov_a), (_, cov_b) = _gaussian(a), _gaussian(b)
    cov_term = float(np.trace(cov_a) + np.trace(cov_b)) - 2 * _trace_sqrt_product(cov_a, cov_b)
    return max(mean_term + cov_term, 0.0)


def _rows(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need [N, D] features with N >= 2, got shape {feats.shape}")
    return feats


def frechet_refusal(name: str, generated: int, real: int, minimum: int) -> str | None:
    """Why a Fréchet distance over these set sizes is not reported; None when it is.

    Below a few dozen clips per set the estimate is dominated by sampling noise and by
    its bias (it shrinks as the sets grow), so a number would mislead.
    """
    if min(generated, real) >= minimum:
        return None
    return f"{name} needs >= {minimum} generated and real videos, got {generated} and {real}"


# --------------------------------------------------------------------------- intervals


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap samples (NaN ones ignored)."""
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (one per video; NaN ignored).

    Returns:
        (low, high); NaN for fewer than 2 finite values.
    """
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    picks = np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))
    return percentile_interval(values[picks].mean(1))  # [resamples, N] -> [resamples]


def bootstrap_frechet(
    generated: np.ndarray, real: np.ndarray, resamples: int, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the Fréchet distance, both sets resampled.

    Resampling repeats rows, which lowers each set's spread: the interval sits a little
    above the point estimate's bias level; it says how much the number moves with the
    videos drawn, which is what a comparison needs.
    """
    rng = np.random.default_rng(seed)
    n, m = len(generated), len(real)
    draws = [
        frechet_distance(generated[rng.integers(0, n, n)], real[rng.integers(0, m, m)])
        for _ in range(resamples)
    ]
    return percentile_interval(np.array(draws))


def paired_difference(
    a: np.ndarray,
    b: np.ndarray,
    resamples: int,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] | None = None,
) -> tuple[float, float, float]:
    """stat(b) - stat(a) and its 95% paired-bootstrap interval.

    Row i of `a` and of `b` come from the same (prompt, seed); each resample draws the
    same rows from both, so the prompt-to-prompt spread that both share cancels.

    Args:
        a, b: [N] values per video (stat: mean over finite pairs) or, with `stat`, [N, ...]
            rows handed to `stat` (e.g. features to a Fréchet distance).
        resamples: bootstrap resamples.
        seed: the resampling seed.
        stat: rows -> number; default the mean.

    Returns:
        (difference, low, high); NaN when fewer than 2 pairs.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if stat is None:
        keep = np.isfinite(a) & np.isfinite(b)
        a, b, stat = a[keep], b[keep], np.mean
    if len(a) != len(b) or len(a) < 2:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), (resamples, len(a)))
    draws = np.array([stat(b[i]) - stat(a[i]) for i in picks])
    return float(stat(b) - stat(a)), *percentile_interval(draws)


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """'better', 'worse' or 'no difference' from the interval of (new - old)."""
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return "no difference"
    return "better" if (low > 0) == higher_is_better else "worse"


# --------------------------------------------------------------------------- extractors


def load_features(spec: str, model: str, device: str = "cpu") -> FeatureExtractor:
    """A feature extractor from a registry name or a `module:callable` path.

    Args:
        spec: `videomae` (built in), or e.g. `mypkg.features:I3DFeatures`, called as
            (model, device) and returning a `FeatureExtractor`.
        model: the extractor's weights (hub id or folder).
        device: torch device.

    Raises:
        ValueError: an unknown name or a path that does not import.
    """
    if spec in FEATURE_EXTRACTORS:
        return FEATURE_EXTRACTORS[spec](model, device)
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        known = ", ".join(FEATURE_EXTRACTORS)
        raise ValueError(
            f"evaluate.feature_extractor {spec!r}: not one of {known} and not an importable "
            f"module:callable ({e})"
        ) from None
    return factory(model, device)


def features_name(spec: str) -> str:
    """The short name a Fréchet distance is reported under: `fd_<name>`.

    `videomae` -> videomae; `mypkg.features:I3DFeatures` -> i3dfeatures.
    """
    tail = spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return re.sub(r"[^a-z0-9]", "", tail.lower()) or "features"


FEATURE_EXTRACTORS: dict[str, Callable[[str, str], FeatureExtractor]] = {
    "videomae": VideoMAEFeatures,
}
