"""Layer placement: the planner against hand-computed splits, explicit device maps, and a model placed over several
distinct (virtual, see virtual_devices.py) devices computing exactly what it computes on one device, through the
reference generate, beam search, the engine's paged KV cache and the loader."""

import pytest
import torch

from internvl.checkpoint.loader import load_model
from internvl.demo.model import DEMO_MODEL_DIR as DEMO
from internvl.engine import Engine, SamplingParams
from internvl.generation.generate import generate
from internvl.generation.sampling import GenerationConfig
from internvl.model.fast import optimize_for_inference
from internvl.model.internvl import InternVLModel
from internvl.model.quantize import quantize_model
from internvl.parallel import Placement, place_model, plan_placement
from internvl.parallel.placement import module_bytes, move_module_, resolve_device_map
from parallel.virtual_devices import values, virtual_devices
from tiny import randomize_, tiny_config, tiny_llm

# One tiny Qwen2 decoder layer by hand (hidden 48, 4 heads and 2 KV heads of 12, MLP 96; q/k/v biases, no o bias):
# q 48*48+48, k and v 48*24+24 each, o 48*48, gate/up/down 3*48*96, two RMSNorm weights 2*48.
LAYER_PARAMS = (48 * 48 + 48) + 2 * (48 * 24 + 24) + 48 * 48 + 3 * 48 * 96 + 2 * 48
assert LAYER_PARAMS == 20928
L = 4 * LAYER_PARAMS  # bytes per layer in float32
R = 1000  # reserve used in the planner tests


def eight_layer_config():
    return tiny_config(llm=tiny_llm(num_layers=8))


def home_bytes_fp32() -> int:
    """Everything but the layers, counted on a real model: all parameters minus 8 hand-counted layers."""
    model = InternVLModel(eight_layer_config())
    return 4 * (sum(p.numel() for p in model.parameters()) - 8 * LAYER_PARAMS)


