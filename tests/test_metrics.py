"""Video metrics with known answers: CLIP score on long prompts, temporal consistency,
dynamic degree and the Fréchet distance (closed forms, and through a tiny VideoMAE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cogpipe import evaluate, metrics
from cogpipe.samples import write_tiny_videomae

PROMPT = "A fighter slaps his opponent and the crowd cheers."  # 10 tokens without BOS/EOS
LONG = " ".join([PROMPT] * 8)  # 80 tokens: past the tiny CLIP's 77 positions on its own


@pytest.fixture(scope="module")
def clip(tiny_models) -> evaluate.Clip:
    return evaluate.load_clip(str(tiny_models["clip"]), "cpu")


@pytest.fixture(scope="module")
def videomae(tmp_path_factory) -> Path:
    return write_tiny_videomae(tmp_path_factory.mktemp("models") / "videomae")


def noise(frames: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, 48, 40, 3), dtype=np.uint8)


def moving_square(frames: int, speed: int, seed: int = 0, grey: bool = False) -> np.ndarray:
    """A 24-px red square gliding right by `speed` pixels per frame over a gradient (or flat
    grey): [F, 64, 96, 3] uint8."""
    ys, xs = np.mgrid[0:64, 0:96]
    background = np.stack([xs * 2, ys * 3, np.full_like(xs, 90 + seed * 40)], -1).clip(0, 255)
    if grey:
        background[:] = 128
    video = np.repeat(background[None].astype(np.uint8), frames, 0)
    for t in range(frames):
        x = 4 + speed * t
        video[t, 20:44, x : x + 24] = (250, 40, 40)
    return video


def truncating_clip_score(clip: evaluate.Clip, frames: np.ndarray, text: str) -> float:
    """The CLIP score evaluate used before chunking: text cut at the tower's 77 tokens."""
    tok = clip.tokenizer
    max_len = min(tok.model_max_length, clip.model.config.text_config.max_position_embeddings)
    tokens = tok([text], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    pixels = clip.processor(images=list(frames), return_tensors="pt").pixel_values
    with torch.inference_mode():
        out = clip.model(**tokens, pixel_values=pixels)
    cos = (out.image_embeds @ out.text_embeds.T)[:, 0]
    return float((100 * cos).clamp(min=0).mean())


# --------------------------------------------------------------------------- CLIP score


def test_text_chunks_fit_the_text_tower(clip):
    tok = clip.tokenizer
    assert metrics.text_chunks(tok, PROMPT, 77) == [tok(PROMPT)["input_ids"]]
    assert metrics.text_chunks(tok, "", 77) == [[tok.bos_token_id, tok.eos_token_id]]
    long = LONG + " " + LONG  # 160 tokens: 75 + 75 + 10
    chunks = metrics.text_chunks(tok, long, 77)
    assert [len(c) for c in chunks] == [77, 77, 12]
    assert all(c[0] == tok.bos_token_id and c[-1] == tok.eos_token_id for c in chunks)
    inner = [i for c in chunks for i in c[1:-1]]
    assert inner == tok(long, add_special_tokens=False)["input_ids"]  # nothing lost or repeated


@pytest.mark.parametrize(
    "text", [PROMPT, "", "cheers", " ".join(["crowd"] * 75)], ids=["prompt", "empty", "one", "75"]
)
def test_short_prompts_score_exactly_as_before(clip, text):
    frames = noise()
    assert len(metrics.text_chunks(clip.tokenizer, text, 77)) == 1
    assert metrics.clip_score(clip, frames, text) == truncating_clip_score(clip, frames, text)
    assert evaluate.clip_score is metrics.clip_score  # what the evaluate stage records


def test_long_prompt_tail_changes_the_score(clip):
    frames = noise()
    a = LONG + " The referee waves off the round."
    b = LONG + " Spectators stand up, cheer and point at the stage."
    # Cut at 77 tokens both read as LONG: the old score cannot tell them apart.
    assert truncating_clip_score(clip, frames, a) == truncating_clip_score(clip, frames, b)
    score_a, score_b = metrics.clip_score(clip, frames, a), metrics.clip_score(clip, frames, b)
    assert abs(score_a - score_b) > 0.5
    assert 0.0 <= score_a <= 100.0 and 0.0 <= score_b <= 100.0
    # The long prompt's embedding is the renormalised mean of its chunks' unit embeddings.
    _, text = metrics.clip_embeddings(clip, frames, a)
    assert float(text.norm()) == pytest.approx(1.0, abs=1e-6)
    head_text = " ".join([PROMPT] * 7) + " A fighter slaps his opponent"  # 75 tokens
    tail_text = "and the crowd cheers. The referee waves off the round."  # the other 12
    _, head = metrics.clip_embeddings(clip, frames, head_text)
    _, tail = metrics.clip_embeddings(clip, frames, tail_text)
    mean = (head + tail) / 2
    torch.testing.assert_close(text, mean / mean.norm(), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- temporal consistency


def test_temporal_consistency_of_a_static_clip_is_one(clip):
    still = np.repeat(noise(1), 6, axis=0)
    assert metrics.temporal_consistency(clip, still) == pytest.approx(1.0, abs=1e-5)


def test_shuffled_frames_lower_temporal_consistency(clip):
    video = moving_square(12, speed=4)
    smooth = metrics.temporal_consistency(clip, video)
    order = np.random.default_rng(0).permutation(12)
    assert -1.0 <= metrics.temporal_consistency(clip, video[order]) < smooth <= 1.0
    # Unrelated frames are less alike still.
    assert metrics.temporal_consistency(clip, noise(12)) < smooth


def test_one_frame_has_no_temporal_metrics(clip):
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.temporal_consistency(clip, noise(1))
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.dynamic_degree(noise(1))


# --------------------------------------------------------------------------- dynamic degree


def test_dynamic_degree_follows_motion():
    assert metrics.dynamic_degree(np.repeat(noise(1), 5, axis=0)) == 0.0
    slow, fast = (metrics.dynamic_degree(moving_square(10, speed)) for speed in (1, 4))
    assert 0.0 < slow < fast < 1.0
    # On flat grey each step changes two 24 x speed strips (leading and trailing edge) by
    # the luma contrast; area resizing keeps their sum, so the answer is known.
    contrast = abs(float(np.array([250, 40, 40]) @ metrics.LUMA) - 128.0)  # luma levels
    for speed in (1, 2, 5):
        expected = 2 * 24 * speed * contrast / (64 * 96) / 255
        got = metrics.dynamic_degree(moving_square(10, speed, grey=True))
        assert got == pytest.approx(expected, rel=1e-4)
    flashing = np.zeros((4, 30, 50, 3), np.uint8)
    flashing[1::2] = 255  # black, white, black, white: the maximum
    assert metrics.dynamic_degree(flashing) == pytest.approx(1.0)


def test_dynamic_degree_does_not_depend_on_resolution():
    from PIL import Image

    video = moving_square(10, speed=4)
    big = np.stack(
        [np.asarray(Image.fromarray(f).resize((192, 128), Image.NEAREST)) for f in video]
    )
    assert metrics.dynamic_degree(big) == pytest.approx(metrics.dynamic_degree(video), rel=1e-4)


def test_video_metrics_reuse_one_pass(clip):
    video = moving_square(8, speed=3)
    got = metrics.video_metrics(clip, video, LONG)
    assert list(got) == ["clip_score", "temporal_consistency", "dynamic_degree"]
    assert got["clip_score"] == metrics.clip_score(clip, video, LONG)
    assert got["temporal_consistency"] == pytest.approx(
        metrics.temporal_consistency(clip, video), abs=1e-6
    )
    assert got["dynamic_degree"] == metrics.dynamic_degree(video)


# --------------------------------------------------------------------------- Fréchet distance


def gaussian_features(mean: np.ndarray, cov: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n rows whose sample mean and covariance (ddof 1) are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ (v / np.sqrt(w)) @ v.T  # whitened: sample covariance exactly I
    w, v = np.linalg.eigh(cov)
    return mean + z @ (v * np.sqrt(w)) @ v.T


def test_frechet_distance_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(50, 8)) * 3 + 1
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(feats, feats[::-1]) == pytest.approx(0.0, abs=1e-6)  # a set


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = gaussian_features(mu_a, np.diag(var_a), 40, seed=1)
    b = gaussian_features(mu_b, np.diag(var_b), 60, seed=2)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)  # 5 + 4.5 = 9.5
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_scaled_covariance_is_closed_form():
    # S_b = c^2 S_a: (S_a S_b)^1/2 = c S_a, so d = ||mu_a - mu_b||^2 + (1 - c)^2 tr(S_a).
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 5))
    cov = m @ m.T + np.eye(5)  # full, not diagonal
    a = gaussian_features(np.zeros(5), cov, 30, seed=4)
    b = gaussian_features(np.ones(5), 9 * cov, 30, seed=5)
    assert metrics.frechet_distance(a, b) == pytest.approx(5 + 4 * np.trace(cov), rel=1e-9)


