"""`VideoReader`'s timed reads return exactly what a plain decode shows, however it gets there.

The reader seeks, decodes forward, and drains the decoder early (instead of decoding the
frames a B-frame decoder holds back); none of that may change which frame comes back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from corpus import VFR_TICKS, _encode

from cogpipe.video import VideoReader, probe_video, write_mp4

FPS = 10


def _moving(n: int, seed: int = 0) -> np.ndarray:
    """[n, 48, 64, 3]: every frame different (a bar sweeping a textured background)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 200, (1, 48, 64, 3), dtype=np.uint8).repeat(n, axis=0)
    for i in range(n):
        frames[i, :, (i * 3) % 60 : (i * 3) % 60 + 4] = 255
        frames[i, 40:, :] = i * 2  # a strip whose level names the frame
    return frames


@pytest.fixture(scope="module")
def bframes(tmp_path_factory) -> Path:
    """4 s at 10 fps, a keyframe every 12 frames, B-frames with pyramid (decoder delay)."""
    path = tmp_path_factory.mktemp("video") / "bframes.mp4"
    options = {"g": "12", "bf": "3", "b_strategy": "0", "x264-params": "b-pyramid=normal"}
    return write_mp4(path, _moving(40), fps=FPS, crf=10, options=options)


def _all_frames(path: Path) -> tuple[list[float], np.ndarray]:
    with VideoReader(path, size=(32, 24)) as r:
        got = list(r.scan(0.0, 1e9))
    return [t for t, _ in got], np.stack([f for _, f in got])


def _expected(times: list[float], all_t: list[float], all_f: np.ndarray, following: int):
    out = []
    for t in sorted(times):
        i = max(j for j, s in enumerate(all_t) if s <= t + 1e-6)
        out += [all_f[min(i + k, len(all_f) - 1)] for k in range(following + 1)]
    return np.stack(out)


def test_stream_has_b_frames_and_keyframes(bframes):
    import av

    with av.open(str(bframes)) as c:
        kinds = {int(f.pict_type) for f in c.decode(c.streams.video[0])}  # 1 I, 2 P, 3 B
    info, error = probe_video(bframes)
    assert error == "" and info["frames"] == 40
    assert 3 in kinds and len(info["keyframes"]) >= 3


@pytest.mark.parametrize(
    "times",
    [
        [0.0, 1.2, 2.4, 3.6],  # keyframes: seek, drain
        [0.05, 0.35, 0.6, 1.15, 2.0, 3.95],  # between frames and keyframes, the last
        [3.0, 0.1, 0.2, 1.9],  # unsorted, and two times in one GOP (decode forward)
        [0.0, 0.1, 0.2, 0.3],  # consecutive
    ],
)
@pytest.mark.parametrize("following", [0, 1, 2])
def test_timed_reads_match_a_plain_decode(bframes, times, following):
    all_t, all_f = _all_frames(bframes)
    with VideoReader(bframes, size=(32, 24)) as r:
        got_t, got = r.at(times, following=following)
    assert got_t == pytest.approx([max(s for s in all_t if s <= t + 1e-6) for t in sorted(times)])
    np.testing.assert_array_equal(got, _expected(times, all_t, all_f, following))


def test_reads_after_a_drain_continue_correctly(bframes):
    """A drained decoder cannot go on; any read after it starts again from a keyframe."""
    all_t, all_f = _all_frames(bframes)
    with VideoReader(bframes, size=(32, 24)) as r:
        r.at([1.2], following=1)  # the last time: drained
        _, later = r.at([1.45, 1.5])  # same GOP, forward: must not read the drained stub
        scanned = np.stack([f for _, f in r.scan(1.5, 2.5)])
    np.testing.assert_array_equal(later, _expected([1.45, 1.5], all_t, all_f, 0))
    np.testing.assert_array_equal(scanned, all_f[15:25])


def test_draining_saves_the_frames_the_decoder_holds_back(tmp_path, monkeypatch):
    """Noise makes x264 code only P-frames while declaring a B-frame reorder delay, as it
    does on grainy web video: a frame + the next at each keyframe then needs 2 packets
    decoded, not the 2 more the decoder would wait for."""
    noise = np.random.default_rng(0).integers(0, 255, (40, 48, 64, 3), dtype=np.uint8)
    path = write_mp4(tmp_path / "noise.mp4", noise, fps=FPS, crf=23, options={"g": "12"})

    def pairs_at_keyframes() -> tuple[int, np.ndarray]:
        with VideoReader(path, size=(32, 24)) as r:
            keys = r.keyframe_times()
            assert len(keys) == 4 and r.stream.codec_context.has_b_frames
            frames = r.at(keys, following=1)[1]
            return r.decoded, frames

    drained, frames = pairs_at_keyframes()
    monkeypatch.setattr(VideoReader, "_fed_until", lambda self, t, after: False)
    undrained, same = pairs_at_keyframes()
    assert drained == 2 * 4 < undrained
    np.testing.assert_array_equal(frames, same)


def test_variable_frame_rate_reads_match_a_plain_decode(tmp_path):
    """Irregular frame times with B-frames: no frame grid, so no drain; reads still exact."""
    ticks = np.cumsum((0,) + VFR_TICKS * 6)  # in 1/30 s
    frames = list(_moving(len(ticks), seed=1))
    options = {"preset": "veryfast", "g": "15", "bf": "2"}
    path = _encode(
        tmp_path / "vfr.mp4", frames, fps=30, pts=[int(k) for k in ticks], options=options
    )
    assert probe_video(path)[0]["vfr"]
    all_t, all_f = _all_frames(path)
    times = [0.0, 0.4, 1.0, 1.37, 2.5, 2.9, 3.5]
    with VideoReader(path, size=(32, 24)) as r:
        _, got = r.at(times, following=1)
    np.testing.assert_array_equal(got, _expected(times, all_t, all_f, 1))


def test_the_same_frames_make_the_same_file(tmp_path):
    """Resumed-equals-uninterrupted checks compare videos byte for byte. These frames (noise
    summed along each row) made x264 write one of three files on an AVX-512 CPU."""
    rng = np.random.default_rng(1)
    frames = np.cumsum(rng.normal(0, 8, (9, 64, 64, 3)), axis=2) + 128
    frames = np.clip(frames, 0, 255).astype(np.uint8)
    made = {write_mp4(tmp_path / f"{i}.mp4", frames, fps=8).read_bytes() for i in range(40)}
    assert len(made) == 1
