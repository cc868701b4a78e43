"""RoPE variants (INTERNVL.md §11.1, §11.2, §11.4, §11.6, §20 items 24-25).

Expected cos/sin come from the spec formulas written out here, or from transformers' own rotary modules.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from internvl.model.rope import RotaryEmbedding, apply_rotary
from tiny import tiny_llm

from .oracle import assert_rel_close, hf_text_config, rel_diff

BASE, D = 10000.0, 12  # tiny_llm: rope_theta, head_dim


def spec_cos_sin(positions: torch.Tensor, base: float, d: int = D, scale: float = 1.0, ext=None):
    """§11.1: theta_k = base^(-2k/d) (divided by ext_k for Phi-3), the d/2 angles repeated twice, times `scale`."""
    k = torch.arange(d // 2, dtype=torch.float64)
    theta = base ** (-2 * k / d)
    if ext is not None:
        theta = theta / torch.tensor(ext, dtype=torch.float64)
    ang = positions.double()[..., None] * theta
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos() * scale).float(), (ang.sin() * scale).float()


def ntk_base(base, d, factor, length, max_len):
    """§11.2: base' = base * (f*L/M - (f-1))^(d/(d-2))."""
    return base * (factor * length / max_len - (factor - 1)) ** (d / (d - 2))


def check(rope, positions, want, kv_len=None, what=""):
    """cos/sin equal `want`. The angle p*theta is formed in float32 (as the spec and transformers do), so a few
    float32 roundings of an angle up to max(p) bound the error: 1e-5 plus 3 * max(p) * 2^-24 (1e-4 at p = 511)."""
    cos, sin = rope(positions, kv_len=kv_len)
    tol = 1e-5 + 3 * int(positions.max()) * 2**-24
    assert_rel_close(cos, want[0], tol, what=f"{what} cos")
    assert_rel_close(sin, want[1], tol, what=f"{what} sin")


def arange(n, start=0):
    return torch.arange(start, start + n)[None]


# ------------------------------------------------------------------------------------------------ plain
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM3ForCausalLM"])
def test_plain_rope_matches_formula(arch):
    cfg = tiny_llm(arch)
    rope = RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 17, 300], [3, 3, 4, 9, 511]])
    check(rope, pos, spec_cos_sin(pos, BASE, cfg.head_dim), what=arch)


def test_apply_rotary_is_a_rotation_of_half_pairs():
    """rotate-half layout: (x_k, x_{k+d/2}) is rotated by the angle p*theta_k (checked with complex numbers)."""
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)  # (B, heads, L, d)
    pos = torch.randint(0, 100, (2, 5))
    cos, sin = spec_cos_sin(pos, BASE)
    got = apply_rotary(x, cos.double(), sin.double())
    k = torch.arange(D // 2, dtype=torch.float64)
    angle = pos.double()[:, None, :, None] * BASE ** (-2 * k / D)  # (B, 1, L, d/2)
    z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.exp(1j * angle)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-6, atol=1e-6)


def test_qwen2_ignores_rope_scaling():
    """The reference pin (transformers 4.37.2) ignores Qwen2's rope_scaling (§11.3): plain RoPE even past max."""
    rope = RotaryEmbedding(tiny_llm("Qwen2ForCausalLM", max_position_embeddings=64,
                                    rope_scaling={"rope_type": "dynamic", "type": "dynamic", "factor": 2.0}))
    check(rope, arange(100), spec_cos_sin(arange(100), BASE), what="qwen2 long")


def test_linear_scaling_divides_positions():
    rope = RotaryEmbedding(tiny_llm("LlamaForCausalLM", rope_scaling={"type": "linear", "factor": 4.0}))
    pos = arange(30)
    check(rope, pos, spec_cos_sin(pos.double() / 4.0, BASE), what="linear")


def test_unsupported_rope_type_raises():
    with pytest.raises(ValueError, match="mrope"):
        RotaryEmbedding(tiny_llm("LlamaForCausalLM", rope_scaling={"rope_type": "mrope", "factor": 2.0}))


