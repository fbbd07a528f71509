"""The captioner loader: every architecture through AutoProcessor / AutoModel, and the
torchvision-free video processor against transformers' own where torchvision imports."""

from __future__ import annotations

import numpy as np
import pytest

from cogpipe import vlm
from cogpipe.samples import write_tiny_captioner

VIDEO_ARCHS = sorted(vlm.VIDEO_MODEL_TYPES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {a: write_tiny_captioner(root / a, a) for a in sorted(vlm.ARCHITECTURES)}


def frames(seed: int = 0, shape=(4, 96, 128, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Smooth frames (a gradient plus blobs) resize like video does; noise would not.
    y, x = np.mgrid[0 : shape[1], 0 : shape[2]]
    base = np.stack([x * 2, y * 2, (x + y)], -1).astype(np.float32)
    out = []
    for f in range(2):
        video = base[None] + rng.normal(0, 8, (shape[0], 1, 1, 3)) + 20 * f
        out.append(np.clip(video, 0, 255).astype(np.uint8))
    return out


def test_every_architecture_loads_and_captions_a_batch(folders):
    for arch, folder in folders.items():
        cap = vlm.load_captioner(str(folder), None, "cpu", "auto")
        assert cap.video == (arch in vlm.VIDEO_MODEL_TYPES)
        text = [vlm.chat_text(cap, 4, "Describe the slap.")] * 2
        media = {"videos": frames()} if cap.video else {"images": [list(f) for f in frames()]}
        inputs = cap.processor(text=text, return_tensors="pt", padding=True, **media)
        out = cap.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 6), arch


def test_a_folder_of_another_model_type_is_refused(folders, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folders["llava"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "clip"}))
    with pytest.raises(ValueError, match="not a supported captioner"):
        vlm.load_captioner(str(other), None, "cpu", "auto")


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_numpy_video_processor_matches_transformers(arch, folders):
    """Where torchvision imports (the GPU host), the stand-in gives the same pixels."""
    pytest.importorskip("torchvision.transforms.v2")
    from transformers import AutoProcessor

    real = AutoProcessor.from_pretrained(folders[arch])
    ours = vlm._processor_from_parts(str(folders[arch]), None, arch)
    assert isinstance(ours.video_processor, vlm.NumpyFrames)
    text = [vlm.chat_text(vlm.Captioner(real, None, "cpu", True, set()), 4, "Go.")] * 2
    a = real(text=text, videos=frames(), return_tensors="pt", padding=True)
    b = ours(text=text, videos=frames(), return_tensors="pt", padding=True)
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    diff = (a["pixel_values_videos"] - b["pixel_values_videos"]).abs()
    print(f"{arch}: mean |diff| {diff.mean():.4f}, max {diff.max():.4f}")
    assert diff.mean() < 0.02 and diff.max() < 0.25  # normalized units (~0.27 per 1/255 * 70)