def test_shifting_features_adds_the_squared_shift():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) * 2
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    d = metrics.frechet_distance(a, b)
    assert metrics.frechet_distance(a, b + shift) - d == pytest.approx(
        (shift**2).sum() + 2 * shift @ (b.mean(0) - a.mean(0)), rel=1e-9
    )
    assert metrics.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(3, 64)), rng.normal(size=(4, 64)) + 0.5  # covariances of rank 2, 3
    d = metrics.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, a + 1.0) == pytest.approx(64.0, rel=1e-9)


def test_frechet_distance_rejects_unusable_sets():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))


# --------------------------------------------------------------------------- VideoMAE features


def test_videomae_features_and_distance(videomae):
    extractor: metrics.FeatureExtractor = metrics.VideoMAEFeatures(str(videomae), batch_size=2)
    assert extractor.num_frames == 4
    # Different sizes and lengths, one shorter than the model's 4 frames (frames repeat).
    clips = [moving_square(12, 2), noise(3), moving_square(9, 4, seed=1)]
    feats = extractor(clips)
    assert feats.shape == (3, 32) and feats.dtype == np.float64 and np.isfinite(feats).all()
    np.testing.assert_array_equal(extractor(clips), feats)  # deterministic
    np.testing.assert_allclose(extractor(clips[1:2])[0], feats[1], atol=1e-5)  # batch-independent

    others = extractor([noise(8, seed=1), moving_square(8, 6, seed=2), noise(6, seed=3)])
    assert metrics.frechet_distance(feats, extractor(clips)) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(feats, others) > 0.01  # 3 clips vs 32 dims: singular, finite


