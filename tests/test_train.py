"""Training on the tiny CogVideoX: exact resume, LoRA export at the right scale, NaN stops,
one process per run folder, clear errors for a full disk or an absurd learning rate, and
no training process outliving the one that launched it.

The precompute output is written by the test (seeded random latents and embeddings in
the real shard and index format), so pinned losses do not depend on video decoding.
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import fake_precompute, tiny_run_config, tiny_train
from safetensors.torch import load_file, save_file

from cogpipe import errors, train
from cogpipe.config import PipelineConfig, TrainConfig
from cogpipe.workspace import Workspace

LORA = "pytorch_lora_weights.safetensors"
REPO = Path(__file__).resolve().parents[1]
TRAIN = tiny_train(learning_rate=1e-3, max_steps=6, checkpoint_every=3, batch_size=2)


@pytest.fixture
def setup(tmp_path, tiny_models):
    ws = Workspace(tmp_path / "ws")
    # 5 samples, 2 to a shard, and one rejected row
    pre = fake_precompute(tmp_path / "ws" / "precompute" / "p1", 5, shard_size=2, rejected=True)
    upstream = {"precompute": pre}

    def make(name: str | None = None, **overrides) -> PipelineConfig:
        return tiny_run_config(ws.root, tiny_models["cogvideox"], name, **TRAIN | overrides)

    return ws, make, upstream


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]


def _stop_at(step_to_stop: int):
    def progress(step, total, note):
        if step == step_to_stop:
            raise KeyboardInterrupt(f"killed at step {step}")

    return progress


def test_resumed_run_matches_an_uninterrupted_one(setup):
    ws, make, upstream = setup
    full = train.run_train(ws, make("full"), upstream)
    run = Path(full.path)
    assert sorted(p.name for p in run.iterdir()) == [
        "_SUCCESS.json",
        "checkpoint-000003",
        "checkpoint-000006",
        "logs",
        "losses.jsonl",
        "run.json",
    ]
    assert sorted(p.name for p in (run / "checkpoint-000006").iterdir()) == [
        "pytorch_lora_weights.safetensors",
        "state.json",
        "training_state.pt",
    ]
    assert full.counts == {"steps": 6, "checkpoints": 2, "samples": 5}
    expected = _losses(run)
    assert [e["step"] for e in expected] == [1, 2, 3, 4, 5, 6]
    # Seeded tiny run: a change in noise schedule, loss weighting, data order, LoRA init
    # or optimizer moves these numbers.
    assert expected[0]["loss"] == pytest.approx(1.436415, rel=1e-5)
    assert expected[0]["grad_norm"] == pytest.approx(0.151725, rel=1e-4)
    assert expected[5]["loss"] == pytest.approx(1.466864, rel=1e-5)

    # Killed after step 3 (just checkpointed) or 5 (steps 4-5 are redone): both resume at 3.
    for killed_at in (3, 5):
        cfg = make(f"resumed-{killed_at}")
        with pytest.raises(KeyboardInterrupt):
            train.run_train(ws, cfg, upstream, _stop_at(killed_at))
        resumed_dir = train.output_dir(ws, cfg, train.key_of(cfg, {"precompute": "p1"}))
        assert len(_losses(resumed_dir)) == killed_at
        assert not (resumed_dir / "checkpoint-000006").exists()
        resumed = train.run_train(ws, cfg, upstream)
        assert resumed.stats["resumed_from_step"] == 3
        got = _losses(Path(resumed.path))
        assert [g["step"] for g in got] == [1, 2, 3, 4, 5, 6]
        assert [g["loss"] for g in got] == [e["loss"] for e in expected]
        a = load_file(run / "checkpoint-000006" / "pytorch_lora_weights.safetensors")
        b = load_file(Path(resumed.path) / "checkpoint-000006" / LORA)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # keep_states=2 keeps both states here; the LoRA of every checkpoint is kept regardless.
    assert train.run_train(ws, cfg, upstream).reused


@pytest.mark.parametrize(
    ("mode", "fraction"),
    [("full", 1.0), ("selective", 1.0), ("attention", 1.0), ("selective", 0.5)],
)
def test_checkpointing_recomputes_the_same_numbers(setup, mode, fraction):
    ws, make, upstream = setup
    off = _losses(Path(train.run_train(ws, make("off"), upstream).path))
    cfg = make(f"{mode}-{fraction}", gradient_checkpointing=mode, checkpointed_blocks=fraction)
    got = _losses(Path(train.run_train(ws, cfg, upstream).path))
    assert [g["loss"] for g in got] == pytest.approx([e["loss"] for e in off], rel=1e-6)
    assert [g["grad_norm"] for g in got] == pytest.approx([e["grad_norm"] for e in off], rel=1e-5)


def test_selective_checkpointing_keeps_attention_and_recomputes_the_rest(tiny_models):
    from torch.utils.checkpoint import CheckpointPolicy

    from cogpipe.models import cogvideox, speed

    transformer = cogvideox.load_transformer(str(tiny_models["cogvideox"]), "cpu", torch.float32)
    names = list(transformer.state_dict())
    base = type(transformer.transformer_blocks[0])
    assert speed.set_checkpointing(transformer, "selective", 0.5) == 1
    kinds = [type(b) for b in transformer.transformer_blocks]
    assert issubclass(kinds[0], base) and kinds[0] is not base and kinds[1] is base
    assert list(transformer.state_dict()) == names  # a LoRA saves and loads as before
    assert speed.set_checkpointing(transformer, "off") == 0
    assert all(type(b) is base for b in transformer.transformer_blocks)

    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    x, up, down = torch.zeros(5, 8), torch.zeros(8, 32), torch.zeros(32, 8)
    mm = torch.ops.aten.mm.default
    assert speed._policy(False, None, sdpa) is CheckpointPolicy.MUST_SAVE
    assert speed._policy(False, None, mm, x, up) is CheckpointPolicy.PREFER_RECOMPUTE
    assert speed._policy(True, None, mm, torch.zeros(5, 32), down) is CheckpointPolicy.MUST_SAVE
    assert speed._policy(True, None, mm, x, up) is CheckpointPolicy.PREFER_RECOMPUTE
    with pytest.raises(ValueError, match="gradient checkpointing 'some'"):
        speed.set_checkpointing(transformer, "some")


def test_what_each_checkpointing_mode_runs_again(tiny_models):
    from torch.utils._python_dispatch import TorchDispatchMode

    from cogpipe.models import cogvideox, speed

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.attention = self.matmuls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.attention += func in speed._attention_ops()
            self.matmuls += func in speed._matmul_ops()
            return func(*args, **(kwargs or {}))

    transformer = cogvideox.load_transformer(str(tiny_models["cogvideox"]), "cpu", torch.float32)
    cogvideox.add_lora(transformer, 4, 4, ["to_q", "to_k", "to_v", "to_out.0"])
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8),
        encoder_hidden_states=torch.randn(1, 16, 32),
        timestep=torch.tensor([10]),
        return_dict=False,
    )
    counts = {}
    for mode in ("off", "selective", "attention", "full"):
        speed.set_checkpointing(transformer, mode)
        with Count() as count:
            transformer(**inputs)[0].square().mean().backward()
        counts[mode] = (count.attention, count.matmuls)
    # 2 blocks: only full checkpointing attends again; selective re-runs only widening matmuls
    assert [a for a, _ in counts.values()] == [2, 2, 2, 4]
    off, selective, attention, full = (m for _, m in counts.values())
    assert off < selective < attention == full


def test_validation_videos_leave_the_losses_as_they_were(setup, tiny_models):
    from cogpipe.config import EvaluateConfig

    ws, make, upstream = setup
    plain = _losses(Path(train.run_train(ws, make("plain"), upstream).path))
    evaluate = EvaluateConfig(
        prompts=["a slap"], seeds=[1, 2], steps=2, frames=9, height=64, width=64, device="cpu"
    )
    cfg = make("validated", validation_every=2).model_copy(update={"evaluate": evaluate})
    result = train.run_train(ws, cfg, upstream)
    assert [g["loss"] for g in _losses(Path(result.path))] == [e["loss"] for e in plain]
    videos = sorted(
        p.relative_to(result.path).as_posix() for p in Path(result.path).glob("validation/*/*.mp4")
    )
    assert videos == [
        f"validation/step-00000{s}/p00-s{seed}.mp4" for s in (2, 4, 6) for seed in (1, 2)
    ]
    assert result.counts["validations"] == 3


def test_adamw8bit_needs_a_gpu(setup):
    ws, make, upstream = setup
    with pytest.raises(ValueError, match="adamw8bit needs a CUDA GPU"):
        train.run_train(ws, make(optimizer="adamw8bit"), upstream)


def test_old_boolean_checkpointing_setting_still_loads():
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "full"
    assert TrainConfig(gradient_checkpointing=False).gradient_checkpointing == "off"


def test_batches_are_one_bucket_and_a_pure_function_of_seed_and_epoch():
    buckets = [(64, 64, 3)] * 5 + [(48, 80, 3)] * 3
    batches = train.epoch_batches(buckets, 2, seed=42, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))  # each sample once per epoch
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    assert sorted(map(len, batches)) == [1, 1, 2, 2, 2]  # each bucket's last batch may be short
    assert batches == train.epoch_batches(buckets, 2, seed=42, epoch=0)
    assert batches != train.epoch_batches(buckets, 2, seed=42, epoch=1)
    assert train.micro_batch(buckets, 2, seed=42, m=6) == train.epoch_batches(buckets, 2, 42, 1)[1]


def test_rotary_embeddings_match_the_pipeline():
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    from cogpipe.models import cogvideox

    # A 5B-type config at a small size (the tiny model is 2B-type: no rotary embeddings):
    # 16-dim heads, a sample of 12 x 8 latents (96 x 64 px).
    sizes = dict(attention_head_dim=16, sample_width=12, sample_height=8)
    config = SimpleNamespace(
        use_rotary_positional_embeddings=True, patch_size=2, patch_size_t=None, **sizes
    )
    pipe = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=config))
    expected = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 64, 96, 3, "cpu")
    got = cogvideox.rotary_embeddings(config, 64, 96, 3, "cpu")
    assert got[0].shape == (3 * 4 * 6, 16)  # [F' * h/2 * w/2, head dim]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    no_rope = SimpleNamespace(use_rotary_positional_embeddings=False)
    assert cogvideox.rotary_embeddings(no_rope, 64, 96, 3, "cpu") is None


def test_stage_modules_import_without_torch():
    import subprocess
    import sys

    code = "import sys, cogpipe.train, cogpipe.precompute; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout == "False\n"  # pipeline.py imports every stage: that must stay cheap


def test_only_the_last_states_are_kept(setup):
    ws, make, upstream = setup
    other = dict(
        optimizer="adam", lr_scheduler="constant", batch_size=1, gradient_accumulation_steps=2
    )
    res = train.run_train(ws, make(checkpoint_every=2, keep_states=1, **other), upstream)
    run = Path(res.path)
    ckpts = train.checkpoints(run)
    assert [c.name for c in ckpts] == [f"checkpoint-00000{i}" for i in (2, 4, 6)]
    assert [(c / train.STATE_FILE).exists() for c in ckpts] == [False, False, True]
    assert all((c / "pytorch_lora_weights.safetensors").exists() for c in ckpts)


def test_exported_lora_loads_in_the_pipeline_at_the_right_scale(setup, tiny_models):
    from diffusers import CogVideoXPipeline

    from cogpipe.models import cogvideox

    ws, make, upstream = setup
    res = train.run_train(ws, make(), upstream)
    ckpt = Path(res.path) / "checkpoint-000006"
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        timestep=torch.tensor([500]),
        return_dict=False,
    )

    # The adapted transformer as training sees it: rank 4, alpha 8 (scale 2) from the config.
    trained = cogvideox.load_transformer(str(tiny_models["cogvideox"]), "cpu", torch.float32)
    cogvideox.add_lora(trained, 4, 8, TrainConfig().target_modules)
    cogvideox.load_lora(trained, ckpt)
    pipe = CogVideoXPipeline.from_pretrained(str(tiny_models["cogvideox"]))
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(ckpt))  # no scale given: alpha comes from the file
        loaded = pipe.transformer(**inputs)[0]
        expected = trained(**inputs)[0]
    torch.testing.assert_close(loaded, expected, rtol=1e-6, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-4


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(setup):
    ws, make, upstream = setup
    cfg = make()
    with pytest.raises(KeyboardInterrupt):
        train.run_train(ws, cfg, upstream, _stop_at(3))
    run = train.output_dir(ws, cfg, train.key_of(cfg, {"precompute": "p1"}))
    ckpt = run / "checkpoint-000003"
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}

    for shard in Path(upstream["precompute"].path).glob("shard-*.safetensors"):
        tensors = load_file(shard)
        for name in tensors:
            if name.endswith(".latents"):
                tensors[name].fill_(float("nan"))
        save_file(tensors, str(shard))

    error = r"loss is nan at step 4 .*last checkpoint: checkpoint-000003"
    with pytest.raises(train.TrainingDiverged, match=error):
        train.run_train(ws, cfg, upstream)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert [c.name for c in train.checkpoints(run)] == ["checkpoint-000003"]
    assert not (run / "_SUCCESS.json").exists()


def test_a_named_run_folder_of_another_key_is_refused(setup):
    ws, make, upstream = setup
    with pytest.raises(KeyboardInterrupt):
        train.run_train(ws, make("mine"), upstream, _stop_at(1))
    error = r"train/mine holds training run \w+ \(run.json\).*pick another `name`"
    with pytest.raises(train.RunFolderTaken, match=error):
        train.run_train(ws, make("mine", learning_rate=2e-3), upstream)


@pytest.mark.gpu
def test_fp16_training_on_gpu_resumes(setup):
    ws, make, upstream = setup
    # auto: fp16 for the 2B-type tiny model, with a grad scaler
    gpu = dict(device="cuda", mixed_precision="auto", gradient_checkpointing=True)
    full = train.run_train(ws, make("gpu-full", **gpu), upstream)
    assert full.stats["weight_dtype"] == "float16" and full.stats["peak_memory_gb"] > 0
    state = torch.load(Path(full.path) / "checkpoint-000006" / train.STATE_FILE, weights_only=True)
    assert state["scaler"] is not None
    cfg = make("gpu-resumed", **gpu)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(ws, cfg, upstream, _stop_at(5))
    resumed = train.run_train(ws, cfg, upstream)
    expected = [e["loss"] for e in _losses(Path(full.path))]
    assert all(map(math.isfinite, expected))
    assert [g["loss"] for g in _losses(Path(resumed.path))] == pytest.approx(expected, rel=1e-4)


@pytest.mark.gpu
def test_compiled_selective_training_on_gpu_matches_eager(setup):
    ws, make, upstream = setup
    fp32 = dict(device="cuda", mixed_precision="no")
    eager = make("gpu-eager", **fp32, compile=False, gradient_checkpointing="off")
    fast = make(
        "gpu-fast",
        **fp32,
        compile=True,
        gradient_checkpointing="selective",
        checkpointed_blocks=0.5,
    )
    expected = _losses(Path(train.run_train(ws, eager, upstream).path))
    got = _losses(Path(train.run_train(ws, fast, upstream).path))
    assert [g["loss"] for g in got] == pytest.approx([e["loss"] for e in expected], rel=1e-4)


@pytest.mark.gpu
def test_adamw8bit_trains_and_resumes_on_gpu(setup):
    pytest.importorskip("bitsandbytes")
    ws, make, upstream = setup
    gpu = dict(device="cuda", optimizer="adamw8bit")
    full = _losses(Path(train.run_train(ws, make("8bit-full", **gpu), upstream).path))
    assert all(math.isfinite(e["loss"]) for e in full)
    cfg = make("8bit-resumed", **gpu)
    with pytest.raises(KeyboardInterrupt):
        train.run_train(ws, cfg, upstream, _stop_at(4))
    resumed = _losses(Path(train.run_train(ws, cfg, upstream).path))
    assert [g["loss"] for g in resumed] == pytest.approx([e["loss"] for e in full], rel=1e-4)


def _wait_until(ready, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


# Trains the config argv[1] (JSON) on the precompute output argv[2], 1 s per step.
SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cogpipe import train
    from cogpipe.config import PipelineConfig
    from cogpipe.workspace import StageResult, Workspace

    cfg = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())
    upstream = {"precompute": StageResult("precompute", "p1", sys.argv[2])}
    train.run_train(Workspace(cfg.workspace), cfg, upstream, lambda *a: time.sleep(1))
    """
)


