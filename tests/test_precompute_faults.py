"""Precompute killed at each of its commit points, and beside other precompute processes.

A reference run lists the commit points it reaches (COGPIPE_FAULT_LOG). For one point of
each kind (the first and the last shard, a latents and a text cache store, the index, the
done marker) a fresh copy of the workspace is run to a SIGKILL there (COGPIPE_FAULT="N:
text"), then run again: its outputs must be byte-equal to the reference's and no `.tmp-*`
may remain. Two runs at once, and a `--part K` worker beside a full run, end the same.

Byte-equal: every shard (tensors and metadata), index.parquet and every entry precompute
stored in cache/latents and cache/text. Not byte-equal, so compared without those fields:
the done marker's `finished_at`, `seconds`, `stats.seconds` and this run's own tallies
(`encoded_videos`, cache hits...), which say when and what each process did. `.locks/`
holds lock files that name their last holder.

Each run is `cogpipe precompute CONFIG` (`cli.main`) in its own process, forked from a
multiprocessing forkserver that imported torch, diffusers and cogpipe once: a real
separate process (its own pid, killed by SIGKILL) without ~9 s of imports per run on a
2-core machine. The stages before precompute run once, in this process.
"""

from __future__ import annotations

import copy
import itertools
import json
import multiprocessing
import multiprocessing.forkserver
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from cogpipe.config import PipelineConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.pipeline import run_stage
from cogpipe.workspace import FAULT_ENV, FAULT_LOG_ENV, SUCCESS

UPSTREAM = ("ingest", "check", "caption", "recaption", "filter")
RUN_TIMEOUT_S = 120
# What to kill at: (text in the fault point, its occurrence: -1 the last). The second
# latents store: its shard committed, one of its latents cached, one not. The last text
# store: every caption but one cached.
POINTS = {
    "first shard": ("/shard-00000.safetensors", 1),
    "last shard": ("/shard-00002.safetensors", 1),
    "latents cache": ("/cache/latents/", 2),
    "text cache": ("/cache/text/", -1),
    "index": ("/index.parquet", 1),
    "done marker": (f"/{SUCCESS}", 1),
}

_runs = itertools.count()  # log file names
_forkserver = multiprocessing.get_context("forkserver")
_forkserver.set_forkserver_preload(
    [
        "cogpipe.cli",
        "cogpipe.pipeline",
        "cogpipe.precompute",
        "cogpipe.models.cogvideox",
        "diffusers.models.transformers",
        "diffusers.models.autoencoders",
        "transformers",
        __name__,
    ]
)


def _child(config: str, args: list[str], env: dict[str, str], log: str) -> None:
    """`cogpipe precompute CONFIG ARGS` with `env` set, its output into `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    sys.argv = ["cogpipe", "precompute", config, *args]  # what a lock's holder line shows
    from cogpipe import cli

    sys.exit(cli.main(sys.argv[1:]))


def _start(config: Path, *args: str, **env: str) -> tuple[multiprocessing.Process, Path]:
    log = config.parent / f"run-{next(_runs)}.log"
    proc = _forkserver.Process(target=_child, args=(str(config), list(args), env, str(log)))
    proc.start()
    return proc, log


def _wait(run: tuple[multiprocessing.Process, Path]) -> int:
    """The run's exit status (-9: SIGKILL), its output tail on a failure."""
    proc, log = run
    proc.join(RUN_TIMEOUT_S)
    assert proc.exitcode is not None, f"{log}: still running after {RUN_TIMEOUT_S} s"
    if proc.exitcode not in (0, -signal.SIGKILL):
        pytest.fail(f"{log} exited {proc.exitcode}:\n{log.read_text()[-3000:]}")
    return proc.exitcode


def _precompute(config: Path, *args: str, **env: str) -> int:
    return _wait(_start(config, *args, **env))


def _copy(base: Path, folder: Path) -> Path:
    """A copy of the base workspace (every stage up to filter done) in `folder`, and its
    config: the stage keys do not depend on the workspace's path."""
    shutil.copytree(base, folder / "workspace", symlinks=True)
    raw = yaml.safe_load((base.parent / "config.yaml").read_text())
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw | {"workspace": str(folder / "workspace")}))
    return config


def _outputs(ws: Path) -> dict[str, bytes]:
    """What precompute writes, by path in the workspace: shards, index, cache entries
    (leftover temporaries included: they start with a dot); not the done marker."""
    files = [*ws.glob("precompute/*/*"), *ws.glob("cache/latents/*/*"), *ws.glob("cache/text/*/*")]
    return {str(f.relative_to(ws)): f.read_bytes() for f in files if f.name != SUCCESS}


