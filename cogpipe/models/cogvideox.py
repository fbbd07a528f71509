"""CogVideoX seams: loading components, precision, encoding video and prompts, rotary
embeddings and LoRA export. Every stage that touches CogVideoX goes through here, so a
second model family is a second module, not a flag.

Components load from a hub id (`THUDM/CogVideoX-2b`) or a local folder in diffusers
layout, through the same `from_pretrained` calls.
"""

from __future__ import annotations

import torch


def is_5b_type(transformer_config) -> bool:
    """5B-type models use rotary positional embeddings (and bf16); 2B-type do not (fp16)."""
    return bool(getattr(transformer_config, "use_rotary_positional_embeddings", False))


def weight_dtype(mixed_precision: str, transformer_config, device: str) -> torch.dtype:
    """The dtype of frozen weights: auto gives fp16 for 2B-type, bf16 for 5B-type on GPU, fp32 on CPU."""
    if mixed_precision == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if is_5b_type(transformer_config) else torch.float16
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
