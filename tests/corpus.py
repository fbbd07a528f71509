"""Generate a folder of messy video inputs for testing the video-ingest stage.

``write_corpus(root)`` writes every case below under ``root`` (a fresh or empty
folder) with PyAV only, in a few seconds, and returns ``{case: path}``.  Unless
noted, videos are H.264 (libx264, ``preset=ultrafast``, yuv420p) in mp4 at
10 fps.  ultrafast means no B-frames, ``keyint=250`` and ``scenecut=0``: the
only keyframe of every short clip here is its first frame (pts 0).

What a correct ingest + check should conclude about each case:

=====================  ==============================  =========================================
case                   file                            expected conclusion
=====================  ==============================  =========================================
ok                     ok.mp4                          valid: 3 s, 30 frames, 160x96, has motion
zero_byte              zero.mp4                        reject: empty file
truncated              truncated.mp4                   reject: first 40% of a valid mp4; moov
                                                       (header, at the end) is lost, open fails
truncated_faststart    truncated_faststart.mp4         faststart mp4 cut to 50%: header intact,
                                                       opens and claims 3 s / 30 frames, but
                                                       demux gives only ~10 packets (the last
                                                       partial, is_corrupt) and decode raises
                                                       InvalidDataError after ~9 frames; reject
                                                       or flag (decoded << declared frames)
not_video_text         notes.mp4                       reject: text with a video extension
not_video_ext          readme.txt                      reject: not a video by extension
random_bytes           noise.mkv                       reject: 20 KB of random bytes
audio_only             audio.mp4                       reject: no video stream (2 s AAC sine)
single_frame           single_frame.mp4                valid but degenerate: exactly 1 frame
huge                   huge.mp4                        8192x4352, 1 frame: reject or downscale
                                                       by a size limit, must not blow memory
odd_dims               odd_dims.mp4                    valid: 161x97 (H.264 yuv444p), 2 s;
                                                       resizing must cope with odd sizes
vfr                    vfr.mp4                         valid, variable frame rate, 3 s; see
                                                       vfr_square_x below to check CFR resampling
rotated                rotated.mp4                     valid; coded 160x96 with a display
                                                       matrix (frame.rotation == -90): shown
                                                       as 96x160; see ROTATION below
ten_bit                ten_bit.mp4                     valid: H.264 High 10, yuv420p10le, 2 s;
                                                       to_ndarray("rgb24") gives 8-bit RGB
unicode_name           sub dir/fight — día 1 ü.mp4     valid: spaces/unicode in folder and name
symlink_file           link.mp4 -> ok.mp4              same file as ``ok`` (dedupe by realpath
                                                       or content)
dangling_link          gone.mp4 -> missing.mp4         reject: dangling symlink
loop_a, loop_b         loop_a.mp4 <-> loop_b.mp4       reject: symlink loop (ELOOP)
dir_loop               nested/back -> ..               a walk following links must not recurse
                                                       forever (root/nested/back == root)
unreadable             unreadable.mp4 (mode 000)       valid video, but unreadable to non-root
                                                       users (root still reads it)
near_dup_src           near_dup_src.mp4                valid: 320x180, 3 s, crf 18
near_dup               near_dup.mp4                    near duplicate of near_dup_src: its
                                                       decoded frames resized to 160x90, crf 35
exact_copy             exact_copy.mp4                  byte-identical to near_dup_src
black_leader_trailer   black_leader_trailer.mp4        4 s: black 0-1 s, content 1-3 s, black
                                                       3-4 s; trim to content [1.0, 3.0)
frozen                 frozen.mp4                      3 s of one textured still: no motion
multi_shot             multi_shot.mp4                  6 s, three shots, cuts at 2.0 and 4.0 s
=====================  ==============================  =========================================

All content is deterministic (seeded), so repeated runs give the same frames.
"""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np

# vfr: frame durations cycle through these many 1/30 s ticks (1/30 s and 1/10 s, irregular).
VFR_TICKS = (1, 3, 1, 1, 3, 3, 1, 3, 1, 1)
VFR_SPEED = 40  # px per second


def vfr_square_x(t: float) -> int:
    """vfr: left edge (px) of the white 16x16 square (rows 40..55) at time ``t`` seconds.

    Every frame shown at t (its pts in seconds) is drawn with x = round(40 * t), so a
    reader that resamples to constant frame rate can check each output frame:
    estimated t = x / 40 should match the output timestamp (nearest earlier source frame).
    """
    return round(VFR_SPEED * t)


# rotated: the display matrix asks for a 90-degree clockwise turn on display (the
# classic "rotate=90" of phone portrait videos).  Written with
# ``stream.set_display_rotation(-90)`` (PyAV angles are counter-clockwise); read back
# as ``frame.rotation == -90`` (and frame.side_data[DISPLAYMATRIX]).  To display:
# ``np.rot90(img, k=frame.rotation // 90)`` -> 96x160, white marker moves from the
# coded top-left corner to the displayed top-right corner.
ROTATION = -90

