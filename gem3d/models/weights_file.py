"""Read the tensors of weights files written by other programs, without running any of their code.

Files gem3d reads but did not write: safetensors files, torch files holding a state dict, and whole
training checkpoints such as PyTorch Lightning's (`last.ckpt` of latent diffusion, Stable Diffusion 1.x,
CompVis's KL-f8 `model.ckpt` and the GEM-3D authors' release). Lightning pickles its callbacks keyed by
their class, so `torch.load(weights_only=True)` refuses those files, and `weights_only=False` would import
and call whatever the file names. Here the pickle is read by an unpickler that rebuilds tensors and plain
containers only; every other global the file names becomes an inert placeholder (never imported, never
called), so what is not a tensor is simply not there.

Every failure is one `InputError` line that says what the file is: missing, empty, not a torch or
safetensors file, truncated or damaged, or holding no tensors.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gem3d.io import InputError

# The globals a tensors-and-containers pickle needs (the rest of torch's own needs, storages, are resolved by
# torch.load before they reach the unpickler). Anything else becomes a Placeholder.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}
_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


class Placeholder:
    """What a pickled object of an unknown class becomes: it accepts any arguments and state and does nothing."""

    origin = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # a pickled dict subclass is filled item by item
        pass

    def append(self, value):  # ... and a list subclass value by value
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return f"<not loaded: {self.origin}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        return type(name, (Placeholder,), {"origin": f"{module}.{name}"})


_restricted_pickle = types.ModuleType("gem3d_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = pickle.load
_restricted_pickle.__name__ = "gem3d_restricted_pickle"


def _kind(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if not head:
        return "empty"
    if head.startswith(b"PK"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy (pre-1.6) format
        return "pickle"
    if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32):
        return "safetensors"  # an 8-byte length, then the JSON header
    return "other"


def read_weights_file(path: str | Path, what: str = "weights file") -> Any:
    """The object a torch or safetensors file holds: tensors, containers and inert placeholders."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "not found"
        raise InputError(f"{path}: {what} {problem}")
    kind = _kind(path)
    if kind == "empty":
        raise InputError(f"{path}: {what} is empty (0 bytes)")
    if kind == "other":
        raise InputError(f"{path}: {what} is not a torch or safetensors file (it starts with neither a zip, a "
                         "pickle nor a safetensors header)")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # a damaged header or a truncated body
            raise InputError(f"{path}: {what} looks like a safetensors file but cannot be read (truncated or "
                             f"damaged: {_first_line(exc)})") from None
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise InputError(f"{path}: {what} is a truncated or damaged torch file (its zip directory is missing)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except Exception as exc:  # zip records, pickle opcodes or storages that do not add up
        raise InputError(f"{path}: {what} is a truncated or damaged torch file ({_first_line(exc)})") from None


def state_dict_of(obj: Any, path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a state dict, or of a checkpoint's ``state_dict`` entry (Lightning and others)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: {what} holds a {_describe(obj)}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        others = sorted({_describe(v) for v in obj.values()})[:3]
        raise InputError(f"{path}: {what} holds no tensors (its entries are {', '.join(others) or 'none'})")
    return tensors


def read_state_dict(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """`state_dict_of(read_weights_file(path))`."""
    return state_dict_of(read_weights_file(path, what), path, what)


def _describe(value: Any) -> str:
    if isinstance(value, Placeholder):
        return f"pickled {value.origin} object (not loaded)"
    return type(value).__name__


def _first_line(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return (text.splitlines() or [""])[0][:160]