# --------------------------------------------------------------------------- intervals


def test_bootstrap_mean_interval_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(8).normal(10.0, 2.0, size=40)
    low, high = metrics.bootstrap_mean(values, 1000, seed=0)
    assert low < values.mean() < high and high - low == pytest.approx(4 * 2 / np.sqrt(40), rel=0.3)
    assert metrics.bootstrap_mean(values, 1000, seed=0) == (low, high)
    assert all(np.isnan(metrics.bootstrap_mean(values[:1], 1000)))  # one video: no interval


def test_paired_difference_decides_only_beyond_zero():
    a = np.random.default_rng(9).normal(25.0, 5.0, size=12)  # per-prompt spread, shared
    assert metrics.paired_difference(a, a, 500) == (0.0, 0.0, 0.0)
    assert metrics.verdict(0.0, 0.0, True) == "no difference"  # identical: no winner
    diff, low, high = metrics.paired_difference(a, a + 0.5, 500)
    assert (diff, low, high) == pytest.approx((0.5, 0.5, 0.5))  # the prompts' spread cancels
    assert (
        metrics.verdict(low, high, True) == "better"
        and metrics.verdict(low, high, False) == "worse"
    )


def test_frechet_refusal_names_the_numbers():
    assert metrics.frechet_refusal("fd_videomae", 40, 32, 32) is None
    assert metrics.frechet_refusal("fd_videomae", 2, 7, 32) == (
        "fd_videomae needs >= 32 generated and real videos, got 2 and 7"
    )


def test_bootstrap_frechet_resamples_both_sets():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(25, 8)) + 1.0
    low, high = metrics.bootstrap_frechet(a, b, 300, seed=0)
    assert low < metrics.frechet_distance(a, b) * 1.5 and low < high
    assert metrics.bootstrap_frechet(a, b, 300, seed=0) == (low, high)


def test_feature_extractors_by_name_or_path(videomae):
    assert isinstance(metrics.load_features("videomae", str(videomae)), metrics.VideoMAEFeatures)
    path = "cogpipe.metrics:VideoMAEFeatures"
    assert metrics.load_features(path, str(videomae)).num_frames == 4
    assert metrics.features_name("videomae") == "videomae"
    assert metrics.features_name("mypkg.features:I3D_Features") == "i3dfeatures"
    with pytest.raises(ValueError, match="not one of videomae"):
        metrics.load_features("nosuchmodule:Thing", str(videomae))
