"""Evaluate killed at every commit point, and two evaluations of one config at once: each
ends as one uninterrupted run would, with no temporary left in the workspace.

The upstream stages (demo config on 3 clips, 2 checkpoints) run in-process once; evaluate
(1 prompt x 1 seed: base + 2 checkpoints, 3 videos) runs as `cogpipe.cli.main(["evaluate",
CONFIG])` in processes forked from one that imported torch, transformers and diffusers
once (a fresh interpreter spends most of a short run importing them), each on its own
copy of the starting workspace. Every process computes with one thread: the same numbers
everywhere (a thread count can change float sums) on two shared cores.

A reference run lists the commit points it reaches (COGPIPE_FAULT_LOG: every rename of a
temporary: the base store's record and video, each unit's metrics and summary, the unit
folder, the shared index, the plot, the report, the done marker). Points fall into kinds
(writer tokens, hex keys and digits normalised); a run is killed at the first point of
each kind (COGPIPE_FAULT), then run again. Files are compared byte for byte (videos,
contact sheets, A/B grids, summaries, report, plot) except these, compared without:
- `metrics.parquet`: `seconds`, the wall time of each video;
- `evaluate/index.parquet`: `evaluated_at`, a timestamp;
- `_SUCCESS.json`: `finished_at`, `seconds` (timings) and `counts.checkpoints_evaluated`,
  `counts.videos` (what the call that wrote it made: a resumed run makes the rest);
- the base store's `<key>.json`: `seconds`, the wall time of the generation;
- JSON files name the workspace, another folder for every copy: it reads `<ws>`.

Beside them: a kill at the rename of a validation video folder during training (expected
to fail until train.py validates before committing the same step's checkpoint), a base
video in flight surviving another run's sweep, and the rating page waiting for the report.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from forker import Forker

from cogpipe import base_suite, evaluate
from cogpipe.config import PipelineConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.pipeline import run_stage, stage_keys, stage_path
from cogpipe.ratings import BEGIN, END, refresh_report, report_lock
from cogpipe.workspace import SUCCESS, Workspace, read_table, sweep_temporaries

PROMPTS = ["a fighter slaps his opponent"]
WRITER = re.compile(r"-h[A-Za-z0-9]+p\d+r[0-9a-f]{8}")  # a temporary's writer token
HEX_KEY = re.compile(r"\b[0-9a-f]{12,}\b")  # stage and store keys
VOLATILE = {"metrics.parquet": ["seconds"], "index.parquet": ["evaluated_at"]}
VOLATILE_JSON = {
    SUCCESS: ["finished_at", "seconds", "counts.checkpoints_evaluated", "counts.videos", "timing"],
    "*.json": ["seconds"],
}


def job(folder: Path, log: str, stage: str = "evaluate", **env: str) -> dict:
    """`cogpipe <stage> folder/config.yaml` with `env`, its output to folder/<log>."""
    return {"argv": [stage, str(folder / "config.yaml")], "env": env, "log": str(folder / log)}


@pytest.fixture(scope="module")
def start(tmp_path_factory, sample_videos, tiny_models) -> Path:
    """A workspace trained up to evaluate (in-process) and its config: a folder to copy."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEMO_CONFIG.items()}
    folder = tmp_path_factory.mktemp("evaluate-start")
    (folder / "videos").mkdir()
    for name in ("shapes_00.mp4", "shapes_01.mp4", "shapes_02.mp4"):
        shutil.copy(sample_videos[name], folder / "videos" / name)
    raw |= {
        "workspace": str(folder / "ws"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(folder / "videos")},
    }
    raw["check"] |= {"heldout_fraction": 0.0}  # every clip trains
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["train"] |= {"max_steps": 4, "checkpoint_every": 2}
    raw["evaluate"] |= {
        "prompts": PROMPTS,
        "clip_model": str(tiny_models["clip"]),
        "device": "cpu",
        "bootstrap": 100,
    }
    cfg = PipelineConfig.model_validate(raw)
    for stage in stage_keys(cfg, "train"):
        run_stage(cfg, stage)
    write_config(cfg, folder)
    return folder


@pytest.fixture(scope="module")
def forker():
    f = Forker(
        [
            "torch",
            "transformers",
            "diffusers",
            "matplotlib.pyplot",
            "av",
            "cogpipe.evaluate",
            "cogpipe.pipeline",
        ]
    )
    yield f
    f.close()


def copy_of(start: Path, folder: Path) -> Path:
    """`start`'s workspace copied to folder/ws, with its config pointing there."""
    shutil.copytree(start / "ws", folder / "ws", ignore=shutil.ignore_patterns(".locks"))
    write_config(load(start).model_copy(update={"workspace": folder / "ws"}), folder)
    return folder


