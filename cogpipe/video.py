"""Video primitives shared by every stage: probe, timed reads, keyframes, resize, write.

Everything goes through PyAV (FFmpeg). Reads are by time in seconds from the first
frame, never by frame index, so every source is normalised the same way on read:
the frame shown at time t (constant frame rate from variable-rate sources), the
display rotation applied, 8-bit RGB whatever the bit depth. Frames are `uint8` arrays
`[F, H, W, 3]`.

Sampling is keyframe-aware: `VideoReader.keyframes` decodes keyframes only
(`skip_frame="NONKEY"`, tens of times cheaper than a full decode), and `VideoReader.at`
seeks to the keyframe before each time and decodes forward only as far as it must.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from cogpipe.errors import first_line


class VideoError(RuntimeError):
    """A file that cannot be used as video; the message is the manifest's reason."""


def _rotation_steps(degrees: float) -> int:
    """Quarter turns counter-clockwise (np.rot90's k) that display a frame upright."""
    return int(round(degrees / 90.0)) % 4


class VideoReader:
    """Timed, normalised access to one video stream.

    Args:
        path: the file.
        size: (width, height) of returned frames after rotation, or None for full size.
        threads: decoder threads (1 in worker processes: parallelism comes from files).
        keyframes: keyframe times if known (from the probe); else read from the packets.
    """

    def __init__(
        self,
        path: str | Path,
        size: tuple[int, int] | None = None,
        threads: int = 1,
        keyframes: Sequence[float] | None = None,
    ):
        import av
        from av.video.reformatter import VideoReformatter

        self.path = str(path)
        try:
            self.container = av.open(self.path, metadata_errors="ignore")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise VideoError(f"cannot open as video: {first_line(e, strerror=True)}") from e
        if not self.container.streams.video:
            kinds = sorted({s.type for s in self.container.streams})
            self.container.close()
            has = f" (only {', '.join(kinds)})" if kinds else ""
            raise VideoError(f"no video stream{has}")
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.thread_count = threads
        self.time_base = float(self.stream.time_base)
        self.t0 = (self.stream.start_time or 0) * self.time_base
        self.size = size
        self.rotation = 0  # quarter turns, known after the first decoded frame
        self._packets = None  # the demuxer from the last seek on; None before any seek
        self._queue: deque = deque()  # frames the decoder has handed over, not yet read
        self._fed: set[int] = set()  # frame numbers (from the seek) of packets decoded
        self._first_pts, self._step = None, 0  # the first packet's pts and duration
        self._drained = self._eof = False
        self._horizon: tuple[float, int] | None = None  # (t, n): drain once `_fed_until`
        self._last = None  # (time, frame): the decoder's position
        self._peeked = None  # (time, frame) decoded past the position
        self._keys = list(keyframes) if keyframes is not None else None
        self.decoded = 0  # packets decoded so far (what sampling costs)
        # One reformatter for every frame: it keeps its swscale context, whose setup
        # (filter coefficients) costs ~10x the scaling itself at 720p -> 64x64.
        self._reformatter = VideoReformatter()

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- decoding ----------------------------------------------------------------------
    def _time(self, frame) -> float:
        pts = frame.pts if frame.pts is not None else 0
        return pts * self.time_base - self.t0

    def array(self, frame) -> np.ndarray:
        """A decoded frame (from `scan(convert=False)`) as this reader's normalised RGB."""
        return self._array(frame)

    def _array(self, frame) -> np.ndarray:
        self.rotation = _rotation_steps(frame.rotation or 0)
        kwargs = {}
        if self.size is not None:
            w, h = self.size
            if self.rotation % 2:
                w, h = h, w
            kwargs = {"width": w, "height": h, "interpolation": "AREA"}  # anti-aliased
        rgb = self._reformatter.reformat(frame, format="rgb24", **kwargs).to_ndarray()  # 8-bit
        return np.ascontiguousarray(np.rot90(rgb, self.rotation)) if self.rotation else rgb

    def _seek(self, t: float) -> None:
        """Position the decoder at the keyframe at or before `t` (seeking flushes it)."""
        target = int((t + self.t0) / self.time_base)
        self.container.seek(max(target, 0), stream=self.stream, backward=True, any_frame=False)
        self._packets = self.container.demux(self.stream)
        self._queue.clear()
        self._fed.clear()
        self._first_pts = None
        self._drained = False  # the decoder was drained before the file's end
        self._eof = False
        self._last, self._peeked = None, None

    def _feed(self) -> None:
        """Decode the next packet into the queue (at the end of the file, drain)."""
        packet = next(self._packets, None)
        if packet is None or packet.size == 0:  # end of file: flush the decoder
            self._queue.extend(self.stream.codec_context.decode(None))
            self._eof = True
            return
        if packet.pts is not None:
            if self._first_pts is None:
                self._first_pts, self._step = packet.pts, packet.duration or 0
            if self._step:
                self._fed.add(round((packet.pts - self._first_pts) / self._step))
        self.decoded += 1
        self._queue.extend(self.stream.codec_context.decode(packet))

    def _fed_until(self, t: float, after: int) -> bool:
        """Whether the packets of the frame shown at `t`, the `after` frames following it
        and every frame before them (from the seek) have been decoded.

        Decoders hold frames back (B-frame reordering delay) until later packets arrive;
        when all frames needed are in, draining hands them over without decoding those
        later packets. Known only for frame times on the first packet's grid (constant
        frame rate); otherwise False and decoding goes on as usual.
        """
        if self._first_pts is None or not self._step:
            return False
        shown = ((t + self.t0) / self.time_base - self._first_pts) / self._step
        last = math.floor(shown + 1e-3) + after
        return last < 4096 and all(i in self._fed for i in range(last + 1))

    def _next(self) -> tuple[float, object] | None:
        """The next decoded (time, frame), or None at the end."""
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        if self._packets is None:  # never positioned
            self._seek(0.0)
        while not self._queue:
            if self._drained:
                return self._resume()
            if self._eof:
                return None
            if self._horizon is not None and self._fed_until(*self._horizon):
                self._queue.extend(self.stream.codec_context.decode(None))
                self._drained = True
            else:
                self._feed()
        frame = self._queue.popleft()
        return self._time(frame), frame

    def _resume(self) -> tuple[float, object] | None:
        """After an early drain the decoder cannot go on: decode again from the keyframe
        and return the frame after the position."""
        last, self._horizon = self._last, None
        self._seek(last[0] if last else 0.0)
        while (item := self._next()) is not None and last and item[0] <= last[0] + 1e-6:
            pass
        self._last = last
        return item

    def keyframe_times(self) -> list[float]:
        """Keyframe times from the packet headers (demuxing only; cached)."""
        if self._keys is None:
            pos = self._last
            self._keys = [
                p.pts * self.time_base - self.t0
                for p in self.container.demux(self.stream)
                if p.is_keyframe and p.pts is not None
            ]
            self._packets, self._last, self._peeked = None, None, None
            if pos is not None:
                self._seek(pos[0])
        return self._keys

    def _keyframe_between(self, a: float, b: float) -> bool:
        """Whether seeking from a decoder at `a` to `b` lands past `a` (saves decoding)."""
        return any(a + 1e-6 < k <= b + 1e-6 for k in self.keyframe_times())

    def _goto(self, t: float) -> None:
        """Make the frame shown at `t` the decoder's position (seeking only if it pays)."""
        last = self._last
        if last is None or t < last[0] - 1e-6 or self._keyframe_between(last[0], t):
            self._seek(t)
            self._last = self._next()
            if self._last is None:
                raise VideoError(f"no frame decodes at {t:.2f}s")
        while (nxt := self._next()) is not None:
            if nxt[0] > t + 1e-6:
                self._peeked = nxt
                return
            self._last = nxt

    def at(self, times: Sequence[float], following: int = 0) -> tuple[list[float], np.ndarray]:
        """The frames shown at `times` (seconds), each followed by `following` next frames.

        Seeks only when a time is behind the decoder or a keyframe lies between them;
        otherwise decodes forward. Before a seek (and after the last time) the decoder is
        drained as soon as the frames needed are in, instead of decoding the packets its
        reorder delay waits for (2 per seek in x264 streams coded without B-frames).
        Returns (the shown frames' times, [N * (1 + following), H, W, 3]); past the end
        the last frame repeats.

        Raises:
            VideoError: nothing decodes at or before a requested time.
        """
        import av

        out_t, out = [], []
        times = sorted(times)
        t = 0.0
        try:
            for i, t in enumerate(times):
                seeks_next = i + 1 == len(times) or self._keyframe_between(t, times[i + 1])
                self._horizon = (t, max(following, 1)) if seeks_next else None
                self._goto(t)
                out_t.append(self._last[0])
                out.append(self._array(self._last[1]))
                for _ in range(following):
                    self._last = self._next() or self._last
                    out.append(self._array(self._last[1]))
        except av.FFmpegError as e:
            raise VideoError(f"decode failed near {t:.2f}s: {first_line(e, strerror=True)}") from e
        finally:
            self._horizon = None
        return out_t, np.stack(out) if out else np.zeros((0, 1, 1, 3), np.uint8)

    def keyframes(self) -> tuple[list[float], np.ndarray]:
        """Every keyframe, decoding nothing else. Returns (times, [K, H, W, 3])."""
        import av

        cc = self.stream.codec_context
        self._seek(0.0)
        cc.skip_frame = "NONKEY"
        times, frames = [], []
        try:
            for frame in self.container.decode(self.stream):
                self.decoded += 1
                times.append(self._time(frame))
                frames.append(self._array(frame))
        except av.FFmpegError as e:
            if not frames:
                raise VideoError(f"no keyframe decodes: {first_line(e, strerror=True)}") from e
        finally:
            cc.skip_frame = "DEFAULT"
            self._packets, self._last, self._peeked = None, None, None
        return times, np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)

    def scan(
        self, start: float, end: float, convert: bool = True
    ) -> Iterator[tuple[float, object]]:
        """Every frame shown in [start, end), in order: a full decode of that span, which
        continues from the decoder's position when no keyframe is nearer. With `convert`
        False the frames are the decoder's, for `array` to convert only those needed."""
        import av

        try:
            self._goto(start)
            item = self._last
            while item is not None and item[0] < end:
                self._last = item
                yield item[0], self._array(item[1]) if convert else item[1]
                item = self._next()
            if item is not None:
                self._peeked = item
        except av.FFmpegError as e:
            raise VideoError(
                f"decode failed after {start:.2f}s: {first_line(e, strerror=True)}"
            ) from e


