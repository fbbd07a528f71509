"""Video primitives shared by every stage: probe, frame sampling, decode, resize, write.

Decoding goes through decord (random access by frame index); writing goes through PyAV
(H.264, yuv420p). Frames are `uint8` arrays `[F, H, W, 3]` in RGB.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np


def _reader(path: str | Path, width: int = -1, height: int = -1):
    import decord

    return decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)


def probe_video(path: str | Path) -> tuple[dict, str]:
    """Width, height, fps, frame count and duration of a video, or an error.

    Returns:
        (info, "") on success, ({}, reason) when the file cannot be decoded.
    """
    try:
        vr = _reader(path)
        frames = len(vr)
        fps = float(vr.get_avg_fps())
        if frames < 1:
            return {}, "no decodable frames"
        height, width = vr[0].shape[:2]
    except Exception as e:  # decord raises its own DECORDError, or RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {}, f"cannot decode video: {first[:200]}"
    if not math.isfinite(fps) or fps <= 0:
        return {}, f"invalid frame rate {fps}"
    info = {
        "width": int(width),
        "height": int(height),
        "fps": fps,
        "frames": int(frames),
        "duration": frames / fps,
    }
    return info, ""


def even_indices(start: int, end: int, count: int) -> list[int]:
    """`count` frame indices spread evenly over [start, end), centre of each segment."""
    n = max(end - start, 1)
    return [start + min(int((i + 0.5) * n / count), n - 1) for i in range(count)]


def window_indices(
    src_fps: float, start: float, end: float, target_fps: float, count: int
) -> list[int] | None:
    """Contiguous window of `count` frames resampled to `target_fps`, from `start` seconds.

    Keeps real motion speed: frame k is the source frame shown at start + k / target_fps.
    Returns None when the clip [start, end) is too short for the window.
    """
    span = (count - 1) / target_fps
    if start + span > end + 1e-6:
        return None
    last = max(int(math.floor(end * src_fps + 1e-6)) - 1, 0)
    return [
        min(int(math.floor((start + k / target_fps) * src_fps + 1e-6)), last) for k in range(count)
    ]


def read_frames(
    path: str | Path, indices: list[int], width: int = -1, height: int = -1
) -> np.ndarray:
    """Decode the given frames, optionally resized by the decoder. Returns [N, H, W, 3] uint8."""
    vr = _reader(path, width=width, height=height)
    return vr.get_batch(list(indices)).asnumpy()


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving resize so the bucket is covered, then centre crop. [F,H,W,3] uint8."""
    import torch
    import torch.nn.functional as F

    f, h, w, _ = frames.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - height) // 2, (nw - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def write_mp4(
    path: str | Path, frames: np.ndarray, fps: float, crf: int = 18, bitrate: int | None = None
) -> Path:
    """Encode [F, H, W, 3] uint8 RGB frames as an H.264 yuv420p mp4 (MPEG-4 Part 2 where
    the FFmpeg build has no libx264). Odd sizes are padded by one edge pixel.

    Args:
        path: output file, overwritten; its folder is created.
        frames: [F, H, W, 3] uint8 RGB.
        fps: frame rate.
        crf: constant quality (libx264), used when `bitrate` is None.
        bitrate: target bits per second instead of constant quality.

    Returns:
        `path`.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        if bitrate is not None:
            stream.bit_rate = bitrate
        elif codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    return path


def luma(frames: np.ndarray) -> np.ndarray:
    """Per-pixel luma (BT.601) of [F, H, W, 3] uint8 frames, as float32 [F, H, W]."""
    return frames[..., 0] * 0.299 + frames[..., 1] * 0.587 + frames[..., 2] * 0.114