def write_config(cfg: PipelineConfig, folder: Path) -> None:
    # In field order: yaml's sorted keys would reorder filter.categories, which is keyed.
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (folder / "config.yaml").write_text(text)


def load(folder: Path) -> PipelineConfig:
    return PipelineConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))


def run_name(folder: Path) -> str:
    (run,) = [p.name for p in (folder / "ws" / "train").iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def reference(forker, start, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted evaluation on a copy of `start`, and the commit points it reached."""
    folder = copy_of(start, tmp_path_factory.mktemp("evaluate-reference"))
    log = folder / "points.log"
    assert forker.run([job(folder, "run.log", COGPIPE_FAULT_LOG=str(log))]) == [0], (
        folder / "run.log"
    ).read_text()[-3000:]
    root = str(folder / "ws")
    return folder, [line.replace(root, "", 1) for line in log.read_text().splitlines()]


def kind(point: str) -> str:
    return re.sub(r"\d", "N", HEX_KEY.sub("KEY", WRITER.sub("", point)))


def fault(points: list[str], i: int) -> str:
    """COGPIPE_FAULT for point i: its path up to any writer token, and which of the points
    holding that text it is."""
    text = WRITER.split(points[i].split(" ", 1)[1])[0]
    return f"{sum(text in p for p in points[: i + 1])}:{text}"


def snapshot(folder: Path) -> dict[str, object]:
    """What evaluation wrote (evaluate/, the base store), by path: what must equal."""
    ws, out = folder / "ws", {}
    for root in (ws / "evaluate", ws / "cache" / evaluate.BASE_STORE):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out[str(path.relative_to(ws))] = comparable(path, str(ws))
    return out


def comparable(path: Path, root: str):
    """A file's bytes' digest, or without its volatile fields (see the module docstring)."""
    if path.suffix == ".parquet":
        return read_table(path).drop(columns=VOLATILE[path.name]).to_json()
    if path.suffix == ".json":
        record = json.loads(path.read_text().replace(root, "<ws>"))
        for field in VOLATILE_JSON.get(path.name, VOLATILE_JSON["*.json"]):
            *parents, last = field.split(".")
            inner = record
            for name in parents:
                inner = inner.get(name, {})
            inner.pop(last, None)
        return record
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p) for p in (folder / "ws").rglob(".tmp-*"))


def test_a_kill_at_every_commit_point_ends_as_an_uninterrupted_run(
    forker, start, reference, tmp_path
):
    ref, points = reference
    expected = snapshot(ref)
    firsts = {}
    for i, point in enumerate(points):
        firsts.setdefault(kind(point), i)
    kinds = sorted(firsts.values())
    assert len(kinds) == 12, [kind(points[i]) for i in kinds]  # listed in the module docstring
    copies = [copy_of(start, tmp_path / f"kill-{i:02d}") for i in kinds]
    killed = forker.run(
        [
            job(c, "killed.log", COGPIPE_FAULT=fault(points, i))
            for c, i in zip(copies, kinds, strict=True)
        ]
    )
    assert killed == [-9] * len(kinds), [
        (points[i], k) for i, k in zip(kinds, killed, strict=True) if k != -9
    ]
    assert forker.run([job(c, "again.log") for c in copies]) == [0] * len(kinds)
    for c, i in zip(copies, kinds, strict=True):
        assert (temporaries(c), snapshot(c)) == ([], expected), points[i]

    # A killed run of another config (a second seed, another eval key) leaves a temporary
    # in the shared store; this config's next run finds its stage done and sweeps it.
    other, done = copies[-1], tmp_path / "other"
    done.mkdir()
    cfg = load(other)
    write_config(
        cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"seeds": [43]})}), done
    )
    assert forker.run([job(done, "killed.log", COGPIPE_FAULT=f"1:{evaluate.BASE_STORE}/")]) == [-9]
    assert evaluate.BASE_STORE in [Path(t).parent.name for t in temporaries(other)]
    assert forker.run([job(other, "done.log")]) == [0]
    assert " reused " in (other / "done.log").read_text()
    assert (temporaries(other), snapshot(other)) == ([], expected)


def committed(folder: Path, names: list[str]) -> bool:
    cfg, keys = load(folder), stage_keys(load(folder))
    out = stage_path(
        Workspace(cfg.workspace),
        cfg,
        "evaluate",
        keys["evaluate"],
        {k: keys[k] for k in ("train", "check", "filter")},
    )
    return all((out / n / "summary.json").is_file() for n in names)


AT_WORK = re.compile(r"^evaluate: [\d,]+/[\d,]+ ", re.M)  # its first progress line


def test_two_evaluations_at_once_share_the_units_and_equal_one(forker, start, reference, tmp_path):
    """Both start while a third holder (this test) has the base unit: they split the
    checkpoints, wait for the base, and one of them makes it once the holder lets go
    without committing it (as a killed holder would)."""
    ref, _ = reference
    folder = copy_of(start, tmp_path / "both")
    cfg, keys = load(folder), stage_keys(load(folder))
    ws, ekey = Workspace(cfg.workspace), evaluate.eval_key(cfg, keys)
    logs = [folder / "a.log", folder / "b.log"]
    held = ExitStack()
    held.enter_context(ws.hold(evaluate.unit_lock(ekey, run_name(folder), evaluate.BASE)))

    ended = threading.Event()

    def let_go() -> None:  # once every checkpoint is in and both runs are at work
        deadline = time.monotonic() + 300  # then the test fails on its asserts, not hangs
        while (
            not ended.wait(0.2)
            and time.monotonic() < deadline
            and not (
                committed(folder, ["checkpoint-000002", "checkpoint-000004"])
                and all(log.is_file() and AT_WORK.search(log.read_text()) for log in logs)
            )
        ):
            pass
        held.close()

    releaser = threading.Thread(target=let_go)
    releaser.start()
    codes = forker.run([job(folder, log.name) for log in logs])
    ended.set()  # both runs ended (had one failed, nothing waits on the base any more)
    releaser.join()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    made = [int(re.search(r"videos=(\d+)", text).group(1)) for text in outputs]
    assert sum(made) == 3 * len(PROMPTS)  # base + 2 checkpoints, each made once
    index = evaluate.read_index(ws)
    assert index.checkpoint.tolist() == ["base", "checkpoint-000002", "checkpoint-000004"]
    assert (temporaries(folder), snapshot(folder)) == ([], snapshot(ref))


def test_a_kill_at_a_validation_commit_is_made_again(forker, start, tmp_path):
    folder = tmp_path / "validation"
    top = {".locks", "train", "evaluate"}  # trained again, with validation
    shutil.copytree(
        start / "ws",
        folder / "ws",
        ignore=lambda d, names: top & set(names) if Path(d) == start / "ws" else [],
    )
    cfg = load(start).model_copy(update={"workspace": folder / "ws"})
    write_config(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"validation_every": 2})}),
        folder,
    )
    fault = job(folder, "killed.log", "train", COGPIPE_FAULT="1:validation/step-000002")
    assert forker.run([fault]) == [-9], (folder / "killed.log").read_text()[-3000:]
    run = folder / "ws" / "train" / run_name(folder)
    (tmp,) = (run / "validation").glob(".tmp-step-000002-*")  # written whole, not renamed
    made = {p.name: p.read_bytes() for p in tmp.iterdir()}
    assert forker.run([job(folder, "again.log", "train")]) == [0]
    assert temporaries(folder) == []
    step = run / "validation" / "step-000002"
    assert {p.name: p.read_bytes() for p in step.iterdir()} == made


def test_a_base_video_being_written_survives_another_runs_sweep(tmp_path, monkeypatch):
    """The store's temporary names its writer: a concurrent run's sweep leaves it alone."""
    written = []

    def write_mp4(path: Path, frames, fps: int) -> None:
        path.write_bytes(b"frames")
        assert sweep_temporaries(tmp_path) == 0  # a live writer's temporary stays
        written.append(path)

    monkeypatch.setattr(base_suite, "write_mp4", write_mp4)
    base_suite.write_video(tmp_path / "0123abcd.mp4", None, 8)
    assert written[0].name.startswith(".tmp-0123abcd-") and written[0].suffix == ".mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["0123abcd.mp4"]


def test_the_rating_page_waits_for_an_evaluation_writing_the_report(tmp_path):
    """The rating page rewrites report.md's ratings section (read, modify, rename) under the
    report's lock, so an evaluation rewriting the whole report meanwhile is not undone."""
    ws = Workspace(tmp_path)
    report = tmp_path / "report.md"
    report.write_text(f"# old\n{BEGIN}\n{END}\n")
    refreshed = threading.Event()
    with report_lock(ws, "ekey", "run"):
        refresher = threading.Thread(
            target=lambda: refreshed.set() if refresh_report(ws, "ekey", "run", report) else None
        )
        refresher.start()
        assert not refreshed.wait(1.0)  # waits for the lock
        report.write_text(f"# new\n{BEGIN}\n{END}\n")  # what the evaluation writes
    refresher.join(30)
    assert refreshed.is_set() and report.read_text().startswith("# new\n")
    assert "No ratings yet" in report.read_text()
