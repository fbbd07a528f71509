"""The whole pipeline end to end, as a newcomer runs it: `cogpipe demo`, twice.

One demo run is shared by the module (it takes a few minutes on two CPU cores): the
tests then read its workspace, rerun it, load its LoRA with diffusers, and change the
caption prompt to see which stages recompute.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_pipe_call

from cogpipe.config import STAGES, load_config
from cogpipe.workspace import read_table

pytestmark = [pytest.mark.prefect, pytest.mark.serial]  # a reused run within half the first


def cogpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "cogpipe.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, f"cogpipe {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def pipeline_seconds(stdout: str) -> float:
    return float(re.search(r"^pipeline: ([\d.]+)s", stdout, re.M).group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    first = cogpipe("demo", "--workspace", str(root / "demo"), cwd=root)
    return root / "demo", first


def test_every_stage_has_its_done_marker(demo):
    folder, _ = demo
    status = json.loads(cogpipe("status", str(folder / "demo.yaml"), "--json", cwd=folder).stdout)
    assert list(status) == list(STAGES)
    for stage, s in status.items():
        assert s["done"], stage
        assert (Path(s["path"]) / "_SUCCESS.json").is_file(), stage
        assert s["key"] and s["counts"], stage


def test_bad_files_are_rejected_rows_and_the_pipeline_goes_on(demo):
    folder, first = demo
    cfg = load_config(folder / "demo.yaml")
    status = json.loads(cogpipe("status", str(folder / "demo.yaml"), "--json", cwd=folder).stdout)
    videos = read_table(Path(status["ingest"]["path"]) / "videos.parquet").set_index("path")
    corrupt = videos.loc[str(cfg.ingest.source / "corrupt.mp4")]
    text = videos.loc[str(cfg.ingest.source / "notes.txt")]
    assert corrupt.status == "rejected" and corrupt.reason.startswith("cannot open as video")
    assert text.status == "rejected" and "not a video" in text.reason
    assert "rejected 1: cannot open as video" in first.stdout  # the CLI summary names the reason
    assert status["evaluate"]["counts"]["checkpoints_evaluated"] >= 1


def test_second_demo_reuses_every_stage(demo):
    folder, first = demo
    second = cogpipe("demo", "--workspace", str(folder), cwd=folder.parent)
    assert "computed: none (all reused)" in second.stdout, second.stdout
    # Eight cached tasks cost Prefect's own overhead (about 2.5 s here), whatever the stages.
    assert pipeline_seconds(second.stdout) <= pipeline_seconds(first.stdout) / 2


def test_trained_lora_loads_into_the_pipeline_and_changes_the_output(demo):
    import numpy as np
    import torch
    from diffusers import CogVideoXPipeline

    folder, _ = demo
    cfg = load_config(folder / "demo.yaml")
    status = json.loads(cogpipe("status", str(folder / "demo.yaml"), "--json", cwd=folder).stdout)
    checkpoints = sorted(Path(status["train"]["path"]).glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-000003", "checkpoint-000006"]

    pipe = CogVideoXPipeline.from_pretrained(cfg.model)
    kwargs = tiny_pipe_call(prompt="a fighter slaps", output_type="np")
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(checkpoints[-1])
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert base.shape == tuned.shape == (1, 9, 64, 64, 3)
    assert np.abs(base - tuned).max() > 1e-4


def test_changing_the_caption_prompt_recomputes_caption_and_after(demo, tmp_path):
    import yaml

    from cogpipe.cli import run_pipeline

    folder, _ = demo
    raw = yaml.safe_load((folder / "demo.yaml").read_text())
    raw["caption"]["prompt"] = "Describe the strike and the reaction in one paragraph."
    changed = folder / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    results, _ = run_pipeline(load_config(changed))
    reused = {r.stage: r.reused for r in results}
    assert reused == {
        "ingest": True,
        "check": True,
        "caption": False,
        "recaption": False,
        "filter": False,
        "precompute": False,
        "train": False,
        "evaluate": False,
    }


def test_stage_summaries_are_prefect_artifacts(demo):
    """Every stage that computed published its counts table; check, filter and evaluate
    their markdown reports."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    reports = ["check-report", "filter-report", "evaluate-report"]
    wanted = [f"{stage}-summary" for stage in STAGES] + [*reports, "caption-progress"]
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted))
        )
    by_key = {a.key: a for a in found}
    assert set(wanted) <= set(by_key), set(wanted) - set(by_key)
    assert any(row["what"] == "rejected" for row in json.loads(by_key["ingest-summary"].data))
    # Other test modules share this Prefect home and publish evaluate reports of their own:
    # the demo's is the one naming the demo's model.
    model = str(load_config(demo[0] / "demo.yaml").model)
    ours = [a.data for a in found if a.key == "evaluate-report" and model in a.data]
    assert ours and all("checkpoint-000006" in data for data in ours)
    # The dataset report's plots travel inside the artifact, not as workspace paths.
    assert "![durations](data:image/png;base64," in by_key["check-report"].data
    assert "![caption length](data:image/png;base64," in by_key["filter-report"].data


