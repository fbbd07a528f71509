"""`cogpipe sweep` on the tiny CogVideoX: cells, resume after an interruption, table, images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cli_support import tiny_video_args
from PIL import Image

from cogpipe import generate, sweep
from cogpipe.cli import main
from cogpipe.generate import GenerateError, GenerateOptions
from cogpipe.workspace import read_table

PROMPTS = {"cheer": "The crowd cheers.", "slap": "A fighter slaps his opponent."}
GRID = {"guidance": ["1", "6"], "steps": [1, 2]}
CELLS = ["guidance=1,steps=1", "guidance=1,steps=2", "guidance=6,steps=1", "guidance=6,steps=2"]


class Interrupted(Exception):
    pass


@pytest.fixture
def opts(tiny_models) -> GenerateOptions:
    return GenerateOptions(
        model=str(tiny_models["cogvideox"]), frames=9, height=32, width=32, device="cpu"
    )


def mean_pixel(frames: np.ndarray, prompt: str) -> float:
    """A stand-in metric: the mean pixel value."""
    return float(frames.mean())


METRICS = {"mean_pixel": mean_pixel}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.glob("*/*.mp4")}


def test_cells_are_sorted_typed_and_named_canonically(opts):
    cells = sweep.grid_cells(opts, {"steps": ["10", "25"], "guidance": ["1", "6.5"]})
    assert [c.name for c in cells] == [
        "guidance=1,steps=10",
        "guidance=1,steps=25",
        "guidance=6.5,steps=10",
        "guidance=6.5,steps=25",
    ]
    assert cells[0].params == {"guidance": 1.0, "steps": 10}
    assert (cells[3].options.guidance, cells[3].options.steps, cells[3].options.frames) == (
        6.5,
        25,
        9,
    )
    assert sweep.parse_grid(["guidance=1,6,12", "lora-scale=0,1"]) == {
        "guidance": ["1", "6", "12"],
        "lora_scale": ["0", "1"],
    }
    for grid, message in [
        ({}, "at least one --grid"),
        ({"model": ["2b"]}, "--grid model: not a per-video option"),
        ({"frames": ["9", "13"]}, "--grid frames=13: must be 8k+1"),
        ({"steps": ["x"]}, "--grid steps=x: Input should be a valid integer"),
        ({"guidance": ["1", "1.0"]}, "cell guidance=1 appears twice"),
        ({"step_cache": ["fast"]}, "--grid step_cache=fast: Input should be 'none',"),
    ]:
        with pytest.raises(GenerateError, match=re.escape(message)):
            sweep.grid_cells(opts, grid)
    compiled = GenerateOptions(**opts.model_dump() | {"compile": True})
    with pytest.raises(GenerateError, match="step_cache=pab: step_cache: pab with compile"):
        sweep.grid_cells(compiled, {"step_cache": ["first_block", "pab"]})
    for specs, message in [(["steps"], "expected NAME=V1,V2"), (["steps=1", "steps=2"], "twice")]:
        with pytest.raises(GenerateError, match=message):
            sweep.parse_grid(specs)


def test_interrupted_sweep_resumes_and_skips_finished_cells(tmp_path, opts, monkeypatch):
    folder = tmp_path / "sweeps" / "cfg"
    notes = []

    def stop_after_first_cell(done: int, total: int, note: str) -> None:
        notes.append(note)
        if done == len(PROMPTS):
            raise Interrupted

    with pytest.raises(Interrupted):
        sweep.run_sweep(
            PROMPTS, opts, GRID, tmp_path / "sweeps", "cfg", METRICS, stop_after_first_cell
        )
    first = mtimes(folder)
    assert sorted(first) == ["guidance=1,steps=1/cheer.mp4", "guidance=1,steps=1/slap.mp4"]
    table = read_table(folder / "results.parquet")
    assert list(table.cell) == [CELLS[0]] * 2 and not table.skipped.any()
    seconds = dict(zip(table.prompt, table.seconds, strict=True))
    # A killed write leaves only a temporary, which is neither skipped nor kept.
    (folder / CELLS[1]).mkdir()
    (folder / CELLS[1] / ".tmp-slap.mp4-0badf00d").write_bytes(b"half a video")

    notes.clear()
    table = sweep.run_sweep(
        PROMPTS,
        opts,
        GRID,
        tmp_path / "sweeps",
        "cfg",
        METRICS,
        lambda done, total, note: notes.append(note),
    )
    assert [n.endswith("skipped") for n in notes] == [True, True] + [False] * 6
    assert {k: v for k, v in mtimes(folder).items() if k in first} == first  # not rewritten
    assert sorted(mtimes(folder)) == [f"{c}/{p}.mp4" for c in CELLS for p in PROMPTS]
    assert not list(folder.glob("*/.tmp-*"))
    assert list(table.columns) == [
        "cell",
        "guidance",
        "steps",
        "prompt",
        "file",
        "seconds",
        "file_bytes",
        "skipped",
        "error",
        "mean_pixel",
    ]
    assert list(table.cell) == [c for c in CELLS for _ in PROMPTS]
    assert list(table.prompt) == list(PROMPTS) * 4
    assert list(table.skipped) == [True, True] + [False] * 6
    assert list(table.guidance) == [1.0, 1.0, 1.0, 1.0, 6.0, 6.0, 6.0, 6.0]
    assert list(table.steps) == [1, 1, 2, 2, 1, 1, 2, 2]
    assert dict(zip(table.prompt[:2], table.seconds[:2], strict=True)) == seconds  # carried over
    assert (table.seconds > 0).all() and (table.error == "").all()
    assert (table.file_bytes == [(folder / f).stat().st_size for f in table.file]).all()
    assert table.mean_pixel.between(0, 255).all()
    assert read_table(folder / "results.parquet").equals(table)
    csv = (folder / "results.csv").read_text().splitlines()
    assert csv[0] == "cell,guidance,steps,prompt,file,seconds,file_bytes,skipped,error,mean_pixel"
    assert len(csv) == 9

    grid = Image.open(folder / "grid.png")
    timing = Image.open(folder / "timing.png")
    assert grid.format == timing.format == "PNG"
    assert grid.size == (920, 480)  # 100 dpi: 2 prompts x 4 frames wide, 4 cells high

    # A third run finds everything: the model is not even loaded, no file is rewritten,
    # recorded values stay; a metric added now is computed from the decoded files.
    before = mtimes(folder)
    monkeypatch.setattr(generate, "load", lambda options: pytest.fail("loaded the model"))
    metrics = METRICS | {"frames": lambda frames, prompt: len(frames)}
    again = sweep.run_sweep(PROMPTS, opts, GRID, tmp_path / "sweeps", "cfg", metrics)
    assert again.skipped.all() and mtimes(folder) == before
    assert again.drop(columns=["skipped", "frames"]).equals(table.drop(columns="skipped"))
    assert (again.frames == 9).all()


def test_nan_video_is_a_row_with_its_error_and_is_retried(tmp_path, opts, monkeypatch):
    real = generate.generate_one

    def overflow_at_guidance_6(pipe, prompt, options, on_step=None):
        if options.guidance == 6:
            raise FloatingPointError("non-finite pixels: precision overflow?")
        return real(pipe, prompt, options, on_step=on_step)

    monkeypatch.setattr(generate, "generate_one", overflow_at_guidance_6)
    grid = {"guidance": [1, 6], "steps": [1]}
    table = sweep.run_sweep({"slap": PROMPTS["slap"]}, opts, grid, tmp_path, "nan")
    assert list(table.error.str.startswith("non-finite")) == [False, True]
    assert list(table.file_bytes == 0) == [False, True]
    assert not (tmp_path / "nan" / "guidance=6,steps=1" / "slap.mp4").exists()
    assert (tmp_path / "nan" / "grid.png").is_file()  # "no video" in its place

    monkeypatch.setattr(generate, "generate_one", real)
    table = sweep.run_sweep({"slap": PROMPTS["slap"]}, opts, grid, tmp_path, "nan")
    assert list(table.skipped) == [True, False] and (table.error == "").all()


def test_a_step_cache_grid_makes_each_cells_video_with_its_cache(tmp_path, opts):
    """Cells of step_cache (first_block at a threshold that reuses every step after the
    first) are generate's videos with that option, and differ from the exact cell's."""
    fixed = GenerateOptions(**opts.model_dump() | {"steps": 3, "step_cache_threshold": 1e6})
    grid = {"step_cache": ["none", "first_block"]}
    table = sweep.run_sweep({"slap": PROMPTS["slap"]}, fixed, grid, tmp_path, "cache")
    assert list(table.cell) == ["step_cache=none", "step_cache=first_block"]
    assert list(table.step_cache) == ["none", "first_block"] and (table.error == "").all()
    exact, cached = (sweep.read_video(tmp_path / "cache" / f) for f in table.file)
    assert not np.array_equal(exact, cached)
    expected = tmp_path / "expected.mp4"
    generate.run_generate(
        {"x": PROMPTS["slap"]}, fixed.model_copy(update={"step_cache": "first_block"}), expected
    )
    np.testing.assert_array_equal(cached, sweep.read_video(expected))


def test_sweep_cli(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "slap.txt").write_text(PROMPTS["slap"])
    fixed = tiny_video_args(tiny_models["cogvideox"], steps=1)
    args = ["sweep", "--grid", "seed=1,2", "--prompts-dir", "prompts", "--out", "sw", *fixed]
    assert main([*args, "--clip-model", str(tiny_models["clip"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[1/2] sw/seed/seed=1/slap.mp4 ") and out[0].endswith("s")
    assert out[-1] == (
        "sw/seed: 2 videos (2 generated, 0 skipped, 0 failed); results.csv, grid.png, timing.png"
    )
    table = read_table(tmp_path / "sw" / "seed" / "results.parquet")
    assert list(table.seed) == [1, 2] and table.clip_score.between(0, 100).all()
    assert main(args) == 0
    assert "(0 generated, 2 skipped, 0 failed)" in capsys.readouterr().out

    for bad, message in [
        (["--grid", "frames=10"], "--grid frames=10: must be 8k+1"),
        (["--grid", "steps=1", "--offload", "model"], "--offload model needs a CUDA GPU"),
        (["--grid", "step-cache=none,pab", "--fp8-linears"], "--fp8-linears needs a CUDA GPU"),
        (["--grid", "steps=1", "--experiment", "a/b"], "--experiment 'a/b'"),
    ]:
        assert main(["sweep", "--prompts-dir", "prompts", *fixed, *bad]) == 2
        assert message in capsys.readouterr().err
