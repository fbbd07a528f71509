"""Data-stage throughput: ingest + checks on 10-second 720p H.264 clips, per CPU core.

Reference (same run, same clips): a full decode of every frame on one core, each frame
converted to the same 64x64 RGB the checks use (one reused scaler, as cogpipe's reader
does): the least any check that reads whole clips (decord `get_batch`, a frame loop)
must pay. cogpipe's checks sample keyframe-aware, so they should cost a fraction of it.

The clips are generated like web video: 25 fps, noisy textured background, a moving
subject, and x264 `veryfast` with scene-cut keyframes and a keyframe interval of 2, 3
or 5 seconds (YouTube-style uploads use 2-5 s). One clip in five, over every keyframe
interval, has a hard cut at a random time between 3 and 7 s; `scenes: auto` places it
by decoding from the keyframe before it. Every time is the best of `--repeats` runs.

Lines:
- `sampled_decode_s_per_clip`: probe + checks per clip in this process (`scenes: auto`),
  over all clips, the single-shot ones and those with a cut, with the worst clip's
  ratio; `..._scenes_always_...`: the same, decoding everything for scene detection.
- `ingest_check_clips_per_s_per_core`: the ingest and check stages as the pipeline runs
  them (one worker process), start-up included.
- `ingest_check_startup_s`: the stages' fixed cost (worker start, imports, report), from
  a one-clip run; `ingest_check_marginal_clips_per_s_per_core`: the rate past it.

    python bench/data_checks.py [--clips 30] [--repeats 3] [--out bench/results/data_checks-cpu-DATE.jsonl]

Prints one JSON line per measurement (DESIGN.md's shape; ratio > 1 means cogpipe is
faster).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import Bench, commit, in_processes, textured_scene, write_h264  # noqa: E402

from cogpipe.check import PROBE_SIZE, inspect_video  # noqa: E402
from cogpipe.config import CheckConfig, PipelineConfig  # noqa: E402
from cogpipe.pipeline import run_stage  # noqa: E402
from cogpipe.video import probe_video  # noqa: E402

W, H, FPS, SECONDS = 1280, 720, 25, 10
GOPS_S = (2, 3, 5)


def make_clip(path: Path, seed: int, gop_s: int, cut: bool) -> Path:
    """A noisy 10 s 720p clip: still textured scene, a subject swinging across it; with
    `cut`, the scene changes at a random frame between 3 and 7 s."""
    rng = np.random.default_rng(seed)
    cut_at = int(rng.integers(3 * FPS, 7 * FPS)) if cut else SECONDS * FPS
    scenes = [textured_scene(rng, W, H, phase=s).astype(np.int16) for s in range(2)]

    def frames():
        for i in range(SECONDS * FPS):
            scene = scenes[1 if i >= cut_at else 0]
            img = scene + rng.integers(-12, 12, (H, W, 3), dtype=np.int16)
            x = int(200 + 700 * (0.5 + 0.5 * np.sin(i / 9)))  # the swinging subject
            img[250:520, x : x + 160] = (220, 170, 140)
            yield img

    return write_h264(path, frames(), (W, H), FPS, gop_s * FPS)


def full_decode(path: Path) -> int:
    """Reference: every frame decoded on one thread and scaled to the checks' RGB size."""
    import av
    from av.video.reformatter import VideoReformatter

    scaler = VideoReformatter()
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        n = 0
        for frame in c.decode(stream):
            w, h = PROBE_SIZE
            scaler.reformat(frame, format="rgb24", width=w, height=h, interpolation="AREA")
            n += 1
        return n


def probe_and_check(path: Path, c: CheckConfig) -> int:
    """What the stages do per clip, in this process; returns the packets decoded."""
    info, _ = probe_video(path)
    return inspect_video(str(path), info, c)["decoded"]


def run_stages(src: Path, workspace: Path) -> tuple[dict, dict]:
    """Ingest + check as the pipeline runs them, one worker process, in a new workspace."""
    shutil.rmtree(workspace, ignore_errors=True)
    cfg = PipelineConfig(
        workspace=workspace, ingest={"source": src, "workers": 1}, check={"workers": 1}
    )
    return run_stage(cfg, "ingest").counts, run_stage(cfg, "check").counts


