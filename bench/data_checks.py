"""Data-stage throughput: ingest + checks on 10-second 720p H.264 clips, per CPU core.

Reference (same run, same clips): a full decode of every frame to RGB on one core, the
least any check that reads whole clips (decord `get_batch`, a frame loop) must pay.
cogpipe's checks sample keyframe-aware, so they should cost a small fraction of it.

The clips are generated like web video: 25 fps, noisy textured background, a moving
subject, and x264 `veryfast` with scene-cut keyframes and a keyframe interval of 2, 3
or 5 seconds (YouTube-style uploads use 2-5 s). One clip has a hard cut in the middle.

    python bench/data_checks.py [--clips 6] [--out bench/results/data_checks-cpu-DATE.jsonl]

Prints one JSON line per measurement (DESIGN.md's shape; ratio > 1 means cogpipe is
faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogpipe.check import inspect_video  # noqa: E402
from cogpipe.config import CheckConfig, PipelineConfig  # noqa: E402
from cogpipe.pipeline import run_stage  # noqa: E402
from cogpipe.video import probe_video  # noqa: E402

W, H, FPS, SECONDS = 1280, 720, 25, 10
GOPS_S = (2, 3, 5)


def make_clip(path: Path, seed: int, gop_s: int, cut: bool) -> Path:
    """A noisy 10 s 720p clip: still textured scene, a subject swinging across it."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    scenes = []
    for s in range(2):
        f = rng.uniform(0.005, 0.03, size=(3, 2))
        base = np.stack([np.sin(xx * f[c, 0] + s) + np.cos(yy * f[c, 1]) for c in range(3)], -1)
        scenes.append((110 + 50 * base).astype(np.int16))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop_s * FPS)}
        for i in range(SECONDS * FPS):
            scene = scenes[1 if cut and i >= SECONDS * FPS // 2 else 0]
            img = scene + rng.integers(-12, 12, (H, W, 3), dtype=np.int16)
            x = int(200 + 700 * (0.5 + 0.5 * np.sin(i / 9)))  # the swinging subject
            img[250:520, x : x + 160] = (220, 170, 140)
            frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def full_decode(path: Path) -> int:
    """Reference: every frame decoded to RGB on one thread."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        return sum(1 for f in c.decode(stream) if f.to_ndarray(format="rgb24") is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    args = parser.parse_args()

    date = datetime.date.today().isoformat()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    device = f"{platform.processor() or platform.machine()} (1 core)"
    case = f"{args.clips} clips 10s 1280x720 h264 veryfast gop {'/'.join(map(str, GOPS_S))}s"
    lines = []

    def emit(metric: str, value: float, reference: float, ratio: float, **extra) -> None:
        line = {"bench": "data_checks", "case": case, "metric": metric, "value": round(value, 4),
                "reference": round(reference, 4), "ratio": round(ratio, 2), **extra,
                "device": device, "date": date, "commit": commit}  # fmt: skip
        print(json.dumps(line), flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="cogpipe-bench-") as tmp:
        src = Path(tmp) / "videos"
        src.mkdir()
        paths = [
            make_clip(src / f"clip{i}.mp4", i, GOPS_S[i % len(GOPS_S)], cut=(i == 1))
            for i in range(args.clips)
        ]

        started = time.perf_counter()
        frames = sum(full_decode(p) for p in paths)
        t_ref = time.perf_counter() - started

        # Sampled decoding alone (in this process, one core), after one untimed call that
        # imports the detectors (as a worker does once, before its first file).
        info, _ = probe_video(paths[0])
        inspect_video(str(paths[0]), info, CheckConfig())
        sampled = {}
        for scenes in ("auto", "always"):
            c = CheckConfig(scenes=scenes)
            decoded = 0
            started = time.perf_counter()
            for p in paths:
                info, _ = probe_video(p)
                decoded += inspect_video(str(p), info, c)["decoded"]
            sampled[scenes] = (time.perf_counter() - started, decoded)
        t_auto, decoded = sampled["auto"]
        emit("sampled_decode_s_per_clip", t_auto / len(paths), t_ref / len(paths),
             t_ref / t_auto, decoded_fraction=round(decoded / frames, 4))  # fmt: skip
        t_always, decoded = sampled["always"]
        emit("sampled_decode_scenes_always_s_per_clip", t_always / len(paths),
             t_ref / len(paths), t_ref / t_always,
             decoded_fraction=round(decoded / frames, 4))  # fmt: skip

        # The stages as the pipeline runs them, with one worker process (one core).
        cfg = PipelineConfig(workspace=Path(tmp) / "ws",
                             ingest={"source": src, "workers": 1},
                             check={"workers": 1})  # fmt: skip
        started = time.perf_counter()
        ingest = run_stage(cfg, "ingest")
        t_ingest = time.perf_counter() - started
        started = time.perf_counter()
        check = run_stage(cfg, "check")
        t_check = time.perf_counter() - started
        rate, ref_rate = len(paths) / (t_ingest + t_check), len(paths) / t_ref
        emit("ingest_check_clips_per_s_per_core", rate, ref_rate, rate / ref_rate,
             ingest_s=round(t_ingest, 2), check_s=round(t_check, 2),
             clips_kept=check.counts["kept"], clips=check.counts["clips"],
             probed=ingest.counts["probed"])  # fmt: skip

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