# ------------------------------------------------------------------------------------------------ planner
def test_module_bytes_match_the_hand_count():
    assert module_bytes(eight_layer_config(), torch.float32) == (home_bytes_fp32(), L)
    assert module_bytes(eight_layer_config(), torch.bfloat16) == (home_bytes_fp32() // 2, L // 2)


@pytest.mark.parametrize("memory, expected", [
    # room for exactly 6 layers next to the home modules, and 2 more on the second device
    (lambda H: {"cuda:0": R + H + 6 * L, "cuda:1": R + 2 * L + L - 1}, ["cuda:0"] * 6 + ["cuda:1"] * 2),
    # capacities 4 and 12 layers: 8 layers shared in proportion, 2 and 6
    (lambda H: {"cuda:0": R + H + 4 * L, "cuda:1": R + 12 * L}, ["cuda:0"] * 2 + ["cuda:1"] * 6),
    # capacities 3, 3, 3: 8 * 3/9 = 2.67 each; the two leftover layers go to the earlier devices
    (lambda H: {"cuda:0": R + H + 3 * L, "cuda:1": R + 3 * L, "cuda:2": R + 3 * L},
     ["cuda:0"] * 3 + ["cuda:1"] * 3 + ["cuda:2"] * 2),
    # a GPU with no room for a whole layer gets none; ints name CUDA devices
    (lambda H: {0: R + H + 8 * L, 1: R + L - 1}, ["cuda:0"] * 8),
])
def test_plan_splits_layers_by_free_memory(memory, expected):
    placement = plan_placement(eight_layer_config(), memory(home_bytes_fp32()), torch.float32, reserve=R)
    assert placement.home == "cuda:0"
    assert list(placement.layers) == expected


def test_plan_uses_the_dtype():
    H = home_bytes_fp32()
    memory = {"cuda:0": H // 2 + 8 * L // 2}  # exactly the bf16 model
    assert plan_placement(eight_layer_config(), memory, torch.bfloat16).layers == ("cuda:0",) * 8
    with pytest.raises(ValueError, match="does not fit"):
        plan_placement(eight_layer_config(), memory, torch.float32)


def test_plan_does_not_fit_names_needed_and_available():
    H = home_bytes_fp32()
    need = H + 8 * L
    memory = {"cuda:0": R + H + 5 * L, "cuda:1": R + 3 * L - 1}  # one byte short of the 8th layer
    with pytest.raises(ValueError) as err:
        plan_placement(eight_layer_config(), memory, torch.float32, reserve=R)
    msg = str(err.value)
    assert f"({need} bytes" in msg and f"({need - 1} bytes after reserving {R} bytes" in msg
    assert "fit only 7 of 8" in msg and f"8 layers x {L} bytes" in msg
    # the home modules alone do not fit on the first device
    with pytest.raises(ValueError, match=rf"home device cuda:0 offers {H - 1} bytes .* but the ViT, projector, embed"
                                         rf"dings and head need {H} bytes"):
        plan_placement(eight_layer_config(), {"cuda:0": R + H - 1, "cuda:1": R + 100 * L}, torch.float32, reserve=R)


@pytest.mark.parametrize("memory, match", [
    ({}, "device_memory is empty"),
    ({"cuda:0": -5}, "non-negative number of bytes"),
    ({"cuda:0": 10, 0: 10}, "names a device twice"),
    ({"gpu7": 10}, "is not a device"),
])
def test_plan_rejects_bad_memory_tables(memory, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(eight_layer_config(), memory, torch.float32)


# ------------------------------------------------------------------------------------------------ explicit maps
def test_device_map_longest_prefix_wins():
    p = Placement.from_device_map(
        {"": "cuda:0", "language_model.model.layers": 1, "language_model.model.layers.7": "cuda:2"}, 8)
    assert p.home == "cuda:0"
    assert p.layers == ("cuda:1",) * 7 + ("cuda:2",)
    assert p.devices == ("cuda:0", "cuda:1", "cuda:2")
    assert p.device_of("language_model.model.layers.7.mlp.up_proj.weight") == "cuda:2"
    assert p.device_of("language_model.model.layers.1.self_attn.q_proj.bias") == "cuda:1"
    assert p.device_of("language_model.lm_head.weight") == p.device_of("vision_model.encoder.layers.1.ls1") == "cuda:0"
    assert Placement.from_device_map(p.device_map(), 8) == p


def test_device_map_of_the_model_cards_split_model():
    """The map InternVL's model cards build for 2 GPUs and 8 layers (original names; both embedding spellings; the
    last layer back on GPU 0 beside the head), and the same split in transformers-native names."""
    card = {f"language_model.model.layers.{i}": 0 if i < 3 else 1 for i in range(8)}
    card.update({"vision_model": 0, "mlp1": 0, "language_model.model.tok_embeddings": 0,
                 "language_model.model.embed_tokens": 0, "language_model.output": 0, "language_model.model.norm": 0,
                 "language_model.model.rotary_emb": 0, "language_model.lm_head": 0, "language_model.model.layers.7": 0})
    expected = Placement("cuda:0", ("cuda:0",) * 3 + ("cuda:1",) * 4 + ("cuda:0",))
    assert Placement.from_device_map(card, 8) == expected
    native = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model": 0, "lm_head": 0}
    native.update({f"model.language_model.layers.{i}": 1 for i in range(3, 7)})
    assert Placement.from_device_map(native, 8) == expected


@pytest.mark.parametrize("device_map, match", [
    ({"": 0, "language_model.model.embed_tokens": 0, "language_model.model.tok_embeddings": 1}, "on both cuda:0 and"),
    ({"": "cuda:0", "language_model.lm_head": "cuda:1"}, "must share one .home. device"),
    ({"": "cuda:0", "language_model.model.layer.3": "cuda:1"}, "names no module"),
    ({"": "cuda:0", "language_model.model.layers.3.mlp": "cuda:1"}, "is inside language_model.model.layers.3"),
    ({"vision_model": "cuda:0"}, "does not place mlp1"),
    ({}, "device_map is empty"),
    ({"": "tpu?"}, "is not a device"),
])
def test_device_map_errors(device_map, match):
    with pytest.raises(ValueError, match=match):
        Placement.from_device_map(device_map, 8)


def test_auto_device_map_queries_every_gpu(monkeypatch):
    H = home_bytes_fp32()
    free = {0: H // 2 + 2 * L // 2 + 100, 1: 6 * L // 2 + 100}  # bf16 home + 2 layers, then 6 layers
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 10 * free[i]))
    seen = []

    def dtype_for(device):
        seen.append(device)
        return torch.bfloat16

    p = resolve_device_map("auto", eight_layer_config(), dtype_for, reserve=100)
    assert seen == [torch.device("cuda:0")]
    assert p.layers == ("cuda:0",) * 2 + ("cuda:1",) * 6


def test_auto_device_map_without_gpus_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("GPUs are visible")
    with pytest.raises(ValueError, match="none is visible"):
        load_model(DEMO, device_map="auto")
    with pytest.raises(ValueError, match=r"on cuda:1, but 0 CUDA GPU\(s\) are visible"):
        load_model(DEMO, device_map={"": "cpu", "language_model.model.layers.5": "cuda:1"})
    with pytest.raises(ValueError, match="'balanced' is not supported"):
        load_model(DEMO, device_map="balanced")


# ------------------------------------------------------------------------------------------------ the transform
def tiny_model(layers: int = 3) -> InternVLModel:
    return randomize_(InternVLModel(tiny_config(llm=tiny_llm(num_layers=layers))), seed=1, std=0.3).eval()


def batch():
    g = torch.Generator().manual_seed(5)
    long = torch.randint(3, 100, (12,), generator=g).tolist()
    long[2:6] = [120] * 4  # one tile's image tokens
    short = torch.randint(3, 100, (7,), generator=g).tolist()
    ids = torch.tensor([long, [0] * 5 + short])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask, torch.randn(1, 3, 56, 56, generator=g), long, short


@torch.inference_mode()
def everything(model, beams: bool = True) -> dict:
    """Outputs of every path that holds a KV cache: forward, generate, beam search, the engine."""
    ids, mask, px, long, short = batch()
    eng = Engine(model, num_blocks=48, block_size=4, prefill_chunk_tokens=5)
    outs = eng.generate([dict(prompt_ids=long, pixel_values=px), dict(prompt_ids=short)],
                        SamplingParams(max_new_tokens=6, greedy=True))
    out = {
        "logits": values(model(pixel_values=px, input_ids=ids, attention_mask=mask).logits),
        "greedy": values(generate(model, ids, mask, pixel_values=px, config=GenerationConfig(max_new_tokens=6))),
        "engine": [o.outputs[0].token_ids for o in outs],
    }
    if beams:
        cfg = GenerationConfig(max_new_tokens=4, num_beams=3)
        out["beams"] = values(generate(model, ids[:1], pixel_values=px, config=cfg))
    return out


def assert_same(got: dict, want: dict):
    assert torch.equal(got["logits"], want["logits"])  # the same arithmetic, only on other devices
    assert got.keys() == want.keys()
    for key in set(got) - {"logits"}:
        assert (got[key].tolist() if torch.is_tensor(got[key]) else got[key]) == (
            want[key].tolist() if torch.is_tensor(want[key]) else want[key]), key


def test_placed_model_computes_the_same_over_distinct_devices():
    want = everything(tiny_model())
    model = tiny_model()
    # home on meta:0 holds no layer; the layers go back and forth between two other devices
    placement = Placement("meta:0", ("meta:1", "meta:2", "meta:1"))
    with virtual_devices():
        with torch.no_grad():
            place_model(model, placement)
        for name, p in model.named_parameters():
            assert str(p.device) == placement.device_of(name), name
        got = everything(model)
        assert [str(k.device) for k in Engine(model, num_blocks=4).pool.k] == list(placement.layers)
    assert_same(got, want)


def test_the_virtual_devices_catch_a_model_moved_without_hooks():
    """The control: the harness does reject cross-device work, so the test above can fail."""
    model = tiny_model()
    ids, mask, px, *_ = batch()
    with virtual_devices():
        with torch.no_grad():
            move_module_(model, "meta:0")
            move_module_(model.language_model.model.layers[1], "meta:1")
            with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device.*meta:0"):
                model(input_ids=ids, attention_mask=mask)


TRANSFORMS = {"optimize_for_inference": optimize_for_inference, "quantize int8": lambda m: quantize_model(m, "int8")}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("first", ["transform", "place"])
def test_placement_composes_with_module_swapping_transforms(transform, first):
    apply = TRANSFORMS[transform]
    want = everything(apply(tiny_model()), beams=False)
    model = tiny_model()
    with virtual_devices():
        with torch.no_grad():
            if first == "transform":
                apply(model)
            place_model(model, Placement("meta:0", ("meta:0", "meta:1", "meta:1")))
            place_model(model, Placement("meta:1", ("meta:0", "meta:1", "meta:0")))  # re-placing replaces
            if first == "place":
                apply(model)
        got = everything(model, beams=False)
    assert_same(got, want)


def test_load_model_with_an_explicit_device_map():
    want = load_model(DEMO)
    ids = torch.tensor([[5, 17, 40, 99, 3, 250, 7]])
    with virtual_devices():
        model = load_model(DEMO, dtype=torch.float32, device_map={
            "": "meta:0", "language_model.model.layers.3": "meta:1", "language_model.model.layers.4": "meta:1"})
        devices = [str(layer.mlp.up_proj.weight.device) for layer in model.language_model.model.layers]
        with torch.inference_mode():
            got = values(model(input_ids=ids).logits)
    assert devices == ["meta:0"] * 3 + ["meta:1"] * 2 + ["meta:0"]
    with torch.inference_mode():
        assert torch.equal(got, want(input_ids=ids).logits)
