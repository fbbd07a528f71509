"""Caption throughput: batched LLaVA-NeXT-Video captioning on one GPU, in clips per hour.

The models are the real architectures at full size with random weights, built on the GPU
in bf16 without any hub access (speed does not depend on weight values): CLIP ViT-L/14-336
with a Vicuna-7B or Nous-Hermes-2-Yi-34B Llama. Every caption is exactly 120 new tokens
(greedy, `min_new_tokens` = `max_new_tokens`: random weights would stop at a random EOS),
from 8 frames per clip (8 x 24 x 24 patches, pooled 2x2: 1152 video tokens) and the
power-slap prompt, SDPA attention, left padding. The tokenizer is a local word-level one
(`cogpipe.samples.build_word_tokenizer`): its ids are all below the models' vocabularies,
and the prompt comes out at about the length Llama's tokenizer gives it.

Lines, per model (DESIGN.md's shape; ratio > 1 means better than the reference):
- `model_clips_per_hour` bs1: `generate` alone on inputs already on the GPU, one clip at a
  time (mean of 3 calls after a warm-up); the reference of every other line.
- `model_clips_per_hour` bsN: the same at each batch size (mean of 2 batches after a
  warm-up), with `peak_mem_gb` (torch.cuda.max_memory_allocated, weights included, 1e9
  bytes) and the prefill / decode split; a size out of memory is a line with metric `oom`.
- `e2e_clips_per_hour`: 720p H.264 clips (10 s, made here with PyAV) through cogpipe's own
  caption path at the best batch size: frames decoded ahead in background threads
  (`cogpipe.caption.prefetch`), the real LlavaNextVideoProcessor and `generate` on the main
  thread. Reference: the same code one clip at a time, decode then generate (1 untimed,
  2 timed). Extras: `decode_s_per_clip` (8 frames to RGB arrays alone, one CPU thread, as
  `decode_batch` does), `wait_decode_s` (main thread waiting for frames),
  `generate_fraction` (share of the wall time spent in cogpipe's `generate`).

Fraction of the hardware limit (`hbm_fraction`, model-only lines): decoding is bound by
memory bandwidth, so each decode step is charged the bytes it must read: every weight of
the language model (the vision tower and projector only run in the prefill; of the
embedding table only B rows are read, so it is left out) plus every sequence's KV cache,
2 x layers x kv_heads x head_dim x 2 bytes per token at the mean context length
(prompt + new tokens / 2). Step time = (batch time - prefill time) / (new tokens - 1),
the prefill time from a 1-token `generate` on the same batch. hbm_fraction = bytes per
step / step time / peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Copies the
step makes but does not need (DynamicCache grows by torch.cat, so it rewrites the whole
cache every step) count as lost time, not as bytes: the fraction is of the roofline.

    python bench/caption.py [--models 7b,34b] [--batch-sizes 8,32,64] [--e2e-clips N]
        [--out bench/results/caption-h200-DATE.jsonl] [--commit abc1234]
    python bench/caption.py --tiny    # same code path, tiny configs, a CPU smoke test

A failing measurement prints a line with metric `error` (not written to --out) and the
run goes on; a short table of all lines goes to stderr at the end.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import Bench, commit, device_name, hub_config, in_processes  # noqa: E402

from cogpipe.samples import build_word_tokenizer  # noqa: E402

PROMPT = (ROOT / "cogpipe" / "prompts" / "power_slap.txt").read_text().strip()
FRAMES, NEW_TOKENS = 8, 120  # frames per clip, new tokens per caption
REF_CALLS, BATCH_CALLS, E2E_REF_CLIPS = 3, 2, 2  # timed calls, each after one warm-up
FPS, GOPS_S = 25, (2, 3, 5)  # generated clips: frame rate, keyframe intervals (s)
HBM_PEAK = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))

# Hub-style Vicuna chat template (llava-hf/LLaVA-NeXT-Video-7B-hf renders the same text):
# "USER: <video>\n{prompt} ASSISTANT:". The 34B's own template is ChatML; a few tokens of
# difference next to 1152 video tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIALS = {
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "image_token": "<image>",
    "video_token": "<video>",
}

# openai/clip-vit-large-patch14-336, as in both hub configs (vision_feature_layer -2).
CLIP_L14_336 = hub_config("clip-vit-large-patch14-336")
# lmsys/vicuna-7b-v1.5 as in llava-hf/LLaVA-NeXT-Video-7B-hf (Llama defaults + vocab 32064).
# The hub config's linear RoPE scaling (factor 2) changes no shape or cost: left out.
VICUNA_7B = hub_config("vicuna-7b-v1.5")
# NousResearch/Nous-Hermes-2-Yi-34B as in llava-hf/LLaVA-NeXT-Video-34B-hf.
YI_34B = hub_config("nous-hermes-2-yi-34b")
# --tiny: the vision tower and the Llama share their sizes; the tower sees 4x4 patches,
# pooled to 2x2.
TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
TINY_VISION = CLIP_L14_336 | TINY | dict(image_size=32, patch_size=8, projection_dim=16)
TINY_TEXT = TINY | dict(max_position_embeddings=4096)

# key -> (name, text config, tiny kv heads, default batch sizes)
CASES = {
    "7b": ("llava-next-video-7b", VICUNA_7B, 4, (8, 32, 64)),
    "34b": ("llava-next-video-34b", YI_34B, 2, (8, 32)),
}


# --------------------------------------------------------------------------- builders


def build_tokenizer():
    """A word-level tokenizer for the prompt and chat roles, with <image> and <video>."""
    tok = build_word_tokenizer([PROMPT, "USER: ASSISTANT:"], SPECIALS, 8192, add_bos=True)
    tok.padding_side = "left"  # generation appends on the right
    return tok


def build_config(key: str, tok, tiny: bool):
    """The LlavaNextVideoConfig of a case, its special token ids taken from `tok`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig

    _, text, tiny_kv, _ = CASES[key]
    ids = dict(
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    if tiny:
        text = dict(TINY_TEXT, num_key_value_heads=tiny_kv, vocab_size=len(tok))
    vision = TINY_VISION if tiny else CLIP_L14_336
    side = vision["image_size"]
    pinpoints = [
        [side, 2 * side],
        [2 * side, side],
        [2 * side, 2 * side],
        [3 * side, side],
        [side, 3 * side],
    ]  # hub: 336 x 1..3
    return LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text, **ids),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )


