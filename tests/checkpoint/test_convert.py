"""Original <-> transformers-native conversion (INTERNVL.md §10.3, §10.4, §11.2).

The native layout is checked three independent ways: tensors against slices the test cuts itself from the spec text,
transformers' `InternVLForConditionalGeneration.from_pretrained` on the converted directory (same logits as our
model), and a bit-exact round trip back to the original layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers_tokenizers import expected_ids, make_bpe_tokenizer_dir, make_sentencepiece_tokenizer_dir
from internvl.checkpoint.convert import convert_checkpoint, find_image_token_id, main
from internvl.checkpoint.loader import load_model, meta_tensors
from internvl.checkpoint.saver import save_pretrained
from internvl.model.internvl import InternVLModel
from tiny import LLM_ARCHS, randomize_, tiny_config, tiny_llm


def read_dir_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).clone()
    return out


def original_checkpoint(tmp_path: Path, arch="Qwen2ForCausalLM", vit="300m", seed=0, vocab=512, **save_kw):
    """A tiny random original-layout checkpoint with a Qwen2-like tokenizer whose <IMG_CONTEXT> id is < vocab."""
    tok = make_bpe_tokenizer_dir(tmp_path / "tok")
    img_id = expected_ids(tok)["<IMG_CONTEXT>"]
    assert img_id < vocab
    cfg = tiny_config(arch, vit, llm=tiny_llm(arch, vocab=vocab), image_token_id=img_id)
    model = randomize_(InternVLModel(cfg), seed=seed).eval()
    src = save_pretrained(model, tmp_path / "orig", **save_kw)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (src / f).write_bytes((tok / f).read_bytes())
    return model, src, img_id


def grouped_split(wqkv, heads, kv_heads, d):
    """InternLM2 wqkv -> q, k, v by walking the groups of §11.2 row block by row block."""
    g_size = heads // kv_heads
    q, k, v = [], [], []
    row = 0
    for _ in range(kv_heads):
        for _ in range(g_size):
            q.append(wqkv[row:row + d])
            row += d
        k.append(wqkv[row:row + d])
        v.append(wqkv[row + d:row + 2 * d])
        row += 2 * d
    assert row == wqkv.shape[0]
    return torch.cat(q), torch.cat(k), torch.cat(v)


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("arch,vit", [(a, "300m") for a in LLM_ARCHS] + [("InternLM2ForCausalLM", "6b"),
                                                                          ("Qwen2ForCausalLM", "6b")])
def test_original_native_original_is_bit_exact(tmp_path, arch, vit):
    model, src, img_id = original_checkpoint(tmp_path, arch, vit, max_shard_size="40KB")
    convert_checkpoint(src, tmp_path / "native", to="native", max_shard_size="40KB")
    convert_checkpoint(tmp_path / "native", tmp_path / "back", to="original")
    a, b = read_dir_tensors(src), read_dir_tensors(tmp_path / "back")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert (tmp_path / "native" / f).read_bytes() == (src / f).read_bytes()
    native_cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert native_cfg["image_token_id"] == img_id  # from the tokenizer: the original config does not carry it
    # the native checkpoint loads into our model too, bit-exact
    loaded = load_model(tmp_path / "native")
    assert loaded.img_context_token_id == img_id
    assert meta_tensors(loaded) == []
    sa, sb = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and sa.keys() == sb.keys()


def test_native_tensors_match_the_spec_mapping(tmp_path):
    model, src, _ = original_checkpoint(tmp_path, "InternLM2ForCausalLM", "300m", seed=4)
    convert_checkpoint(src, tmp_path / "native", to="native")
    orig, nat = read_dir_tensors(src), read_dir_tensors(tmp_path / "native")
    L = model.config.llm
    C = model.config.vision.hidden_size
    qkv = orig["vision_model.encoder.layers.1.attn.qkv.weight"]
    base = "model.vision_tower.encoder.layer.1.attention."
    assert torch.equal(nat[base + "q_proj.weight"], qkv[:C])
    assert torch.equal(nat[base + "k_proj.weight"], qkv[C:2 * C])
    assert torch.equal(nat[base + "v_proj.weight"], qkv[2 * C:])
    assert torch.equal(nat[base + "v_proj.bias"], orig["vision_model.encoder.layers.1.attn.qkv.bias"][2 * C:])
    assert torch.equal(nat[base + "projection_layer.weight"], orig["vision_model.encoder.layers.1.attn.proj.weight"])
    assert torch.equal(nat["model.vision_tower.encoder.layer.0.lambda_1"], orig["vision_model.encoder.layers.0.ls1"])
    assert torch.equal(nat["model.vision_tower.embeddings.cls_token"], orig["vision_model.embeddings.class_embedding"])
    assert torch.equal(nat["model.multi_modal_projector.linear_2.bias"], orig["mlp1.3.bias"])
    q, k, v = grouped_split(orig["language_model.model.layers.0.attention.wqkv.weight"],
                            L.num_heads, L.num_kv_heads, L.head_dim)
    assert torch.equal(nat["model.language_model.layers.0.self_attn.q_proj.weight"], q)
    assert torch.equal(nat["model.language_model.layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(nat["model.language_model.layers.0.self_attn.v_proj.weight"], v)
    assert torch.equal(nat["model.language_model.layers.0.mlp.up_proj.weight"],
                       orig["language_model.model.layers.0.feed_forward.w3.weight"])
    assert torch.equal(nat["lm_head.weight"], orig["language_model.output.weight"])
    assert not any("vision_model" in n or "wqkv" in n or "mlp1." in n for n in nat)
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["architectures"] == ["InternVLForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "llama"  # InternLM2 becomes Llama (§10.4)


# --------------------------------------------------------------------------------------------- transformers parity
@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "LlamaForCausalLM", "InternLM2ForCausalLM"])
def test_converted_checkpoint_runs_in_transformers_with_our_logits(tmp_path, arch):
    from transformers import InternVLForConditionalGeneration

    model, src, img_id = original_checkpoint(tmp_path, arch, seed=8)
    convert_checkpoint(src, tmp_path / "native", to="native")
    hf, info = InternVLForConditionalGeneration.from_pretrained(tmp_path / "native", dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval()
    tiles = 2
    px = torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 300, (1, 26), generator=torch.Generator().manual_seed(2))
    ids[0, 4:4 + tiles * model.config.num_image_token] = img_id
    model.img_context_token_id = img_id
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids).logits
        got = model(pixel_values=px, input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# --------------------------------------------------------------------------------------------- details
def test_dtype_cast_on_conversion(tmp_path):
    _, src, _ = original_checkpoint(tmp_path)
    convert_checkpoint(src, tmp_path / "native", to="native", dtype="bf16")
    assert {t.dtype for t in read_dir_tensors(tmp_path / "native").values()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    convert_checkpoint(tmp_path / "native", tmp_path / "back", to="original")  # kept unless asked
    assert {t.dtype for t in read_dir_tensors(tmp_path / "back").values()} == {torch.bfloat16}


def test_image_token_id_from_sentencepiece_tokenizer_config(tmp_path):
    d = make_sentencepiece_tokenizer_dir(tmp_path / "sp", "internlm2")
    assert find_image_token_id(d) == expected_ids(d)["<IMG_CONTEXT>"]
    assert find_image_token_id(tmp_path) is None


def test_missing_image_token_is_explained(tmp_path):
    _, src, _ = original_checkpoint(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (src / f).unlink()
    with pytest.raises(ValueError, match="image_token_id.*<IMG_CONTEXT>"):
        convert_checkpoint(src, tmp_path / "native", to="native")
    assert not (tmp_path / "native").exists()


def test_same_layout_and_unknown_target_are_refused(tmp_path):
    _, src, _ = original_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="already in the original layout"):
        convert_checkpoint(src, tmp_path / "x", to="original")
    with pytest.raises(ValueError, match="'gguf'.*native, original"):
        convert_checkpoint(src, tmp_path / "x", to="gguf")


def test_mismatched_checkpoint_fails_and_writes_nothing(tmp_path):
    _, src, _ = original_checkpoint(tmp_path)
    d = json.loads((src / "config.json").read_text())
    d["llm_config"]["intermediate_size"] = 80  # the weights say 96
    (src / "config.json").write_text(json.dumps(d))
    # safetensors stores names sorted, so down_proj of layer 0 is the first LLM tensor checked
    msg = r"0\.mlp\.down_proj\.weight.*model\.safetensors.*\(48, 96\), expected \(48, 80\)"
    with pytest.raises(ValueError, match=msg):
        convert_checkpoint(src, tmp_path / "native", to="native")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orig", "tok"]


def test_native_checkpoint_saved_by_transformers_converts_back(tmp_path):
    """transformers 5 saves with its legacy prefixes (`vision_tower.`, `language_model.model.`); both are native."""
    from transformers import InternVLConfig as HFConfig
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_config("InternLM2ForCausalLM", image_token_id=120)
    hf = InternVLForConditionalGeneration(HFConfig(**cfg.to_native_dict(image_token_id=120))).float()
    randomize_(hf, seed=5)
    hf.eval().save_pretrained(tmp_path / "hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "orig", to="original")
    disk = read_dir_tensors(tmp_path / "orig")
    assert "language_model.model.layers.0.attention.wqkv.weight" in disk  # InternLM2 again, per the saved llm_arch
    ours = load_model(tmp_path / "orig")
    ours.img_context_token_id = 120
    px = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(4))
    ids[0, 2:2 + cfg.num_image_token] = 120
    with torch.no_grad():
        want = hf(pixel_values=px, input_ids=ids).logits
        got = ours(pixel_values=px, input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


# --------------------------------------------------------------------------------------------- CLI
def test_cli_converts_and_reports(tmp_path, capsys):
    _, src, _ = original_checkpoint(tmp_path)
    assert main([str(src), str(tmp_path / "native"), "--to", "native", "--dtype", "bf16"]) == 0
    assert "native" in capsys.readouterr().out
    assert {t.dtype for t in read_dir_tensors(tmp_path / "native").values()} == {torch.bfloat16}


def test_cli_user_errors_have_no_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "native"]) == 1
    err = capsys.readouterr().err
    assert "error" in err and str(tmp_path / "missing") in err and "Traceback" not in err
    _, src, _ = original_checkpoint(tmp_path)
    assert main([str(src), str(tmp_path / "out"), "--to", "native", "--dtype", "int3"]) == 1
    err = capsys.readouterr().err
    assert "int3" in err and "bf16" in err and "Traceback" not in err
    assert main([str(src), str(tmp_path / "out"), "--to", "onnx"]) == 2  # argparse rejects the choice
    assert "invalid choice" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main([str(src), str(tmp_path / "out"), "--to", "native"]) == 1
    assert "not empty" in capsys.readouterr().err


def test_custom_system_message_survives_original_native_original(tmp_path):
    from internvl.checkpoint.convert import convert_checkpoint
    from internvl.checkpoint.saver import save_pretrained
    from internvl.config import InternVLConfig
    from internvl.model.internvl import InternVLModel
    from tiny import tiny_config

    cfg = tiny_config().replace(system_message="Answer briefly.")
    save_pretrained(InternVLModel(cfg), tmp_path / "orig")
    from helpers_tokenizers import make_bpe_tokenizer_dir

    make_bpe_tokenizer_dir(tmp_path / "orig")  # the original layout takes <IMG_CONTEXT>'s id from the tokenizer
    convert_checkpoint(tmp_path / "orig", tmp_path / "native", to="native")
    convert_checkpoint(tmp_path / "native", tmp_path / "back", to="original")
    assert InternVLConfig.from_pretrained(tmp_path / "back").system_message == "Answer briefly."
