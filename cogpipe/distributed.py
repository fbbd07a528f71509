"""Several processes for one training run: how many, which strategy, starting them, and
a clear error when one of them fails.

A step's micro-batches are split, never multiplied: with `gradient_accumulation_steps`
A and P processes, rank r takes micro-batches r*A/P .. (r+1)*A/P - 1 of every step, the
gradients are averaged over all A, and the global batch stays batch_size x A. The
draws of a micro-batch (timesteps, noise) are those a single process makes for it: each
rank draws, and drops, those of the micro-batches before its own from the step's
generator. So `num_processes` and `strategy` are not in the train key: one, two or eight
GPUs give the same run up to floating-point summation order, and a run started on two
GPUs resumes on one.

- ddp (LoRA modes): torch's DistributedDataParallel; each process holds the model,
  gradients are all-reduced at a process's last micro-batch of a step (`no_sync` before).
- fsdp (mode full): torch's FSDP2 `fully_shard` on every transformer block and the root.
  Its mixed precision is the trainer's own autocast around the forward, so
  `master_weights: bf16` keeps bf16 weights. Checkpoints gather the full weights and
  optimizer states on rank 0 (CPU) and write the layout a single process writes:
  `transformer/` in diffusers layout and the optimizer states keyed by parameter name.

The process group (NCCL on GPUs, gloo on the CPU) is set up from the environment `launch`
gives each rank (`init_group`).

`launch` starts the processes with the spawn method (a parent that touched CUDA cannot
fork), relays rank 0's progress calls to the parent's callback one at a time (a callback
that raises stops the run at that step, as it does in-process), and when a rank raises or
dies, stops the others and raises an error that names that rank. A rank never outlives
its parent: on Linux the kernel kills it when the parent dies (SIGKILL included:
PR_SET_PDEATHSIG), elsewhere it polls; so a killed `cogpipe train` frees its run folder
(`Workspace.hold`) only once no rank of it can write there. A parent stopped by Ctrl-C
(KeyboardInterrupt) stops its ranks on the way out.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from cogpipe.net import free_port
from cogpipe.workspace import Progress, no_progress

if TYPE_CHECKING:
    from cogpipe.config import TrainConfig

PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies
GRACE_S = 10.0  # after a rank fails, how long the others get to report before they are stopped
TIMEOUT_S = 2 * 3600  # collective timeout: rank 0 may validate or write a 5B checkpoint meanwhile
# Errors a rank raises because another one went away: the cause is elsewhere.
PEER_ERRORS = ("DistBackendError", "DistNetworkError", "DistStoreError", "DistError")
PEER_MESSAGES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "stopped by the launching process",
)


class RankFailed(RuntimeError):
    """A training process raised an error or died."""


def visible_gpus(env: dict[str, str] | None = None) -> int:
    """GPUs of this process: its CUDA_VISIBLE_DEVICES (how a GPU worker owns GPUs)."""
    from cogpipe.gpus import gpu_devices

    return len(gpu_devices(env))


def parallelism(t: TrainConfig, device: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """(strategy, processes) of a run: `single` with one process, else `ddp` or `fsdp`.

    `num_processes: 0` takes one per visible GPU (one on the CPU), lowered to the largest
    count that divides `gradient_accumulation_steps`; strategy auto picks fsdp for mode
    full and ddp for the LoRA modes.

    Raises:
        ValueError: more processes asked for than the process has GPUs; fsdp with
            validation videos or adamw8bit (neither takes a sharded model), or on a torch
            older than 2.6.
    """
    accum = t.gradient_accumulation_steps
    if t.num_processes:
        n = t.num_processes
        gpus = visible_gpus(env)
        if device == "cuda" and n > gpus:
            raise ValueError(
                f"train.num_processes {n}: this process has {gpus} GPU(s) (CUDA_VISIBLE_DEVICES)"
            )
    elif t.strategy == "single" or device != "cuda":
        n = 1
    else:
        n = max(d for d in range(1, max(visible_gpus(env), 1) + 1) if accum % d == 0)
    if n == 1:
        return "single", 1
    strategy = t.strategy if t.strategy != "auto" else "fsdp" if t.mode == "full" else "ddp"
    if strategy == "fsdp" and t.validation_every:
        raise ValueError(
            "train.validation_every: a run sharded with fsdp makes no validation videos; set it"
            " to 0, or train.strategy ddp"
        )
    if strategy == "fsdp" and t.optimizer == "adamw8bit":
        raise ValueError(
            "train.optimizer adamw8bit does not take weights sharded with fsdp: use adamw (its"
            " states are sharded too), or train.strategy ddp"
        )
    if strategy == "fsdp" and not has_fsdp2():
        import torch

        raise ValueError(
            f"train.strategy fsdp needs torch 2.6 or newer (FSDP2's fully_shard); this is torch"
            f" {torch.__version__}: upgrade torch, or train.strategy ddp"
        )
    return strategy, n


def has_fsdp2() -> bool:
    """Whether this torch has FSDP2's public API (torch.distributed.fsdp.fully_shard, 2.6+)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def share(count: int, rank: int, processes: int) -> range:
    """Positions of a step's `count` micro-batches that rank `rank` takes (contiguous)."""
    each = count // processes
    return range(rank * each, (rank + 1) * each)