# ------------------------------------------------------------------------------------------------ InternLM2 NTK
def internlm2_rope(max_len=64, factor=2.0):
    return RotaryEmbedding(tiny_llm("InternLM2ForCausalLM", max_position_embeddings=max_len,
                                    rope_scaling={"type": "dynamic", "factor": factor}))


def test_internlm2_dynamic_is_plain_up_to_max():
    rope = internlm2_rope()
    for n in (10, 64):  # L <= M: plain (the switch is L > M)
        check(rope, arange(n), spec_cos_sin(arange(n), BASE), kv_len=n, what=f"internlm2 L={n}")


def test_internlm2_dynamic_ntk_is_stateful():
    """§11.2: past M the base becomes base' (formula) for the kv length, and it persists for later shorter calls."""
    rope = internlm2_rope(max_len=64, factor=2.0)
    b100 = ntk_base(BASE, D, 2.0, 100, 64)
    assert b100 / BASE > 2  # really a different base, so the checks below can fail
    check(rope, arange(100), spec_cos_sin(arange(100), b100), kv_len=100, what="L=100")
    assert rel_diff(rope(arange(100), kv_len=100)[0], spec_cos_sin(arange(100), BASE)[0]) > 1e-2
    # later, a short call keeps base'(100): stateful, unlike transformers' dynamic rope
    check(rope, arange(10), spec_cos_sin(arange(10), b100), kv_len=10, what="short after long")
    # a length between M and the cached 100 does not rebuild either
    check(rope, arange(80), spec_cos_sin(arange(80), b100), kv_len=80, what="80 after 100")
    # decode step past the cache: position 100, kv length 101 -> base'(101) for the new token only
    check(rope, torch.tensor([[100]]), spec_cos_sin(torch.tensor([[100]]), ntk_base(BASE, D, 2.0, 101, 64)),
          kv_len=101, what="decode 101")
    # and it keeps growing from there
    b101 = ntk_base(BASE, D, 2.0, 101, 64)
    check(rope, arange(5), spec_cos_sin(arange(5), b101), kv_len=5, what="short after decode")


def test_internlm2_ntk_length_is_kv_length_not_max_position():
    """The reference rebuilds for the key/value length (cached + new), which with left padding exceeds max(pos)+1."""
    rope = internlm2_rope(max_len=64, factor=3.0)
    pos = arange(60)  # max position 59, but 70 keys (10 left pads)
    check(rope, pos, spec_cos_sin(pos, ntk_base(BASE, D, 3.0, 70, 64)), kv_len=70, what="kv_len 70")


# ------------------------------------------------------------------------------------------------ Llama dynamic
def hf_llama_rope(cfg):
    d = hf_text_config(cfg)
    d.pop("model_type")
    return LlamaRotaryEmbedding(LlamaConfig(**d))


def hf_cos_sin(hf_rope, pos):
    return hf_rope(torch.zeros(1), pos)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "InternLM3ForCausalLM"])
