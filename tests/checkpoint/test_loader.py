"""Saving and loading checkpoints (INTERNVL.md §10, §11.2, §11.4).

Round trips compare every tensor bit for bit against the model that was saved. The on-disk layouts (InternLM2's
grouped `wqkv`, Phi-3's fused projections, HF shard names and index) are checked against tensors the tests build
themselves from the spec text, not with the code under test. transformers' own InternVL implementation is the
reference for native checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from internvl.checkpoint import hub
from internvl.checkpoint.loader import (
    ACCEPTED_DTYPE_NAMES,
    detect_layout,
    load_model,
    meta_tensors,
    parse_dtype,
    resolve_dtype,
)
from internvl.checkpoint.saver import copy_tokenizer_files, parse_size, save_pretrained
from internvl.config import SUPPORTED_LLM_ARCHS
from internvl.model.internvl import InternVLModel
from tiny import LLM_ARCHS, randomize_, tiny_config


# --------------------------------------------------------------------------------------------- helpers
def tiny_model(arch="Qwen2ForCausalLM", vit="300m", seed=0, **over) -> InternVLModel:
    return randomize_(InternVLModel(tiny_config(arch, vit, **over)), seed=seed).eval()


def read_dir_tensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every weight file of `d`, read directly (no loader code)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = h.get_tensor(k).clone()
    for f in sorted(d.glob("*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k] if dtype is None else sa[k].to(dtype)
        assert sb[k].dtype == want.dtype, k
        assert torch.equal(sb[k], want), k


def grouped_wqkv(q, k, v, heads, kv_heads, d):
    """InternLM2 wqkv from the spec text (§11.2): KV groups of [G query heads, key head g, value head g]."""
    g_size = heads // kv_heads
    rows = []
    for g in range(kv_heads):
        for j in range(g_size):
            h = g * g_size + j
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    return torch.cat(rows)


def rewrite_single_file(ckpt: Path, edit):
    """Load model.safetensors, apply `edit(dict)`, write it back."""
    f = ckpt / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        state = {k: h.get_tensor(k).clone() for k in h.keys()}
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("vit", ["300m", "6b"])
@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_round_trip_every_family_single_file(tmp_path, arch, vit):
    model = tiny_model(arch, vit)
    out = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = load_model(out)
    assert_same_state(model, loaded)
    assert meta_tensors(loaded) == []
    assert not loaded.training
    assert loaded.img_context_token_id is None  # the original config has no image_token_id: chat API resolves it
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk["architectures"] == ["InternVLChatModel"] and on_disk["llm_config"]["architectures"] == [arch]
    assert on_disk["torch_dtype"] == "float32"


@pytest.mark.parametrize("arch", LLM_ARCHS)
def test_sharded_round_trip_uses_hf_names_and_index(tmp_path, arch):
    model = tiny_model(arch, seed=3)
    out = save_pretrained(model, tmp_path / "ckpt", max_shard_size="30KB")
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = read_dir_tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for s in shards:  # each shard holds exactly the names the index gives it, and stays under the limit
        with safe_open(str(s), "pt") as h:
            names = set(h.keys())
            size = sum(h.get_tensor(k).numel() * 4 for k in names)
        assert names == {k for k, v in index["weight_map"].items() if v == s.name}
        assert size <= 30_000 or len(names) == 1
    assert_same_state(model, load_model(out))


@pytest.mark.parametrize("sharded", [False, True])
def test_legacy_bin_round_trip(tmp_path, sharded):
    model = tiny_model("InternLM2ForCausalLM", seed=5)
    out = save_pretrained(model, tmp_path / "ckpt", safe_serialization=False,
                          max_shard_size="30KB" if sharded else "5GB")
    if sharded:
        assert (out / "pytorch_model.bin.index.json").is_file()
        assert len(list(out.glob("pytorch_model-*-of-*.bin"))) > 2
    else:
        assert (out / "pytorch_model.bin").is_file()
    assert not list(out.glob("*.safetensors"))
    assert_same_state(model, load_model(out))


def test_bf16_on_disk_loads_as_float32_by_default(tmp_path):
    model = tiny_model("Phi3ForCausalLM", seed=7)
    out = save_pretrained(model, tmp_path / "ckpt", dtype="bf16")
    assert {t.dtype for t in read_dir_tensors(out).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    fp32 = load_model(out)
    assert_same_state(model.to(torch.bfloat16).float(), fp32)  # bf16 rounding, then exact widening
    bf16 = load_model(out, dtype="bfloat16")
    assert_same_state(model.to(torch.bfloat16), bf16)
    assert all(p.dtype == torch.bfloat16 for p in load_model(out, dtype="auto").parameters())
    assert all(p.dtype == torch.float16 for p in load_model(out, dtype=torch.float16).parameters())
    # computed RoPE tables stay float32 whatever the weights are
    assert bf16.language_model.model.rotary.inv_freq.dtype == torch.float32


def test_dtype_defaults_and_names():
    cfg = {"torch_dtype": "bfloat16"}
    assert resolve_dtype(None, cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(None, {"dtype": "float16"}, torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", {}, torch.device("cpu")) == torch.bfloat16  # released checkpoints are bf16
    for name, want in [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                       ("BFloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16)]:
        assert parse_dtype(name) == want
    for bad in ("int8", "float64", torch.float64, 3):
        with pytest.raises(ValueError) as e:
            parse_dtype(bad)
        assert "fp32" in str(e.value) and "bf16" in str(e.value) and "auto" in str(e.value)


def test_bad_dtype_name_in_load_model(saved):
    _, ckpt = saved
    with pytest.raises(ValueError, match=r"dtype 'half4'.*float32.*bfloat16.*float16.*auto"):
        load_model(ckpt, dtype="half4")
    assert set(ACCEPTED_DTYPE_NAMES) >= {"fp32", "bf16", "fp16", "auto"}


# --------------------------------------------------------------------------------------------- on-disk layouts
def test_internlm2_is_saved_with_grouped_wqkv_and_its_own_names(tmp_path):
    model = tiny_model("InternLM2ForCausalLM", seed=11)
    L = model.config.llm
    assert L.num_heads // L.num_kv_heads == 2  # several query heads per group, so a naive split would differ
    disk = read_dir_tensors(save_pretrained(model, tmp_path / "ckpt"))
    for i in range(L.num_layers):
        attn = model.language_model.model.layers[i].self_attn
        want = grouped_wqkv(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                            L.num_heads, L.num_kv_heads, L.head_dim)
        assert torch.equal(disk[f"language_model.model.layers.{i}.attention.wqkv.weight"], want)
        mlp = model.language_model.model.layers[i].mlp
        assert torch.equal(disk[f"language_model.model.layers.{i}.feed_forward.w1.weight"], mlp.gate_proj.weight)
        assert torch.equal(disk[f"language_model.model.layers.{i}.feed_forward.w3.weight"], mlp.up_proj.weight)
        assert torch.equal(disk[f"language_model.model.layers.{i}.feed_forward.w2.weight"], mlp.down_proj.weight)
    assert torch.equal(disk["language_model.output.weight"], model.language_model.lm_head.weight)
    assert torch.equal(disk["language_model.model.tok_embeddings.weight"],
                       model.language_model.model.embed_tokens.weight)
    assert not any(re.search(r"q_proj|embed_tokens|lm_head", k) for k in disk)


def test_phi3_is_saved_with_fused_qkv_and_gate_up(tmp_path):
    model = tiny_model("Phi3ForCausalLM", seed=12)
    disk = read_dir_tensors(save_pretrained(model, tmp_path / "ckpt"))
    for i, layer in enumerate(model.language_model.model.layers):
        a, m = layer.self_attn, layer.mlp
        assert torch.equal(disk[f"language_model.model.layers.{i}.self_attn.qkv_proj.weight"],
                           torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        assert torch.equal(disk[f"language_model.model.layers.{i}.mlp.gate_up_proj.weight"],
                           torch.cat([m.gate_proj.weight, m.up_proj.weight]))
    assert not any(re.search(r"\.(q|k|v|gate|up)_proj\.", k) for k in disk)


def test_qwen2_names_on_disk_are_the_original_names(tmp_path):
    model = tiny_model("Qwen2ForCausalLM", vit="6b")
    disk = read_dir_tensors(save_pretrained(model, tmp_path / "ckpt"))
    assert set(disk) == set(model.state_dict())
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in disk and "mlp1.3.bias" in disk
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in disk


# --------------------------------------------------------------------------------------------- native (transformers)
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "InternLM2ForCausalLM"])
def test_loads_native_checkpoint_saved_by_transformers(tmp_path, arch):
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_config(arch, image_token_id=120)
    torch.manual_seed(0)
    hf = InternVLForConditionalGeneration(HFConfig(**cfg.to_native_dict(image_token_id=120))).float()
    randomize_(hf, seed=21).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.img_context_token_id == 120  # the native config carries it
    assert meta_tensors(ours) == []
    tiles = 2
    px = torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(2))
    ids[0, 3:3 + tiles * cfg.num_image_token] = 120
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids).logits
        got = ours(pixel_values=px, input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# --------------------------------------------------------------------------------------------- errors
def test_missing_shard_names_shard_and_index(tmp_path):
    out = save_pretrained(tiny_model(), tmp_path / "ckpt", max_shard_size="30KB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(out)
    assert victim.name in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_truncated_safetensors_names_the_file(saved):
    _, ckpt = saved
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=re.escape(str(f))):
        load_model(ckpt)


def test_truncated_bin_names_the_file(tmp_path):
    out = save_pretrained(tiny_model(), tmp_path / "ckpt", safe_serialization=False)
    f = out / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(f))):
        load_model(out)


def test_wrong_shape_names_tensor_file_and_shapes(saved):
    _, ckpt = saved

    def edit(state):
        state["mlp1.1.weight"] = torch.zeros(48, 127)  # expected (48, 128): 4 * 32 channels after the shuffle

    rewrite_single_file(ckpt, edit)
    with pytest.raises(ValueError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "mlp1.1.weight" in msg and str(ckpt / "model.safetensors") in msg
    assert "(48, 127)" in msg and "(48, 128)" in msg


def test_internlm2_wqkv_with_wrong_rows_is_reported(tmp_path):
    out = save_pretrained(tiny_model("InternLM2ForCausalLM"), tmp_path / "ckpt")

    def edit(state):
        name = "language_model.model.layers.1.attention.wqkv.weight"
        state[name] = state[name][:-12]  # one head short

    rewrite_single_file(out, edit)
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wqkv\.weight.*model\.safetensors"):
        load_model(out)


def test_extra_tensor_is_listed_with_file(saved):
    _, ckpt = saved
    rewrite_single_file(ckpt, lambda s: s.update({"vision_model.encoder.layers.0.attn.bogus": torch.zeros(3)}))
    with pytest.raises(ValueError) as e:
        load_model(ckpt)
    assert "vision_model.encoder.layers.0.attn.bogus" in str(e.value)
    assert str(ckpt / "model.safetensors") in str(e.value)


def test_missing_tensors_are_listed(saved):
    _, ckpt = saved
    rewrite_single_file(ckpt, lambda s: [s.pop(k) for k in ("mlp1.1.bias", "vision_model.encoder.layers.1.ls2")])
    with pytest.raises(ValueError, match=r"lacks 2 tensor.*layers\.1\.ls2, mlp1\.1\.bias"):
        load_model(ckpt)


def test_missing_lm_head_is_an_error_not_a_tie(saved):
    _, ckpt = saved
    rewrite_single_file(ckpt, lambda s: s.pop("language_model.lm_head.weight"))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*never tied"):
        load_model(ckpt)


def test_unsupported_llm_architecture_lists_supported_ones(saved):
    _, ckpt = saved
    d = json.loads((ckpt / "config.json").read_text())
    d["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        load_model(ckpt)
    assert "MistralForCausalLM" in str(e.value)
    assert all(a in str(e.value) for a in SUPPORTED_LLM_ARCHS)


def test_no_weights_and_no_config(tmp_path, saved):
    _, ckpt = saved
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        load_model(ckpt)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def test_detect_layout():
    cfg = tiny_config()
    assert detect_layout(cfg.to_original_dict()) == "original"
    assert detect_layout(cfg.to_native_dict(120)) == "native"
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        detect_layout({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"})


def test_meta_check_can_fail():
    with torch.device("meta"):
        model = InternVLModel(tiny_config("Phi3ForCausalLM"))
    left = meta_tensors(model)
    assert "language_model.model.rotary.inv_freq" in left
    assert "language_model.model.rotary.short_factor" in left  # plain tensor attributes are found too
    assert "mlp1.1.weight" in left


# --------------------------------------------------------------------------------------------- hub
def test_hub_id_without_network_says_what_failed(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError(
            "Cannot reach the hub: network is unreachable\nsecond line with details"
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError) as e:
        load_model("OpenGVLab/InternVL3-1B")
    msg = str(e.value)
    assert "OpenGVLab/InternVL3-1B" in msg and "network is unreachable" in msg and "local directory" in msg
    assert "second line" not in msg


def test_hub_non_os_errors_become_oserror(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(OSError, match="could not fetch 'org/model'.*connection reset by peer"):
        hub.resolve_model_path("org/model")


def test_hub_id_downloads_data_files_only(monkeypatch, saved):
    model, ckpt = saved
    calls = []

    def fake(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert_same_state(model, load_model("OpenGVLab/InternVL3-1B"))
    (repo, patterns), = calls
    assert repo == "OpenGVLab/InternVL3-1B"
    assert "config.json" in patterns and "*.safetensors" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith(".py") or p == "*" for p in patterns)  # remote code is never fetched


def test_local_looking_paths_that_do_not_exist(tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a local path must not reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    for p in (str(tmp_path / "nope"), "./nope", "a/b/c", "~/nope-xyz", tmp_path / "x"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(p))):
            hub.resolve_model_path(p)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        hub.resolve_model_path(f)


# --------------------------------------------------------------------------------------------- saver details
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fail_second)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(tiny_model(), tmp_path / "ckpt", max_shard_size="30KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor the temporary directory


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        save_pretrained(tiny_model(), out)
    assert (out / "notes.txt").read_text() == "keep me"
    model = tiny_model(seed=9)
    save_pretrained(model, out, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert_same_state(model, load_model(out))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(model, empty)  # an empty directory is fine
    assert (empty / "model.safetensors").is_file()


def test_generation_config_carries_llm_token_ids(saved):
    model, ckpt = saved
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}  # tiny_llm's ids


def test_parse_size():
    assert parse_size("500MB") == 500_000_000
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("30kb") == 30_000
    assert parse_size(1234) == 1234
    for bad in ("lots", "5 parsecs", 0, "-1MB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_copy_tokenizer_files_copies_only_tokenizer_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "modeling_internvl_chat.py", "config.json"):
        (src / name).write_text(name)
    copied = copy_tokenizer_files(src, out)
    assert sorted(copied) == ["merges.txt", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "tokenizer.json").read_text() == "tokenizer.json"


def test_saved_files_have_ordinary_permissions(saved):
    """The temp-dir-and-rename dance must not leave 0600/0700 modes behind (safetensors and mkdtemp use them)."""
    _, ckpt = saved
    ref_file, ref_dir = ckpt.parent / "ref.txt", ckpt.parent / "ref_dir"
    ref_file.write_text("x")
    ref_dir.mkdir()
    assert ckpt.stat().st_mode & 0o777 == ref_dir.stat().st_mode & 0o777
    for f in ckpt.iterdir():
        assert f.stat().st_mode & 0o777 == ref_file.stat().st_mode & 0o777, f.name
