"""A process's GPUs and the names of their one-job-at-a-time slots.

A GPU worker owns the GPUs of its own CUDA_VISIBLE_DEVICES (never a deployment variable);
each is a one-slot Prefect concurrency limit `gpu:<host>:<device>` that its flow runs
hold while they run (cogpipe_tasks.gpu.gpu_slots); <device> is the host's number of the
GPU (COGPIPE_GPU_IDS in a container, which numbers its GPUs from 0). A worker with no GPU
has one slot, `gpu:<host>:cpu`. Plain Python: training uses the same device list for its
processes.
"""

from __future__ import annotations

import os
import socket

SLOTS_ENV = "COGPIPE_GPU_SLOTS"  # set by `cogpipe worker` for the flow runs it starts
GPU_IDS_ENV = "COGPIPE_GPU_IDS"  # a container's GPUs as the host numbers them (slot names)


def gpu_devices(env: dict[str, str] | None = None) -> list[str]:
    """This process's GPUs: CUDA_VISIBLE_DEVICES when set (empty: none), else every GPU
    torch sees."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def slot_names(
    devices: list[str], host: str | None = None, env: dict[str, str] | None = None
) -> list[str]:
    """The concurrency limits of a worker owning `devices` (one slot each).

    A container sees its GPUs as 0..n-1 whichever of the host's it was given, so each GPU
    worker container sets GPU_IDS_ENV to the host's numbers of its GPUs (see
    docker/compose.yaml): its slots then name the GPUs it really holds, one slot each.

    Raises:
        ValueError: GPU_IDS_ENV names another number of GPUs than the worker has.
    """
    env = os.environ if env is None else env
    host = host or socket.gethostname()
    ids = [d.strip() for d in env.get(GPU_IDS_ENV, "").split(",") if d.strip()]
    if ids and len(ids) != len(devices):
        raise ValueError(
            f"{GPU_IDS_ENV}={env[GPU_IDS_ENV]!r} names {len(ids)} GPU(s) but this worker has "
            f"{len(devices)} ({','.join(devices) or 'none'}): give one host GPU number per GPU"
        )
    return [f"gpu:{host}:{d}" for d in ids or devices] or [f"gpu:{host}:cpu"]
