"""The recaption stage on the tiny LLaVA: exactly the rejected clips are captioned again,
committed parts are reused, shards run alone and merge without a model, retries 0 loads
nothing, and the filter after it loads no captioner.

The gate's "refusal phrase" is a word the tiny model writes in some captions and not in
others, so a known subset of real captions is rejected.
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest

from cogpipe import caption, recaption
from cogpipe import filter as filter_module
from cogpipe.filter import judge_captions, token_counter
from cogpipe.pipeline import run_stage, stage_keys
from cogpipe.workspace import SUCCESS, ShardsIncomplete, Workspace, read_table

CAPTION = {"num_frames": 4, "max_new_tokens": 24, "batch_size": 2}


@pytest.fixture
def captioned(demo_config, tmp_path):
    """A factory: a config on a fresh workspace with ingest, check and caption done."""

    def make(name: str = "workspace", **caption_overrides):
        cfg = demo_config(workspace=tmp_path / name, caption=CAPTION | caption_overrides)
        for stage in ("ingest", "check", "caption"):
            run_stage(cfg, stage)
        return cfg

    return make


def captions_of(cfg) -> pd.DataFrame:
    return read_table(
        cfg.workspace / "caption" / stage_keys(cfg, "caption")["caption"] / "captions.parquet"
    )


def rejecting(cfg, **gate):
    """The config with a gate that rejects some, not most, captions; and those clips."""
    captions = captions_of(cfg)
    words = [set(c.lower().split()) for c in captions.caption]
    marker = next(
        w for w in sorted(set().union(*words)) if 0 < sum(w in c for c in words) < len(words) / 2
    )
    fc = cfg.filter.model_copy(update={"refusal_phrases": [marker], "select_top": 0} | gate)
    cfg = cfg.model_copy(update={"filter": fc})
    verdicts = judge_captions(captions, fc, token_counter(cfg))
    bad = sorted(captions.clip_id[[bool(r) for _, r in verdicts]])
    assert 0 < len(bad) < len(captions)
    return cfg, bad


@pytest.fixture
def generated(monkeypatch):
    """The number of clips each `generate` call captions, call by call."""
    calls, real = [], caption.generate

    def spy(cap, clips_frames, *args, **kwargs):
        calls.append(len(clips_frames))
        return real(cap, clips_frames, *args, **kwargs)

    monkeypatch.setattr(caption, "generate", spy)
    return calls


def no_captioner(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a captioner was loaded")

    monkeypatch.setattr(caption, "_load", refuse)


def test_recaption_captions_exactly_the_rejected_clips_again(captioned, generated, monkeypatch):
    cfg, bad = rejecting(captioned("retry"))
    generated.clear()  # the caption stage's calls
    res = run_stage(cfg, "recaption")
    assert sum(generated) == len(bad)  # round 1 only: retries 1
    table = read_table(Path(res.path) / "captions.parquet").set_index("clip_id")
    before = captions_of(cfg).set_index("clip_id")
    assert list(table.index) == list(before.index)
    assert {"caption", "error", "truncated", "attempt", "source"} <= set(table.columns)
    retried = table[table.attempt == 1]
    assert set(retried.index) <= set(bad) and len(retried) == res.counts["round1_accepted"]
    assert (retried.caption != before.caption[retried.index]).all()
    assert set(retried.prompt_hash) <= {caption.prompt_hash(cfg.filter.retry_prompt)}
    kept = table.drop(retried.index)
    assert (kept.caption == before.caption[kept.index]).all() and (kept.attempt == 0).all()
    assert set(table.source) == {"model"}
    assert res.counts | {"parts": 0, "parts_reused": 0} == {
        "clips": len(table),
        "rejected_before": len(bad),
        "recaptioned": len(bad),
        "accepted_after": len(table) - len(bad) + len(retried),
        "parts": 0,
        "parts_reused": 0,
        "round1": len(bad),
        "round1_accepted": len(retried),
    }

    # Round 1's parts cover exactly the rejected clips, in a content-keyed folder.
    (folder,) = (cfg.workspace / "cache" / "recaption").iterdir()
    assert sorted(c for p in folder.glob("part-*") for c in read_table(p).clip_id) == bad

    # The filter reads the re-captions and records where each caption came from.
    curated = read_table(Path(run_stage(cfg, "filter").path) / "curated.parquet")
    assert {"attempt", "source"} <= set(curated.columns)
    assert (curated.set_index("clip_id").attempt == table.attempt).all()

    # A lost stage folder is rebuilt from the committed parts: no model, same table.
    no_captioner(monkeypatch)
    shutil.rmtree(res.path)
    again = run_stage(cfg, "recaption")
    assert again.key == res.key and again.counts["parts_reused"] == again.counts["parts"] > 0
    assert read_table(Path(again.path) / "captions.parquet").equals(table.reset_index())
    # Curation is not part of the recaption key.
    other = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"select_top": 2})})
    assert stage_keys(other, "recaption") == stage_keys(cfg, "recaption")
    assert stage_keys(other, "filter")["filter"] != stage_keys(cfg, "filter")["filter"]


def test_shards_run_every_round_alone_and_merge_without_a_model(captioned, generated, monkeypatch):
    cfg, bad = rejecting(captioned("shards", shards=2, batch_size=1), retries=2)
    generated.clear()  # the caption stage's calls
    with pytest.raises(ShardsIncomplete):
        run_stage(cfg, "recaption", merge_only=True)
    assert generated == []  # the refused merge loaded nothing
    assert run_stage(cfg, "recaption", shard=0) is None
    with pytest.raises(ShardsIncomplete, match="shards 1"):
        run_stage(cfg, "recaption", merge_only=True)
    assert run_stage(cfg, "recaption", shard=1) is None
    rounds = sum(generated)  # round 1 of every rejected clip, round 2 of those still rejected
    assert rounds >= len(bad)

    no_captioner(monkeypatch)
    merged = run_stage(cfg, "recaption", merge_only=True)
    assert merged.counts["round1"] == len(bad)  # round 2: what round 1 left rejected
    assert merged.counts.get("round2", 0) == len(bad) - merged.counts["round1_accepted"]
    assert rounds == sum(v for k, v in merged.counts.items() if k in ("round1", "round2"))
    assert merged.counts["parts_reused"] == merged.counts["parts"]
    table = read_table(Path(merged.path) / "captions.parquet")

    # The same result in one process, from the same parts (content-keyed): nothing captioned.
    shutil.rmtree(merged.path)
    whole = run_stage(cfg, "recaption")
    assert read_table(Path(whole.path) / "captions.parquet").equals(table)


def test_retries_0_or_nothing_rejected_loads_no_model(captioned, monkeypatch):
    cfg = captioned("none")
    no_captioner(monkeypatch)
    for gate in ({"retries": 0, "min_words": 1000, "max_words": 2000}, {"retries": 2}):
        other = cfg.model_copy(update={"filter": cfg.filter.model_copy(update=gate)})
        res = run_stage(other, "recaption")
        table = read_table(Path(res.path) / "captions.parquet")
        assert res.counts["recaptioned"] == 0 and (table.attempt == 0).all()
        assert list(table.caption) == list(captions_of(cfg).caption)
        assert (Path(res.path) / SUCCESS).is_file()
    assert not (cfg.workspace / "cache" / "recaption").exists()


def test_filter_loads_no_captioner_and_imports_nothing_of_captioning(captioned, monkeypatch):
    tree = ast.parse(inspect.getsource(filter_module))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(
        m.startswith(("cogpipe.caption", "cogpipe.vlm", "cogpipe.recaption")) for m in imported
    ), imported

    cfg, bad = rejecting(captioned("filter"), retries=1)
    run_stage(cfg, "recaption")
    no_captioner(monkeypatch)
    res = run_stage(cfg, "filter")
    assert res.counts["captions"] == len(captions_of(cfg))


def test_moving_the_model_folders_keeps_every_key(demo_config, tiny_models, tmp_path):
    cfg = demo_config()
    moved = tmp_path / "moved"
    for name in ("cogvideox", "llava", "clip"):
        shutil.copytree(tiny_models[name], moved / name)
    other = demo_config(caption={"model": str(moved / "llava")}).model_copy(
        update={"model": str(moved / "cogvideox")}
    )
    other = other.model_copy(
        update={"evaluate": other.evaluate.model_copy(update={"clip_model": str(moved / "clip")})}
    )
    assert stage_keys(other) == stage_keys(cfg)
    assert recaption.key_of(cfg, {"caption": "a", "check": "b"}) != recaption.key_of(
        cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"retries": 2})}),
        {"caption": "a", "check": "b"},
    )


def test_a_part_another_process_holds_is_waited_for_then_captioned_if_left(captioned):
    cfg, bad = rejecting(captioned("held"))
    ws = Workspace(cfg.workspace)
    folder = recaption.pass_dir(ws, recaption.retry_config(cfg, 1), 1, bad)
    notes: list[str] = []
    with ExitStack() as other, ThreadPoolExecutor(1) as pool:
        other.enter_context(ws.hold(caption.part_lock(ws, folder, 0, 0)))  # as another process
        run = pool.submit(
            run_stage, cfg, "recaption", progress=lambda d, t, note: notes.append(note)
        )
        deadline = time.monotonic() + 120
        while not any("waiting for part-000-00000.parquet" in n for n in notes):
            assert not run.done() and time.monotonic() < deadline, notes
            time.sleep(0.05)
        assert f"held by pid {os.getpid()} on " in notes[-1]
        assert not (folder / "part-000-00000.parquet").exists()  # never written under a lock held
        other.close()  # its holder ends without committing it: the waiting run captions it
        res = run.result(timeout=120)
    table = read_table(Path(res.path) / "captions.parquet")
    assert sorted(read_table(folder / "part-000-00000.parquet").clip_id) == bad[:2]

    # The same as a run nobody got in the way of.
    shutil.rmtree(res.path)
    shutil.rmtree(folder)
    again = read_table(Path(run_stage(cfg, "recaption").path) / "captions.parquet")
    pd.testing.assert_frame_equal(table.drop(columns="seconds"), again.drop(columns="seconds"))
