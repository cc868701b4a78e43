"""Shared pieces of benchmarks/run.py: machine facts, rooflines, timing, model shapes, FLOP/byte counts, accuracy.

Nothing here is imported by the package. transformers is used only as the comparison baseline.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from internvl.config import InternVLConfig, LLMConfig, VisionConfig

IMG_CONTEXT_ID = 151667  # <IMG_CONTEXT> in the InternVL3 (Qwen2.5) tokenizer


# ------------------------------------------------------------------------------------------------ machine
def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(threads: int) -> dict:
    model_name = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
        flags = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags:")), [])
    except (OSError, subprocess.CalledProcessError):
        flags = []
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni") if f in flags]
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "isa": isa,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over fork + exec from the
    (large) parent, so a child started by the benchmark would report the parent's peak."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ timing
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(reps: int, fns: dict) -> dict[str, list[float]]:
    """Run every fn once per repetition, alternating sides, so background load hits both equally."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(fn())
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ------------------------------------------------------------------------------------------------ rooflines
@torch.no_grad()
def gemm_gflops(dtype: torch.dtype, n: int, reps: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    return 2 * n**3 / median([timed(lambda: a @ b) for _ in range(reps)]) / 1e9


@torch.no_grad()
def read_bandwidth_gbs(nbytes: int, reps: int) -> float:
    """Streaming read: sum of a buffer much larger than the last-level cache."""
    x = torch.ones(nbytes // 4)
    x.sum()
    return nbytes / median([timed(lambda: x.sum()) for _ in range(reps)]) / 1e9


@torch.no_grad()
def copy_bandwidth_gbs(nbytes: int, reps: int) -> float:
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * nbytes / median([timed(lambda: y.copy_(x)) for _ in range(reps)]) / 1e9


@torch.no_grad()
def gemv_bandwidth_gbs(reps: int, layers: int = 24, n: int = 4864, k: int = 896) -> float:
    """fp32 matrix-vector through a stack of weights bigger than the cache (what a decode step is made of)."""
    ws = [torch.randn(n, k) for _ in range(layers)]
    x = torch.randn(1, k)
    run = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
    run()
    return layers * n * k * 4 / median([timed(run) for _ in range(reps)]) / 1e9


# ------------------------------------------------------------------------------------------------ shapes
def full_config() -> InternVLConfig:
    """InternVL3-1B shapes (huggingface.co/OpenGVLab/InternVL3-1B config.json): InternViT-300M-448px + Qwen2.5-0.5B."""
    vision = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, image_size=448,
                          patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
    llm = LLMConfig(arch="Qwen2ForCausalLM", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                    num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True,
                    max_position_embeddings=32768, bos_token_id=None, eos_token_id=151645, pad_token_id=151643)
    return InternVLConfig(vision=vision, llm=llm, template="internvl2_5", force_image_size=448,
                          image_token_id=IMG_CONTEXT_ID)


def quick_config() -> InternVLConfig:
    """A small model with the same structure, for `--quick` sanity runs (224 px tiles: 64 tokens each)."""
    vision = VisionConfig(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, image_size=224,
                          patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False)
    llm = LLMConfig(arch="Qwen2ForCausalLM", vocab_size=151674, hidden_size=256, intermediate_size=1024,
                    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e6, qkv_bias=True,
                    max_position_embeddings=32768, eos_token_id=151645, pad_token_id=151643)
    return InternVLConfig(vision=vision, llm=llm, template="internvl2_5", force_image_size=224,
                          image_token_id=IMG_CONTEXT_ID)


@torch.no_grad()
def init_random_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Random weights at the usual init scale (N(0, 0.02); norm weights and layer scales 1 + N(0, 0.02)).

    Random weights are a pessimistic-but-honest proxy for accuracy numbers: trained weights are not Gaussian and
    trained logits have large top-1 margins, while random logits are nearly flat, so argmax flips more easily.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if p.ndim == 1 and ("norm" in name or name.endswith((".ls1", ".ls2")) or "mlp1.0" in name):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)
    return model


@dataclass
class Counts:
    """FLOPs and bytes of the model pieces, for roofline fractions."""

    cfg: InternVLConfig

    def vit_flops_per_tile(self) -> float:
        v = self.cfg.vision
        n = (self.cfg.image_size // v.patch_size) ** 2 + 1
        c, i = v.hidden_size, v.intermediate_size
        linear = 2 * n * (4 * c * c + 2 * c * i) * v.num_layers  # qkv, proj, fc1, fc2
        attn = 4 * n * n * c * v.num_layers  # q k^T and p v, all heads
        patch = 2 * (n - 1) * 3 * v.patch_size**2 * c
        width = c * 4
        proj = 2 * self.cfg.num_image_token * (width * self.cfg.llm.hidden_size + self.cfg.llm.hidden_size**2)
        return linear + attn + patch + proj

    def llm_linear_params(self, lm_head: bool) -> int:
        c = self.cfg.llm
        d, hd = c.hidden_size, c.head_dim
        per = d * (c.num_heads + 2 * c.num_kv_heads) * hd + c.num_heads * hd * d + 3 * d * c.intermediate_size
        return per * c.num_layers + (c.vocab_size * d if lm_head else 0)

    def prefill_flops(self, n: int) -> float:
        c = self.cfg.llm
        linear = 2 * n * self.llm_linear_params(lm_head=False) + 2 * c.vocab_size * c.hidden_size  # last logits
        attn = 2 * n * n * c.num_heads * c.head_dim * c.num_layers  # causal: half of 4 n^2 H d
        return linear + attn

    def decode_bytes(self, weight_bytes: int, batch: int, context: int) -> float:
        """Bytes one decode step must read: every LLM weight once, plus the K/V cache of every sequence."""
        c = self.cfg.llm
        kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * context * batch
        return weight_bytes + kv


def linear_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights of every (possibly quantized) linear layer under `module`."""
    from internvl.model.quantize import QUANTIZED_LINEARS

    total = 0
    for m in module.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


# ------------------------------------------------------------------------------------------------ inputs
def image_prompt(tiles: int, tokens_per_tile: int, text: int = 40, seed: int = 0) -> torch.Tensor:
    """A chat-shaped prompt: text, <img>, tiles x tokens_per_tile <IMG_CONTEXT>, </img>, question. (1, L)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1000, 100000, (text // 2,), generator=g)
    tail = torch.randint(1000, 100000, (text - text // 2,), generator=g)
    img = torch.full((tiles * tokens_per_tile,), IMG_CONTEXT_ID)
    return torch.cat([head, img, tail])[None]


def text_prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, 100000, (batch, length), generator=torch.Generator().manual_seed(seed))


def pixels(tiles: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ accuracy
def cosines(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Per-row cosine of two (N, V) logit matrices -> (mean, min)."""
    cos = F.cosine_similarity(ref.double(), other.double(), dim=-1)
    return float(cos.mean()), float(cos.min())


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
