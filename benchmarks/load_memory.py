"""Peak memory of `load_model` on an InternVL3-1B-shaped checkpoint (random weights, bf16 on disk, sharded).

    /work/venv/bin/python benchmarks/load_memory.py [--dir DIR] [--max-shard-size 500MB]

The checkpoint is built once (cached in DIR, default a directory under the system temp dir) tensor by tensor from
a model built on the `meta` device, so the builder never holds more than one shard. A fresh subprocess then loads it
in float32 and reports its RSS before loading and its peak RSS (`ru_maxrss`). Target: peak - baseline <= 1.3x the
fp32 weight bytes (the streaming loader keeps about one copy of the weights plus one shard's file pages).
Results: a markdown table on stdout and benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from internvl.checkpoint.names import internal_to_original
from internvl.checkpoint.saver import (
    atomic_directory,
    generation_config_dict,
    original_config_dict,
    write_json,
    write_weights,
)
from internvl.config import InternVLConfig, LLMConfig, VisionConfig
from internvl.model.internvl import InternVLModel

TARGET_RATIO = 1.3
RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"


def internvl3_1b_config() -> InternVLConfig:
    """Shapes of OpenGVLab/InternVL3-1B (INTERNVL.md §1, §3.1, §11.3): InternViT-300M-448px + Qwen2.5-0.5B."""
    return InternVLConfig(
        vision=VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, image_size=448,
                            patch_size=14, norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
        llm=LLMConfig(arch="Qwen2ForCausalLM", vocab_size=151674, hidden_size=896, intermediate_size=4864,
                      num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=32768, qkv_bias=True,
                      rope_scaling={"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
                      bos_token_id=151643, eos_token_id=151643),
        template="internvl2_5", downsample_ratio=0.5, ps_version="v2", force_image_size=448,
        dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1, max_dynamic_patch=12,
    )


def build_checkpoint(out: Path, max_shard_size: str) -> None:
    cfg = internvl3_1b_config()
    with torch.device("meta"):
        shapes = internal_to_original(InternVLModel(cfg).state_dict(), cfg)  # names and shapes, no memory
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for name, meta in shapes.items():
            yield name, (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)

    with atomic_directory(out) as tmp:
        write_weights(tensors(), tmp, max_shard_size)
        write_json(tmp / "config.json", original_config_dict(cfg, torch.bfloat16))
        write_json(tmp / "generation_config.json", generation_config_dict(cfg))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def child(ckpt: Path) -> None:
    """Runs in a fresh interpreter: everything imported first, so the baseline excludes only the load itself."""
    from internvl.checkpoint.loader import load_model

    baseline = rss_bytes()
    t0 = time.perf_counter()
    model = load_model(ckpt, dtype="float32")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "after_rss": rss_bytes(),
                      "fp32_weight_bytes": weights, "load_seconds": seconds}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "internvl_bench_internvl3_1b_bf16",
                   help="where the random checkpoint is built (reused when present)")
    p.add_argument("--max-shard-size", default="500MB")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.dir)
        return 0
    if not (args.dir / "config.json").is_file():
        t0 = time.perf_counter()
        build_checkpoint(args.dir, args.max_shard_size)
        print(f"built {args.dir} in {time.perf_counter() - t0:.1f} s")
    disk = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, __file__, "--child", "--dir", str(args.dir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = (r["peak_rss"] - r["baseline_rss"]) / r["fp32_weight_bytes"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or None
    result = {**r, "peak_minus_baseline_over_fp32": round(ratio, 4), "target_ratio": TARGET_RATIO,
              "passed": ratio <= TARGET_RATIO, "checkpoint_bytes_on_disk": disk,
              "shards": len(list(args.dir.glob("*.safetensors"))), "dtype_on_disk": "bfloat16",
              "dtype_loaded": "float32", "device": "cpu", "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "commit": commit,
              "date": time.strftime("%Y-%m-%d")}
    gib = 2**30
    print("| fp32 weight bytes | baseline RSS | peak RSS | (peak - baseline) / fp32 | load time |")
    print("|---|---|---|---|---|")
    print(f"| {r['fp32_weight_bytes'] / gib:.3f} GiB | {r['baseline_rss'] / gib:.3f} GiB | "
          f"{r['peak_rss'] / gib:.3f} GiB | {ratio:.3f} (target <= {TARGET_RATIO}) | {r['load_seconds']:.1f} s |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