W, H, FPS = 160, 96, 10


def _texture(w: int, h: int, seed: int) -> np.ndarray:
    """A fixed, mid-gray, non-flat background (smooth waves + mild noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    f = rng.uniform(0.05, 0.3, size=(3, 2))
    base = np.stack([np.sin(xx * f[c, 0]) + np.cos(yy * f[c, 1]) for c in range(3)], -1)
    img = 110 + 35 * base + rng.normal(0, 8, (h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def _square(img: np.ndarray, x: int, y: int, size: int, color) -> np.ndarray:
    img = img.copy()
    img[y : y + size, x : x + size] = color
    return img


def _moving(w=W, h=H, n=30, seed=0, color=(255, 255, 255), size=24) -> list[np.ndarray]:
    """A bright square sliding left to right over a textured background panning 2 px/frame."""
    bg = _texture(w, h, seed)
    return [
        _square(
            np.roll(bg, 2 * i, axis=1),
            (w - size) * i // max(n - 1, 1),
            (h - size) // 2,
            size,
            color,
        )
        for i in range(n)
    ]


def _encode(
    path,
    frames,
    *,
    fps=FPS,
    codec="libx264",
    pix_fmt="yuv420p",
    options=None,
    container_options=None,
    pts=None,
    rotation=None,
    in_format="rgb24",
) -> Path:
    """Encode ``frames`` (HxWx3 uint8 arrays, or yuv420p planes if in_format='yuv420p').

    ``pts`` (optional) are per-frame timestamps in units of 1/fps s (default 0, 1, 2...).
    ``rotation`` (optional) writes a display matrix (counter-clockwise degrees).
    """
    import av

    opts = {"preset": "ultrafast"} if codec == "libx264" else {}
    opts.update(options or {})
    h, w = frames[0].shape[:2]
    if in_format == "yuv420p":
        h = h * 2 // 3
    with av.open(str(path), "w", options=container_options or {}) as out:
        s = out.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format=in_format)
            f.pts, f.time_base = (pts[i] if pts is not None else i), Fraction(1, fps)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return Path(path)


def _write_audio(path: Path, seconds=2.0, rate=44100, hz=440.0) -> Path:
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=rate, layout="mono")
        t = np.arange(int(seconds * rate)) / rate
        pcm = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[None]
        for start in range(0, pcm.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(
                pcm[:, start : start + 1024], format="fltp", layout="mono"
            )
            f.sample_rate, f.pts = rate, start
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


def _cut(src: Path, dst: Path, fraction: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def _link(target: str, link: Path) -> Path:
    if os.path.lexists(link):
        link.unlink()
    os.symlink(target, link)
    return link


def _shots() -> list[np.ndarray]:
    """multi_shot: three 2 s shots (20 frames each) with different colours, patterns, motion."""
    yy, xx = np.mgrid[0:H, 0:W]
    frames = []
    red = _texture(W, H, 1) // 2 + np.uint8([120, 0, 0])
    for i in range(20):  # shot 1: panning reddish texture, white square moving right
        frames.append(_square(np.roll(red, 2 * i, axis=1), 4 + 6 * i, 40, 16, 255))
    for i in range(20):  # shot 2: blue vertical stripes scrolling, yellow square moving down
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 2] = np.where(((xx + 3 * i) // 8) % 2 == 0, 230, 40)
        frames.append(_square(img, 72, 2 + 4 * i, 16, (255, 230, 0)))
    for i in range(20):  # shot 3: drifting green checkerboard, black square moving up-left
        img = np.zeros((H, W, 3), np.uint8)
        img[..., 1] = np.where((((xx + i) // 12) + ((yy + i) // 12)) % 2 == 0, 200, 90)
        frames.append(_square(img, 140 - 6 * i, 76 - 3 * i, 16, 0))
    return frames


def write_corpus(root: Path) -> dict[str, Path]:
    """Write every case under root; return case name -> path (the path as created, links included)."""
    import av

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    c: dict[str, Path] = {}

    c["ok"] = _encode(root / "ok.mp4", _moving())
    c["zero_byte"] = root / "zero.mp4"
    c["zero_byte"].write_bytes(b"")

    full = _encode(root / "_full.tmp.mp4", _moving(seed=2))
    c["truncated"] = _cut(full, root / "truncated.mp4", 0.4)
    _encode(full, _moving(seed=2), container_options={"movflags": "+faststart"})
    c["truncated_faststart"] = _cut(full, root / "truncated_faststart.mp4", 0.5)
    full.unlink()

    c["not_video_text"] = root / "notes.mp4"
    c["not_video_text"].write_text("meeting notes\nthis is not a video\n")
    c["not_video_ext"] = root / "readme.txt"
    c["not_video_ext"].write_text("just a readme\n")
    c["random_bytes"] = root / "noise.mkv"
    c["random_bytes"].write_bytes(np.random.default_rng(7).bytes(20 * 1024))
    c["audio_only"] = _write_audio(root / "audio.mp4")
    c["single_frame"] = _encode(root / "single_frame.mp4", _moving(n=1))

    hw, hh = 8192, 4352  # level 6.2's max frame size (139264 macroblocks); > 7680x4320
    yuv = np.full((hh * 3 // 2, hw), 90, np.uint8)
    yuv[hh:] = 160  # chroma: bluish
    c["huge"] = _encode(root / "huge.mp4", [yuv], in_format="yuv420p")

    c["odd_dims"] = _encode(
        root / "odd_dims.mp4", _moving(161, 97, n=20, seed=3), pix_fmt="yuv444p"
    )

    t = np.cumsum((0,) + VFR_TICKS * 10)
    t = t[t < 90]  # ticks of 1/30 s, under 3 s
    bg = _texture(W, H, 4)
    vfr = [_square(bg, vfr_square_x(k / 30), 40, 16, 255) for k in t]
    c["vfr"] = _encode(root / "vfr.mp4", vfr, fps=30, pts=[int(k) for k in t])

    rot = _moving(n=20, seed=5, color=(255, 0, 0))
    for f in rot:
        f[:16, :32] = 255  # white marker in the coded top-left corner
    c["rotated"] = _encode(root / "rotated.mp4", rot, rotation=ROTATION)

    c["ten_bit"] = _encode(root / "ten_bit.mp4", _moving(n=20, seed=6), pix_fmt="yuv420p10le")

    (root / "sub dir").mkdir(exist_ok=True)
    c["unicode_name"] = _encode(root / "sub dir" / "fight — día 1 ü.mp4", _moving(n=20, seed=8))

    c["symlink_file"] = _link("ok.mp4", root / "link.mp4")
    c["dangling_link"] = _link("missing.mp4", root / "gone.mp4")
    c["loop_a"] = _link("loop_b.mp4", root / "loop_a.mp4")
    c["loop_b"] = _link("loop_a.mp4", root / "loop_b.mp4")
    (root / "nested").mkdir(exist_ok=True)
    c["dir_loop"] = _link("..", root / "nested" / "back")

    c["unreadable"] = root / "unreadable.mp4"
    if c["unreadable"].exists():
        c["unreadable"].chmod(0o600)
    _encode(c["unreadable"], _moving(n=20, seed=9))
    c["unreadable"].chmod(0o000)

    src = []
    bg = _texture(320, 180, 10)
    for i in range(30):
        f = _square(bg, 10 + 9 * i, 20, 40, (255, 40, 40))
        src.append(_square(f, 260 - 7 * i, 110, 30, (40, 40, 255)))
    c["near_dup_src"] = _encode(root / "near_dup_src.mp4", src, options={"crf": "18"})
    with av.open(str(c["near_dup_src"])) as inp:
        small = [f.to_ndarray(format="rgb24", width=160, height=90) for f in inp.decode(video=0)]
    c["near_dup"] = _encode(root / "near_dup.mp4", small, options={"crf": "35"})
    c["exact_copy"] = Path(shutil.copyfile(c["near_dup_src"], root / "exact_copy.mp4"))

    black = [np.zeros((H, W, 3), np.uint8)] * 10
    c["black_leader_trailer"] = _encode(
        root / "black_leader_trailer.mp4", black + _moving(n=20, seed=11) + black
    )
    c["frozen"] = _encode(root / "frozen.mp4", [_texture(W, H, 12)] * 30)
    c["multi_shot"] = _encode(root / "multi_shot.mp4", _shots())
    return c


# Training windows (tests/test_windows.py): lengths around the default window, 49 frames at
# 8 fps = 6.0 s, and long ones that split into several windows.
WINDOW_SECONDS = (2.0, 4.0, 5.9, 6.1, 13.0, 40.0)


def window_name(seconds: float) -> str:
    """'s5_9' for 5.9 s."""
    return "s" + f"{seconds:g}".replace(".", "_")


def write_window_corpus(root: Path) -> dict[str, Path]:
    """Clips of every `WINDOW_SECONDS` length (160x96) and a portrait one (8 s, 96x160), at
    10 fps; each its own texture panning 2 px per frame under a sliding square, so none is
    frozen or a near duplicate of another, nor one span of a long clip of the next (the pan
    wraps every 8 s). Returns {window_name(seconds) or 'portrait': path}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, seconds in enumerate(WINDOW_SECONDS):
        name = window_name(seconds)
        out[name] = _encode(root / f"{name}.mp4", _moving(n=round(seconds * FPS), seed=20 + i))
    out["portrait"] = _encode(root / "portrait.mp4", _moving(96, 160, n=8 * FPS, seed=30))
    return out