def best(repeats: int, fn, *args):
    """(the least seconds of `repeats` calls, the last call's result)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - started)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    args = parser.parse_args()

    device = f"{platform.processor() or platform.machine()} (1 core)"
    gops = "/".join(map(str, GOPS_S))
    case = (
        f"{args.clips} clips 10s 1280x720 h264 veryfast gop {gops}s, 1 in 5 with a cut, "
        f"best of {args.repeats}"
    )
    bench = Bench("data_checks", device, commit(), args.out)

    with tempfile.TemporaryDirectory(prefix="cogpipe-bench-") as tmp:
        src = Path(tmp) / "videos"
        src.mkdir()
        jobs = [
            (src / f"clip{i}.mp4", i, GOPS_S[i % len(GOPS_S)], i % 5 == 2)
            for i in range(args.clips)
        ]
        paths = in_processes(make_clip, jobs)

        ref = {p: best(args.repeats, full_decode, p) for p in paths}  # (seconds, frames)
        t_ref = sum(t for t, _ in ref.values())

        # Sampled decoding alone (in this process, one core), after one untimed call that
        # imports the detectors (as a worker does once, before its first file).
        info, _ = probe_video(paths[0])
        inspect_video(str(paths[0]), info, CheckConfig())
        cut = {p: i % 5 == 2 for i, p in enumerate(paths)}
        for scenes in ("auto", "always"):
            c = CheckConfig(scenes=scenes)
            decoded, took = {}, {}
            for p in paths:
                took[p], decoded[p] = best(args.repeats, probe_and_check, p, c)
            metric = (
                "sampled_decode_s_per_clip"
                if scenes == "auto"
                else "sampled_decode_scenes_always_s_per_clip"
            )
            groups = {
                "all": paths,
                "single_shot": [p for p in paths if not cut[p]],
                "with_cut": [p for p in paths if cut[p]],
            }
            for clips, group in groups.items():
                if not group:
                    continue
                t, t_full = sum(took[p] for p in group), sum(ref[p][0] for p in group)
                bench.result(
                    case,
                    metric,
                    t / len(group),
                    t_full / len(group),
                    t_full / t,
                    clips=clips,
                    worst_clip_ratio=round(min(ref[p][0] / took[p] for p in group), 2),
                    packets_decoded_fraction=round(
                        sum(decoded[p] for p in group) / sum(ref[p][1] for p in group), 4
                    ),
                )

        # The stages as the pipeline runs them, with one worker process (one core); and
        # on one clip alone, for the fixed start-up. An untimed one-clip run first pays
        # this process's one-time imports (pandas, matplotlib), as a long-lived worker has.
        one = Path(tmp) / "one"
        one.mkdir()
        (one / paths[0].name).symlink_to(paths[0])
        run_stages(one, Path(tmp) / "ws-warm")
        t_one, _ = best(args.repeats, run_stages, one, Path(tmp) / "ws-one")
        t_all, (ingest, check) = best(args.repeats, run_stages, src, Path(tmp) / "ws")
        n, ref_rate = len(paths), len(paths) / t_ref
        bench.result(
            case,
            "ingest_check_clips_per_s_per_core",
            n / t_all,
            ref_rate,
            t_ref / t_all,
            stages_s=round(t_all, 2),
            clips_kept=check["kept"],
            clips=check["clips"],
            probed=ingest["probed"],
        )
        marginal = (t_all - t_one) / (n - 1)
        startup = t_one - marginal
        bench.result(
            case,
            "ingest_check_startup_s",
            startup,
            ref[paths[0]][0],
            ref[paths[0]][0] / startup,
            note="reference: a full decode of one clip",
        )
        bench.result(
            case,
            "ingest_check_marginal_clips_per_s_per_core",
            1 / marginal,
            ref_rate,
            1 / marginal / ref_rate,
        )


if __name__ == "__main__":
    main()