def build_model(config, device: str):
    """Random bf16 weights, created directly on `device` (never 34B on the CPU)."""
    from transformers import GenerationConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextVideoForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    t = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id
    )
    return model.eval()


def build_processor(tok, config):
    """LlavaNextVideoProcessor with the hub's video settings (shortest edge 336, crop 336,
    CLIP mean/std, bicubic); a torch stand-in where torchvision is missing (CPU dev box)."""
    vc = config.vision_config
    if importlib.util.find_spec("torchvision") is None:
        return StandInProcessor(tok, vc.image_size, vc.patch_size, config.spatial_pool_stride)
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    side = {"shortest_edge": vc.image_size}
    crop = {"height": vc.image_size, "width": vc.image_size}
    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size=side, crop_size=crop),
        image_processor=LlavaNextImageProcessor(
            size=side, crop_size=crop, image_grid_pinpoints=config.image_grid_pinpoints
        ),
        tokenizer=tok,
        chat_template=CHAT_TEMPLATE,
        patch_size=vc.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by "default"
    )


class StandInProcessor:
    """What cogpipe.caption uses of LlavaNextVideoProcessor, in torch only: the same chat
    text, <video> expanded to frames x (side/patch)^2 / stride^2 tokens, and frames resized
    (shortest edge, bicubic), centre-cropped and CLIP-normalised. Only for --tiny on a
    machine without torchvision, where the real video processor cannot be built."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, tokenizer, side: int, patch: int, stride: int):
        self.tokenizer, self.side = tokenizer, side
        self.per_frame = (side // patch) ** 2 // stride**2  # video tokens per frame

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _pixels(self, frames: list) -> torch.Tensor:
        """PIL frames -> [F, 3, side, side] float, normalised."""
        import torch.nn.functional as F

        x = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.side / min(h, w)
        size = (max(self.side, round(h * scale)), max(self.side, round(w * scale)))
        x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True)
        top, left = (size[0] - self.side) // 2, (size[1] - self.side) // 2
        x = x[:, :, top : top + self.side, left : left + self.side] / 255
        return (x - torch.tensor(self.MEAN)[:, None, None]) / torch.tensor(self.STD)[:, None, None]

    def __call__(self, text: list[str], videos: list, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        pixels = torch.stack([self._pixels(v) for v in videos])  # [B, F, 3, side, side]
        n = pixels.shape[1] * self.per_frame
        text = [t.replace("<video>", "<video>" * n) for t in text]
        enc = self.tokenizer(text, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**enc, "pixel_values_videos": pixels})

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)


# --------------------------------------------------------------------------- model only


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_inputs(tok, config, batch: int, device: str) -> dict:
    """input_ids with the expanded <video> tokens, a full mask, random pixels; on `device`."""
    vc = config.vision_config
    per_frame = (vc.image_size // vc.patch_size) ** 2 // config.spatial_pool_stride**2
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    text = text.replace("<video>", "<video>" * (FRAMES * per_frame))
    ids = tok([text] * batch, return_tensors="pt").input_ids.to(device)  # [B, L]
    shape = (batch, FRAMES, 3, vc.image_size, vc.image_size)  # [B, F, C, H, W]
    pixels = torch.randn(shape, device=device, dtype=torch.bfloat16)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def timed_generate(model, inputs: dict, new_tokens: int) -> float:
    """Seconds for one greedy `generate` of exactly `new_tokens` tokens per sequence."""
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    sync()
    took = time.perf_counter() - started
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens, out.shape
    return took


def measure(model, tok, batch: int, calls: int, device: str) -> dict:
    """Model-only generate at one batch size: seconds per batch (mean of `calls` after a
    warm-up), prefill seconds (a 1-token generate), decode seconds per step, peak memory."""
    inputs = model_inputs(tok, model.config, batch, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timed_generate(model, inputs, NEW_TOKENS)  # warm-up
    seconds = sum(timed_generate(model, inputs, NEW_TOKENS) for _ in range(calls)) / calls
    prefill = timed_generate(model, inputs, 1)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None
    return {
        "seconds": seconds,
        "prefill_s": prefill,
        "prompt_tokens": inputs["input_ids"].shape[1],
        "step_s": (seconds - prefill) / (NEW_TOKENS - 1),
        "peak_mem_gb": peak,
    }


def hbm_fraction(model, batch: int, m: dict, device: str) -> float | None:
    """Bytes a decode step must read (LM weights + KV cache) / step time / peak bandwidth."""
    peak = next((bw for name, bw in HBM_PEAK if name in device), None)
    if peak is None:
        return None
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in lm.parameters())
    weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    weights -= lm.embed_tokens.weight.numel() * lm.embed_tokens.weight.element_size()
    t = model.config.text_config
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2  # bf16
    kv = kv_per_token * batch * (m["prompt_tokens"] + NEW_TOKENS / 2)
    return (weights + kv) / m["step_s"] / peak


# --------------------------------------------------------------------------- end to end


def make_clip(path: Path, seed: int, size: tuple[int, int], seconds: int, gop_s: int) -> Path:
    """A noisy H.264 clip (x264 veryfast, keyframe every `gop_s`): a textured still scene
    with grain and a subject swinging across it."""
    from common import textured_scene, with_subject, write_h264

    w, h = size
    rng = np.random.default_rng(seed)
    scene = textured_scene(rng, w, h).astype(np.int16)
    frames = (
        with_subject(scene + rng.integers(-12, 12, (h, w, 3), dtype=np.int16), i)
        for i in range(seconds * FPS)
    )
    return write_h264(path, frames, size, FPS, gop_s * FPS)


def make_clips(folder: Path, unique: int, size: tuple[int, int], seconds: int) -> list[Path]:
    """`unique` clips, made in parallel on the host's CPUs."""
    jobs = [
        (folder / f"clip{i:02d}.mp4", i, size, seconds, GOPS_S[i % len(GOPS_S)])
        for i in range(unique)
    ]
    return in_processes(make_clip, jobs)