def _record(ws: Path) -> dict:
    """The done marker without when, how long and this process's own tallies."""
    record = json.loads(next(ws.glob(f"precompute/*/{SUCCESS}")).read_text())
    counts = {k: record["counts"][k] for k in ("samples", "ok", "rejected", "shards")}
    stats = {k: v for k, v in record["stats"].items() if k != "seconds"}
    return {"key": record["key"], "counts": counts, "stats": stats}


def _assert_like_reference(ws: Path, reference: dict) -> None:
    outputs = _outputs(ws)
    assert sorted(outputs) == sorted(reference["outputs"])
    differ = [name for name, data in outputs.items() if data != reference["outputs"][name]]
    assert differ == []
    assert _record(ws) == reference["record"]
    assert list(ws.rglob(".tmp-*")) == []


def _kind(point: str, ws: Path) -> str:
    """A commit point's kind: its label and its path in the workspace, hex names as H and
    numbers as N."""
    label, path = point.split(" ", 1)
    parts = [
        re.sub(r"^[0-9a-f]{2,}(?=\.|$)", "H", part) for part in Path(path).relative_to(ws).parts
    ]
    return f"{label} {re.sub(r'[0-9]+', 'N', '/'.join(parts))}"


@pytest.fixture(scope="module")
def base(tmp_path_factory, sample_videos, tiny_models) -> Path:
    """A workspace whose stages up to filter are done: 6 clips, 3 shards of 2."""
    multiprocessing.forkserver.ensure_running()  # it imports while the stages below run
    root = tmp_path_factory.mktemp("precompute-faults")
    raw = copy.deepcopy(DEMO_CONFIG)
    raw |= {
        "workspace": str(root / "workspace"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    raw["precompute"]["workers"] = 2  # for --part; not in the key
    (root / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = PipelineConfig.model_validate(raw)
    for stage in UPSTREAM:
        run_stage(cfg, stage)
    return root / "workspace"


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> dict:
    """One uninterrupted run: its outputs, done marker and commit points, in order."""
    config = _copy(base, tmp_path_factory.mktemp("reference"))
    log = config.parent / "fault-points.log"
    assert _precompute(config, **{FAULT_LOG_ENV: str(log)}) == 0
    ws = config.parent / "workspace"
    points = log.read_text().splitlines()
    return {"ws": ws, "outputs": _outputs(ws), "record": _record(ws), "points": points}


def _target(reference: dict, point: str) -> tuple[str, str]:
    """(COGPIPE_FAULT for `point`, the path of the commit point it kills at)."""
    text, occurrence = POINTS[point]
    hits = [p for p in reference["points"] if text in p]
    n = len(hits) if occurrence == -1 else occurrence
    assert len(hits) >= n, f"{point}: {text} is reached {len(hits)} times"
    return f"{n}:{text}", hits[n - 1].split(" ", 1)[1]


def test_the_points_cover_every_kind_of_commit_point(reference):
    ws = reference["ws"]
    kinds = {_kind(p, ws) for p in reference["points"]}
    chosen = {_kind(f"rename {_target(reference, point)[1]}", ws) for point in POINTS}
    assert kinds == chosen
    assert reference["record"]["counts"]["shards"] == 3  # POINTS' last shard is the last


@pytest.mark.parametrize("point", list(POINTS))
def test_a_kill_at_a_commit_point_then_a_run_ends_equal_to_one_run(
    point, base, reference, tmp_path
):
    config = _copy(base, tmp_path)
    ws = config.parent / "workspace"
    fault, path = _target(reference, point)
    assert _precompute(config, **{FAULT_ENV: fault}) == -signal.SIGKILL
    target = ws / Path(path).relative_to(reference["ws"])
    assert not target.exists()
    assert len(list(target.parent.glob(f".tmp-{target.name}-*"))) == 1  # killed before rename
    assert _precompute(config) == 0
    _assert_like_reference(ws, reference)


@pytest.mark.parametrize("second", [(), ("--part", "1")], ids=["full", "part-1"])
def test_a_second_process_beside_a_full_run_ends_equal_to_one_run(
    second, base, reference, tmp_path
):
    config = _copy(base, tmp_path)
    runs = [_start(config), _start(config, *second)]
    assert [_wait(run) for run in runs] == [0, 0]
    _assert_like_reference(config.parent / "workspace", reference)
