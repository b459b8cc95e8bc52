"""Exponential moving average of a model's trained parameters, kept in fp32.

    ema = EMA(model, decay=0.9999, start=0)          # tracks every parameter with requires_grad
    ema.update(model, step)                          # after each optimizer step (step = completed steps)
    ema.copy_to(model)                               # put the averaged weights into the model
    with ema.applied_to(model): sample(model)        # temporarily, restoring the trained weights after

Up to and including step `start`, the average is a plain copy of the weights; afterwards
`shadow <- decay * shadow + (1 - decay) * param`. `state_dict()` maps parameter names (as in the
UNWRAPPED model's `named_parameters()`) to fp32 tensors, so `model.load_state_dict(ema_sd,
strict=False)` also works directly.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, start: int = 0, names: Iterable[str] | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if start < 0:
            raise ValueError(f"EMA start must be >= 0, got {start}")
        self.decay = float(decay)
        self.start = int(start)
        params = dict(model.named_parameters())
        if names is None:
            names = [n for n, p in params.items() if p.requires_grad]
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"EMA: not parameters of the model: {unknown[:5]}")
        self.names: list[str] = names
        self.shadow: dict[str, torch.Tensor] = {
            n: params[n].detach().to(dtype=torch.float32, copy=True) for n in names
        }
        self._cache: tuple[int, list[torch.Tensor]] | None = None

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        if self._cache is None or self._cache[0] != id(model):
            params = dict(model.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ValueError(f"EMA: model lacks tracked parameters {missing[:5]}")
            self._cache = (id(model), [params[n] for n in self.names])
        return self._cache[1]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current weights in; `step` = optimizer steps completed so far."""
        if not self.names:
            return
        current = [p.detach().float() for p in self._params(model)]
        shadows = [self.shadow[n] for n in self.names]
        if step <= self.start:
            torch._foreach_copy_(shadows, current)
        else:
            torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if set(state) != set(self.names):
            extra = sorted(set(state) - set(self.names))[:5]
            missing = sorted(set(self.names) - set(state))[:5]
            raise ValueError(f"EMA state does not match the tracked parameters (unexpected {extra}, missing {missing})")
        for n in self.names:
            value = state[n]
            if value.shape != self.shadow[n].shape:
                raise ValueError(f"EMA state {n!r}: shape {tuple(value.shape)} != {tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages (cast to each parameter's dtype)."""
        for p, n in zip(self._params(model), self.names):
            p.copy_(self.shadow[n])

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block; the trained weights come back afterwards."""
        saved = [p.detach().clone() for p in self._params(model)]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(self._params(model), saved):
                    p.copy_(s)
