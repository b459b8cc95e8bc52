"""Speed switches that mean the same on every device: bf16 autocast, and what torch.compile needs on the CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch

from gem3d.io import InputError


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A factory of the context the forward pass runs in: bf16 autocast on `device` (CPU or CUDA) for
    "bf16", nothing for "fp32"."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles) rather than emulating it."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if callable(check))


def require_cpu_compiler() -> None:
    """torch.compile on the CPU (inductor) builds C++ kernels with Python bindings: it needs a C++
    compiler and Python's headers. Without them, one line (InputError) instead of a traceback at the
    first step."""
    import sysconfig

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error type when no compiler is found
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"compile: true on the CPU needs a C++ compiler for torch.compile (none found: {first}); "
                         "install g++ (apt-get install g++) or set compile: false") from None
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():
        raise InputError(f"compile: true on the CPU needs Python's C headers for torch.compile ({header} is missing); "
                         "install them (apt-get install python3-dev) or set compile: false")