def test_sharded_captioning_runs_each_shard_as_its_own_task_run(demo, tmp_path):
    """Caption and recaption shards (a gate that rejects every caption) are task runs."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from cogpipe.cli import run_pipeline
    from cogpipe.pipeline import run_stage

    folder, _ = demo
    raw = yaml.safe_load((folder / "demo.yaml").read_text())
    raw["caption"] |= {"shards": 2, "prompt": "Describe the moving shapes."}
    raw["filter"] |= {"min_words": 1000, "max_words": 2000}
    sharded = folder / "sharded.yaml"
    sharded.write_text(yaml.safe_dump(raw))
    cfg = load_config(sharded)
    results, _ = run_pipeline(cfg, until="recaption")
    captions = read_table(Path(results[2].path) / "captions.parquet")
    check = read_table(Path(results[1].path) / "clips.parquet")
    assert list(captions.clip_id) == sorted(check.loc[check.keep, "clip_id"])

    # The shards' parts are there; a shard run of a finished stage does nothing.
    names = sorted(p.name[:8] for p in Path(results[2].path).glob("part-*.parquet"))
    assert set(names) == {"part-000", "part-001"}
    assert run_stage(cfg, "caption", shard=1) is None
    assert results[3].counts["round1"] == len(captions)  # every clip captioned again
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(limit=1, sort="START_TIME_DESC")[0]
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    states = {r.name: r.state_type.value for r in runs}
    assert states["caption-shard-0"] == states["caption-shard-1"] == "COMPLETED"
    assert states["recaption-shard-0"] == states["recaption-shard-1"] == "COMPLETED"


def test_failures_a_retry_would_repeat_are_not_retried():
    from prefect.states import Failed

    from cogpipe.precompute import SpotCheckError
    from cogpipe.train import TrainingDiverged
    from cogpipe_tasks.precompute import precompute
    from cogpipe_tasks.train import train

    def retried(task, error: Exception) -> bool:
        return task.retry_condition_fn(task, None, Failed(data=error))

    assert not retried(train, TrainingDiverged("loss is nan at step 4"))
    assert not retried(precompute, SpotCheckError("shard-00001: PSNR 9.1 dB"))
    assert retried(train, OSError("disk full")) and retried(precompute, MemoryError())


def test_copying_every_model_folder_elsewhere_keeps_every_stage_key(demo, tmp_path):
    """Models enter keys by their contents: a copy in another place (new paths, new mtimes)
    finds every stage of the demo done, under the same keys."""
    import shutil

    import yaml

    folder, _ = demo
    copy = tmp_path / "elsewhere" / "models"
    shutil.copytree(folder / "models", copy)
    raw = yaml.safe_load((folder / "demo.yaml").read_text())
    raw["model"] = str(copy / "cogvideox")
    raw["caption"]["model"] = str(copy / "llava")
    raw["evaluate"]["clip_model"] = str(copy / "clip")
    moved = folder / "moved.yaml"
    moved.write_text(yaml.safe_dump(raw, sort_keys=False))  # categories keep their order

    def status(name: str) -> dict:
        return json.loads(cogpipe("status", str(folder / name), "--json", cwd=folder).stdout)

    before, after = status("demo.yaml"), status("moved.yaml")
    assert {s: v["key"] for s, v in after.items()} == {s: v["key"] for s, v in before.items()}
    assert all(v["done"] for v in after.values()), after
