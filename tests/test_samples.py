"""The sample videos and tiny models load through the same code paths as real inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipe_call
from PIL import Image

from cogpipe.samples import write_sample_videos, write_tiny_models
from cogpipe.video import VideoError, VideoReader, probe_video, read_frames

GOOD = [f"shapes_{i:02d}.mp4" for i in range(6)]
ALL_FILES = [
    *GOOD,
    "black.mp4",
    "frozen.mp4",
    "shapes_00_reencoded.mp4",
    "corrupt.mp4",
    "notes.txt",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("samples")
    return root, write_sample_videos(root / "videos"), write_tiny_models(root / "models")


def _frames(path: Path, indices: list[int], fps: float = 8.0) -> np.ndarray:
    """[len(indices), H, W, 3] uint8."""
    return read_frames(path, [i / fps for i in indices])


def test_every_video_file_is_written(built):
    _, videos, _ = built
    assert sorted(videos) == sorted(ALL_FILES)
    for name in ALL_FILES:
        assert videos[name].is_file() and videos[name].stat().st_size > 0, name


@pytest.mark.parametrize("name", GOOD)
def test_good_clips_decode(built, name):
    _, videos, _ = built
    info, error = probe_video(videos[name])
    assert error == "" and info["frames"] == 24
    assert info["fps"] == pytest.approx(8.0)
    with VideoReader(videos[name]) as reader:
        frames = np.stack([f for _, f in reader.scan(0.0, 3.0)])
    assert frames.shape == (24, 96, 128, 3)
    assert frames.mean() > 40  # not dark
    assert np.abs(np.diff(frames.astype(np.float32), axis=0)).mean() > 0.5  # moving


def test_reject_clips_look_as_named(built):
    _, videos, _ = built
    assert _frames(videos["black.mp4"], list(range(24))).mean() < 1
    frozen = _frames(videos["frozen.mp4"], list(range(24))).astype(np.float32)
    assert frozen.mean() > 40 and np.abs(np.diff(frozen, axis=0)).mean() < 0.5
    original = _frames(videos["shapes_00.mp4"], [0, 12, 23]).astype(np.float32)
    copy = _frames(videos["shapes_00_reencoded.mp4"], [0, 12, 23])
    assert copy.shape == (3, 120, 160, 3)
    small = np.stack([np.asarray(Image.fromarray(f).resize((128, 96))) for f in copy])
    assert np.abs(small.astype(np.float32) - original).mean() < 8  # same picture


@pytest.mark.parametrize("name", ["corrupt.mp4", "notes.txt"])
def test_unreadable_files_fail_to_read(built, name):
    _, videos, _ = built
    # FFmpeg's "tty" demuxer claims *.txt (text rendered as frames), so notes.txt is
    # refused by ingest's extension and signature checks before any decoder sees it;
    # corrupt.mp4 fails to open (no moov box).
    if name == "corrupt.mp4":
        with pytest.raises(VideoError):
            VideoReader(videos[name])
    else:
        assert (
            "not a video"
            in __import__("cogpipe.ingest").ingest.probe_file(str(videos[name]), [".mp4"])["reason"]
        )


def test_cogvideox_loads_and_generates(built):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import AutoTokenizer, T5EncoderModel

    _, _, models = built
    folder = models["cogvideox"]
    assert CogVideoXTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    assert AutoencoderKLCogVideoX.from_pretrained(folder, subfolder="vae")
    assert T5EncoderModel.from_pretrained(folder, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert tokenizer.unk_token_id not in tokenizer("a fighter slaps").input_ids
    scheduler = CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"

    pipe = CogVideoXPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    call = tiny_pipe_call(prompt="a fighter slaps", guidance_scale=6, output_type="np")
    frames = pipe(**call, generator=g).frames
    assert frames.shape == (1, 9, 64, 64, 3)
    assert np.isfinite(frames).all()


def test_llava_batched_generation(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, videos, models = built
    processor = AutoProcessor.from_pretrained(models["llava"])
    model = AutoModelForImageTextToText.from_pretrained(models["llava"])
    processor.tokenizer.padding_side = "left"
    prompts = ["Describe the fighter, the slap and the crowd.", "What moves in the video?"]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * 4 + [{"type": "text", "text": p}]}],
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    assert texts[0].count("<image>") == 4 and texts[0].endswith("ASSISTANT:")
    images = [
        Image.fromarray(f)
        for name in ("shapes_00.mp4", "shapes_01.mp4")
        for f in _frames(videos[name], [0, 8, 16, 23])
    ]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    captions = processor.batch_decode(
        output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert len(captions) == 2
    for caption in captions:
        words = caption.split()
        assert len(words) >= 10, caption
        assert len(set(words)) >= 10, caption  # varied, not one token repeated
    assert captions[0] != captions[1]


def test_clip_loads(built):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    _, videos, models = built
    model = CLIPModel.from_pretrained(models["clip"])
    tokenizer = AutoTokenizer.from_pretrained(models["clip"])
    image_processor = AutoImageProcessor.from_pretrained(models["clip"])
    text = tokenizer(["a red circle", "a fighter slaps"], padding=True, return_tensors="pt")
    pixels = image_processor(
        [Image.fromarray(f) for f in _frames(videos["shapes_00.mp4"], [0, 12])],
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**text, **pixels)
    assert out.logits_per_image.shape == (2, 2)


def test_second_call_rewrites_nothing(built):
    root, videos, models = built
    files = sorted(p for p in root.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    assert write_sample_videos(root / "videos") == videos
    assert write_tiny_models(root / "models") == models
    after = {p: p.stat().st_mtime_ns for p in sorted(p for p in root.rglob("*") if p.is_file())}
    assert after == before