def test_transformers_style_dynamic_matches_transformers(arch):
    """Llama/InternLM3 'dynamic' = transformers' dynamic NTK: scaled past M for max(pos)+1, plain again when short."""
    cfg = tiny_llm(arch, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ours, hf = RotaryEmbedding(cfg), hf_llama_rope(cfg)
    for n in (100, 40, 70, 120):  # growing, back under M (reset), growing again
        pos = arange(n)
        want = hf_cos_sin(hf, pos)
        check(ours, pos, want, what=f"{arch} L={n}")
    # the long case really is scaled, with the spec's base
    check(ours, arange(120), spec_cos_sin(arange(120), ntk_base(BASE, cfg.head_dim, 2.0, 120, 64), cfg.head_dim))


def test_llama3_scaling_matches_transformers():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
    cfg = tiny_llm("LlamaForCausalLM", head_dim=64, hidden_size=256, rope_theta=500000.0, rope_scaling=rs)
    ours, hf = RotaryEmbedding(cfg), hf_llama_rope(cfg)
    plain = spec_cos_sin(arange(200), 500000.0, d=64)
    want = hf_cos_sin(hf, arange(200))
    assert rel_diff(want[0], plain[0]) > 1e-3  # the scaling really changes some frequencies
    check(ours, arange(200), want, what="llama3")


# ------------------------------------------------------------------------------------------------ Phi-3 su / yarn
PHI3 = tiny_llm("Phi3ForCausalLM")  # max 1024, original 256, 6 short and 6 long factors


def test_phi3_su_matches_spec_formula():
    """§11.4: short factors for L <= 256, long past it; cos and sin both times m = sqrt(1 + ln s / ln orig)."""
    rope = RotaryEmbedding(PHI3)
    s = 1024 / 256
    m = math.sqrt(1 + math.log(s) / math.log(256))
    assert abs(m - 1) > 0.1  # applied even to short prompts
    rs = PHI3.rope_scaling
    check(rope, arange(256), spec_cos_sin(arange(256), BASE, scale=m, ext=rs["short_factor"]), what="L=256 short")
    check(rope, arange(257), spec_cos_sin(arange(257), BASE, scale=m, ext=rs["long_factor"]), what="L=257 long")
    # per call: the factor choice follows this call's max position, e.g. one decode step at position 256
    check(rope, torch.tensor([[256]]), spec_cos_sin(torch.tensor([[256]]), BASE, scale=m, ext=rs["long_factor"]))
    check(rope, arange(10), spec_cos_sin(arange(10), BASE, scale=m, ext=rs["short_factor"]), what="short again")


def test_phi3_su_matches_transformers_longrope():
    """transformers renames 'su' to 'longrope' and applies the same per-call factor switch and attention factor."""
    ours = RotaryEmbedding(PHI3)
    d = hf_text_config(PHI3)
    assert d["rope_parameters"]["rope_type"] == "longrope"
    d.pop("model_type")
    hf = Phi3RotaryEmbedding(Phi3Config(**d))
    for pos in (arange(40), arange(300), torch.tensor([[255]]), torch.tensor([[256]]), arange(256)):
        check(ours, pos, hf_cos_sin(hf, pos), what=f"phi3 max pos {int(pos.max())}")
    # the old name itself, as Phi3Config accepts it
    d_su = dict(d, rope_parameters=dict(d["rope_parameters"], rope_type="su"))
    hf_su = Phi3RotaryEmbedding(Phi3Config(**d_su))
    check(ours, arange(300), hf_cos_sin(hf_su, arange(300)), what="phi3 'su' name")


def test_phi3_longrope_name_is_accepted():
    rs = dict(PHI3.rope_scaling, type="longrope")
    ours = RotaryEmbedding(tiny_llm("Phi3ForCausalLM", rope_scaling=rs))
    check(ours, arange(300), RotaryEmbedding(PHI3)(arange(300)), what="longrope == su")


def test_phi3_yarn_scale():
    """yarn: same factor switch, m = 0.1 ln s + 1 (§11.4 step 4)."""
    rs = dict(PHI3.rope_scaling, type="yarn")
    rope = RotaryEmbedding(tiny_llm("Phi3ForCausalLM", rope_scaling=rs))
    m = 0.1 * math.log(4) + 1
    check(rope, arange(40), spec_cos_sin(arange(40), BASE, scale=m, ext=rs["short_factor"]), what="yarn short")
    check(rope, arange(300), spec_cos_sin(arange(300), BASE, scale=m, ext=rs["long_factor"]), what="yarn long")


def test_phi3_no_scale_when_max_equals_original():
    rope = RotaryEmbedding(tiny_llm("Phi3ForCausalLM", max_position_embeddings=256))
    check(rope, arange(40), spec_cos_sin(arange(40), BASE, ext=PHI3.rope_scaling["short_factor"]), what="m = 1")