# --------------------------------------------------------------------------- process group


def init_group(device):
    """Join this rank's process group (NCCL for a GPU, gloo for the CPU) from the
    environment `launch` set, a group already there (a test's, a caller's) kept; returns
    this rank's torch.device (a bare "cuda": its LOCAL_RANK's GPU, made current).

    CPU ranks share the cores: without OMP_NUM_THREADS each takes its part of them, as
    `accelerate launch` sets it, so two ranks on one machine do not oversubscribe it.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    device, local = torch.device(device), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        import psutil

        share = (psutil.cpu_count(logical=False) or 1) // int(
            os.environ.get("LOCAL_WORLD_SIZE", "1")
        )
        torch.set_num_threads(max(share, 1))
    backend = "gloo" if device.type == "cpu" else "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    return device


def world() -> tuple[int, int]:
    """(rank, processes) of this process: (0, 1) outside a process group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(model, device):
    """`model` in DistributedDataParallel: gradients averaged over the processes."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids and ids[0])


# --------------------------------------------------------------------------- FSDP


def shard(transformer, blocks: list) -> None:
    """FSDP2: each block its own unit (gathered for its forward and backward only), the
    rest (embeddings, final norm, output projection) the root's. The last block stays
    gathered after its forward: backward needs it first."""
    from torch.distributed.fsdp import fully_shard

    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(transformer)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model) -> dict:
    """The whole model's state dict on rank 0's CPU ({} on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's states keyed by parameter name, whole, on rank 0's CPU (sharded
    models: {} on the other ranks, a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model, optimizer, state: dict, names: list[str]) -> None:
    """Load `full_optimizer_state`'s form (or `optimizer.state_dict()`'s, keyed by position
    in `names`) into a plain or sharded model's optimizer; a sharded model's ranks get
    rank 0's states by broadcast."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state and all(isinstance(k, int) for k in state["state"]):  # by position -> by name
        state = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                g | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }
    sharded = is_sharded(model)
    if sharded and dist.get_rank() != 0:
        state = {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded)
    set_optimizer_state_dict(model, optimizer, state, options=options)


# --------------------------------------------------------------------------- launching


def launch(
    target,
    args: tuple,
    processes: int,
    progress: Progress = no_progress,
    raises: tuple[type[Exception], ...] = (ValueError,),
) -> list[Any]:
    """Run `target(rank, progress, *args)` in `processes` spawned processes, one per rank.

    Each process gets the torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT on 127.0.0.1); rank 0's `progress` calls reach this
    process's `progress`. `target` and `args` must pickle.

    Returns:
        Every rank's return value, by rank.

    Raises:
        RankFailed: a rank raised or died; names that rank (the one that failed first by
            its own fault, not because a peer went away) and its traceback. A rank's
            error of a type in `raises` (the caller's own errors, e.g. a ValueError
            about its config) is raised as that type instead.
        Whatever `progress` raises, after every rank is stopped.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port, parent = free_port(), os.getpid()
    procs, conns = [], []
    try:
        for rank in range(processes):
            mine, theirs = ctx.Pipe()
            spec = (target, rank, processes, port, parent, theirs, args)
            proc = ctx.Process(target=_rank_main, name=f"cogpipe-train-rank{rank}", args=spec)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
        return _supervise(procs, conns, progress, raises)
    finally:
        _stop(procs)


