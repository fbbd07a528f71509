"""Precompute on the tiny CogVideoX: shards, index, rejections, resume, per-item caches,
resolution buckets, batched encoding and the decode-back spot check.

The upstream tables (check's clips.parquet, filter's curated.parquet) are written by the
test from the sample videos, so only precompute runs here. The tiny random VAE does not
reconstruct, so its spot check is only recorded (min_psnr 0); the check itself is tested
with `LosslessVAE`, a stand-in whose decode(encode(x)) is x.
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_train
from safetensors.torch import load_file

from cogpipe import precompute
from cogpipe.config import PipelineConfig, PrecomputeConfig
from cogpipe.video import probe_video, read_frames, write_mp4
from cogpipe.workspace import ShardsIncomplete, StageResult, Workspace, read_table, write_table

CAPTIONS = [
    "A red circle moves left across a green background.",
    "A blue rectangle slides up and a yellow square drifts down.",
    "An orange circle and a purple rectangle bounce on a grey background.",
    "A pink ball rolls right over a cyan and brown gradient.",
    "The shapes change direction, speed and size over time.",
]


def _upstream(root: Path, videos: dict[str, Path], captions: list[str], name: str = "f1") -> dict:
    """check/ and filter/ outputs: clip1..4 whole shapes_01..04, clip5 0.5 s of shapes_05,
    clip6 a heldout copy of clip1; clip4's caption is not selected."""
    rows = []
    for i in range(1, 6):
        path = videos[f"shapes_{i:02d}.mp4"]
        info, _ = probe_video(path)
        end = 0.5 if i == 5 else info["duration"]  # a 9-frame window at 8 fps needs 1 s
        rows.append(
            {
                "clip_id": f"clip{i}",
                "video_id": f"video{i}",
                "path": str(path),
                "start": 0.0,
                "end": end,
                "fps": info["fps"],
                "width": info["width"],
                "height": info["height"],
                "split": "train",
                "keep": True,
                "reasons": "",
            }
        )
    rows.append(rows[0] | {"clip_id": "clip6", "split": "heldout"})
    check, filt = root / "check" / "c1", root / "filter" / name
    write_table(check / "clips.parquet", pd.DataFrame(rows))
    curated = pd.DataFrame(
        {
            "clip_id": [f"clip{i}" for i in range(1, 7)],
            "caption": captions + captions[:1],
            "score": 1.0,
            "selected": [True, True, True, False, True, True],
            "reasons": ["", "", "", "too few words (3 < 5)", "", ""],
        }
    )
    write_table(filt / "curated.parquet", curated)
    return {
        "check": StageResult("check", "c1", str(check)),
        "filter": StageResult("filter", name, str(filt)),
    }


@pytest.fixture
def setup(tmp_path, sample_videos, tiny_models):
    def make(**overrides) -> PipelineConfig:
        p = dict(frames=9, fps=8, height=64, width=64, shard_size=2, min_psnr=0, device="cpu")
        p |= overrides
        return PipelineConfig(
            workspace=tmp_path / "ws",
            model=str(tiny_models["cogvideox"]),
            precompute=PrecomputeConfig(**p),
        )

    ws = Workspace(tmp_path / "ws")
    return ws, make, _upstream(ws.root, sample_videos, CAPTIONS)


def _shard(result, i: int) -> dict[str, torch.Tensor]:
    return load_file(Path(result.path) / precompute.shard_name(i))


