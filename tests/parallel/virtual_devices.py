"""Several devices on a CPU-only machine, for testing multi-device code with real numbers.

Inside `virtual_devices()`, the devices `meta:0`, `meta:1`, ... behave like distinct GPUs: a tensor moved or created
there is a `VirtualTensor` that reports that device but keeps its values in an ordinary CPU tensor, so everything
computes exactly as on the CPU. Every operation checks the placement rules CUDA enforces and fails with CUDA's
message when they are broken:
* all tensor operands of an op are on one device (a 0-dim CPU tensor counts as a scalar and may join any op);
* advanced indexing (`x[idx]`, `x[idx] = v`) also accepts index tensors on the CPU;
* copies (`.to`, `copy_`) may cross devices.
The index-carrying `meta:N` spelling is used because the meta device type is the one whose device guard exists in a
CPU-only build (a fake `cuda:1` crashes in C++ device guards); plain `meta` (no index) keeps its usual meaning.
Outside the context manager, operations on a `VirtualTensor` still run and check (its own `__torch_dispatch__`), but
new tensors can only be created on virtual devices inside it. Modules must be moved outside `torch.inference_mode`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def is_virtual(device) -> bool:
    device = torch.device(device)
    return device.type == "meta" and device.index is not None


class VirtualTensor(torch.Tensor):
    """A tensor on a virtual device; `.data` lives in the CPU tensor `elem`."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        with torch.inference_mode(elem.is_inference()):  # autograd's view bookkeeping needs them to agree
            out = torch.Tensor._make_wrapper_subclass(
                cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
                device=device, requires_grad=False,
            )
        out.elem = elem
        return out

    @property
    def is_meta(self) -> bool:  # values are real: code that skips meta tensors must not skip these
        return False

    # Python list indices become index tensors below the Python dispatcher (on the indexed tensor's device, i.e. a
    # real, empty meta tensor); make them CPU tensors first, which is what they mean
    def __getitem__(self, index):
        return super().__getitem__(_lists_to_tensors(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_lists_to_tensors(index), value)

    def __repr__(self) -> str:
        return f"VirtualTensor({self.elem!r}, device='{self.device}')"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _lists_to_tensors(index):
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(_lists_to_tensors(i) for i in index)
    return index


def _dispatch(func, args, kwargs):
    operands: list[tuple[str, torch.Tensor]] = []  # (role, tensor) of every tensor argument

    def collect(role):
        def visit(x):
            if isinstance(x, torch.Tensor):
                operands.append((role, x))
            return x

        return visit

    if func in _INDEXING:
        self_, indices, *rest = args
        collect("self")(self_)
        tree_map(collect("index"), indices)
        tree_map(collect("self"), (rest, kwargs))
    else:
        tree_map(collect("self"), (args, kwargs))
    main = [t.device for role, t in operands if role == "self" and not (t.device.type == "cpu" and t.dim() == 0)]
    if func not in _COPIES:
        devices = set(map(str, main))
        if len(devices) > 1:
            a, b = sorted(devices)[:2]
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}! "
                f"(in {func}: {[(r, str(t.device), type(t).__name__, tuple(t.shape)) for r, t in operands]})"
            )
        home = main[0] if main else torch.device("cpu")
        for role, t in operands:
            if role == "index" and t.device.type != "cpu" and t.device != home:
                raise RuntimeError(
                    f"indices should be either on cpu or on the same device as the indexed tensor ({home}), "
                    f"got {t.device} (in {func})"
                )
    # where the result lives: an explicit device argument, else the first operand's device
    slot, target = _device_argument(func, args, kwargs)
    if target is not None:
        target = torch.device(target)
        if is_virtual(target):  # run on the CPU
            if slot == "kw":
                kwargs = {**kwargs, "device": torch.device("cpu")}
            else:
                args = (*args[:slot], torch.device("cpu"), *args[slot + 1:])
    elif func is aten.copy_.default:
        target = operands[0][1].device
    elif main:
        target = main[0]
    else:
        target = torch.device("cpu")

    def unwrap(x):
        return x.elem if isinstance(x, VirtualTensor) else x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    if not is_virtual(target):
        return out
    return tree_map(lambda x: VirtualTensor(x, target) if isinstance(x, torch.Tensor) else x, out)


def _device_argument(func, args, kwargs):
    """(position or "kw", value) of an op's `device` argument; (None, None) when it has none or it is unset."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "device":
            if not arg.kwarg_only and i < len(args):
                return i, args[i]
            return "kw", kwargs.get("device")
    return None, None


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _from_data(make):
    """torch.tensor / torch.as_tensor copy their data to the target device below the Python dispatcher, which would
    give a real (empty) meta tensor: create on the CPU, then move through the dispatcher."""

    def wrapped(data, *args, device=None, **kwargs):
        if device is not None and is_virtual(device):
            return make(data, *args, **kwargs).to(device)
        return make(data, *args, device=device, **kwargs)

    return wrapped


@contextlib.contextmanager
def virtual_devices():
    """Make `meta:0`, `meta:1`, ... usable as separate devices (see the module docstring)."""
    originals = torch.tensor, torch.as_tensor
    torch.tensor, torch.as_tensor = map(_from_data, originals)
    try:
        with _Mode():
            yield
    finally:
        torch.tensor, torch.as_tensor = originals


def values(x: torch.Tensor) -> torch.Tensor:
    """The CPU values of a (possibly virtual) tensor."""
    return x.elem if isinstance(x, VirtualTensor) else x.cpu()
