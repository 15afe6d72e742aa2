"""A second device on a CPU-only machine, for the device tier (issue 18 §3).

Inside ``fake_accelerator()``, a tensor moved to ``meta:<i>`` (``.to(DEVICE)``, a factory with
``device=DEVICE``, ``torch.tensor(..., device=DEVICE)``) keeps its real CPU data but reports the device
``meta:<i>``, and every operation on it is checked the way CUDA checks it:

- an operation that mixes it with a host tensor of one or more dimensions, or with ``meta:<j>`` (another
  "GPU"), raises "Expected all tensors to be on the same device" (0-dim host tensors mix, as on CUDA;
  cross-device ``copy_`` / ``to`` and host index tensors are allowed, as on CUDA);
- ``.numpy()`` and ``np.asarray`` raise TypeError, as for a CUDA tensor; ``.cpu()`` / ``.to("cpu")`` give a
  plain host tensor; ``.item()``, ``float()``, ``.tolist()`` work (a synchronising read, legal on CUDA);
- random draws on the device with a host ``torch.Generator`` raise, as on CUDA (``torch.Generator(device=
  DEVICE)`` gives one for the device).

The numbers are the CPU's, so a device-correct path gives the plain CPU result exactly, and a wrong one
fails: a host conversion, a module built on the host inside a device model, statistics allocated on another
device than their inputs. ``meta`` is used as the device type because CPU-only builds register device
guards for it (``cuda`` ones are missing); the library never branches on ``meta``, so it is "not the host"
and nothing more. (FakeTensorMode was the other lead: it has no data, so ``int(t.max())``, eigh and the
searches cannot run under it.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

HOST = torch.device("cpu")
KIND = "meta"
DEVICE = torch.device(KIND, 0)
SECOND = torch.device(KIND, 1)

#: Operations CUDA runs on inputs of several devices (the copy itself, host index tensors).
MIXED_OK = {"aten::copy_", "aten::_to_copy", "aten::index", "aten::index_put_", "aten::_index_put_impl_",
            "aten::index_put", "aten::_local_scalar_dense"}


class OnDevice(torch.Tensor):
    """Real host data reporting a device ``meta:<i>`` (see the module docstring)."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=device, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    # host reads that the Python bindings would otherwise route through a device guard
    def item(self):
        return self.elem.item()

    def tolist(self):
        return self.elem.tolist()

    def __float__(self):
        return float(self.elem)

    def __int__(self):
        return int(self.elem)

    def __bool__(self):
        return bool(self.elem)

    def __index__(self):
        return self.elem.__index__()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy the "
                        "tensor to host memory first.")

    __array__ = numpy

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r}, device={self.device})"


def _index(device: torch.device) -> torch.device:
    return torch.device(KIND, 0) if device.index is None else device


def _run(func, args, kwargs):
    name = func._schema.name
    devices: set[torch.device] = set()
    by_id: dict[int, OnDevice] = {}

    def unwrap(t):
        if isinstance(t, OnDevice):
            devices.add(t.device)
            by_id[id(t.elem)] = t
            return t.elem
        if isinstance(t, torch.Tensor):
            if t.device.type == KIND:
                raise RuntimeError(f"{func}: a data-less {KIND} tensor, made outside fake_accelerator()")
            if t.dim() > 0:
                devices.add(HOST)
        return t

    args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    target = kwargs.get("device")
    if target is not None:
        target = torch.device(target)
        if target.type == KIND:
            target = _index(target)
        kwargs["device"] = HOST
    if len(devices) > 1 and name not in MIXED_OK:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{' and '.join(sorted(map(str, devices)))}! ({func})")
    if target is not None:
        out_device = target
    else:
        out_device = next((d for d in sorted(devices, key=str) if d.type == KIND), HOST)
    out = func(*args, **kwargs)

    def wrap(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice):
            if id(t) in by_id:  # in-place and out= results are their input
                return by_id[id(t)]
            return OnDevice(t, out_device) if out_device.type == KIND else t
        return t

    return tree_map(wrap, out)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


class _Lift(TorchFunctionMode):
    """Python-level checks, before the dispatcher turns the arguments into fresh objects: a random draw on a
    device needs a generator of that device; ``torch.tensor(data, device=DEVICE)`` builds on the host with the
    dispatcher bypassed, then moves: do the move ourselves so the data survive."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        gen = kwargs.get("generator")
        if gen is not None and dev is not None and torch.device(dev).type == KIND:
            have = getattr(gen, "fake_device", HOST)
            if have != _index(torch.device(dev)):
                raise RuntimeError(f"{func.__name__}: Expected a '{_index(torch.device(dev))}' generator device "
                                   f"but found '{have}'")
        if func in (torch.tensor, torch.as_tensor) and dev is not None and torch.device(dev).type == KIND:
            kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            return torch.ops.aten._to_copy.default(func(*args, **kwargs), device=_index(torch.device(dev)))
        return func(*args, **kwargs)


class _Generator(torch.Generator):
    """``torch.Generator(device=DEVICE)``: a host generator that remembers its device (draws on the device
    need one; a plain host generator is refused there, as on CUDA)."""

    def __new__(cls, device=None):
        dev = None if device is None else torch.device(device)
        return super().__new__(cls, "cpu" if dev is not None and dev.type == KIND else device)

    def __init__(self, device=None):
        dev = None if device is None else torch.device(device)
        self.fake_device = _index(dev) if dev is not None and dev.type == KIND else HOST

    def manual_seed(self, seed: int) -> _Generator:
        super().manual_seed(seed)
        return self  # the binding would return a new wrapper, without ``fake_device``


class _Autocast(torch.autocast):
    """``torch.autocast(device_type=t.device.type)`` (lm-eval, peft) on the fake device: the host's autocast."""

    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cpu" if device_type == KIND else device_type, *args, **kwargs)


@contextmanager
def fake_accelerator() -> Iterator[torch.device]:
    """Within the block, ``meta:<i>`` behaves as a GPU holding real data (module docstring); yields ``DEVICE``.
    Autograd runs on the calling thread (the engine has no worker for this device)."""
    real = torch.autocast, torch.Generator
    torch.autocast, torch.Generator = _Autocast, _Generator
    try:
        with _Lift(), _Dispatch(), torch.autograd.set_multithreading_enabled(False):
            yield DEVICE
    finally:
        torch.autocast, torch.Generator = real


def on_host(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain host tensor (not on the fake device)."""
    return not isinstance(t, OnDevice) and t.device.type == "cpu"
