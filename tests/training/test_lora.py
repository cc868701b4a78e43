"""LoRA as a model transform: targets, trainable set, alpha, merge equivalence, adapter files and `merge-lora`."""

from __future__ import annotations

import pytest
import torch

from tiny import TINY_IMAGE, randomize_, tiny_config

from internvl.api.model import InternVLChatModel
from internvl.training.config import TrainConfig
from internvl.training.lora import (
    apply_lora,
    has_lora,
    load_adapter,
    lora_state_dict,
    main_merge,
    merge_lora,
    save_adapter,
)
from internvl.training.trainer import apply_training_setup

IMG = 120  # tiny_config's <IMG_CONTEXT> id; a 56-pixel tile gives 4 image tokens


def tiny_model(seed: int = 0) -> InternVLChatModel:
    return randomize_(InternVLChatModel(tiny_config()), seed=seed).eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 110, (2, 12), generator=g)
    ids[:, 2:6] = IMG  # one tile per row
    px = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE, generator=g)
    return px, ids


@torch.no_grad()
def logits(model, px, ids):
    return model(pixel_values=px, input_ids=ids).logits


@torch.no_grad()
def randomize_lora_(model, seed: int = 7, std: float = 0.1) -> None:
    """peft initialises B = 0 (adapter is a no-op); make every adapter matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_targets_are_our_module_names():
    model = apply_lora(tiny_model(), llm_rank=4, vision_rank=2)
    names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    llm = {f"language_model.model.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(2)
           for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") for ab in "AB"}
    vit = {f"vision_model.encoder.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(2)
           for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for ab in "AB"}
    assert names == llm | vit
    assert model.language_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 48)
    assert model.vision_model.encoder.layers[0].attn.qkv.lora_B["default"].weight.shape == (96, 2)


def test_alpha_defaults_to_twice_the_rank():
    model = apply_lora(tiny_model(), llm_rank=4, vision_rank=2)
    assert model.language_model.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # alpha / r = 8 / 4
    assert model.vision_model.encoder.layers[0].mlp.fc1.scaling["default"] == 2.0  # 4 / 2
    model = apply_lora(tiny_model(), llm_rank=4, alpha=6.0)
    assert model.language_model.model.layers[1].mlp.down_proj.scaling["default"] == 1.5


def test_merged_model_gives_same_logits_as_base_plus_adapter():
    px, ids = inputs()
    model = tiny_model()
    base = logits(model, px, ids)
    q_base = model.language_model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(model, llm_rank=4, vision_rank=2, dropout=0.05)
    randomize_lora_(model)
    model.eval()  # dropout off
    adapted = logits(model, px, ids)
    assert (adapted - base).abs().max() > 1e-1  # the adapters change the output
    layer = model.language_model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()

    merge_lora(model)
    assert not has_lora(model)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # checkpoint names again
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    # independent merge formula: W + (alpha / r) * B @ A with alpha = 2r
    torch.testing.assert_close(model.language_model.model.layers[0].self_attn.q_proj.weight, q_base + 2.0 * b @ a,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model, px, ids), adapted, rtol=1e-5, atol=1e-5)


def test_only_lora_params_trainable_when_base_frozen():
    cfg = TrainConfig(model="x", meta_path="m", output_dir="o", freeze_vision=True, freeze_projector=True,
                      use_llm_lora=4)
    model = apply_training_setup(tiny_model(), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert all(".lora_" in n and n.startswith("language_model.") for n in trainable)


def test_lora_freezes_only_the_adapted_part():
    cfg = TrainConfig(model="x", meta_path="m", output_dir="o", use_vision_lora=2)
    model = apply_training_setup(tiny_model(), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = {n for n in trainable if n.startswith("vision_model.")}
    assert vision and all(".lora_" in n for n in vision)  # ViT base frozen by its LoRA
    assert "mlp1.1.weight" in trainable and "language_model.lm_head.weight" in trainable


def test_applying_twice_is_an_error():
    model = apply_lora(tiny_model(), llm_rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, llm_rank=2)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(tiny_model(), llm_rank=-1)


def test_adapter_files_and_merge_lora_cli(tmp_path, capsys):
    from helpers_tokenizers import make_bpe_tokenizer_dir

    px, ids = inputs()
    model = apply_lora(tiny_model(), llm_rank=4, vision_rank=2)
    randomize_lora_(model)
    model.eval()
    adapted = logits(model, px, ids)
    tensors = lora_state_dict(model)

    src = tmp_path / "unmerged"
    base = tiny_model()  # same seed: the base weights `model` started from
    base.save_pretrained(src)
    make_bpe_tokenizer_dir(src)
    save_adapter(tensors, src, llm_rank=4, vision_rank=2, alpha=None, dropout=0.05)

    # the adapter files alone reproduce the adapted model
    reloaded = load_adapter(InternVLChatModel.from_pretrained(src).eval(), src)
    reloaded.img_context_token_id = IMG  # the original layout leaves it to the tokenizer
    torch.testing.assert_close(logits(reloaded, px, ids), adapted, rtol=1e-5, atol=1e-5)

    dst = tmp_path / "merged"
    assert main_merge([str(src), str(dst), "--dtype", "fp32"]) == 0
    merged = InternVLChatModel.from_pretrained(dst).eval()
    merged.img_context_token_id = IMG
    assert not has_lora(merged) and (dst / "tokenizer.json").is_file()
    assert not (dst / "adapter_model.safetensors").exists()
    torch.testing.assert_close(logits(merged, px, ids), adapted, rtol=1e-5, atol=1e-5)

    assert main_merge([str(dst), str(tmp_path / "again")]) == 2  # no adapter there
    assert "no adapter_config.json" in capsys.readouterr().err
