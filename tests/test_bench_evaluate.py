"""bench/evaluate.py --dry: one checkpoint evaluated by run_evaluate with today's settings
and the fastest (compiled, first-block cache; FP8 left out on the CPU), a line per metric."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["base_unit_s", "checkpoint_s", "s_per_video", "fixed_s", "projected_20x2_s"]


def test_bench_dry_run_times_one_checkpoint_per_setting():
    cmd = [sys.executable, "bench/evaluate.py", "--dry", "--prompts", "2", "--seeds", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    case = "cogvideox-5b 2 prompts x 1 seed 4 steps 9x64x64"
    assert [(line["case"], line["metric"]) for line in lines] == [
        (f"{case} {name}", metric) for name in ("today", "fastest") for metric in METRICS
    ]
    today, fastest = {x["metric"]: x for x in lines[:5]}, {x["metric"]: x for x in lines[5:]}
    assert {x["settings"] for x in today.values()} == {"as shipped"}
    assert {x["settings"] for x in fastest.values()} == {
        "compile=true,step_cache=first_block,step_cache_threshold=0.1"
        " (fp8_linears left out: needs CUDA)"
    }
    ran = [
        (x["checkpoint_s"]["compiled_blocks"], x["checkpoint_s"]["torchao_linears"])
        for x in (today, fastest)
    ]
    assert ran[0] == (0, 0) and ran[1][0] > 0 and ran[1][1] == 0  # compiled; FP8 needs CUDA
    for line in lines:
        assert line["bench"] == "evaluate" and line["value"] > 0
        assert line["device"] == "cpu (dry run)" and line["base_suite"] == "stand-in"
    for metric in METRICS:  # today / fastest, as every bench: above 1, fastest is faster
        assert today[metric]["ratio"] == 1.0
        assert fastest[metric]["reference"] == today[metric]["value"]
        ratio = today[metric]["value"] / fastest[metric]["value"]
        assert fastest[metric]["ratio"] == pytest.approx(ratio, abs=0.01)
    for found in (today, fastest):
        assert len(found["s_per_video"]["video_s"]) == 2
        assert found["s_per_video"]["value"] == found["s_per_video"]["video_s"][1]
        projected = found["projected_20x2_s"]
        assert projected["projected"] is True and "not measured" in projected["note"]
        per_video, fixed = found["s_per_video"]["value"], found["fixed_s"]["value"]
        assert projected["value"] == pytest.approx(per_video * 40 + fixed, abs=1e-3)
        assert fixed == pytest.approx(found["checkpoint_s"]["value"] - 2 * per_video, abs=1e-3)
