"""What makes a CogVideoX LoRA step fast on a GPU: the attention kernel, compiled blocks
and which activations the backward pass recomputes. Training and `bench/train_step.py`
call the same functions, so the benchmark measures the product.

At 49x480x720 a block attends over 17,776 tokens (226 text + 13 x 30 x 45 video), so
attention is about 70% of a step's FLOPs, while the linears that feed it are cheap to
run again. Two selective policies never run attention forward twice:

- `attention` keeps the attention kernel's outputs and recomputes everything else: a
  block keeps about two hidden-size tensors per token instead of about fifteen;
- `selective` also keeps the outputs of the matmuls that are no wider than their input
  (q, k, v, out, the feed-forward down-projection, LoRA's A): recomputing one costs at
  least twice its input width in FLOPs per element it would save, so only the
  feed-forward up-projection and the elementwise ops run again (about seven tensors).

Checkpointing swaps a block's class for a subclass whose forward runs the original
under `torch.utils.checkpoint` (the module and its parameter names stay the same, so a
LoRA saves and loads as before). `torch.compile` then compiles each block; the blocks
are alike, so the first compiles and the others reuse its code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Literal

from cogpipe.compat import dynamo_config

if TYPE_CHECKING:
    import torch

Checkpointing = Literal["off", "full", "selective", "attention"]
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]

RECOMPILE_LIMIT = 64  # compiled graphs per module: one per input shape seen


def blocks(transformer) -> list[torch.nn.Module]:
    """The transformer's repeated blocks (the unit that is checkpointed and compiled)."""
    return list(transformer.transformer_blocks)


@contextlib.contextmanager
def attention_kernel(name: AttentionBackend) -> Iterator[None]:
    """Run scaled-dot-product attention with one kernel (auto: PyTorch's own choice).

    Active while a compiled block is traced, too, so the compiled graph calls that kernel.
    """
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    with sdpa_kernel([backend]):
        yield


def _attention_ops() -> set:
    """The aten attention kernels whose outputs the selective policy keeps."""
    import torch

    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _matmul_ops() -> set:
    import torch

    return {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _policy(keep_matmuls: bool, ctx, op, *args, **kwargs):
    """Keep attention outputs; with `keep_matmuls`, also matmul outputs no wider than their input."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _attention_ops():
        return CheckpointPolicy.MUST_SAVE
    if keep_matmuls and op in _matmul_ops():
        a, b = args[-2], args[-1]  # [M, K] @ [K, N] (addmm's bias comes first)
        if b.shape[-1] <= a.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context(keep_matmuls: bool):
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_policy, keep_matmuls))


_SUBCLASSES: dict[tuple[type, str], type] = {}


def _checkpointed(cls: type, mode: Checkpointing) -> type:
    """`cls` with a forward that runs under activation checkpointing (one subclass per mode)."""
    if (cls, mode) in _SUBCLASSES:
        return _SUBCLASSES[cls, mode]
    from torch.utils.checkpoint import checkpoint

    # Full checkpointing passes no context_fn at all: torch.compile cannot trace the default one.
    policies = {
        "selective": partial(_selective_context, True),
        "attention": partial(_selective_context, False),
    }
    options = {"context_fn": policies[mode]} if mode in policies else {}

    def forward(self, *args, **kwargs):
        import torch

        if not torch.is_grad_enabled():  # validation and inference: nothing to save
            return cls.forward(self, *args, **kwargs)
        # No random op runs in a block (dropout is 0), so no RNG state needs restoring.
        return checkpoint(
            cls.forward,
            self,
            *args,
            use_reentrant=False,
            preserve_rng_state=False,
            **options,
            **kwargs,
        )

    sub = type(f"{mode.title()}Checkpointed{cls.__name__}", (cls,), {"forward": forward})
    _SUBCLASSES[cls, mode] = sub
    return sub


def set_checkpointing(transformer, mode: Checkpointing, fraction: float = 1.0) -> int:
    """Checkpoint the first `fraction` of the blocks with `mode`; return how many.

    The backward pass runs the last blocks first and frees their activations as it goes,
    so by the time it reaches a checkpointed block and recomputes it, memory has come down:
    leaving the last blocks whole costs their activations and nothing on top.
    """
    if mode not in ("off", "full", "selective", "attention"):
        raise ValueError(f"gradient checkpointing {mode!r}: use off, full, selective or attention")
    every = blocks(transformer)
    count = 0 if mode == "off" else round(fraction * len(every))
    for i, block in enumerate(every):
        base = next(c for c in type(block).__mro__ if c not in _SUBCLASSES.values())
        block.__class__ = _checkpointed(base, mode) if i < count else base
    return count


def compile_static(module) -> None:
    """`torch.compile` a module with static shapes: one graph per input shape it meets."""
    config = dynamo_config()
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    module.compile(dynamic=False)


def compile_blocks(transformer) -> None:
    """Compile every block (shapes static: one graph per bucket and batch size)."""
    for block in blocks(transformer):
        compile_static(block)