def clips_table(paths: list[Path], n: int, seconds: int) -> pd.DataFrame:
    """n clips.parquet-style rows cycling over `paths` (each row decodes its file again)."""
    return pd.DataFrame(
        {
            "clip_id": [f"c{i:05d}" for i in range(n)],
            "path": [str(paths[i % len(paths)]) for i in range(n)],
            "start": 0.0,
            "end": float(seconds),
            "fps": float(FPS),
        }
    )


def caption_loop(cap, clips: pd.DataFrame, batch_size: int, ahead: bool) -> dict:
    """cogpipe's caption stage minus the parquet parts, timed: with `ahead`, frames decoded
    in background threads (`prefetch`) while the GPU generates; without, decode then
    generate on the main thread. Kept to one function: cogpipe.caption is being refactored.

    Returns:
        seconds (all), generate_s, wait_s (main thread waiting for frames), tokens (mean).
    """
    from cogpipe.caption import decode_batch, generate, prefetch
    from cogpipe.config import CaptionConfig

    cc = CaptionConfig(
        model="random-weights",
        prompt=PROMPT,
        num_frames=FRAMES,
        max_new_tokens=NEW_TOKENS,
        batch_size=batch_size,
    )
    # cogpipe's generate passes no min_new_tokens; the model's generation config supplies
    # it, so random weights cannot stop a caption at a random EOS before 120 tokens.
    cap.model.generation_config.min_new_tokens = NEW_TOKENS
    batches = [
        (i, clips.iloc[s : s + batch_size]) for i, s in enumerate(range(0, len(clips), batch_size))
    ]
    source = (
        prefetch(batches, FRAMES)
        if ahead
        else ((i, b, decode_batch(b, FRAMES)) for i, b in batches)
    )
    gen = wait = 0.0
    tokens = []
    started = time.perf_counter()
    mark = started
    for _, _, decoded in source:
        wait += time.perf_counter() - mark
        errors = [e for frames, e in decoded if frames is None]
        assert not errors, errors[0]
        t = time.perf_counter()
        tokens += [n for _, n, _ in generate(cap, [frames for frames, _ in decoded], cc)]
        gen += time.perf_counter() - t
        mark = time.perf_counter()
    cap.model.generation_config.min_new_tokens = None
    return {
        "seconds": time.perf_counter() - started,
        "generate_s": gen,
        "wait_s": wait,
        "tokens": float(np.mean(tokens)),
    }


