"""A process's GPUs and the names of their one-job-at-a-time slots.

A GPU worker owns the GPUs of its own CUDA_VISIBLE_DEVICES (never a deployment variable);
each is a one-slot Prefect concurrency limit `gpu:<host>:<device>` that its flow runs
hold while they run (cogpipe_tasks.gpu.gpu_slots). A worker with no GPU has one slot,
`gpu:<host>:cpu`. Plain Python: training uses the same device list for its processes.
"""

from __future__ import annotations

import os
import socket

SLOTS_ENV = "COGPIPE_GPU_SLOTS"  # set by `cogpipe worker` for the flow runs it starts


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


def slot_names(devices: list[str], host: str | None = None) -> list[str]:
    """The concurrency limits of a worker owning `devices` (one slot each)."""
    host = host or socket.gethostname()
    return [f"gpu:{host}:{d}" for d in devices] or [f"gpu:{host}:cpu"]
