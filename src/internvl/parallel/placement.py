"""Layer placement over several devices: a plan from free memory, and a transform that moves and hooks the model.

    placement = plan_placement(model.config, {"cuda:0": 20 << 30, "cuda:1": 24 << 30}, torch.bfloat16)
    place_model(model, placement)              # or: load_model(path, device_map="auto")

What goes where. The ViT, the projector (mlp1), the token embeddings, the RoPE module, the final norm and lm_head
all sit on one *home* device (the first one); only the decoder layers are spread. Every caller of the model treats
`lm_head.weight.device` as "the model's device" and puts token ids, attention masks, images and sampled tokens there
(the reference `generate`, the engine, the chat API), so with the head beside the embeddings all of that lives on one
device and the only tensors that ever cross devices are those a decoder layer receives. This is the placement the
brief allows for tied embeddings, used here for every model: InternVL never ties them (INTERNVL.md §10.3), and the
head costs one extra hop of the (B, L, D) hidden state per forward, which is small next to the layers' work.

How layers are split. Each device offers its memory minus `reserve` (activations and the KV cache need room); the
home device first pays for the modules above. Device d can then hold `cap[d] = room[d] // layer_bytes` layers, and
the model's layers are shared out in proportion to `cap` (largest remainders, earlier devices first on ties), in
order, so every device ends up equally full and keeps the same fraction of its memory for the KV cache.

How the forward stays device-safe. `place_model` adds forward pre-hooks, no code in the model: each decoder layer
moves its inputs (hidden state, RoPE cos/sin, additive mask) to its own device, the final norm moves the hidden
state home, and `model(...)` moves its tensor arguments home. cos/sin and the mask are the same tensors for every
layer of one forward, so each is moved to a device once per forward (a memo reset by a hook on the LLM). KV caches
keep every layer's entries on that layer's device: the reference `KVCache` builds them from the layer's own K/V
(and `select` moves its row index there), the engine's paged pool is allocated per layer device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from internvl.config import InternVLConfig
from internvl.model.internvl import InternVLModel

AUTO_RESERVE_BYTES = 1 << 30  # device_map="auto": kept free per GPU for activations and the KV pool (default 512 MiB)
LAYERS = "language_model.model.layers"
HOME_MODULES = (  # everything that is not a decoder layer; all on the home device
    "vision_model",
    "mlp1",
    "language_model.model.embed_tokens",
    "language_model.model.rotary",
    "language_model.model.norm",
    "language_model.lm_head",
)
ROPE = "language_model.model.rotary"
_ALIASES = (  # (prefix in another spelling, our prefix)
    ("language_model.model.tok_embeddings", "language_model.model.embed_tokens"),  # original InternLM2 names
    ("language_model.output", "language_model.lm_head"),
    ("language_model.model.rotary_emb", ROPE),  # the model cards' split_model names it
    ("model.vision_tower", "vision_model"),  # transformers-native names
    ("model.multi_modal_projector", "mlp1"),
    ("model.language_model", "language_model.model"),
    ("lm_head", "language_model.lm_head"),
)
_LAYER_NAME = re.compile(rf"^{re.escape(LAYERS)}\.(\d+)(\.|$)")


def device_name(device: str | int | torch.device) -> str:
    """'cuda:1', 1 (a CUDA index, as transformers' device maps allow) or torch.device -> its canonical string."""
    if isinstance(device, bool):
        raise ValueError(f"device {device!r} is not a device; use e.g. 'cuda:0', 0 or 'cpu'")
    if isinstance(device, int):
        return f"cuda:{device}"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device; use e.g. 'cuda:0', 0 or 'cpu'") from None


@dataclass(frozen=True)
class Placement:
    """home: the device of every module but the decoder layers (see the module docstring); layers[i]: layer i's."""

    home: str
    layers: tuple[str, ...]

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices used, home first, then in layer order."""
        return tuple(dict.fromkeys((self.home, *self.layers)))

    def device_of(self, name: str) -> str:
        """The device of a parameter or module of `InternVLModel`, by name."""
        m = _LAYER_NAME.match(name)
        return self.layers[int(m.group(1))] if m else self.home

    def device_map(self) -> dict[str, str]:
        """The placement as a module name -> device dictionary (the form `from_device_map` reads)."""
        out = {name: self.home for name in HOME_MODULES}
        out.update({f"{LAYERS}.{i}": d for i, d in enumerate(self.layers)})
        return out

    @classmethod
    def from_device_map(cls, device_map: Mapping[str, str | int | torch.device], num_layers: int) -> "Placement":
        """An explicit map: module-name prefixes -> devices; each module takes its longest matching key ('' = all).

        e.g. {"": "cuda:0", "language_model.model.layers.12": "cuda:1", ...}, or the maps of the InternVL model
        cards' `split_model` (original names such as `language_model.model.tok_embeddings`, `language_model.output`
        are accepted, and transformers-native ones such as `model.language_model.layers.3`). HOME_MODULES must share
        one device (the RoPE module follows them when not named); units are whole decoder layers.
        """
        if not device_map:
            raise ValueError("device_map is empty; give module-name prefixes -> devices, e.g. {'': 'cuda:0'}")
        units = [*HOME_MODULES, *(f"{LAYERS}.{i}" for i in range(num_layers))]
        keys: dict[str, str] = {}
        for raw, device in device_map.items():
            key, device = _our_name(str(raw)), device_name(device)
            if key and not any(u == key or u.startswith(key + ".") for u in units):
                inside = next((u for u in units if key.startswith(u + ".")), None)
                why = (f"is inside {inside}; whole modules are placed" if inside else
                       f"names no module; modules are {', '.join(HOME_MODULES)} and {LAYERS}.0..{num_layers - 1}")
                raise ValueError(f"device_map key {raw!r} {why}")
            if keys.get(key, device) != device:
                raise ValueError(f"device_map places {key} on both {keys[key]} and {device} (key {raw!r})")
            keys[key] = device

        def resolve(unit: str) -> str | None:
            matches = [k for k in keys if k == "" or unit == k or unit.startswith(k + ".")]
            return keys[max(matches, key=len)] if matches else None

        home = {u: resolve(u) for u in HOME_MODULES}
        if home[ROPE] is None:
            home[ROPE] = home[HOME_MODULES[0]]  # computed, not stored: it follows the other home modules
        missing = [u for u in units if (home[u] if u in home else resolve(u)) is None]
        if missing:
            raise ValueError(f"device_map does not place {', '.join(missing)}; add them or a prefix ('' for all)")
        if len(set(home.values())) > 1:
            raise ValueError(
                f"{', '.join(HOME_MODULES)} must share one (home) device: token ids, images and logits live there; "
                f"got {home}"
            )
        return cls(home[HOME_MODULES[0]], tuple(resolve(f"{LAYERS}.{i}") for i in range(num_layers)))


def _our_name(name: str) -> str:
    """A module name in the original or transformers-native spelling -> ours (INTERNVL.md §10)."""
    for other, ours in _ALIASES:
        if name == other or name.startswith(other + "."):
            return ours + name[len(other):]
    return name


# ---------------------------------------------------------------------------------------------- planning
def module_bytes(config: InternVLConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of the home modules, bytes of one decoder layer) for `config` in `dtype`.

    Counted on a model built on the meta device (no memory), so the count always matches the modules.
    """
    with torch.device("meta"):
        model = InternVLModel(config)
    item = torch.empty((), dtype=dtype).element_size()

    def size(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * item

    layer = size(model.language_model.model.layers[0])
    return size(model) - layer * len(model.language_model.model.layers), layer


def plan_placement(
    config: InternVLConfig,
    device_memory: Mapping[str | int | torch.device, int],
    dtype: torch.dtype,
    reserve: int = 0,
) -> Placement:
    """Split the decoder layers over `device_memory` (device -> free bytes, in order; the first one is home).

    reserve: bytes left free on every device (activations, KV cache). Raises ValueError when the weights do not fit,
    naming the bytes needed and available.
    """
    if not device_memory:
        raise ValueError("device_memory is empty: give at least one device and its free bytes")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0 bytes, got {reserve}")
    memory = {}
    for dev, free in device_memory.items():
        if isinstance(free, bool) or not isinstance(free, int) or free < 0:
            raise ValueError(f"free memory of {dev!r} must be a non-negative number of bytes, got {free!r}")
        memory[device_name(dev)] = free
    if len(memory) != len(device_memory):
        raise ValueError(f"device_memory names a device twice: {list(device_memory)}")
    home_bytes, layer_bytes = module_bytes(config, dtype)
    n = config.llm.num_layers
    devices = list(memory)
    room = [memory[d] - reserve - (home_bytes if i == 0 else 0) for i, d in enumerate(devices)]
    need = home_bytes + n * layer_bytes
    have = sum(max(0, memory[d] - reserve) for d in devices)
    if room[0] < 0:
        raise ValueError(
            f"the model does not fit: the home device {devices[0]} offers {memory[devices[0]] - reserve} bytes "
            f"(after reserving {reserve}) but the ViT, projector, embeddings and head need {home_bytes} bytes "
            f"({_gib(home_bytes)} in {dtype}) there"
        )
    cap = [max(0, r) // layer_bytes for r in room]
    if sum(cap) < n:
        raise ValueError(
            f"the model does not fit: it needs {_gib(need)} ({need} bytes: {_gib(home_bytes)} on the home device "
            f"{devices[0]} for the ViT, projector, embeddings and head, plus {n} layers x {layer_bytes} bytes in "
            f"{dtype}) but the devices offer {_gib(have)} ({have} bytes after reserving {reserve} bytes on each of "
            f"{', '.join(devices)}), and whole layers fit only {sum(cap)} of {n}"
        )
    counts = _proportional(n, cap)
    layers = tuple(d for d, k in zip(devices, counts) for _ in range(k))
    return Placement(devices[0], layers)


def _proportional(n: int, cap: list[int]) -> list[int]:
    """n items shared in proportion to cap (largest remainder; ties to the earlier device); never above cap."""
    total = sum(cap)
    counts = [n * c // total for c in cap]
    order = sorted(range(len(cap)), key=lambda i: (-(n * cap[i] % total), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def cuda_free_memory() -> dict[str, int]:
    """Free bytes of every visible GPU, from `torch.cuda.mem_get_info` (what device_map='auto' plans with)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        raise ValueError("device_map='auto' places the model over CUDA GPUs, but none is visible; use device='cpu'")
    return {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


def resolve_device_map(
    device_map: str | Mapping, config: InternVLConfig, dtype_for: Callable[[torch.device], torch.dtype],
    reserve: int = AUTO_RESERVE_BYTES,
) -> Placement:
    """`load_model`'s device_map: 'auto' (plan over the visible GPUs) or an explicit map (`Placement.from_device_map`).

    dtype_for: the load dtype given the home device (the loader's default depends on the device type).
    """
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f"device_map {device_map!r} is not supported; use 'auto' or a dict of module -> device")
        memory = cuda_free_memory()
        return plan_placement(config, memory, dtype_for(torch.device(next(iter(memory)))), reserve)
    if isinstance(device_map, Mapping):
        placement = Placement.from_device_map(device_map, config.llm.num_layers)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for dev in map(torch.device, placement.devices):
            if dev.type == "cuda" and (dev.index or 0) >= gpus:
                raise ValueError(f"device_map places modules on {dev}, but {gpus} CUDA GPU(s) are visible")
        return placement
    raise ValueError(f"device_map must be 'auto' or a dict of module -> device, got {type(device_map).__name__}")


# ---------------------------------------------------------------------------------------------- the transform
def move_module_(module: nn.Module, device: str | torch.device) -> None:
    """`module.to(device)` plus plain tensor attributes (e.g. cached RoPE tables), which `.to` does not move."""
    device = torch.device(device)
    module.to(device)
    for sub in module.modules():
        for attr, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device != device:
                setattr(sub, attr, value.to(device))


class _Mover:
    """Moves a forward's shared tensors (cos, sin, mask) to each device once; reset at every LLM forward."""

    def __init__(self):
        self.memo: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, x, device: torch.device, memo: bool = True):
        if isinstance(x, tuple):
            return tuple(self.to(t, device, memo) for t in x)
        if not isinstance(x, torch.Tensor) or x.device == device:
            return x
        if not memo:
            return x.to(device)
        key = (id(x), str(device))
        hit = self.memo.get(key)
        if hit is None or hit[0] is not x:  # the memo keeps `x` alive, so its id cannot be reused meanwhile
            hit = self.memo[key] = (x, x.to(device))
        return hit[1]

    def reset(self, *_):
        self.memo.clear()


def place_model(model: nn.Module, placement: Placement) -> nn.Module:
    """Move an `InternVLModel`'s modules as `placement` says and make its forward device-safe (hooks only).

    Idempotent: a second call replaces the first placement. Transforms that swap modules inside the layers
    (`optimize_for_inference`, `quantize_model`) may run before or after. Returns `model`.
    """
    lm = model.language_model
    decoder = lm.model
    if len(placement.layers) != len(decoder.layers):
        raise ValueError(
            f"placement has {len(placement.layers)} layer devices but the model has {len(decoder.layers)} layers")
    for handle in getattr(model, "_placement_hooks", ()):
        handle.remove()
    for name in HOME_MODULES:
        move_module_(model.get_submodule(name), placement.home)
    for layer, device in zip(decoder.layers, placement.layers):
        move_module_(layer, device)

    mover = _Mover()
    home = torch.device(placement.home)

    def to_layer(device: torch.device):
        def hook(module, args):
            h, *rest = args  # (h, cos, sin, mask, cache): the cache object is not a tensor and passes through
            return (mover.to(h, device, memo=False), *(mover.to(a, device) for a in rest))

        return hook

    def inputs_home(module, args, kwargs):  # model(...) with inputs anywhere, as on one device with .to(device)
        return tuple(mover.to(a, home, memo=False) for a in args), {
            k: mover.to(v, home, memo=False) for k, v in kwargs.items()}

    handles = [model.register_forward_pre_hook(inputs_home, with_kwargs=True),
               lm.register_forward_pre_hook(mover.reset), lm.register_forward_hook(mover.reset)]
    for layer, device in zip(decoder.layers, placement.layers):
        handles.append(layer.register_forward_pre_hook(to_layer(torch.device(device))))
    handles.append(decoder.norm.register_forward_pre_hook(lambda module, args: (args[0].to(home), *args[1:])))
    model._placement_hooks = handles
    model.placement = placement
    return model
