"""Weight-only int8 / int4 quantization of `nn.Linear` layers, as a module swap (STYLE.md §1, §7 item 5).

`quantize_model(model, "int8")` replaces the selected `nn.Linear` modules by `Int8Linear` / `Int4Linear`; the model
code is unchanged and nothing in any `forward` knows about quantization. The readable reference of a quantized layer
is `F.linear(x, layer.dequantize(), layer.bias)`; the fast kernels are tested against it (tests/model/test_quantize.py).

Formats (what is stored, kernel-independent):
* int8: per output channel, symmetric. `weight` int8 (N, K) in [-127, 127], `scale` fp32 (N,);
  W[n, k] ~= weight[n, k] * scale[n], scale = max_k |W[n, k]| / 127.
* int4: per output channel and group of `group_size` input channels, asymmetric (min/max).
  `weight` uint8 (N, K/2) two codes per byte (low nibble = even k), codes q in 0..15; `scales`, `zeros` fp32
  (N, K/group); W[n, k] ~= (q - 8) * scales[n, g] + zeros[n, g] with g = k // group_size, which is the convention of
  torch's CPU int4 kernel, so its packed layout is derived from ours without rounding again.

Kernels (CPU, torch 2.13; measured by benchmarks/run.py and summarised in docs/BENCHMARKS.md):
* int8, few rows (decode): `aten._weight_int8pack_mm` with **bf16 activations** (its fp32-activation path is much
  slower); the input is rounded to bf16 and the result comes back as bf16 before the cast to the input dtype.
* int4, few rows: `aten._weight_int4pack_mm_for_cpu`, also with **bf16 activations** and bf16 scales/zeros (its
  fp32-activation path is 8-50x slower); it needs group 32/64/128/256 (other groups use the dequantize path for
  every M and say so in `kernel`) and N % 16 == 0 (the kernel copy of the weight is padded with zero rows, e.g. the
  151674-row lm_head, and the padding is sliced off the output).
* many rows (prefill, ViT): dequantize the whole weight once per call and run an ordinary GEMM in `compute_dtype`
  (None = the activation dtype, i.e. fp32 numerics on the dequantized weight; torch.bfloat16 = bf16 GEMM, which uses
  AMX/AVX512-BF16 where the CPU has it, at the price of bf16 rounding of the activations). int8 multiplies by the
  per-row scale after the GEMM (x @ q.T) * s, so the weight is only cast, never rescaled, and the int8 codes are
  exact in bf16.
The row threshold between the two is `gemv_rows` (per module; defaults `GEMV_ROWS_INT8`, `GEMV_ROWS_INT4`).

Quantized checkpoints: `save_quantized(model, dir)` writes `config.json` (original layout plus a `quantization`
entry), and the model's state dict under our internal module names (int tensors + fp32 scales, float tensors in
the model's dtype) as safetensors; `load_quantized(dir)` rebuilds the same modules and loads it.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUANT_MODES = ("int8", "int4")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
TARGET_PREFIXES = {"llm": "language_model.", "vision": "vision_model.", "projector": "mlp1."}
FORMAT = "internvl-weight-only-v1"
# Up to this many rows (tokens x batch) the weight-only kernels beat "dequantize + fp32 GEMM" on the benchmark
# machine (kernel sweep in docs/BENCHMARKS.md); above it the dequantize cost is amortised over enough rows.
GEMV_ROWS_INT8 = 64
GEMV_ROWS_INT4 = 256
GEMV_ROWS = None  # quantize_model default: each class's own threshold


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


# ---------------------------------------------------------------------------------------------------- int8
def quantize_int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K), fp32 scale (N,); symmetric per output channel."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (weight * scale[:, None]).T + bias with an int8 weight (see the module docstring for kernels)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 bias_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                 gemv_rows: int | None = GEMV_ROWS):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = compute_dtype
        self.gemv_rows = GEMV_ROWS_INT8 if gemv_rows is None else gemv_rows
        # the bf16 int8 kernel reads past the end of rows whose length is not a multiple of 16 (measured: NaNs)
        self.kernel = "int8pack_bf16" if in_features % 16 == 0 else "dequant"
        self.refresh_()

    @torch.no_grad()
    def refresh_(self) -> "Int8Linear":
        """Rebuild the kernel-side tensors from `weight`/`scale` (after loading or editing them)."""
        self._scale_bf16 = self.scale.to(torch.bfloat16)
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, **kw) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                bias_dtype=lin.weight.dtype, **kw)
        if not lin.weight.is_meta:
            q, s = quantize_int8_weight(lin.weight)
            m.weight.copy_(q)
            m.scale.copy_(s)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m.refresh_()

    @classmethod
    @torch.no_grad()
    def cat(cls, mods: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing the concatenated outputs of `mods` (per-row scales make this exact)."""
        first = mods[0]
        if any(m.in_features != first.in_features or (m.bias is None) != (first.bias is None) for m in mods):
            raise ValueError("can only concatenate int8 layers with the same input size and bias presence")
        out = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None,
                  device=first.weight.device, bias_dtype=first.bias.dtype if first.bias is not None else torch.float32,
                  compute_dtype=first.compute_dtype, gemv_rows=first.gemv_rows)
        out.weight = torch.cat([m.weight for m in mods])
        out.scale = torch.cat([m.scale for m in mods])
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
        return out.refresh_()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (N, K) this layer represents."""
        return (self.weight.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8pack_bf16" and _rows(x) <= self.gemv_rows:
            y = torch.ops.aten._weight_int8pack_mm(
                x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self._scale_bf16
            ).to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        # many rows: (x @ q.T) * s, one GEMM in compute_dtype on the cast codes, scale and bias in x's dtype.
        # Few passes over the (big) output on purpose: each fresh large tensor costs page faults on CPU.
        dt = self.compute_dtype or x.dtype
        y = F.linear(x.to(dt), self.weight.to(dt))
        y = y.mul_(self.scale.to(dt)) if dt == x.dtype else (y * self.scale).to(x.dtype)  # bf16 * fp32 -> fp32
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}, gemv_rows={self.gemv_rows}, compute_dtype={self.compute_dtype}")


def _dequant_linear(x, dequantize, bias, compute_dtype) -> torch.Tensor:
    """Many rows: dequantize once, one ordinary GEMM in `compute_dtype` (None = x's dtype)."""
    dt = compute_dtype or x.dtype
    b = None if bias is None else bias.to(dt)
    return F.linear(x.to(dt), dequantize(dt), b).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- int4
def quantize_int4_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed uint8 (N, K/2), scales (N, K/g), zeros (N, K/g); asymmetric per group.

    Codes q = round((w - min) / scale) in 0..15 with scale = (max - min) / 15 and zero = min + 8 * scale, so that
    (q - 8) * scale + zero = min + q * scale reproduces the group's range exactly at both ends.
    """
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"int4 group size {group_size} does not divide the input size {k} (or {k} is odd)")
    g = w.detach().float().reshape(n, k // group_size, group_size)  # (N, groups, g)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = (hi - lo) / 15.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant group: every code is 0
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    zeros = lo + 8.0 * scales
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes (N, K) in 0..15 -> (N, K/2), low nibble = even column."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) -> uint8 codes (N, K)."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)  # (N, K/2, 2) -> interleaved columns


class Int4Linear(nn.Module):
    """y = x @ W.T + bias with W group-wise int4 (see the module docstring for formats and kernels)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128, device=None,
                 bias_dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                 gemv_rows: int | None = GEMV_ROWS):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ValueError(f"int4 group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = compute_dtype
        self.gemv_rows = GEMV_ROWS_INT4 if gemv_rows is None else gemv_rows
        self.kernel = "int4pack" if group_size in INT4_KERNEL_GROUPS else "dequant"
        self.refresh_()

    @torch.no_grad()
    def refresh_(self) -> "Int4Linear":
        """Derive the kernel's packed weight and (groups, N, 2) scale/zero table from the stored format."""
        self._packed = self._scales_zeros = None
        if self.kernel == "int4pack" and not self.weight.is_meta:
            pad = -self.out_features % 16  # the kernel packs rows in blocks of 16
            codes = F.pad(unpack_int4(self.weight).to(torch.int32), (0, 0, 0, pad))  # (N + pad, K)
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([self.scales, self.zeros], dim=-1)  # (N, groups, 2)
            sz = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1)  # (groups, N + pad, 2); padded rows are 0
            self._scales_zeros = sz.to(torch.bfloat16).contiguous()
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, group_size: int = 128, **kw) -> "Int4Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size, device=lin.weight.device,
                bias_dtype=lin.weight.dtype, **kw)
        if not lin.weight.is_meta:
            packed, scales, zeros = quantize_int4_weight(lin.weight, group_size)
            m.weight.copy_(packed)
            m.scales.copy_(scales)
            m.zeros.copy_(zeros)
            if lin.bias is not None:
                m.bias.copy_(lin.bias)
        return m.refresh_()

    @classmethod
    @torch.no_grad()
    def cat(cls, mods: list["Int4Linear"]) -> "Int4Linear":
        first = mods[0]
        if any(m.in_features != first.in_features or m.group_size != first.group_size
               or (m.bias is None) != (first.bias is None) for m in mods):
            raise ValueError("can only concatenate int4 layers with the same input size, group and bias presence")
        out = cls(first.in_features, sum(m.out_features for m in mods), first.bias is not None, first.group_size,
                  device=first.weight.device,
                  bias_dtype=first.bias.dtype if first.bias is not None else torch.float32,
                  compute_dtype=first.compute_dtype, gemv_rows=first.gemv_rows)
        out.weight = torch.cat([m.weight for m in mods])
        out.scales = torch.cat([m.scales for m in mods])
        out.zeros = torch.cat([m.zeros for m in mods])
        if first.bias is not None:
            out.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
        return out.refresh_()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, g = self.out_features, self.group_size
        codes = unpack_int4(self.weight).to(dtype).view(n, -1, g) - 8  # (N, groups, g)
        w = codes * self.scales.to(dtype)[..., None] + self.zeros.to(dtype)[..., None]
        return w.reshape(n, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and _rows(x) <= self.gemv_rows:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(torch.bfloat16), self._packed, self.group_size, self._scales_zeros
            )[:, :self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return _dequant_linear(x, self.dequantize, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, kernel={self.kernel}, gemv_rows={self.gemv_rows}, "
                f"compute_dtype={self.compute_dtype}")


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


# ---------------------------------------------------------------------------------------------------- transform
def _matches(name: str, patterns) -> bool:
    """`lm_head` matches `language_model.lm_head`; glob patterns (`*.mlp.*`) match the full name."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _selected_linears(model: nn.Module, targets, skip) -> list[str]:
    unknown = [t for t in targets if t not in TARGET_PREFIXES]
    if unknown:
        raise ValueError(f"unknown quantization target(s) {unknown}; choose from {', '.join(TARGET_PREFIXES)}")
    prefixes = tuple(TARGET_PREFIXES[t] for t in targets)
    return [n for n, m in model.named_modules()  # nn.Linear and its float subclasses (fast.SkinnyLinear)
            if isinstance(m, nn.Linear) and n.startswith(prefixes) and not _matches(n, skip)]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8", targets=("llm",), skip=(), group_size: int = 128,
                   compute_dtype: torch.dtype | dict | None = None, gemv_rows: int = GEMV_ROWS) -> nn.Module:
    """Swap the `nn.Linear` layers under `targets` (of 'llm', 'vision', 'projector') for int8/int4 ones, in place.

    skip: module names or glob patterns left in float (e.g. ('lm_head',)). group_size: int4 only.
    compute_dtype: dtype of the many-rows GEMM (None = activation dtype; torch.bfloat16 = faster, less exact), or a
    dict target -> dtype (e.g. {'vision': torch.bfloat16}: bf16 GEMMs in the ViT only).
    Returns `model`; `model.quantization` records the settings (used by `save_quantized`).
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is not supported; choose from {', '.join(QUANT_MODES)}")
    if getattr(model, "quantization", None):
        raise ValueError(f"model is already quantized ({model.quantization['mode']}); start from a float model")
    targets, skip = tuple(targets), tuple(skip)
    per_target = compute_dtype if isinstance(compute_dtype, dict) else {t: compute_dtype for t in targets}
    if set(per_target) - set(targets):
        raise ValueError(f"compute_dtype names targets {sorted(set(per_target) - set(targets))} not being quantized")
    names = _selected_linears(model, targets, skip)
    if not names:
        raise ValueError(f"no nn.Linear layers under targets {targets} (after skip {skip})")
    if mode == "int4":
        bad = [n for n in names if model.get_submodule(n).in_features % group_size]
        if bad:
            raise ValueError(f"int4 group size {group_size} does not divide {bad[0]}.in_features "
                             f"{model.get_submodule(bad[0]).in_features}; choose one that divides every layer")
    for name in names:
        lin = model.get_submodule(name)
        dt = per_target.get(_target_of(name))
        if mode == "int8":
            new = Int8Linear.from_linear(lin, compute_dtype=dt, gemv_rows=gemv_rows)
        else:
            new = Int4Linear.from_linear(lin, group_size, compute_dtype=dt, gemv_rows=gemv_rows)
        _swap(model, name, new)
    model.quantization = {"format": FORMAT, "mode": mode, "targets": list(targets), "skip": list(skip),
                          "group_size": group_size if mode == "int4" else None,
                          "compute_dtype": {t: None if d is None else str(d).removeprefix("torch.")
                                            for t, d in per_target.items()},
                          "modules": names}
    return model


def _target_of(name: str) -> str:
    return next(t for t, prefix in TARGET_PREFIXES.items() if name.startswith(prefix))


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight a forward pass reads (quantized storage for swapped layers, float for the rest)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_quantized(model: nn.Module, out_dir: str | Path, overwrite: bool = False,
                   max_shard_size: int | str = "5GB") -> Path:
    """Write a quantized `InternVLModel`: config.json (original layout + `quantization`) + safetensors shards."""
    from internvl.checkpoint.saver import atomic_directory, dtype_name, original_config_dict, write_json, write_weights

    spec = getattr(model, "quantization", None)
    if not spec:
        raise ValueError("model is not quantized; call quantize_model first (or use save_pretrained)")
    fused = [n for n, m in model.named_modules() if getattr(m, "fused_for_inference", False)]
    if fused:
        raise ValueError(f"save_quantized needs the unfused module layout, but {fused[0]} was fused by "
                         "optimize_for_inference; save before optimizing (load_quantized + optimize_for_inference)")
    state = model.state_dict()
    float_dtype = next((t.dtype for t in state.values() if t.is_floating_point() and t.dtype != torch.float32),
                       torch.float32)
    out = Path(out_dir)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_weights(iter(state.items()), tmp, max_shard_size)
        cfg = original_config_dict(model.config, float_dtype)
        # the original layout has no field for the <IMG_CONTEXT> id (it lives in the tokenizer): keep ours here
        cfg["quantization"] = {**{k: v for k, v in spec.items() if k != "modules"}, "modules": spec["modules"],
                               "float_dtype": dtype_name(float_dtype),
                               "image_token_id": getattr(model, "img_context_token_id", None)}
        write_json(tmp / "config.json", cfg)
    return out


@torch.no_grad()
def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a checkpoint written by `save_quantized` (eval mode)."""
    from internvl.checkpoint.loader import checkpoint_files, iter_file_tensors
    from internvl.config import InternVLConfig
    from internvl.model.internvl import InternVLModel
    from internvl.model.rope import RotaryEmbedding

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    d = json.loads(cfg_file.read_text(encoding="utf-8"))
    spec = d.get("quantization")
    if not spec or spec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a quantized checkpoint written by save_quantized "
                         f"(config.json quantization format {spec and spec.get('format')!r}, expected {FORMAT!r})")
    device = torch.device(device)
    cfg = InternVLConfig.from_dict(d)
    compute = {t: None if d is None else getattr(torch, d) for t, d in (spec.get("compute_dtype") or {}).items()}
    with torch.device("meta"):
        model = InternVLModel(cfg)
    for name in spec["modules"]:
        lin = model.get_submodule(name)
        dt = compute.get(_target_of(name))
        if spec["mode"] == "int8":
            new = Int8Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta",
                             compute_dtype=dt)
        else:
            new = Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, spec["group_size"],
                             device="meta", compute_dtype=dt)
        _swap(model, name, new)
    state = {}
    for f in checkpoint_files(path):
        for n, t in iter_file_tensors(f):
            state[n] = t.to(device).clone()
    model.load_state_dict(state, strict=True, assign=True)
    for name, m in list(model.named_modules()):
        if isinstance(m, RotaryEmbedding):  # non-persistent tables are rebuilt on the real device
            _swap(model, name, RotaryEmbedding(cfg.llm).to(device))
        elif isinstance(m, QUANTIZED_LINEARS):
            m.refresh_()
    model.quantization = {k: v for k, v in spec.items() if k not in ("float_dtype", "image_token_id")}
    model.img_context_token_id = spec.get("image_token_id", cfg.image_token_id)
    return model.eval()
