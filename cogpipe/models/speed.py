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


FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores


def _fp8_linear(module, name: str) -> bool:
    """Whether a transformer module is a linear worth FP8: a block's (attention projections
    and feed-forward, where the FLOPs are) with sides the FP8 kernels take (multiples of 16),
    never a LoRA's own A/B matrices (they stay in the adapter's dtype)."""
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and name.startswith("transformer_blocks.")
        and "lora_" not in name
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def _fp8_device(transformer, what: str) -> None:
    """Refuse FP8 where it cannot run, naming the reason.

    Raises:
        RuntimeError: the transformer is not on a CUDA GPU of compute capability 8.9 or newer.
    """
    import torch

    device = next(transformer.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(
            f"{what} needs a CUDA GPU (H100, L4, RTX 4090 or newer); the model is on {device}"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(
            f"{what} needs FP8 tensor cores (compute capability 8.9+); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
        )


def _torchao(what: str):
    """The torchao package, or a RuntimeError saying how to install it."""
    try:
        import torchao
    except ImportError as e:
        raise RuntimeError(f"{what} needs torchao: pip install 'cogpipe[gpu]'") from e
    return torchao


def fp8_training(transformer) -> int:
    """Run the blocks' frozen base linears in FP8 for LoRA training, in place: torchao's
    float8 training linears (dynamic per-tensor scales, the tensorwise recipe) under the
    LoRA layers, which keep their own dtype and gradients. Call after the LoRA is added and
    before the blocks are compiled: compiled, the casts fuse and the unused weight gradient
    of a frozen linear is dropped from the backward graph. Returns how many linears changed.

    Raises:
        RuntimeError: not on an FP8-capable CUDA GPU, or torchao is not installed.
    """
    _fp8_device(transformer, "train.fp8_base")
    _torchao("train.fp8_base")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = {
        name
        for name, m in transformer.named_modules()
        if _fp8_linear(m, name) and not m.weight.requires_grad
    }
    convert_to_float8_training(
        transformer, config=Float8LinearConfig(), module_filter_fn=lambda m, name: name in chosen
    )
    return len(chosen)


def fp8_linears(transformer) -> int:
    """Quantise the transformer blocks' linears to FP8 for inference, in place: torchao's
    float8 dynamic quantisation, weights and activations with one scale per row (bf16
    models; per tensor for fp16 ones, which torchao's row-wise kernels do not take), the
    product accumulated in higher precision and returned in the model's dtype. A LoRA
    loaded afterwards wraps the quantised linears (its own matrices stay in their dtype).
    Compile the blocks afterwards (`compile_blocks`): eager, the per-call activation
    quantisation costs more than the FP8 matmul saves. Returns how many linears changed.

    Raises:
        RuntimeError: the transformer is not on a CUDA GPU of compute capability 8.9 or
            newer (H100, L4, RTX 4090), or torchao is not installed.
    """
    _fp8_device(transformer, "fp8_linears")
    _torchao("fp8_linears")
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    chosen = {name for name, m in transformer.named_modules() if _fp8_linear(m, name)}
    # torchao takes per-row scales from bf16 weights only: fp16 models (2B) get one per tensor
    bf16 = next(transformer.parameters()).dtype == torch.bfloat16
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if bf16 else PerTensor()
    )
    quantize_(transformer, config, filter_fn=lambda m, name: name in chosen)
    return len(chosen)
