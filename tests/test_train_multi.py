"""Multi-process training on the CPU (gloo): DDP LoRA and FSDP full fine-tune on the tiny
CogVideoX, two processes, against one process with the same global batch.

A step's micro-batches are split over the processes, so a two-process run is the
single-process run (same key, same data, same draws) up to float summation order. The
precompute output is written by the test (seeded random latents in the real format).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fake_precompute, tiny_run_config, tiny_sampling, tiny_train
from safetensors.torch import load_file

from cogpipe import distributed, train
from cogpipe.config import PipelineConfig, TrainConfig
from cogpipe.models import cogvideox
from cogpipe.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

TRAIN = tiny_train(learning_rate=1e-2, lr_scheduler="constant", max_steps=6, checkpoint_every=3)
TRAIN |= dict(batch_size=1, gradient_accumulation_steps=2)  # 2 micro-batches: one per process


@pytest.fixture
def setup(tmp_path, tiny_models):
    ws = Workspace(tmp_path / "ws")
    upstream = {"precompute": fake_precompute(tmp_path / "ws" / "precompute" / "p1")}

    def make(name: str, **overrides) -> PipelineConfig:
        return tiny_run_config(ws.root, tiny_models["cogvideox"], name, **TRAIN | overrides)

    return ws, make, upstream


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    files = sorted((checkpoint / cogvideox.FULL_FOLDER).glob("*.safetensors"))
    return {
        k: v for f in files or [checkpoint / cogvideox.LORA_FILE] for k, v in load_file(f).items()
    }


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("norm_k.bias"):
            # The key norm's bias adds the same q.b to every logit of a query and softmax
            # ignores it: its gradient is float noise, which Adam scales to full-size steps.
            continue
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _kill_rank(rank: int, at_step: int):
    """A progress callback of the launching process that kills one rank with SIGKILL."""

    def progress(step, total, note):
        if step == at_step:
            (proc,) = [
                p
                for p in multiprocessing.active_children()
                if p.name == f"cogpipe-train-rank{rank}"
            ]
            os.kill(proc.pid, signal.SIGKILL)

    return progress


def test_ddp_lora_is_the_single_process_run(setup):
    from cogpipe.config import EvaluateConfig

    ws, make, upstream = setup
    one = make("one")
    two = make("two", num_processes=2)  # strategy auto: ddp for a LoRA
    assert train.key_of(one, {"precompute": "p1"}) == train.key_of(two, {"precompute": "p1"})
    single = train.run_train(ws, one, upstream)
    # Rank 0 makes validation videos at step 3 while rank 1 waits in the next step.
    evaluate = EvaluateConfig(**tiny_sampling(prompts=["a slap"]))
    two = make("two", num_processes=2, validation_every=3).model_copy(update={"evaluate": evaluate})
    ddp = train.run_train(ws, two, upstream)
    videos = sorted(p.relative_to(ddp.path).as_posix() for p in Path(ddp.path).rglob("*.mp4"))
    assert videos == ["validation/step-000003/p00-s42.mp4", "validation/step-000006/p00-s42.mp4"]
    assert (single.stats["strategy"], single.stats["processes"]) == ("single", 1)
    assert (ddp.stats["strategy"], ddp.stats["processes"]) == ("ddp", 2)
    expected, got = _losses(Path(single.path)), _losses(Path(ddp.path))
    assert len(got) == 6 and sum(got[-2:]) < 0.9 * sum(got[:2])  # it learns
    assert got == pytest.approx(expected, rel=1e-5)  # gradients averaged over both ranks
    run = Path(ddp.path)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [p.name for p in Path(single.path).iterdir()] + ["validation"]
    )
    assert sorted(p.name for p in (run / "checkpoint-000006").iterdir()) == [
        "pytorch_lora_weights.safetensors",
        "state.json",
        "training_state.pt",
    ]
    _assert_close(
        _weights(run / "checkpoint-000006"), _weights(Path(single.path) / "checkpoint-000006")
    )
    state = torch.load(run / "checkpoint-000006" / train.STATE_FILE, weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["micro_batch"] == 12  # 6 steps x 2


@pytest.mark.slow
def test_fsdp_full_fine_tune_resumes_after_a_rank_is_killed(setup):
    ws, make, upstream = setup
    full = dict(mode="full", learning_rate=1e-3)
    single = train.run_train(ws, make("one", **full), upstream)
    # sharded, and every block recomputed in backward (the default selective policy)
    cfg = make("fsdp", **full, num_processes=2, gradient_checkpointing="selective")
    error = r"train rank 1 of 2 failed: killed by signal SIGKILL"
    with pytest.raises(distributed.RankFailed, match=error):
        train.run_train(ws, cfg, upstream, _kill_rank(1, at_step=4))
    run = train.output_dir(ws, cfg, train.key_of(cfg, {"precompute": "p1"}))
    assert [c.name for c in train.checkpoints(run)] == ["checkpoint-000003"]
    assert not (run / "_SUCCESS.json").exists()

    resumed = train.run_train(ws, cfg, upstream)
    assert resumed.stats["resumed_from_step"] == 3
    assert (resumed.stats["strategy"], resumed.stats["processes"]) == ("fsdp", 2)
    assert resumed.stats["trainable_params"] == single.stats["trainable_params"]
    assert _losses(run) == pytest.approx(_losses(Path(single.path)), rel=1e-5)
    ckpt = run / "checkpoint-000006"
    assert sorted(p.name for p in (ckpt / "transformer").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    _assert_close(_weights(ckpt), _weights(Path(single.path) / "checkpoint-000006"))
    # Optimizer states by parameter name, whole: a single process resumes from them too.
    state = torch.load(ckpt / train.STATE_FILE, weights_only=True)
    assert "patch_embed.proj.weight" in state["optimizer"]["state"]
    from diffusers import CogVideoXTransformer3DModel

    loaded = CogVideoXTransformer3DModel.from_pretrained(str(ckpt / "transformer"))
    _assert_close(loaded.state_dict(), _weights(ckpt))


@pytest.mark.gpu
@pytest.mark.parametrize(("mode", "strategy"), [("lora", "ddp"), ("full", "fsdp")])
def test_two_gpus_give_the_one_gpu_run(setup, mode, strategy):
    """NCCL, compiled blocks, selective recomputation and fp16 autocast (with a grad scaler)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ws, make, upstream = setup
    gpu = dict(
        mode=mode,
        device="cuda",
        mixed_precision="auto",
        compile=True,
        gradient_checkpointing="selective",
        learning_rate=1e-3,
    )
    one = train.run_train(ws, make(f"{mode}-one", **gpu), upstream)
    two = train.run_train(ws, make(f"{mode}-two", **gpu, num_processes=2), upstream)
    assert (two.stats["strategy"], two.stats["processes"]) == (strategy, 2)
    assert len(two.stats["peak_memory_gb_per_process"]) == 2
    # fp16 sums in another order: close, not equal
    assert _losses(Path(two.path)) == pytest.approx(_losses(Path(one.path)), rel=5e-3)