def decode_seconds(clips: pd.DataFrame) -> float:
    """Seconds per clip to decode its FRAMES frames to RGB arrays, one thread (cogpipe's decoder)."""
    from cogpipe.caption import decode_batch

    started = time.perf_counter()
    decode_batch(clips, FRAMES)
    return (time.perf_counter() - started) / len(clips)


# --------------------------------------------------------------------------- run


def report_error(bench: Bench, case: str, what: str, e: BaseException) -> None:
    """A failed measurement: its traceback to stderr, a line with metric `error` (the
    stage that failed and why) to stdout; the run goes on."""
    traceback.print_exception(e, file=sys.stderr)
    bench.failed(case, "error", f"{type(e).__name__}: {str(e)[:300]}", stage=what)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def model_only(model, tok, label: str, sizes, calls: tuple[int, int], bench: Bench) -> tuple:
    """Batch 1 (the reference), then every batch size; returns (best batch size, clips/h)."""
    device = model.device.type

    def line(bs: int, m: dict, reference: float) -> float:
        value = 3600 * bs / m["seconds"]
        bench.result(
            f"{label} bs{bs}",
            "model_clips_per_hour",
            value,
            reference,
            batch_size=bs,
            frames=FRAMES,
            new_tokens=NEW_TOKENS,
            prompt_tokens=m["prompt_tokens"],
            prefill_s=m["prefill_s"],
            decode_step_ms=1000 * m["step_s"],
            tokens_per_s=bs * NEW_TOKENS / m["seconds"],
            peak_mem_gb=m["peak_mem_gb"],
            hbm_fraction=hbm_fraction(model, bs, m, bench.device),
        )
        return value

    m = measure(model, tok, 1, calls[0], device)
    ref = line(1, m, 3600 / m["seconds"])
    best = (1, ref)
    for bs in sizes:
        m = oom = None
        try:
            m = measure(model, tok, bs, calls[1], device)
        except torch.cuda.OutOfMemoryError:
            oom = True  # freed below, once the traceback (and its tensors) is gone
        except Exception as e:
            report_error(bench, f"{label} bs{bs}", "model-only", e)
        free()
        if oom:
            bench.result(f"{label} bs{bs}", "oom", float(bs), None, batch_size=bs)
        elif m is not None:
            best = max(best, (bs, line(bs, m, ref)), key=lambda x: x[1])
    return best


def end_to_end(cap, clips: dict, name: str, best: tuple, n: int, ref_clips: int, bench) -> None:
    """cogpipe's caption loop at the best batch size vs one clip at a time, on 720p clips."""
    bs, model_only_rate = best
    one = clips_table(clips["paths"], 1 + ref_clips, clips["seconds"])
    caption_loop(cap, one.iloc[:1], 1, ahead=False)  # warm-up: the processor's first call
    r = caption_loop(cap, one.iloc[1:], 1, ahead=False)
    e = caption_loop(cap, clips_table(clips["paths"], n, clips["seconds"]), bs, ahead=True)
    (w, h), s = clips["size"], clips["seconds"]
    bench.result(
        f"{name} e2e {n} clips {w}x{h} {s}s h264 bs{bs}",
        "e2e_clips_per_hour",
        3600 * n / e["seconds"],
        3600 * ref_clips / r["seconds"],
        batch_size=bs,
        clips=n,
        frames=FRAMES,
        new_tokens=NEW_TOKENS,
        tokens_per_caption=e["tokens"],
        generate_s=e["generate_s"],
        wait_decode_s=e["wait_s"],
        generate_fraction=e["generate_s"] / e["seconds"],
        model_only_clips_per_hour=model_only_rate,
        decode_s_per_clip=clips["decode_s"],
        cpu_count=os.cpu_count(),
        processor=type(cap.processor).__name__,
        note="reference: the same code, one clip at a time",
    )