def _packets(r: VideoReader) -> tuple[list[float], list[float], int]:
    """Every packet's time and the keyframes' (seconds from the first), and their bytes:
    demuxing only, no decoding.

    Raises:
        VideoError: no packet reads, the stream breaks off, or it holds no frame.
    """
    import av

    pts, keys, nbytes = [], [], 0
    try:
        for packet in r.container.demux(r.stream):
            if packet.size == 0 or packet.pts is None:
                continue
            t = packet.pts * r.time_base - r.t0
            pts.append(t)
            nbytes += packet.size
            if packet.is_keyframe:
                keys.append(t)
    except av.FFmpegError as e:
        why = first_line(e, strerror=True)
        if not pts:
            raise VideoError(f"no readable packets: {why}") from None
        raise VideoError(f"corrupt or truncated after {len(pts)} frames: {why}") from None
    if not pts:
        raise VideoError("no video frames")
    return pts, keys, nbytes


def _frame_rate(pts: list[float], stream) -> tuple[float, float, np.ndarray]:
    """(fps, the median step, the steps between frames): the median step's rate, or the
    stream's declared one for a single frame.

    Raises:
        VideoError: the rate is not a positive number.
    """
    steps = np.diff(np.sort(np.asarray(pts)))
    step = float(np.median(steps)) if len(steps) else 0.0
    fps = 1.0 / step if step > 0 else float(stream.average_rate or stream.guessed_rate or 0)
    if not math.isfinite(fps) or fps <= 0:
        raise VideoError(f"invalid frame rate {fps}")
    return fps, step, steps