def test_process_count_and_strategy(monkeypatch):
    def plan(env: str | None, **fields):
        t = TrainConfig(**fields)
        return distributed.parallelism(
            t, "cuda", {} if env is None else {"CUDA_VISIBLE_DEVICES": env}
        )

    assert plan("0,1", gradient_accumulation_steps=4) == ("ddp", 2)
    assert plan("0,1", gradient_accumulation_steps=4, mode="full") == ("fsdp", 2)
    assert plan("0,1,2", gradient_accumulation_steps=4) == ("ddp", 2)  # 3 does not divide 4
    assert plan("0,1") == ("single", 1)  # one micro-batch per step cannot be split
    assert plan("0,1", gradient_accumulation_steps=2, strategy="single") == ("single", 1)
    assert plan("0,1", gradient_accumulation_steps=2, strategy="ddp", mode="full") == ("ddp", 2)
    assert plan("", gradient_accumulation_steps=2) == ("single", 1)
    with pytest.raises(ValueError, match=r"num_processes 4: this process has 2 GPU"):
        plan("0,1", gradient_accumulation_steps=4, num_processes=4)
    full = dict(mode="full", gradient_accumulation_steps=2)  # auto: fsdp on 2 GPUs
    with pytest.raises(ValueError, match=r"validation_every: a run sharded with fsdp"):
        plan("0,1", **full, validation_every=10)
    with pytest.raises(ValueError, match=r"adamw8bit does not take weights sharded"):
        plan("0,1", **full, optimizer="adamw8bit")
    assert plan("0", **full, validation_every=10) == ("single", 1)
    monkeypatch.setattr(distributed, "has_fsdp2", lambda: False)  # a torch older than 2.6
    with pytest.raises(ValueError, match=r"fsdp needs torch 2.6 or newer .*train.strategy ddp"):
        plan("0,1", **full)
    assert plan("0,1", **full, strategy="ddp") == ("ddp", 2)
    monkeypatch.undo()
    cpu = TrainConfig(gradient_accumulation_steps=2)
    assert distributed.parallelism(cpu, "cpu") == ("single", 1)  # the CPU: only when asked for
    assert distributed.parallelism(cpu.model_copy(update={"num_processes": 2}), "cpu") == ("ddp", 2)
    assert [list(distributed.share(6, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (dict(num_processes=3, gradient_accumulation_steps=4), r"num_processes 3 must divide"),
        (
            dict(strategy="single", num_processes=2, gradient_accumulation_steps=2),
            r"strategy single runs one process",
        ),
        (dict(strategy="fsdp"), r"strategy fsdp shards a full fine-tune; mode lora"),
        (dict(strategy="fsdp", mode="full", validation_every=10), r"fsdp makes no validation"),
        (dict(strategy="fsdp", mode="full", optimizer="adamw8bit"), r"adamw8bit does not take"),
    ],
)
def test_process_settings_fail_at_load(fields, error):
    with pytest.raises(ValueError, match=error):
        TrainConfig(**fields)


def test_process_settings_are_not_in_the_key():
    base = PipelineConfig(train=TrainConfig(gradient_accumulation_steps=4))
    spread = PipelineConfig(
        train=TrainConfig(gradient_accumulation_steps=4, num_processes=2, strategy="ddp")
    )
    assert train.key_of(base, {"precompute": "p"}) == train.key_of(spread, {"precompute": "p"})
    assert "num_processes" not in spread.train.key_fields()


def test_launch_relays_progress_and_stops_every_rank_on_a_failure(monkeypatch):
    import launch_targets

    calls = []
    ranks = distributed.launch(launch_targets.report, (3,), 2, lambda *a: calls.append(a))
    assert ranks == [{"rank": r, "world": "2", "master": "127.0.0.1"} for r in (0, 1)]
    assert calls == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]

    monkeypatch.setattr(distributed, "GRACE_S", 1.0)  # rank 0 would wait 120 s
    with pytest.raises(ValueError, match=r"^train rank 1 of 2: no usable samples on this rank$"):
        distributed.launch(launch_targets.fail_on, (1,), 2)
    assert multiprocessing.active_children() == []

    def stop(step, total, note):
        if step == 2:
            raise KeyboardInterrupt("stopped at step 2")

    with pytest.raises(KeyboardInterrupt, match="stopped at step 2"):
        distributed.launch(launch_targets.report, (5,), 2, stop)
    assert multiprocessing.active_children() == []