def run_case(key: str, args, tok, bench: Bench, clips: dict | None) -> None:
    """Build one model, measure it model-only and end to end, free it."""
    from cogpipe.caption import Captioner

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = CASES[key][0] + ("-tiny" if args.tiny else "")
    config = build_config(key, tok, args.tiny)
    side = config.vision_config.image_size
    label = f"{name} {FRAMES}f {side}px bf16 sdpa greedy {NEW_TOKENS} new"
    sizes = args.batch_sizes or ((2, 4) if args.tiny else CASES[key][3])
    calls = (1, 1, 1) if args.tiny else (REF_CALLS, BATCH_CALLS, E2E_REF_CLIPS)
    started = time.perf_counter()
    model = build_model(config, device)
    print(f"{name}: built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    best = model_only(model, tok, label, sizes, calls[:2], bench)
    n = args.e2e_clips if args.e2e_clips is not None else 2 * best[0]
    if clips and n > 0:
        try:
            cap = Captioner(
                build_processor(tok, config), model, device, video=True, eos_ids={tok.eos_token_id}
            )
            end_to_end(cap, clips, name, best, n, calls[2], bench)
        except Exception as e:
            report_error(bench, f"{name} e2e", "end to end", e)
        cap = None
    del model
    free()


def prepare_clips(folder: Path, tiny: bool) -> dict:
    """The e2e clips (16 x 10 s 720p; tiny: 4 x 2 s 256x144) and their decode s/clip.
    Made before CUDA or the tokenizer start: the process pool forks."""
    size, seconds, unique = ((256, 144), 2, 4) if tiny else ((1280, 720), 10, 16)
    paths = make_clips(folder, unique, size, seconds)
    decode_s = decode_seconds(clips_table(paths, min(8, unique), seconds))
    return {"paths": paths, "size": size, "seconds": seconds, "decode_s": decode_s}


def _cell(v, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs: a CPU smoke test")
    parser.add_argument("--models", default="7b,34b", help="comma-separated: 7b, 34b")
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated; default 8,32,64 (7b), 8,32 (34b), 2,4 (tiny)",
    )
    parser.add_argument(
        "--e2e-clips",
        type=int,
        default=None,
        help="clips end to end (0: skip); default two batches of the best size",
    )
    parser.add_argument("--out", type=Path, default=None, help="also append the lines here")
    parser.add_argument("--commit", default=None, help="commit to report (no .git on the host)")
    args = parser.parse_args()
    args.batch_sizes = (
        tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None
    )
    keys = [k.strip() for k in args.models.split(",")]
    if unknown := [k for k in keys if k not in CASES]:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(CASES)}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cogpipe-bench-caption-") as tmp:
        clips = clips_error = None
        if args.e2e_clips != 0:
            try:
                clips = prepare_clips(Path(tmp), args.tiny)
            except Exception as e:
                clips_error = e
        device = device_name(not torch.cuda.is_available(), f"cpu-{platform.machine()}")
        bench = Bench("caption", device, commit(args.commit), args.out)
        if clips_error is not None:
            report_error(bench, "e2e clips", "making clips", clips_error)
        if args.tiny and not torch.cuda.is_available():
            torch.set_num_threads(1)  # a tiny model gains nothing from threads on a busy CPU
        tok = build_tokenizer()
        for key in keys:
            try:
                run_case(key, args, tok, bench, clips)
            except Exception as e:
                report_error(bench, CASES[key][0], "case", e)
            free()

    print(
        f"\n{'case':<68} {'metric':<20} {'value':>9} {'ratio':>6} {'GB':>6} {'hbm':>5}",
        file=sys.stderr,
    )
    for ln in bench.lines + bench.errors:
        print(
            f"{ln['case'][:68]:<68} {ln['metric']:<20} {_cell(ln['value'], '9.0f')} "
            f"{_cell(ln['ratio'], '6.2f')} {_cell(ln.get('peak_mem_gb'), '6.1f')} "
            f"{_cell(ln.get('hbm_fraction'), '5.2f')}",
            file=sys.stderr,
        )
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