def test_a_second_run_waits_for_the_first_then_resumes_where_it_died(setup, tmp_path, caplog):
    ws, make, upstream = setup
    expected = _losses(Path(train.run_train(ws, make("alone"), upstream).path))
    cfg = make("shared")
    run = train.output_dir(ws, cfg, train.key_of(cfg, {"precompute": "p1"}))
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SLOW_RUN,
                str(tmp_path / "config.json"),
                upstream["precompute"].path,
            ],
            env=os.environ | {"PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    lock = ws.lock_path("train-shared")

    def holds() -> bool:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        return lock.is_file() and f"pid {first.pid} " in lock.read_text()

    _wait_until(holds, "the first run holds the run folder")
    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(train.run_train, ws, cfg, upstream)
        _wait_until(lambda: "waiting for" in caplog.text, "second waits")
        assert f"train: waiting for {run}, held by pid {first.pid} on " in caplog.text
        assert not second.done()
        lines = run / "losses.jsonl"  # whole lines: the first run may be writing one
        _wait_until(lambda: lines.is_file() and lines.read_text().count("\n") >= 4, "step 4")
        first.kill()  # after checkpoint 3, before checkpoint 6
        assert first.wait(timeout=30) == -signal.SIGKILL
        resumed = second.result(timeout=300)

    assert resumed.stats["resumed_from_step"] == 3
    assert [g["loss"] for g in _losses(run)] == [e["loss"] for e in expected]
    assert [c.name for c in train.checkpoints(run)] == ["checkpoint-000003", "checkpoint-000006"]
    assert not list(run.rglob(".tmp-*"))


def test_a_full_disk_names_the_checkpoint_file_and_the_space_left(setup, monkeypatch):
    ws, make, upstream = setup
    cfg = make("full-disk")
    run = train.output_dir(ws, cfg, train.key_of(cfg, {"precompute": "p1"}))

    def save(*args, **kwargs):  # what torch's zip writer says when the disk fills up
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . unexpected pos 32448 vs 32336"
        )

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(errors, "free_mib", lambda path: 0)
    with pytest.raises(OSError) as raised:
        train.run_train(ws, cfg, upstream)
    state = run / "checkpoint-000003" / train.STATE_FILE
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(state))
    assert errors.describe(raised.value) == f"disk full writing {state} (0 MiB free)"
    assert errors.is_permanent(raised.value)  # Prefect does not retry it
    assert not train.checkpoints(run) and not list(run.rglob(".tmp-*"))
    assert [g["step"] for g in _losses(run)] == [1, 2, 3]  # a run once there is space resumes