def test_shards_index_and_rejections(setup):
    ws, make, upstream = setup
    res = precompute.run_precompute(ws, make(), upstream)
    out = Path(res.path)
    assert sorted(p.name for p in out.iterdir()) == [
        "_SUCCESS.json",
        "index.parquet",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    index = read_table(out / "index.parquet")
    # clip4 is not selected by the filter and clip6 is heldout: neither is a sample.
    assert list(index.clip_id) == ["clip1", "clip2", "clip3", "clip5"]
    assert list(index.status) == ["ok", "ok", "ok", "rejected"]
    assert index.reason[3] == "too short for 9 frames at 8 fps: 0.50 s (needs 1.00 s)"
    assert list(index.shard.fillna("-")) == [precompute.shard_name(0)] * 2 + [
        precompute.shard_name(1),
        "-",
    ]
    assert list(index.latents_key.fillna("-")) == [
        "clip1.latents",
        "clip2.latents",
        "clip3.latents",
        "-",
    ]
    buckets = index[["frames", "height", "width", "latent_frames"]].drop_duplicates()
    assert buckets.values.tolist() == [[9, 64, 64, 3]]
    # One spot check per shard, on its first clip encoded; the tiny random VAE scores low.
    assert list(index.psnr.notna()) == [True, False, True, False]
    assert res.stats["spot_checks"] == {
        "shard-00000.safetensors": {"clip_id": "clip1", "psnr": pytest.approx(9.188, abs=0.01)},
        "shard-00001.safetensors": {"clip_id": "clip3", "psnr": pytest.approx(12.234, abs=0.01)},
    }
    assert res.stats["buckets"] == {"64x64": 3}
    shard = _shard(res, 0)
    assert sorted(shard) == [
        "clip1.latents",
        "clip1.prompt_embeds",
        "clip2.latents",
        "clip2.prompt_embeds",
    ]
    assert shard["clip1.latents"].shape == (3, 4, 8, 8)  # [F', C, H/8, W/8] for 9 x 64 x 64
    assert shard["clip1.prompt_embeds"].shape == (16, 32)  # [max_text_seq_length, d_model]
    assert shard["clip1.latents"].dtype == torch.float32  # CPU keeps fp32
    assert res.counts == {
        "samples": 4,
        "ok": 3,
        "rejected": 1,
        "shards": 2,
        "encoded_videos": 3,
        "encoded_texts": 3,
        "latents_cache_hits": 0,
        "text_cache_hits": 0,
    }
    assert res.stats["rejections"] == {"too short for 9 frames at 8 fps": 1}
    # Seeded sample from the latent distribution: a number, not only a shape.
    assert shard["clip1.latents"].double().mean().item() == pytest.approx(0.07352, abs=1e-4)


def test_new_key_reuses_caches_and_an_edited_caption_re_encodes_only_itself(
    setup, sample_videos, monkeypatch
):
    from cogpipe.models import cogvideox

    ws, make, upstream = setup
    first = precompute.run_precompute(ws, make(), upstream)

    def must_not_load(*args, **kwargs):
        raise AssertionError("no encoder may load when everything is cached")

    monkeypatch.setattr(cogvideox, "load_vae", must_not_load)
    monkeypatch.setattr(cogvideox, "load_text_encoder", must_not_load)
    second = precompute.run_precompute(ws, make(shard_size=3), upstream)
    assert second.key != first.key
    assert second.counts["encoded_videos"] == 0 and second.counts["encoded_texts"] == 0
    assert second.counts["latents_cache_hits"] == 3 and second.counts["text_cache_hits"] == 3
    assert torch.equal(_shard(first, 1)["clip3.latents"], _shard(second, 0)["clip3.latents"])

    monkeypatch.undo()
    edited = list(CAPTIONS)
    edited[1] = "The referee watches closely and steps in after the strike."  # clip2's caption
    third = precompute.run_precompute(ws, make(), _upstream(ws.root, sample_videos, edited, "f2"))
    assert third.counts["encoded_videos"] == 0 and third.counts["encoded_texts"] == 1
    old, new = _shard(first, 0), _shard(third, 0)
    assert torch.equal(old["clip1.prompt_embeds"], new["clip1.prompt_embeds"])
    assert not torch.equal(old["clip2.prompt_embeds"], new["clip2.prompt_embeds"])


def test_restart_skips_committed_shards(setup):
    ws, make, upstream = setup
    cfg = make(shard_size=1)

    def crash(done, total, note):
        if done == 2:
            raise KeyboardInterrupt("killed after two shards")

    with pytest.raises(KeyboardInterrupt):
        precompute.run_precompute(ws, cfg, upstream, crash)
    out = ws.stage_dir("precompute", precompute.key_of(cfg, {"filter": "f1", "check": "c1"}))
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert sorted(committed) == [precompute.shard_name(0), precompute.shard_name(1)]
    assert not (out / "_SUCCESS.json").exists()

    res = precompute.run_precompute(ws, cfg, upstream)
    assert {name: (out / name).stat().st_mtime_ns for name in committed} == committed
    assert res.counts["shards"] == 3 and res.counts["ok"] == 3
    assert res.counts["latents_cache_hits"] == 0 and res.counts["encoded_videos"] == 1
    assert precompute.run_precompute(ws, cfg, upstream).reused


def test_parts_split_the_shards_and_the_last_run_only_indexes(setup):
    """precompute.workers: part k of N encodes shards k, k+N, ... (one GPU worker's run),
    commits them and writes no index; the final run finds every shard and only indexes."""
    ws, make, upstream = setup
    cfg = make(shard_size=1, workers=2)
    out = ws.stage_dir("precompute", precompute.key_of(cfg, {"filter": "f1", "check": "c1"}))

    assert precompute.run_precompute(ws, cfg, upstream, part=1) is None
    assert sorted(p.name for p in out.glob("shard-*")) == [precompute.shard_name(1)]
    assert not (out / "index.parquet").exists() and not (out / "_SUCCESS.json").exists()
    # A merge-only run (a GPU pipeline's, on its CPU worker) refuses while a shard is undone.
    missing = f"{precompute.shard_name(0)}, {precompute.shard_name(2)}"
    with pytest.raises(ShardsIncomplete, match=f"2 of 3 shards are not committed \\({missing}\\)"):
        precompute.run_precompute(ws, cfg, upstream, merge_only=True)
    assert precompute.run_precompute(ws, cfg, upstream, part=0) is None
    names = [precompute.shard_name(i) for i in range(3)]
    assert sorted(p.name for p in out.glob("shard-*")) == names
    committed = {n: (out / n).stat().st_mtime_ns for n in names}

    res = precompute.run_precompute(ws, cfg, upstream, merge_only=True)
    assert res.counts["shards"] == 3 and res.counts["ok"] == 3
    assert res.counts["encoded_videos"] == 0  # the parts encoded everything
    assert {n: (out / n).stat().st_mtime_ns for n in names} == committed
    # Equal to one run over everything: the split changes no byte of the output.
    whole = precompute.run_precompute(ws, make(shard_size=1), upstream)
    assert whole.key == res.key and whole.reused
    with pytest.raises(precompute.ConfigError, match="part 2 is not in"):
        precompute.run_precompute(Workspace(ws.root / "other"), cfg, upstream, part=2)


def test_undecodable_clip_is_a_rejected_row(setup, tmp_path):
    ws, make, upstream = setup
    clips_path = Path(upstream["check"].path) / "clips.parquet"
    clips = read_table(clips_path)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(Path(clips.path[1]).read_bytes()[:2000])  # the header, no frames
    clips.loc[1, "path"], clips.loc[1, "video_id"] = str(broken), "broken"
    write_table(clips_path, clips)
    res = precompute.run_precompute(ws, make(), upstream)
    index = read_table(Path(res.path) / "index.parquet").set_index("clip_id")
    assert index.loc["clip2", "status"] == "rejected"
    assert index.loc["clip2", "reason"].startswith("decode failed: ")
    assert index.loc["clip1", "status"] == "ok" and pd.isna(index.loc["clip2", "shard"])
    assert sorted(_shard(res, 0)) == ["clip1.latents", "clip1.prompt_embeds"]


def test_train_reads_what_precompute_writes(setup):
    from cogpipe import train
    from cogpipe.config import TrainConfig

    ws, make, upstream = setup
    pre = precompute.run_precompute(ws, make(), upstream)
    steps = dict(max_steps=2, checkpoint_every=2, batch_size=2)
    train_cfg = TrainConfig(**tiny_train(alpha=4, gradient_checkpointing="selective", **steps))
    res = train.run_train(ws, make().model_copy(update={"train": train_cfg}), {"precompute": pre})
    assert res.counts == {"steps": 2, "checkpoints": 1, "samples": 3}
    assert (Path(res.path) / "checkpoint-000002" / "pytorch_lora_weights.safetensors").is_file()


def test_nearest_bucket_by_aspect_ratio():
    buckets = [(480, 720), (720, 480), (480, 480)]
    assert precompute.nearest_bucket(1920, 1080, buckets) == (480, 720)  # 16:9 -> 3:2
    assert precompute.nearest_bucket(1080, 1920, buckets) == (720, 480)  # 9:16 -> 2:3
    assert precompute.nearest_bucket(500, 490, buckets) == (480, 480)
    # In log(w/h), 1:1 is as far from 2:1 as from 1:2: the earlier bucket wins.
    assert precompute.nearest_bucket(100, 100, [(256, 512), (512, 256)]) == (256, 512)
    assert precompute.nearest_bucket(100, 100, [(512, 256), (256, 512)]) == (512, 256)


def test_portrait_clip_goes_to_a_portrait_bucket(setup, tmp_path):
    ws, make, upstream = setup
    clips_path = Path(upstream["check"].path) / "clips.parquet"
    clips = read_table(clips_path)
    landscape = read_frames(clips.path[2], [i / 8 for i in range(24)])  # [24, 96, 128, 3]
    portrait = write_mp4(tmp_path / "portrait.mp4", landscape.transpose(0, 2, 1, 3), 8)
    clips.loc[2, ["path", "video_id", "width", "height"]] = [str(portrait), "portrait", 96, 128]
    write_table(clips_path, clips)
    cfg = make(buckets=[(64, 96), (96, 64)], shard_size=3)  # 1:1, 3:2 and 2:3; clips are 4:3
    res = precompute.run_precompute(ws, cfg, upstream)
    index = read_table(Path(res.path) / "index.parquet").set_index("clip_id")
    assert index.loc[["clip1", "clip2", "clip3"], ["height", "width"]].values.tolist() == [
        [64, 96],
        [64, 96],
        [96, 64],
    ]
    shard = _shard(res, 0)  # one shard, two buckets
    assert shard["clip1.latents"].shape == (3, 4, 8, 12)  # [F', C, H/8, W/8]
    assert shard["clip3.latents"].shape == (3, 4, 12, 8)
    assert res.stats["buckets"] == {"64x96": 2, "96x64": 1}


def test_batched_encode_equals_one_at_a_time(setup, tmp_path, monkeypatch):
    from cogpipe.models import cogvideox

    ws, make, upstream = setup
    encode, calls = cogvideox.encode_video, []

    def counted(vae, frames, generators):
        calls.append(len(frames))
        return encode(vae, frames, generators)

    monkeypatch.setattr(cogvideox, "encode_video", counted)
    latents = {}
    for name, settings in [
        ("b1", {"batch_size": 1}),
        ("b3", {"batch_size": 3}),
        ("b3-sliced", {"batch_size": 3, "vae_slicing": True}),
    ]:
        calls.clear()
        cfg = make(shard_size=3, **settings)  # one shard: clip1, clip2, clip3
        res = precompute.run_precompute(Workspace(tmp_path / name), cfg, upstream)
        latents[name] = _shard(res, 0)
        assert calls == ([1, 1, 1] if name == "b1" else [3])
    for clip in ("clip1", "clip2", "clip3"):
        one = latents["b1"][f"{clip}.latents"]
        for name in ("b3", "b3-sliced"):
            torch.testing.assert_close(latents[name][f"{clip}.latents"], one, atol=1e-5, rtol=1e-5)


def test_psnr_of_known_arrays():
    black = np.zeros((2, 4, 4, 3), np.uint8)
    assert precompute.psnr(black, black) == math.inf
    assert precompute.psnr(black, black + 1) == pytest.approx(48.13, abs=0.01)  # 20 log10(255)
    assert precompute.psnr(black, np.full_like(black, 255)) == pytest.approx(0.0)
    half = black.copy()
    half[0] = 255  # half the pixels off by 255: 10 log10(2)
    assert precompute.psnr(black, half) == pytest.approx(3.01, abs=0.01)
    assert math.isnan(precompute.psnr(black, np.full(black.shape, np.nan)))


class LosslessVAE:
    """A VAE stand-in whose decode(encode(x)) is x: each block of 4 frames x 8 x 8 pixels
    becomes the channels of one latent (the first frame alone, repeated, as the causal
    CogVideoX VAE keeps it), with std 0, in the real VAE's shapes and scaling."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=1.15258426)

    def encode(self, x):  # [B, 3, 4k+1, H, W] -> mean [B, 3*4*8*8, k+1, H/8, W/8]
        x = torch.cat([x[:, :, :1].expand(-1, -1, 3, -1, -1), x], dim=2)
        b, c, f, h, w = x.shape
        z = x.reshape(b, c, f // 4, 4, h // 8, 8, w // 8, 8).permute(0, 1, 3, 5, 7, 2, 4, 6)
        mean = z.reshape(b, c * 256, f // 4, h // 8, w // 8)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))

    def decode(self, z):  # the inverse, without the first frame's repeats
        b, _, f, h, w = z.shape
        x = z.reshape(b, 3, 4, 8, 8, f, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return SimpleNamespace(sample=x.reshape(b, 3, f * 4, h * 8, w * 8)[:, :, 3:])


@pytest.mark.parametrize(
    "mistake",
    [
        lambda latents: latents * 0.18215 / 1.15258426,  # Stable Diffusion's scaling factor
        lambda latents: torch.full_like(latents, math.nan),  # fp16 overflow
    ],
    ids=["scaling", "nan"],
)
def test_spot_check_stops_the_shard_whose_latents_do_not_decode_back(setup, monkeypatch, mistake):
    from cogpipe.models import cogvideox

    ws, make, upstream = setup
    # min_psnr: the default. Clip1 and clip2 in shard 0 (one encode call), clip3 in shard 1.
    cfg = make(min_psnr=20, batch_size=4)
    encode, calls = cogvideox.encode_video, []

    def wrong_in_shard_1(vae, frames, generators):
        calls.append(len(frames))
        latents = encode(vae, frames, generators)
        return mistake(latents) if len(calls) == 2 else latents

    monkeypatch.setattr(cogvideox, "load_vae", lambda *args: LosslessVAE())
    monkeypatch.setattr(cogvideox, "encode_video", wrong_in_shard_1)
    with pytest.raises(precompute.SpotCheckError) as failure:
        precompute.run_precompute(ws, cfg, upstream)
    assert str(failure.value).startswith(
        "decode-back spot check failed in shard-00001.safetensors: clip clip3 decodes to "
    )
    assert "under min_psnr 20 dB" in str(failure.value) and "scaling" in str(failure.value)
    out = ws.stage_dir("precompute", precompute.key_of(cfg, {"filter": "f1", "check": "c1"}))
    assert sorted(p.name for p in out.iterdir()) == [precompute.shard_name(0)]
    assert len(list(ws.cache_dir("latents").rglob("*.safetensors"))) == 2  # not clip3's

    monkeypatch.setattr(cogvideox, "encode_video", encode)
    res = precompute.run_precompute(ws, cfg, upstream)
    assert res.counts["encoded_videos"] == 1  # clip3 only: shard 0 was committed
    checks = res.stats["spot_checks"]
    assert [c["clip_id"] for c in checks.values()] == ["clip1", "clip3"]
    assert all(c["psnr"] > 100 for c in checks.values())  # lossless up to float rounding


@pytest.mark.gpu
def test_gpu_encodes_in_the_weight_dtype(setup, tmp_path, sample_videos):
    ws, make, upstream = setup
    cpu = _shard(precompute.run_precompute(ws, make(), upstream), 0)
    ws_gpu = Workspace(tmp_path / "ws-gpu")  # fresh caches: everything is encoded on the GPU
    upstream_gpu = _upstream(ws_gpu.root, sample_videos, CAPTIONS)
    res = precompute.run_precompute(ws_gpu, make(device="cuda"), upstream_gpu)
    gpu = _shard(res, 0)
    assert res.counts["encoded_videos"] == 3
    assert gpu["clip1.latents"].dtype == torch.float16  # the tiny model is 2B-type: fp16 on GPU
    assert gpu["clip1.latents"].shape == (3, 4, 8, 8)
    # The same sample noise on every device: only fp16 rounding differs.
    torch.testing.assert_close(
        gpu["clip1.latents"].float(), cpu["clip1.latents"], atol=0.05, rtol=0.05
    )


def _latents(out: Path) -> dict[str, torch.Tensor]:
    """Every latents tensor of every shard in `out`, by tensor name."""
    shards = [load_file(p) for p in sorted(out.glob("shard-*.safetensors"))]
    return {k: v for shard in shards for k, v in shard.items() if k.endswith(".latents")}


def _one_run(tmp_path: Path, sample_videos, cfg: PipelineConfig) -> Path:
    """The output folder of an uninterrupted run on a workspace of its own."""
    ws = Workspace(tmp_path / "reference")
    return Path(
        precompute.run_precompute(ws, cfg, _upstream(ws.root, sample_videos, CAPTIONS)).path
    )


def test_a_shard_committed_meanwhile_is_skipped_with_its_frames(
    setup, tmp_path, sample_videos, monkeypatch
):
    """Issue 19: another process commits shard 1 after this run planned its work; the run
    skips it, and shard 2 is still encoded from clip3's own frames (it used to get
    clip2's: the skipped shard's frames stayed in the decoder's queue)."""
    ws, make, upstream = setup
    cfg = make(shard_size=1)  # clip1, clip2, clip3: a shard each
    reference = _one_run(tmp_path, sample_videos, cfg)
    out = ws.stage_dir("precompute", reference.name)
    encode_texts = precompute._encode_texts

    def then_another_process_commits_shard_1(*args, **kwargs):
        encoded = encode_texts(*args, **kwargs)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(reference / precompute.shard_name(1), out / precompute.shard_name(1))
        return encoded

    monkeypatch.setattr(precompute, "_encode_texts", then_another_process_commits_shard_1)
    res = precompute.run_precompute(ws, cfg, upstream)
    assert res.counts["encoded_videos"] == 2
    ours, theirs = _latents(out), _latents(reference)
    assert sorted(ours) == ["clip1.latents", "clip2.latents", "clip3.latents"]
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    assert (out / "index.parquet").read_bytes() == (reference / "index.parquet").read_bytes()


@pytest.mark.parametrize("holder_commits", [True, False], ids=["holder-commits", "holder-dies"])
def test_a_shard_another_process_holds_is_left_to_it_then_waited_for(
    setup, tmp_path, sample_videos, monkeypatch, caplog, holder_commits
):
    """The shard's lock held elsewhere: the run encodes the other shards, then waits for
    it (saying for which and who holds it) and takes the holder's commit, or encodes it
    itself when the holder let go without committing (it died)."""
    ws, make, upstream = setup
    cfg = make(shard_size=1)
    reference = _one_run(tmp_path, sample_videos, cfg)
    out, name = ws.stage_dir("precompute", reference.name), precompute.shard_name(1)
    holder = ExitStack()
    holder.enter_context(ws.hold(f"precompute-{reference.name}-shard-00001"))
    waits, waiting = [], precompute._waiting

    def holder_lets_go(what):
        def on_wait(description):
            waiting(what)(description)
            waits.append((what, sorted(p.name for p in out.glob("shard-*"))))
            if holder_commits:
                shutil.copy2(reference / name, out / name)
            holder.close()

        return on_wait

    monkeypatch.setattr(precompute, "_waiting", holder_lets_go)
    with caplog.at_level("WARNING", logger="cogpipe.precompute"):
        res = precompute.run_precompute(ws, cfg, upstream)
    # It waited once, for shard 1, once shards 0 and 2 were committed.
    assert waits == [(f"{reference.name}/{name}", [precompute.shard_name(i) for i in (0, 2)])]
    assert f"precompute: waiting for {reference.name}/{name}, held by pid {os.getpid()}" in (
        caplog.text
    )
    assert res.counts["encoded_videos"] == (2 if holder_commits else 3)
    ours, theirs = _latents(out), _latents(reference)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    for i in range(3):
        shard = precompute.shard_name(i)
        assert (out / shard).read_bytes() == (reference / shard).read_bytes()


def test_a_run_that_waited_for_the_index_finds_it_written(setup, monkeypatch):
    """Two runs of one key reach the index at once: the second waits for the first's lock,
    then returns its result and writes nothing."""
    ws, make, upstream = setup
    cfg = make()
    key = precompute.key_of(cfg, {"filter": "f1", "check": "c1"})
    first, waiting = {}, precompute._waiting
    lock = ExitStack()
    lock.enter_context(ws.hold(f"precompute-{key}-index"))

    def the_other_run_indexes(what):
        def on_wait(description):
            waiting(what)(description)
            lock.close()
            first["result"] = precompute.run_precompute(ws, cfg, upstream)  # the other run
            first["index"] = (ws.stage_dir("precompute", key) / "index.parquet").stat()

        return on_wait

    monkeypatch.setattr(precompute, "_waiting", the_other_run_indexes)
    res = precompute.run_precompute(ws, cfg, upstream)
    assert res.reused and not first["result"].reused
    assert res.counts == first["result"].counts
    index = Path(res.path) / "index.parquet"
    assert index.stat().st_mtime_ns == first["index"].st_mtime_ns
