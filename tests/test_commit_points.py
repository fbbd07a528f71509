"""Kill caption, recaption and train at every commit point: the next run ends as if
nothing had happened, and leaves no temporary behind.

For each stage, a reference run of its command (`python -m cogpipe.cli <stage> CONFIG`,
upstream stages run in-process first) lists the commit points it reaches
(COGPIPE_FAULT_LOG: every rename of a temporary, and train's pruning of old training
states). Points fall into kinds (the path with digits and temporaries' writer tokens
normalised); at the first and the last point of each kind a run on a copy of the same
starting workspace is killed (COGPIPE_FAULT), then the stage runs again in-process. Its
outputs must equal the reference's, with no temporary anywhere in the workspace, and
stay so after one more run that finds the stage done.

The killed runs are the same command, `cogpipe.cli.main([stage, CONFIG])`, in processes
forked from one that imported torch, transformers and diffusers once (a fresh interpreter
spends most of a killed run importing them). Every process computes with one thread: the
same numbers everywhere (a thread count can change float sums), and two shared cores.

Files are compared byte for byte except these (not deterministic), which are compared
without the fields named:
- caption tables (caption parts, `captions.parquet` of caption and recaption, the
  recaption rounds' parts): `seconds`, the wall time each clip took;
- `_SUCCESS.json`: `seconds` and `finished_at` (timings), `counts.parts_reused` (a resumed
  run reuses what the killed one committed), train's `stats.seconds_per_step` (timing)
  and `stats.resumed_from_step` (where it resumed);
- train's `losses.jsonl`: each step's `seconds` (timing); `logs/` is left out (TensorBoard
  event files hold wall times and are named after the host and the time);
- safetensors files (the LoRA): their header's metadata (rank, alpha, format) comes in
  another order in every process (safetensors writes a hash map), so the header is
  compared as JSON and the tensor bytes as bytes;
- JSON files name the workspace, which is another folder for every copy: its path is
  replaced by `<ws>` first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from forker import ONE_THREAD, REPO, Forker

from cogpipe.config import PipelineConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.pipeline import run_stage
from cogpipe.workspace import SUCCESS, read_table

CAPTION = {"num_frames": 4, "max_new_tokens": 24, "batch_size": 2}  # 6 clips: 3 parts
# 2 checkpoints, and the first one's training state pruned after the second
TRAIN = {"rank": 4, "alpha": 4, "max_steps": 4, "checkpoint_every": 2, "keep_states": 1}
# 24 new tokens never make 50 words: every clip is re-captioned in both rounds
REJECT_ALL = {"min_words": 50, "max_words": 80, "retries": 2}
WRITER = re.compile(r"-h[A-Za-z0-9]+p\d+r[0-9a-f]{8}")  # a temporary's writer token
PARALLEL = 2  # killed runs at once
PRELOAD = [
    "torch",
    "transformers",
    "diffusers",
    "accelerate",
    "peft",
    "torch.utils.tensorboard",
    "cogpipe.caption",
    "cogpipe.recaption",
    "cogpipe.filter",
    "cogpipe.train",
]
VOLATILE = (
    "seconds",
    "finished_at",
    "counts.parts_reused",
    "stats.seconds_per_step",
    "stats.resumed_from_step",
    "timing",
)


@dataclass
class Reference:
    """A stage's uninterrupted run: its starting workspace, its own and the points it reached."""

    start: PipelineConfig
    done: PipelineConfig
    points: list[str]  # "label /path below the workspace", in the order reached