def test_an_absurd_learning_rate_fails_naming_the_field(setup):
    ws, make, upstream = setup
    cfg = make("absurd")
    for lr, error in [
        (1e39, r"^train.learning_rate 1e\+39 overflows the optimizer's update at step 1 \("),
        (1e30, r"^loss is nan at step 2 .* Lower train.learning_rate \(now 1e\+30\)"),
    ]:  # past any bound the config sets: the run itself says which field
        bad = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": lr})})
        with pytest.raises(train.TrainingDiverged, match=error):
            train.run_train(ws, bad.model_copy(update={"name": f"lr-{lr:g}"}), upstream)


# Launches two ranks that sleep; prints their pids.
LAUNCHER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import launch_targets
    from cogpipe import distributed

    distributed.launch(launch_targets.fail_on, (-1,), 2)  # no rank fails: both sleep
    """
)


@pytest.mark.serial  # ranks gone within 1 s of a SIGKILL
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_no_rank_outlives_its_launcher(signum):
    import psutil

    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(REPO / "tests")],
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    parent = psutil.Process(launcher.pid)

    def ranks() -> list:
        return [p for p in parent.children() if "--multiprocessing-fork" in p.cmdline()]

    _wait_until(lambda: len(ranks()) == 2, "two ranks")
    pids = [p.pid for p in ranks()]
    time.sleep(1)  # the ranks are past their start-up
    launcher.send_signal(signum)
    launcher.wait(timeout=30)
    gone = time.monotonic()

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    _wait_until(lambda: not any(alive(pid) for pid in pids), "ranks gone", timeout=15)
    if signum == signal.SIGKILL:  # the kernel kills them with it, not a poll seconds later
        assert time.monotonic() - gone < 1.0