def _first_frame(r: VideoReader) -> np.ndarray:
    """The first frame, decoded: the codec works, and the frame carries the rotation.

    Raises:
        VideoError: no frame decodes.
    """
    r._seek(0.0)
    r._horizon = (0.0, 0)  # drain once the first packet is in: decode one frame
    decoded = r._next()
    if decoded is None:
        raise VideoError("no frame decodes")
    return r._array(decoded[1])


def probe_video(path: str | Path) -> tuple[dict, str]:
    """Stream facts of a video from its packets plus one decoded frame, or a reason.

    Demuxing reads every packet header (no decoding): the true frame count, keyframe
    times, bitrate, variable frame rate and truncation. One decoded frame proves the
    codec works and gives the display rotation.

    Returns:
        (info, "") on success, ({}, reason) when the file is not usable video.
    """
    import av

    try:
        with VideoReader(path) as r:
            s = r.stream
            pts, keys, nbytes = _packets(r)
            declared = s.frames or 0
            if declared > 1 and len(pts) < 0.98 * declared:
                return {}, f"truncated: {len(pts)} of {declared} declared frames present"
            fps, step, steps = _frame_rate(pts, s)
            first = _first_frame(r)
            fmt = s.codec_context.format
    except VideoError as e:
        return {}, str(e)
    except av.FFmpegError as e:
        return {}, f"cannot decode video: {first_line(e, strerror=True)}"
    duration = float(max(pts) - min(pts)) + 1.0 / fps
    height, width = first.shape[:2]
    vfr = bool(len(steps) > 1 and (steps.max() - steps.min()) > 0.25 * step)
    return {
        "width": int(width),
        "height": int(height),
        "fps": float(fps),
        "frames": len(pts),
        "duration": duration,
        "keyframes": [float(k) for k in sorted(keys)],
        "rotation": int(r.rotation * 90),
        "vfr": vfr,
        "codec": s.codec_context.name,
        "pix_fmt": fmt.name if fmt is not None else "",
        "bit_depth": int(fmt.components[0].bits) if fmt is not None else 8,
        "bitrate": int(nbytes * 8 / duration),
    }, ""