def copy_of(cfg: PipelineConfig, folder: Path) -> PipelineConfig:
    """`cfg` on a copy of its workspace, `folder/ws` (lock files left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(cfg.workspace, folder / "ws", ignore=shutil.ignore_patterns(".locks"))
    return cfg.model_copy(update={"workspace": folder / "ws"})


def command(cfg: PipelineConfig, stage: str, folder: Path, **env: str) -> subprocess.Popen:
    """`python -m cogpipe.cli <stage> folder/config.yaml` with `env` added; output to
    folder/stage.log."""
    config = write_config(cfg, folder)
    env = os.environ | {"PYTHONPATH": str(REPO)} | ONE_THREAD | env
    with open(folder / "stage.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cogpipe.cli", stage, str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def write_config(cfg: PipelineConfig, folder: Path) -> Path:
    config = folder / "config.yaml"  # in field order: filter.categories' order is keyed
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return config


def points_of(log: Path, cfg: PipelineConfig) -> list[str]:
    root = str(cfg.workspace)
    return [line.replace(root, "", 1) for line in log.read_text().splitlines()]


def reference(start: PipelineConfig, stage: str, folder: Path) -> Reference:
    """Run `stage`'s command on a copy of `start`, listing the commit points it reaches."""
    cfg = copy_of(start, folder)
    proc = command(cfg, stage, folder, COGPIPE_FAULT_LOG=str(folder / "points.log"))
    assert proc.wait(timeout=300) == 0, (folder / "stage.log").read_text()[-3000:]
    return Reference(start, cfg, points_of(folder / "points.log", cfg))


def kind(point: str) -> str:
    return re.sub(r"\d", "N", WRITER.sub("", point))


def targets(points: list[str]) -> list[int]:
    """The first and the last point of each kind, in the order reached."""
    by_kind: dict[str, list[int]] = {}
    for i, point in enumerate(points):
        by_kind.setdefault(kind(point), []).append(i)
    return sorted({i for found in by_kind.values() for i in (found[0], found[-1])})


def fault(points: list[str], i: int) -> str:
    """COGPIPE_FAULT for point i: its path up to any writer token, and which of the points
    holding that text it is."""
    text = WRITER.split(points[i].split(" ", 1)[1])[0]
    return f"{sum(text in p for p in points[: i + 1])}:{text}"


def temporaries(cfg: PipelineConfig) -> list[str]:
    return sorted(str(p) for p in Path(cfg.workspace).rglob(".tmp-*"))


def comparable(path: Path, root: str) -> str:
    """A digest of what of a file must equal the reference's (see the module docstring)."""
    return hashlib.sha256(repr(_comparable(path, root)).encode()).hexdigest()[:16]


def _comparable(path: Path, root: str):
    if path.suffix == ".safetensors":
        data = path.read_bytes()
        end = 8 + int.from_bytes(data[:8], "little")  # u64 header length, JSON header, tensors
        return json.dumps(json.loads(data[8:end]), sort_keys=True), data[end:]
    if path.suffix == ".parquet":
        return read_table(path).drop(columns="seconds", errors="ignore").to_json()
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
    if path.name == SUCCESS:
        record = json.loads(path.read_text().replace(root, "<ws>"))
        for field in VOLATILE:
            *parents, name = field.split(".")
            (record.get(parents[0], {}) if parents else record).pop(name, None)
        return record
    if path.suffix == ".json":
        return path.read_text().replace(root, "<ws>")
    return path.read_bytes()


def snapshot(cfg: PipelineConfig, folders: list[str]) -> dict[str, object]:
    """Every file of the stage's `folders` (below the workspace) as `comparable` has it."""
    root = Path(cfg.workspace)
    files = [p for f in folders for p in (root / f).rglob("*") if p.is_file()]
    return {
        str(p.relative_to(root)): comparable(p, str(root))
        for p in sorted(files)
        if "logs" not in p.relative_to(root).parts
    }


def killed(
    forker: Forker, ref: Reference, stage: str, folder: Path
) -> list[tuple[str, PipelineConfig]]:
    """A copy of the starting workspace per target point, `stage` killed there; checks
    that each died at its point."""
    runs, jobs = [], []
    for i in targets(ref.points):
        cfg = copy_of(ref.start, folder / f"point-{i}")
        here = cfg.workspace.parent
        env = {"COGPIPE_FAULT": fault(ref.points, i), "COGPIPE_FAULT_LOG": str(here / "points.log")}
        jobs.append(
            {
                "argv": [stage, str(write_config(cfg, here))],
                "env": env,
                "log": str(here / "stage.log"),
            }
        )
        runs.append((ref.points[i], cfg))
    for (point, cfg), code in zip(runs, forker.run(jobs), strict=True):
        output = (cfg.workspace.parent / "stage.log").read_text()[-3000:]
        assert code == -signal.SIGKILL, f"{point}:\n{output}"
        last = points_of(cfg.workspace.parent / "points.log", cfg)[-1]
        assert WRITER.sub("", last) == WRITER.sub("", point)  # temporaries are named anew
        if point.startswith("rename"):  # killed between writing a temporary and its rename
            assert temporaries(cfg), point
    return runs


