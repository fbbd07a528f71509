"""IC-LoRA references: condition functions, reference latents in precompute, validation
fed with references.

Precompute runs on the tiny CogVideoX and the sample videos, with the check and filter
tables of test_precompute (clip1..3 selected and long enough).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from conftest import tiny_sampling, tiny_train
from safetensors.torch import load_file
from test_precompute import CAPTIONS, _upstream

from cogpipe import condition, precompute, train, validation
from cogpipe.config import EvaluateConfig, PipelineConfig, PrecomputeConfig, TrainConfig
from cogpipe.models import cogvideox
from cogpipe.video import read_frames, resize_center_crop, window_times
from cogpipe.workspace import Workspace, read_table

CANNY = "cogpipe.condition:canny"


@pytest.fixture
def setup(tmp_path, sample_videos, tiny_models):
    def make(**overrides) -> PipelineConfig:
        p = dict(frames=9, fps=8, height=64, width=64, shard_size=2, min_psnr=0, device="cpu")
        return PipelineConfig(
            workspace=tmp_path / "ws",
            model=str(tiny_models["cogvideox"]),
            precompute=PrecomputeConfig(**(p | overrides)),
        )

    ws = Workspace(tmp_path / "ws")
    return ws, make, _upstream(ws.root, sample_videos, CAPTIONS)


def test_canny_marks_the_edges_of_a_square():
    frames = np.zeros((2, 32, 32, 3), np.uint8)
    frames[:, 8:24, 8:24] = 200  # a bright square
    edges = condition.canny(frames)
    assert edges.shape == frames.shape and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 2]).all()  # the same in every channel
    assert edges[0, 8:24, 7:9].any() and edges[0, 7:9, 8:24].any()  # on the border
    assert not edges[0, 12:20, 12:20].any() and not edges[0, :4].any()  # not inside or away
    assert condition.canny(frames, blur=0)[0, 8:24, 7:9].any()  # unblurred too
    with pytest.raises(condition.ConditionError, match="blur must be odd"):
        condition.canny(frames, blur=4)


def test_condition_paths_fail_with_the_reason(tmp_path, monkeypatch):
    assert condition.load(CANNY) is condition.canny
    assert condition.load("cogpipe.condition.canny") is condition.canny
    with pytest.raises(condition.ConditionError, match="'nope.refs:f': cannot import nope.refs"):
        condition.load("nope.refs:f")
    with pytest.raises(condition.ConditionError, match="cogpipe.condition has no function edges"):
        condition.load("cogpipe.condition:edges")
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "bad_refs.py").write_text("def half(frames):\n    return frames[:, ::2]\n")
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    error = r"bad_refs:half: must return uint8 \[3, 16, 16, 3\] .* returned uint8 \[3, 8, 16, 3\]"
    with pytest.raises(condition.ConditionError, match=error):
        condition.apply(condition.load("bad_refs:half"), frames, {}, "bad_refs:half")


def _window(plan_row, p: PrecomputeConfig) -> np.ndarray:
    times = window_times(plan_row.start, plan_row.end, p.fps, p.frames)
    return resize_center_crop(read_frames(plan_row.path, times), p.height, p.width)


def test_precompute_stores_the_reference_latents_of_each_sample(setup, tiny_models):
    ws, make, upstream = setup
    plain = precompute.run_precompute(ws, make(), upstream)
    cfg = make(reference=CANNY)
    assert precompute.key_of(cfg, {"filter": "f1", "check": "c1"}) != plain.key
    res = precompute.run_precompute(ws, cfg, upstream)
    # The targets come from the plain run's cache; only the references are encoded.
    assert res.counts == {
        "samples": 4,
        "ok": 3,
        "rejected": 1,
        "shards": 2,
        "encoded_videos": 0,
        "encoded_texts": 0,
        "latents_cache_hits": 3,
        "text_cache_hits": 3,
        "encoded_references": 3,
        "reference_cache_hits": 0,
    }
    index = read_table(Path(res.path) / "index.parquet")
    assert list(index.reference_key.fillna("-")) == [
        "clip1.reference_latents",
        "clip2.reference_latents",
        "clip3.reference_latents",
        "-",
    ]
    assert "reference_key" not in read_table(Path(plain.path) / "index.parquet")
    shard, plain_shard = (load_file(Path(r.path) / precompute.shard_name(0)) for r in (res, plain))
    references = ["clip1.reference_latents", "clip2.reference_latents"]
    assert sorted(shard) == sorted([*plain_shard, *references])
    assert torch.equal(shard["clip1.latents"], plain_shard["clip1.latents"])

    # The reference is the VAE latents of canny(the sample's frames), with its own noise seed.
    clips = read_table(Path(upstream["check"].path) / "clips.parquet").set_index("clip_id")
    row = clips.loc["clip1"]
    frames = _window(row, cfg.precompute)
    vae = cogvideox.load_vae(str(tiny_models["cogvideox"]), "cpu", torch.float32)
    seed_row = SimpleNamespace(video_id=row.video_id, start=row.start, end=row.end)
    expected = cogvideox.encode_video(
        vae, torch.from_numpy(condition.canny(frames)[None]), [precompute._reference_seed(seed_row)]
    )[0]
    assert shard["clip1.reference_latents"].shape == (3, 4, 8, 8)
    # Batched with clip2 in the shard: float noise of sharp edge images, far under any real change.
    torch.testing.assert_close(shard["clip1.reference_latents"], expected, atol=1e-3, rtol=0)
    assert not torch.allclose(shard["clip1.reference_latents"], shard["clip1.latents"])

    # Other options (thresholds no edge reaches): a new key and new references, the same targets.
    again = precompute.run_precompute(
        ws, make(reference=CANNY, reference_options={"low": 5000, "high": 9000}), upstream
    )
    assert again.key != res.key
    assert (again.counts["encoded_videos"], again.counts["encoded_references"]) == (0, 3)
    other = load_file(Path(again.path) / precompute.shard_name(0))
    assert not torch.equal(other["clip1.reference_latents"], shard["clip1.reference_latents"])


def test_a_plugged_in_condition_is_keyed_by_its_source(setup, tmp_path, monkeypatch):
    ws, make, upstream = setup
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "my_refs.py"
    module.write_text("def invert(frames):\n    return 255 - frames\n")
    cfg = make(reference="my_refs:invert")
    first = precompute.key_of(cfg, {"filter": "f1", "check": "c1"})
    res = precompute.run_precompute(ws, cfg, upstream)
    assert res.key == first and res.counts["encoded_references"] == 3
    module.write_text(
        textwrap.dedent("""\
        def invert(frames):
            return (255 - frames) // 2
    """)
    )
    assert precompute.key_of(cfg, {"filter": "f1", "check": "c1"}) != first


def test_a_failing_condition_stops_precompute_naming_the_function_and_clip(
    setup, tmp_path, monkeypatch
):
    ws, make, upstream = setup
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_refs.py").write_text("def boom(frames):\n    raise RuntimeError('no')\n")
    cfg = make(reference="broken_refs:boom")
    error = r"precompute.reference broken_refs:boom failed on clip clip1: RuntimeError: no"
    with pytest.raises(condition.ConditionError, match=error):
        precompute.run_precompute(ws, cfg, upstream)
    out = ws.stage_dir("precompute", precompute.key_of(cfg, {"filter": "f1", "check": "c1"}))
    assert not list(out.glob("shard-*"))


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_ic_lora_trains_from_precompute_and_validates_with_the_references(setup, tiny_models):
    ws, make, upstream = setup
    cfg = make(reference=CANNY)
    pre = precompute.run_precompute(ws, cfg, upstream)
    prompts = ["a slap", "a block"]
    evaluate = EvaluateConfig(**tiny_sampling(prompts=prompts, seeds=[1], clip_model="unused"))
    steps = dict(max_steps=2, checkpoint_every=2, batch_size=2, validation_every=2)
    t = TrainConfig(**tiny_train(mode="ic-lora", gradient_checkpointing="selective", **steps))
    res = train.run_train(
        ws, cfg.model_copy(update={"train": t, "evaluate": evaluate}), {"precompute": pre}
    )
    assert res.counts == {"steps": 2, "checkpoints": 1, "samples": 3, "validations": 1}
    folder = validation.folder_of(Path(res.path), 2)
    assert sorted(p.name for p in folder.iterdir()) == [
        "p00-reference.mp4",
        "p00-s1.mp4",
        "p01-reference.mp4",
        "p01-s1.mp4",
    ]
    videos = {p.name: _decode(p) for p in folder.iterdir()}
    assert all(v.shape == (9, 64, 64, 3) for v in videos.values())
    assert np.abs(videos["p00-reference.mp4"].astype(int) - videos["p01-reference.mp4"]).mean() > 1


def test_with_reference_feeds_the_reference_and_returns_the_target(tiny_models):
    transformer = cogvideox.load_transformer(str(tiny_models["cogvideox"]), "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    reference, x = torch.randn(1, 3, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    inputs = dict(
        encoder_hidden_states=torch.randn(2, 16, 32, generator=g),
        timestep=torch.tensor([500, 500]),
        return_dict=False,
    )
    wrapped = validation.with_reference(transformer, reference)
    assert wrapped.config is transformer.config and wrapped.device == transformer.device
    with torch.no_grad():
        got = wrapped(hidden_states=x, image_rotary_emb=None, **inputs)[0]
        full = transformer(
            hidden_states=torch.cat([reference.expand(2, -1, -1, -1, -1), x], 1), **inputs
        )[0]
    assert got.shape == x.shape
    assert torch.equal(got, full[:, 3:])