def to_uint8(video: np.ndarray, prompt: str, seed: int) -> np.ndarray:
    """[F, H, W, 3] float pixels in [0, 1] (a pipeline's output) -> uint8; `prompt` and
    `seed` name the video in the error.

    Raises:
        FloatingPointError: the pipeline produced NaN or inf (fp16 overflow, broken LoRA).
    """
    if not np.isfinite(video).all():  # would be written as black frames and scored
        raise FloatingPointError(
            f"non-finite pixels for prompt {prompt[:40]!r}, seed {seed}: precision overflow?"
        )
    return (video * 255).round().clip(0, 255).astype(np.uint8)


def even_indices(start: int, end: int, count: int) -> list[int]:
    """`count` indices spread evenly over [start, end), centre of each segment."""
    n = max(end - start, 1)
    return [start + min(int((i + 0.5) * n / count), n - 1) for i in range(count)]


def even_times(start: float, end: float, count: int) -> list[float]:
    """`count` times spread evenly over [start, end), at the centre of each segment."""
    span = max(end - start, 0.0)
    return [start + (i + 0.5) * span / count for i in range(count)]


WINDOW_SLACK = 1e-6  # s: a clip exactly as long as a window yields it, float rounding aside


def window_times(start: float, end: float, target_fps: float, count: int) -> list[float] | None:
    """A contiguous window of `count` frame times at `target_fps`, from `start` seconds.

    Keeps real motion speed: frame k is the one shown at start + k / target_fps.
    Returns None when the clip [start, end) is too short for the window (check rejects
    such clips with the same `WINDOW_SLACK`).
    """
    span = (count - 1) / target_fps
    if start + span > end + WINDOW_SLACK:
        return None
    return [start + k / target_fps for k in range(count)]


def read_frames(
    path: str | Path, times: Sequence[float], size: tuple[int, int] | None = None
) -> np.ndarray:
    """The frames shown at `times` (seconds), normalised. Returns [N, H, W, 3] uint8.

    Raises:
        VideoError: the file cannot be opened or decoded there.
    """
    with VideoReader(path, size=size) as r:
        order = np.argsort(times, kind="stable")
        _, frames = r.at([times[i] for i in order])
        out = np.empty_like(frames)
        out[order] = frames
        return out


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


def _x264_asm() -> str | None:
    """x264's instruction sets for this CPU where its own choice is not repeatable: on a CPU
    with AVX-512 (measured on an AMD EPYC), x264 wrote one of three different files for the
    same nine frames, single-threaded too; capped at AVX2 it writes one. Every AVX-512 CPU
    has what x264's "AVX2" level uses (AVX2, FMA3, BMI2). None: x264 picks."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []
    )
    return "AVX2" if "avx512f" in flags else None


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    crf: int = 18,
    bitrate: int | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode [F, H, W, 3] uint8 RGB frames as an H.264 yuv420p mp4 (MPEG-4 Part 2 where
    the FFmpeg build has no libx264). Odd sizes are padded by one edge pixel.

    Args:
        path: output file, overwritten; its folder is created.
        frames: [F, H, W, 3] uint8 RGB.
        fps: frame rate.
        crf: constant quality (libx264), used when `bitrate` is None.
        bitrate: target bits per second instead of constant quality.
        options: more encoder options (libx264), e.g. {"g": "50"} for a keyframe every 50.

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
        if codec == "libx264":
            asm = _x264_asm()  # the same frames make the same file, run after run
            stream.options = {**stream.options, **({"x264-params": f"asm={asm}"} if asm else {})}
        if options and codec == "libx264":
            stream.options = {**stream.options, **options}
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