def every_point_resumes(
    forker: Forker, ref: Reference, stage: str, folders: list[str], tmp: Path
) -> None:
    expected = snapshot(ref.done, folders)
    assert expected and not temporaries(ref.done)
    for point, cfg in killed(forker, ref, stage, tmp):
        res = run_stage(cfg, stage)
        assert not res.reused, point
        assert temporaries(cfg) == [], point
        assert snapshot(cfg, folders) == expected, point
        assert run_stage(cfg, stage).reused, point  # finds it done: still nothing left
        assert temporaries(cfg) == [], point


def kinds(ref: Reference) -> set[str]:
    """Kinds of point by label and file name (temporaries' writer tokens and digits out)."""
    return {kind(f"{p.split(' ')[0]} {Path(p.split(' ', 1)[1]).name}") for p in ref.points}


@pytest.fixture(scope="module")
def one_thread():
    """This process computes as the stage commands do: with one thread (see the docstring)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def forker(one_thread):
    forker = Forker(PRELOAD, PARALLEL)
    yield forker
    forker.close()


@pytest.fixture(scope="module")
def checked(tmp_path_factory, sample_videos, tiny_models, one_thread) -> PipelineConfig:
    """The demo config (caption and train made small) on a workspace with ingest and check done."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
    raw |= {
        "workspace": str(tmp_path_factory.mktemp("checked") / "ws"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"] |= {"model": str(tiny_models["llava"])} | CAPTION
    raw["train"] |= TRAIN
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    cfg = PipelineConfig.model_validate(raw)
    for stage in ("ingest", "check"):
        run_stage(cfg, stage)
    return cfg


@pytest.fixture(scope="module")
def captioned(checked, tmp_path_factory) -> Reference:
    return reference(checked, "caption", tmp_path_factory.mktemp("caption-reference"))


def test_caption_killed_at_each_commit_point(forker, captioned, tmp_path):
    assert kinds(captioned) == {
        "rename part-NNN-NNNNN.parquet",
        "rename captions.parquet",
        "rename _SUCCESS.json",
    }
    every_point_resumes(forker, captioned, "caption", ["caption"], tmp_path)


def test_recaption_killed_at_each_commit_point(forker, captioned, tmp_path):
    start = copy_of(captioned.done, tmp_path / "start")
    start = start.model_copy(update={"filter": start.filter.model_copy(update=REJECT_ALL)})
    ref = reference(start, "recaption", tmp_path / "reference")
    parts = {kind(p) for p in ref.points if "/cache/recaption/" in p}
    assert len(parts) == 2  # the parts of round 1 and of round 2, each in its pass folder
    assert kinds(ref) == {
        "rename part-NNN-NNNNN.parquet",
        "rename captions.parquet",
        "rename _SUCCESS.json",
    }
    folders = ["recaption", "cache/recaption"]
    every_point_resumes(forker, ref, "recaption", folders, tmp_path / "killed")


def test_train_killed_at_each_commit_point(forker, captioned, tmp_path):
    start = copy_of(captioned.done, tmp_path / "start")
    for stage in ("recaption", "filter", "precompute"):
        run_stage(start, stage)
    ref = reference(start, "train", tmp_path / "reference")
    assert kinds(ref) == {
        "rename run.json",
        "rename losses.jsonl",
        "rename state.json",  # inside the temporary
        "rename checkpoint-NNNNNN",
        "prune training_state.pt",
        "rename _SUCCESS.json",
    }
    (run,) = (Path(ref.done.workspace) / "train").iterdir()
    assert [p.parent.name for p in run.glob("*/training_state.pt")] == ["checkpoint-000004"]
    every_point_resumes(forker, ref, "train", ["train"], tmp_path / "killed")