def _supervise(procs: list, conns: list, progress: Progress, raises: tuple) -> list[Any]:
    """Serve rank 0's progress calls and collect results until every rank is done or one
    failed (then wait GRACE_S for the others' reports)."""
    from multiprocessing.connection import wait

    n = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, tuple[str, str, str]] = {}  # rank -> (kind, message, traceback)
    failed_at = None
    open_conns = dict(zip(conns, range(n), strict=True))
    running = {p.sentinel: r for r, p in enumerate(procs)}

    def handle(rank: int, message: tuple) -> None:
        nonlocal failed_at
        kind = message[0]
        if kind == "progress":
            if not failures:
                progress(*message[1:])
            try:
                conns[rank].send("stop" if failures else "go")
            except OSError:  # it died meanwhile: its sentinel says so
                pass
        elif kind == "done":
            results[rank] = message[1]
        elif kind == "error":
            failures.setdefault(rank, message[1:])
            failed_at = failed_at or time.monotonic()

    def drain(conn) -> None:
        try:
            while conn in open_conns and conn.poll():
                handle(open_conns[conn], conn.recv())
        except (EOFError, OSError):
            open_conns.pop(conn, None)

    while len(results) < n:
        if failures and (not running or time.monotonic() - failed_at > GRACE_S):
            raise _failure(failures, n, raises)
        for ready in wait([*open_conns, *running], timeout=1.0):
            if ready in open_conns:
                drain(ready)
                continue
            rank = running.pop(ready)
            procs[rank].join()
            drain(conns[rank])
            code = procs[rank].exitcode
            if rank not in results and rank not in failures:
                failures[rank] = ("died", _exit_reason(code), "")
                failed_at = failed_at or time.monotonic()
    return [results[r] for r in range(n)]


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code} without a report"


def _is_peer_error(kind: str, message: str) -> bool:
    return kind in PEER_ERRORS or any(m in message for m in PEER_MESSAGES)


def _failure(failures: dict[int, tuple[str, str, str]], n: int, raises: tuple = ()) -> Exception:
    """The error to raise: the rank that died, else one that raised on its own, else the
    first; the other ranks' errors are named on one line each. An error of a type in
    `raises` is raised as that type, with its message only."""

    def evidence(rank: int) -> int:
        kind, message, _ = failures[rank]
        return 0 if kind == "died" else 2 if _is_peer_error(kind, message) else 1

    cause = min(failures, key=evidence)  # dicts keep the order failures arrived in
    kind, message, trace = failures[cause]
    what = message if kind == "died" else f"{kind}: {message}"
    text = f"train rank {cause} of {n} failed: {what}"
    others = [
        f"rank {r}: {k}: {m.splitlines()[0] if m else ''}"
        for r, (k, m, _) in failures.items()
        if r != cause
    ]
    if others:
        text += "\n(then " + "; ".join(others) + ")"
    if trace:
        text += f"\n\nrank {cause}'s traceback:\n{trace}"
    known = {error.__name__: error for error in raises}
    if kind in known:
        return known[kind](f"train rank {cause} of {n}: {message}")
    return RankFailed(text)


def _stop(procs: list) -> None:
    """Terminate the ranks still running (SIGTERM, then SIGKILL after 10 s)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 10
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0))
        if proc.is_alive():
            proc.kill()
            proc.join()


class _ParentProgress:
    """Rank 0's progress callback: the parent's, called through the pipe."""

    def __init__(self, conn):
        self.conn = conn

    def __call__(self, done: int, total: int, note: str = "") -> None:
        self.conn.send(("progress", done, total, note))
        if self.conn.recv() != "go":
            raise KeyboardInterrupt("stopped by the launching process: another rank failed")


def _exit_with_parent(parent: int) -> None:
    """Die with the launching process (killed with its Prefect flow run, say): SIGKILL
    from the kernel the moment it dies (Linux; strictly, when the thread that started this
    process ends: `launch` waits in that thread), and a thread that polls as a fallback."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the poll below
        pass
    if os.getppid() != parent:  # it died before the kernel was told
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cogpipe-parent-watch").start()


def _rank_main(target, rank: int, processes: int, port: int, parent: int, conn, args) -> None:
    """A spawned rank: the distributed environment (none for a lone process), then
    `target`; reports to `conn`."""
    if processes > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(processes),
            LOCAL_WORLD_SIZE=str(processes),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    _exit_with_parent(parent)
    progress = _ParentProgress(conn) if rank == 0 else no_progress
    try:
        result = target(rank, progress, *args)
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
        conn.send(("error", type(e).__name__, str(e), traceback.format_exc()))
        conn.close()
        sys.exit(1)
    conn.send(("done", result))
    conn.close()
    dist = sys.modules.get("torch.distributed")  # a target that never imported torch: none
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()
