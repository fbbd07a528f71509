"""What the benchmarks share: their JSON result lines, the commit and device they name,
running a measurement in a fresh process, the hub configs of full-size models, and the
synthetic H.264 clips they decode.

Every benchmark prints one JSON object per measurement (DESIGN.md's Benchmarks section):
its own fields first, then the `device`, `date` and `commit` of the run, which `Bench`
adds. The committed results under bench/results/ are compared by these field names.

Importable both from a benchmark run as a script (bench/ is then on `sys.path`) and from
a test that loads a benchmark by its path (the benchmark puts bench/ on `sys.path` first).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).resolve().parent / "configs"


# --------------------------------------------------------------------------- result lines


def commit(given: str | None = None) -> str:
    """The commit to report: `given` (a --commit flag), else env COMMIT (a host without
    .git), else git's short HEAD, else "unknown"."""
    if given or os.environ.get("COMMIT"):
        return given or os.environ["COMMIT"]
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    return git.stdout.strip() or "unknown"


def device_name(on_cpu: bool, cpu: str = "cpu (dry run)") -> str:
    """The GPU's name (`torch.cuda.get_device_name()`), or `cpu` for a run on the CPU."""
    if on_cpu:
        return cpu
    import torch

    return torch.cuda.get_device_name()


def _round(value, digits: int = 4):
    """Floats rounded; anything else (None, ints, strings) as it is."""
    return round(value, digits) if isinstance(value, float) else value


def timed(bench: str, case: str, metric: str, seconds: float, reference, digits: int = 4):
    """A line of a lower-is-better time against its reference's (None: not measured): the
    ratio is reference / seconds, so above 1 means faster."""
    return {
        "bench": bench,
        "case": case,
        "metric": metric,
        "value": round(seconds, digits),
        "reference": reference and round(reference, digits),
        "ratio": reference and round(reference / seconds, 3),
    }


class Bench:
    """One benchmark run's JSON lines: each printed as soon as it is measured, ending in
    the run's device, date and commit, and appended to `out` when one is given (a line at
    a time, so a run that dies later keeps what it measured).

    Attributes:
        lines: the result lines (those `out` gets).
        errors: the failed measurements: printed, never written to `out`.
    """

    def __init__(self, name: str, device: str, commit: str, out: str | Path | None = None):
        self.name, self.device, self.commit = name, device, commit
        self.out = Path(out) if out else None
        self.date = datetime.date.today().isoformat()
        self.lines: list[dict] = []
        self.errors: list[dict] = []

    def _print(self, line: dict) -> dict:
        line = line | {"device": self.device, "date": self.date, "commit": self.commit}
        print(json.dumps(line), flush=True)
        return line

    def print(self, line: dict) -> None:
        """Print a result line (its own fields, then device, date and commit) and keep it."""
        line = self._print(line)
        self.lines.append(line)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            with self.out.open("a") as f:
                f.write(json.dumps(line) + "\n")

    def print_lines(self, lines: Iterable[dict]) -> None:
        """`print` each line as the iterable yields it (a measurement at a time)."""
        for line in lines:
            self.print(line)

    def result(self, case: str, metric: str, value, reference, ratio=None, **extra) -> None:
        """A measurement against its reference: floats rounded to 4 places, the ratio to 2.
        `ratio` is value / reference unless given: a lower-is-better metric passes
        reference / value, so that a ratio above 1 always means better."""
        if ratio is None and value is not None and reference:
            ratio = value / reference
        self.print(
            {
                "bench": self.name,
                "case": case,
                "metric": metric,
                "value": _round(value),
                "reference": _round(reference),
                "ratio": _round(ratio, 2),
                **{k: _round(v) for k, v in extra.items()},
            }
        )

    def failed(self, case: str, metric: str, error: str, **extra) -> None:
        """A measurement that failed (out of memory, say): value None and the error."""
        line = {"bench": self.name, "case": case, "metric": metric, "value": None}
        self.errors.append(self._print(line | extra | {"error": error}))


# --------------------------------------------------------------------------- processes


def run_fresh(script: str, args: list[str]) -> dict:
    """`python script *args` in a new process, which prints its measurement as a JSON line
    last: a clean peak-memory count, and nothing compiled shared between measurements.

    Returns:
        The last stdout line's object, or {"error": the last 3 lines of output} when the
        process fails (out of memory, say).
    """
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-400:] or f"exit {proc.returncode}"}
    return json.loads(lines[-1])


def in_processes(make, jobs: list[tuple]) -> list:
    """`make(*job)` for every job, in parallel processes (x264 on noise is slow). Call it
    before CUDA starts: the pool forks."""
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        return list(pool.map(make, *zip(*jobs, strict=True)))


# --------------------------------------------------------------------------- models


def hub_config(name: str) -> dict:
    """The constructor arguments of a full-size model as its hub config.json gives them
    (where they differ from the class's defaults): bench/configs/<name>.json."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


# --------------------------------------------------------------------------- clips


def textured_scene(rng: np.random.Generator, width: int, height: int, phase=0.0) -> np.ndarray:
    """A still scene [H, W, 3] float, 110 +- 100: per channel a sine across and a cosine
    down at frequencies drawn from `rng` (texture, so encoding and decoding are real work).
    `phase` shifts the sines: another scene from the same frequencies' draw."""
    yy, xx = np.mgrid[0:height, 0:width]
    f = rng.uniform(0.005, 0.03, size=(3, 2))
    waves = [np.sin(xx * f[c, 0] + phase) + np.cos(yy * f[c, 1]) for c in range(3)]
    return 110 + 50 * np.stack(waves, -1)


def with_subject(img: np.ndarray, i: int) -> np.ndarray:
    """`img` [H, W, 3] with frame `i`'s subject painted on it in place: a skin-coloured
    block (an eighth of the width) swinging from 15% to 70% of the width and back."""
    h, w = img.shape[:2]
    x = int(w * (0.15 + 0.55 * (0.5 + 0.5 * np.sin(i / 9))))
    img[h // 3 : 3 * h // 4, x : x + w // 8] = (220, 170, 140)
    return img


def write_h264(path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: int, gop: int):
    """An H.264 mp4 of RGB `frames` [H, W, 3] (clipped to 0..255) as web video is made:
    x264 veryfast, crf 23, a keyframe at least every `gop` frames; `size` is (width, height).

    Returns:
        `path`.
    """
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop)}
        for img in frames:
            frame = av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), "rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path
