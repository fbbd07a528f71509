"""Two `cogpipe run`s of one config on one workspace at once (two terminals, a retry beside
the first attempt) share the work and end equal to one run: every unit has one writer.

The stages done in one piece (ingest, check, filter) are computed by one of the two runs,
the other waits and reuses them; caption parts, precompute shards, the training run and
evaluation units are locked one by one.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from cogpipe.config import PipelineConfig
from cogpipe.demo import DEMO_CONFIG
from cogpipe.pipeline import run_all, stage_keys
from cogpipe.workspace import read_table

pytestmark = pytest.mark.prefect

WHOLE = ("ingest", "check", "filter")
TIMES = ["seconds", "evaluated_at"]  # wall times of the run that wrote them


def config(tmp: Path, sample_videos, tiny_models) -> dict:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw |= {
        "workspace": str(tmp / "workspace"),
        "model": str(tiny_models["cogvideox"]),
        "ingest": {"source": str(next(iter(sample_videos.values())).parent)},
    }
    raw["caption"]["model"] = str(tiny_models["llava"])
    raw["evaluate"]["clip_model"] = str(tiny_models["clip"])
    return raw


def table(path: Path, root: Path) -> list[dict]:
    """A Parquet table's rows without wall times, its workspace path written as <ws>, NaN
    as None (NaN equals nothing, itself included)."""
    df = read_table(path).drop(columns=TIMES, errors="ignore")
    df = df.map(lambda v: v.replace(str(root), "<ws>") if isinstance(v, str) else v)
    return df.astype(object).where(df.notna(), None).to_dict("records")


def losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def outputs(cfg: PipelineConfig) -> dict:
    """What a run leaves: shards, latents, captions, losses, LoRA tensors, evaluate index."""
    root, keys = Path(cfg.workspace), stage_keys(cfg)
    pre, run = root / "precompute" / keys["precompute"], root / "train" / keys["train"]
    loras = sorted(run.glob("checkpoint-*/*.safetensors"))
    return {
        "shards": {p.name: p.read_bytes() for p in sorted(pre.glob("*.safetensors"))},
        "latents": {
            p.name: p.read_bytes()
            for p in sorted((root / "cache" / "latents").rglob("*"))
            if p.is_file()
        },
        "index": table(pre / "index.parquet", root),
        "captions": table(root / "filter" / keys["filter"] / "curated.parquet", root),
        "losses": losses(run),
        "lora": {
            f"{p.parent.name}/{p.name}": {k: t.tolist() for k, t in load_file(p).items()}
            for p in loras
        },
        "evaluate": table(root / "evaluate" / "index.parquet", root),
    }


def temporaries(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*"))


def test_two_runs_at_once_share_the_work_and_equal_one(tmp_path, sample_videos, tiny_models):
    raw = config(tmp_path / "two", sample_videos, tiny_models)
    (tmp_path / "two").mkdir()
    path = tmp_path / "two" / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))  # categories' order is in the key
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "cogpipe.cli", "run", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    said = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], said

    one = config(tmp_path / "one", sample_videos, tiny_models)
    run_all(PipelineConfig.model_validate(one))
    two = PipelineConfig.model_validate(raw)
    assert outputs(two) == outputs(PipelineConfig.model_validate(one))
    for stage in WHOLE:  # computed by one run; the other waited and reused it
        computed = [
            any(
                line.split()[:3] == [stage, line.split()[1], "computed"]
                for line in text.splitlines()
                if line.startswith(stage)
            )
            for text in said
        ]
        assert sorted(computed) == [False, True], (stage, said)
    assert temporaries(Path(two.workspace)) == []