def test_the_failure_raised_names_the_rank_that_caused_it():
    peer = ("DistBackendError", "Connection closed by peer [127.0.0.1]:1234", "trace 0")
    died = ("died", "killed by signal SIGKILL", "")
    error = distributed._failure({0: peer, 1: died}, 2)
    assert isinstance(error, distributed.RankFailed)
    assert str(error).startswith("train rank 1 of 2 failed: killed by signal SIGKILL\n(then rank 0")
    own = ("RuntimeError", "CUDA out of memory", "Traceback ... CUDA out of memory")
    error = distributed._failure({0: peer, 1: own}, 2)  # the rank that raised on its own
    assert "train rank 1 of 2 failed: RuntimeError: CUDA out of memory" in str(error)
    assert "rank 1's traceback:\nTraceback" in str(error)
    nan = ("TrainingDiverged", "loss is nan at step 4", "")
    error = distributed._failure({1: nan, 0: nan}, 2, (train.TrainingDiverged,))
    assert isinstance(error, train.TrainingDiverged)  # not retried by the Prefect task
    assert str(error) == "train rank 1 of 2: loss is nan at step 4"
    assert distributed._exit_reason(-9) == "killed by signal SIGKILL"


@pytest.mark.slow
def test_bench_dry_run():
    cmd = [sys.executable, "bench/train_ddp.py", "--dry", "--warmup", "1", "--steps", "1"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(line["case"].split()[1], line["metric"]) for line in lines] == [
        ("ddp-lora", "steps_per_s"),
        ("ddp-lora", "peak_mem_gb_per_gpu"),
        ("fsdp-full", "steps_per_s"),
        ("fsdp-full", "peak_mem_gb_per_gpu"),
    ]
    fields = {"bench", "case", "metric", "value", "reference", "ratio", "device", "date", "commit"}
    assert all(fields <= line.keys() and line["bench"] == "train_ddp" for line in lines)
    for line in lines[::2]:  # 2 processes split the step 1 process makes: the same loss
        assert line["value"] > 0 and line["ratio"] > 0
        assert line["loss"] == pytest.approx(line["reference_loss"], rel=1e-6)


def test_sharded_step_under_autocast_is_the_plain_one(tiny_models):
    """FSDP's forward runs under the trainer's autocast as the plain model's does: one
    process sharding over a process group of one gives the unsharded step's numbers."""
    import torch.distributed as dist

    model = str(tiny_models["cogvideox"])
    t = TrainConfig(
        mode="full",
        learning_rate=1e-3,
        lr_warmup_steps=0,
        max_steps=2,
        gradient_checkpointing="off",
        device="cpu",
    )
    g = torch.Generator().manual_seed(0)
    batch = [
        (torch.randn(2, 3, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), (64, 64, 3))
    ]
    got = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for strategy in ("single", "fsdp"):
            # bf16 weights in, fp32 master weights trained under bf16 autocast
            transformer = cogvideox.load_transformer(model, "cpu", torch.bfloat16)
            trainer = train.build_trainer(
                transformer, cogvideox.load_scheduler(model), t, 0, "cpu", strategy
            )
            assert trainer.autocast == torch.bfloat16 and trainer.scaler is None
            got[strategy] = [trainer.step(s, batch)[0].item() for s in (1, 2)]
    finally:
        dist.destroy_process_group()
    assert distributed.is_sharded(trainer.transformer)
    assert got["fsdp"] == pytest.approx(got["single"], rel=1e-6)
