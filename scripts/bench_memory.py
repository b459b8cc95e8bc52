#!/usr/bin/env python
"""Peak memory of one training step of every method at the paper configuration, counted on the meta device.

    python scripts/bench_memory.py                       # one line per (method, stage), as each is counted
    python scripts/bench_memory.py --markdown            # and the table for docs/benchmarks.md
    python scripts/bench_memory.py --only gem3d pix2pix  # some methods only (--list names them)
    python scripts/bench_memory.py --batch 2             # 2 windows (volumes) per step and GPU

No GPU and no real compute: every network is built on the meta device (shapes and dtypes, no data)
and one training step runs on it as the configs train it (config/brats.yaml, read with
gem3d.config.load_config and the repository's spec helpers): the loss of the method's training
code (gem3d.training.diffusion_training.eps_loss, gem3d.methods.pix2pix.make_loss), backward,
the trained parameters of the pipeline's stage (stage 2: the slice-axis layers only), bf16 autocast
where the section says `precision: bf16`, gradient checkpointing where it says
`grad_checkpointing: true`, one window (or volume) per step: the paper trains one 16-slice window
per GPU.

What is counted
- `MemoryCounter`, a TorchDispatchMode below autograd: every tensor an operator returns in fresh
  memory (not a view, not an in-place or out= result) is recorded at `untyped_storage().nbytes()`,
  once per storage (views share it), and released when its storage is garbage-collected
  (weakref.finalize on the storage), keeping a running total and its maximum. So it sees what
  autograd saves for the backward, the autocast copies, the checkpointed recomputation, the
  gradients as the backward makes them (a post-accumulate-grad hook moves each parameter's gradient
  to the "gradients" account) and every short-lived temporary between two operators.
- Beside it, the training state held through the step: the weights (fp32), AdamW's two fp32
  moments per trained parameter, and the EMA copy (fp32) of the trained parameters where the
  section's `ema_decay` keeps one (not pix2pix's); the gradients (fp32, trained parameters only)
  are in the column of the state too.
- "peak activations" is the largest total of the counted tensors other than gradients; "total" is
  weights + AdamW + EMA + the largest total of counted tensors INCLUDING the gradients present at
  that moment (the peak of the step's timeline). So total <= state + peak activations: the
  gradients appear during the backward, while the saved activations are being released.
- bf16 autocast is CUDA's: the meta device has no autocast dispatch key (torch.autocast on meta
  tensors changes nothing, and on a machine without a GPU torch.autocast("cuda") turns itself off),
  so `CudaAutocast`, a TorchFunctionMode ABOVE autograd, applies CUDA's autocast policy as torch's
  aten/src/ATen/autocast_mode.h lists it (lower precision: convolutions, linear, matmuls,
  scaled_dot_product_attention; fp32: group_norm, layer_norm, upsampling, the losses, exp/log/pow...;
  fp32 output dtype: sum, softmax, cumsum, prod), with autocast's cache of the bf16 copies of the
  trained weights for the forward. Scaled dot-product attention runs as the flash kernel (what an
  H100/H200 picks for bf16 without a mask; on meta the plain call would decompose into the math
  path and materialise the attention matrix), so it keeps O(tokens) for its backward.

What is NOT counted, so the figures are a LOWER BOUND of `torch.cuda.max_memory_allocated` for the
same step in eager mode: memory an operator allocates inside its kernel and frees before returning
(cuDNN/cuBLAS workspaces, the flash backward's fp32 accumulators, copies of non-contiguous inputs),
the caching allocator's rounding and fragmentation (reserved > allocated), the CUDA context and
libraries (outside max_memory_allocated as well), DDP's gradient buckets (one more copy of the
gradients when several GPUs train), torch.compile's own buffers (the configs train eagerly), and the micro-batch
accumulation (with micro_batch < the global batch on one GPU, the gradients of the earlier micro-
batches stay while the next runs: add them to the activations). The batch's own tensors (latents,
mask) are counted with the activations.

Validation (tests/test_bench_memory.py): the counter equals the real CPU allocator's peak byte for
byte over whole steps (an MLP in fp32 and under bf16 autocast, with and without checkpointing, and a
small UNet of convolutions, GroupNorm, SiLU and upsampling), once the allocations an operator frees
before returning are left out of the allocator's timeline; and an MLP's saved activations by hand.

Fallback: if an operator has no meta kernel (NotImplementedError while tracing), the network is
counted again under torch._subclasses.fake_tensor.FakeTensorMode (fake CPU tensors on meta storage;
the same two modes on top); the line then says "fake". No network is skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import weakref
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's gem3d, installed or not

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the counter


def _counted(t: torch.Tensor) -> bool:
    """Tensors of the traced device: meta tensors, or fake tensors under the fallback (not real CPU tensors
    such as the noise schedule's tables)."""
    if t.is_meta:
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, FakeTensor)


class MemoryCounter(TorchDispatchMode):
    """Running total and peak of the bytes of tensors that operators return in fresh storage.

    Accounts: "activations" (everything) and "gradients" (storages moved there by `mark_gradient`).
    `peak` is the maximum of both together, `peak_activations` of the first alone; `current` is the
    total now.
    """

    def __init__(self, existing=()):
        """`existing`: tensors allocated before the step (weights, the batch), never counted even where an operator
        without an alias annotation returns their storage (e.g. _unsafe_view)."""
        super().__init__()
        self.existing = [t.untyped_storage() for t in existing if isinstance(t, torch.Tensor)]  # kept alive
        self.skip = {st._cdata for st in self.existing}
        self.live: dict[int, list] = {}  # StorageImpl address -> [nbytes, account]
        self.current = {"activations": 0, "gradients": 0}
        self.peak = 0
        self.peak_activations = 0
        self.ops = 0

    # -- bookkeeping ----------------------------------------------------------------------
    def _allocate(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.skip:
            return
        nbytes = int(storage.nbytes())
        self.live[key] = [nbytes, "activations"]
        self.current["activations"] += nbytes
        weakref.finalize(storage, self._release, key)
        self._update_peak()

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[1]] -= entry[0]

    def _update_peak(self) -> None:
        self.peak = max(self.peak, self.current["activations"] + self.current["gradients"])
        self.peak_activations = max(self.peak_activations, self.current["activations"])

    def mark_gradient(self, t: torch.Tensor) -> None:
        """Move a tensor's storage (a parameter's .grad) to the gradients account."""
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1] != "gradients":
            self.current[entry[1]] -= entry[0]
            entry[1] = "gradients"
            self.current["gradients"] += entry[0]

    @property
    def total(self) -> int:
        return self.current["activations"] + self.current["gradients"]

    # -- the mode -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        returns = func._schema.returns
        outs = out if isinstance(out, (tuple, list)) and len(returns) > 1 else (out,)
        for ret, value in zip(returns, outs):
            if ret.alias_info is not None:  # a view of an input, or an in-place / out= result: no new memory
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor) and _counted(t):
                    self._allocate(t)
        return out


# ---------------------------------------------------------------------------------------------
# CUDA's bf16 autocast, on tensors that have no autocast dispatch key


def _resolve(names: str) -> set:
    found = set()
    for name in names.split():
        owner, _, attr = name.rpartition(".")
        obj = {"torch": torch, "F": F, "Tensor": torch.Tensor, "torch._C._nn": torch._C._nn}[owner]
        if hasattr(obj, attr):
            found.add(getattr(obj, attr))
    return found


# aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE (the CUDA
# policy), at the level of the Python functions that reach those operators
_LOWER = _resolve(
    "torch.conv1d torch.conv2d torch.conv3d torch.conv_tbc torch.conv_transpose1d torch.conv_transpose2d "
    "torch.conv_transpose3d torch.convolution torch._convolution torch.prelu F.prelu torch.addmm torch.addmv "
    "torch.addr torch.matmul torch.einsum torch.mm torch.mv torch.bmm torch.baddbmm torch.addbmm torch.chain_matmul "
    "F.linear torch._C._nn.linear Tensor.matmul Tensor.__matmul__ Tensor.__rmatmul__ Tensor.mm Tensor.mv Tensor.bmm "
    "Tensor.addmm Tensor.baddbmm Tensor.addbmm Tensor.addmv Tensor.addr")
_FP32 = _resolve(
    "torch.acos torch.asin torch.cosh torch.erfinv torch.exp torch.expm1 torch.log torch.log10 torch.log2 torch.log1p "
    "torch.reciprocal torch.rsqrt torch.sinh torch.tan torch.pow Tensor.acos Tensor.asin Tensor.cosh Tensor.erfinv "
    "Tensor.exp Tensor.expm1 Tensor.log Tensor.log10 Tensor.log2 Tensor.log1p Tensor.reciprocal Tensor.rsqrt "
    "Tensor.sinh Tensor.tan Tensor.pow Tensor.__pow__ Tensor.__rpow__ F.softplus torch._C._nn.softplus F.layer_norm "
    "torch.layer_norm torch.native_layer_norm F.group_norm torch.group_norm torch.frobenius_norm torch.nuclear_norm "
    "F.cosine_similarity torch.cosine_similarity F.poisson_nll_loss torch.poisson_nll_loss F.cosine_embedding_loss "
    "F.nll_loss F.hinge_embedding_loss F.kl_div torch.kl_div F.l1_loss F.smooth_l1_loss F.huber_loss F.mse_loss "
    "F.margin_ranking_loss F.multilabel_margin_loss F.soft_margin_loss F.triplet_margin_loss F.multi_margin_loss "
    "F.binary_cross_entropy_with_logits torch.binary_cross_entropy_with_logits torch.dist torch.pdist F.pdist "
    "torch.cdist torch.renorm torch.logsumexp Tensor.logsumexp F.upsample F.upsample_nearest F.upsample_bilinear")
_FP32_OUTPUT = _resolve(
    "torch.prod torch.softmax torch.log_softmax torch.cumprod torch.cumsum torch.sum Tensor.prod Tensor.softmax "
    "Tensor.log_softmax Tensor.cumprod Tensor.cumsum Tensor.sum F.softmax F.log_softmax")
_SDPA = _resolve("F.scaled_dot_product_attention torch._C._nn.scaled_dot_product_attention")


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


class CudaAutocast(TorchFunctionMode):
    """torch.autocast("cuda", dtype=torch.bfloat16) for tensors of any device (see the module docstring).

    Active for the whole step, so that checkpointed blocks recompute in the backward with the dtypes of their
    forward; `forward()` is the region of the forward pass, where the bf16 copies of fp32 leaf tensors that
    require grad (the trained weights) are cached as torch's autocast caches them, and dropped at its end.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @contextlib.contextmanager
    def forward(self):
        self.cache = {}
        try:
            yield
        finally:
            self.cache = None

    def _cast(self, t, dtype):
        if not _eligible(t) or t.dtype == dtype:
            return t
        cacheable = (self.cache is not None and dtype == self.dtype and t.dtype == torch.float32 and t.is_leaf
                     and t.requires_grad and not t._is_view())
        if cacheable and id(t) in self.cache:
            return self.cache[id(t)][1]
        out = t.to(dtype)
        if cacheable:
            self.cache[id(t)] = (t, out)
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _SDPA:
            return self._sdpa(func, *args, **kwargs)
        if func in _LOWER:
            cast = self.dtype
        elif func in _FP32 or (func is F.interpolate and kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
                               != "area"):
            cast = torch.float32
        elif func in _FP32_OUTPUT:
            first = next((a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
            if kwargs.get("dtype") is None and _eligible(first):
                kwargs["dtype"] = torch.float32
            return func(*args, **kwargs)
        else:
            return func(*args, **kwargs)
        # last argument first, as torch's C++ autocast kernels evaluate their casts (the order only decides which
        # small cast is freed first in the backward)
        leaves, spec = tree_flatten((args, kwargs))
        leaves = [self._cast(a, cast) for a in reversed(leaves)][::-1]
        args, kwargs = tree_unflatten(leaves, spec)
        return func(*args, **kwargs)

    def _sdpa(self, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q, k, v = (self._cast(x, self.dtype) for x in (query, key, value))
        if attn_mask is None and not kw.get("enable_gqa", False) and q.shape[-1] <= 256 and q.dim() == 4:
            # the flash kernel: saves q, k, v, out and the fp32 log-sum-exp for its backward
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        return func(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)


@contextlib.contextmanager
def _active(mode: TorchFunctionMode):
    """Enter `mode` unless it is on the torch-function mode stack already."""
    from torch.overrides import _get_current_function_mode_stack

    if any(m is mode for m in _get_current_function_mode_stack()):
        yield
    else:
        with mode:
            yield


@contextlib.contextmanager
def recompute_under(mode: TorchFunctionMode):
    """Checkpointed blocks recompute under `mode` too. The autograd engine does not carry torch-function modes into
    the backward (dispatch modes it does), so torch.utils.checkpoint's recomputation would run without the autocast
    policy; this passes the mode as its recompute context (context_fn, use_reentrant=False) to every module's
    `checkpoint` name bound to torch.utils.checkpoint.checkpoint, for the duration."""
    import torch.utils.checkpoint as ckpt

    original = ckpt.checkpoint

    def checkpoint(function, *args, use_reentrant=None, context_fn=None, **kwargs):
        if use_reentrant is False and context_fn is None:
            context_fn = lambda: (contextlib.nullcontext(), _active(mode))  # noqa: E731
        if context_fn is not None:
            kwargs["context_fn"] = context_fn
        return original(function, *args, use_reentrant=use_reentrant, **kwargs)

    bound = [m for m in list(sys.modules.values()) if getattr(m, "__dict__", {}).get("checkpoint") is original]
    for m in bound:
        m.checkpoint = checkpoint
    try:
        yield
    finally:
        for m in bound:
            m.checkpoint = original


# ---------------------------------------------------------------------------------------------
# one training step


@dataclasses.dataclass
class StepMemory:
    parameters: int  # all parameters of the module
    trained: int  # parameters the optimizer updates
    weights: int  # bytes
    gradients: int
    adamw: int
    ema: int
    peak_activations: int  # counted tensors other than gradients, at their maximum (batch included)
    peak_step: int  # counted tensors including the gradients present, at their maximum
    mode: str = "meta"
    ops: int = 0

    @property
    def state(self) -> int:
        return self.weights + self.gradients + self.adamw + self.ema

    @property
    def total(self) -> int:
        """Peak of the step: weights, AdamW and EMA all the time, plus the timeline's peak of activations and
        gradients."""
        return self.weights + self.adamw + self.ema + self.peak_step


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st._cdata not in seen:
                seen.add(st._cdata)
                total += int(st.nbytes())
    return total


def count_step(make_model: Callable[[], nn.Module], make_batch: Callable[[], tuple],
               loss_fn: Callable[..., torch.Tensor], trainable: Callable[[nn.Module], list] | None = None,
               bf16: bool = True, checkpointing: bool = False, ema: bool = True) -> StepMemory:
    """Memory of one training step, counted on meta tensors; under FakeTensorMode if an operator has no meta
    kernel. `make_model()` and `make_batch()` are called under torch.device("meta") (or the fake mode);
    `loss_fn(model, *batch)` returns the scalar loss; `trainable(model)` the trained parameters (default: all)."""
    try:
        return _count_step(contextlib.nullcontext, "meta", make_model, make_batch, loss_fn, trainable, bf16,
                           checkpointing, ema)
    except NotImplementedError:
        from torch._subclasses.fake_tensor import FakeTensorMode

        return _count_step(FakeTensorMode, "fake", make_model, make_batch, loss_fn, trainable, bf16, checkpointing,
                           ema)


def _count_step(outer, mode, make_model, make_batch, loss_fn, trainable, bf16, checkpointing, ema) -> StepMemory:
    with outer() as fake:
        device = torch.device("meta") if fake is None else contextlib.nullcontext()
        with device:
            model = make_model()
            batch = make_batch()
        model.train()
        setter = getattr(model, "set_grad_checkpointing", None)
        if callable(setter):
            setter(checkpointing)
        trained = list(trainable(model) if trainable is not None else model.parameters())
        ids = {id(p) for p in trained}
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        n_trained = sum(p.numel() for p in trained)
        n_all = sum(p.numel() for p in model.parameters())
        weights = _nbytes(list(model.parameters()) + list(model.buffers()))
        fp32 = 4 * n_trained

        counter = MemoryCounter(existing=[*model.parameters(), *model.buffers(), *tree_leaves(batch)])
        counter.current["activations"] = _nbytes(tree_leaves(batch))  # the batch, on the device for the step
        hooks = [p.register_post_accumulate_grad_hook(lambda p: counter.mark_gradient(p.grad)) for p in trained]
        autocast = CudaAutocast() if bf16 else None
        try:
            with counter, (recompute_under(autocast) if autocast is not None else contextlib.nullcontext()), \
                    (autocast if autocast is not None else contextlib.nullcontext()):
                with (autocast.forward() if autocast is not None else contextlib.nullcontext()):
                    loss = loss_fn(model, *batch)
                loss.backward()
                del loss
        finally:
            for h in hooks:
                h.remove()
        gradients = _nbytes(p.grad for p in trained)
        return StepMemory(parameters=n_all, trained=n_trained, weights=weights, gradients=gradients, adamw=2 * fp32,
                          ema=fp32 if ema else 0, peak_activations=counter.peak_activations, peak_step=counter.peak,
                          mode=mode, ops=counter.ops)


# ---------------------------------------------------------------------------------------------
# the methods at the paper configuration


@dataclasses.dataclass
class Network:
    method: str
    stage: str
    shape: str  # what one step sees
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[], tuple]
    loss_fn: Callable
    trainable: Callable | None
    bf16: bool
    checkpointing: bool
    ema: bool


def networks(config_path: Path, batch: int = 1) -> dict[str, list[Network]]:
    """method key -> its rows, from the config (sizes, training switches) and the repository's spec helpers."""
    from gem3d.methods.ldm3d import ldm3d_unet_config
    from gem3d.methods.pix2pix import make_loss, pix2pix_config, volume_size
    from gem3d.config import load_config
    from gem3d.models import UNet
    from gem3d.models.pix2pix3d import Pix2Pix3D
    from gem3d.models.specs import latent_channels, train_config, vae_config, variant_unet_config
    from gem3d.models.unet3d import UNet3D
    from gem3d.training.diffusion_training import eps_loss, noise_schedule

    cfg = load_config(config_path, check_paths=False)
    c = latent_channels(cfg)
    lat = cfg.preprocess.slice_size // vae_config(cfg).downsampling_factor  # 512 / 8 = 64
    n = cfg.volume_model.window
    schedule = noise_schedule(cfg)
    rows: dict[str, list[Network]] = {}

    def switches(section) -> dict:
        t = train_config(section, cfg.seed)
        return dict(bf16=t.precision == "bf16", checkpointing=bool(t.grad_checkpointing), ema=t.ema_decay > 0)

    def diffusion_loss(model, x0, cond, t, noise):
        return eps_loss(model, x0, cond, t, noise, schedule)[0]

    def window_batch(cond_channels: int, depth: int, per_slice_t: bool):
        def make():
            x0 = torch.randn(batch, c, depth, lat, lat)
            t = torch.zeros((batch, depth) if per_slice_t else (batch,), dtype=torch.long, device="cpu")
            return x0, torch.randn(batch, cond_channels, depth, lat, lat), t, torch.randn_like(x0)
        return make

    labels = {"gem3d": "GEM-3D", "baseline": "Make-A-Volume baseline", "controlnet": "GEM-3D, ControlNet injection",
              "crossattn": "GEM-3D, cross-attention injection"}
    for variant in ("gem3d", "baseline", "controlnet", "crossattn"):
        cond = c if variant == "baseline" else 2 * c
        for stage in (1, 2):
            net_cfg = variant_unet_config(cfg, variant, slice_axis=stage == 2)
            section = getattr(cfg.volume_model, f"stage{stage}")
            rows.setdefault(variant, []).append(Network(
                labels[variant], f"stage {stage}", f"{batch} x {n} slices of {lat}x{lat}x{c}",
                lambda net_cfg=net_cfg: UNet(net_cfg), window_batch(cond, n, stage == 1), diffusion_loss,
                (lambda m: m.slice_axis_parameters()) if stage == 2 else None, **switches(section)))
    # the windows' point: the same stage-2 network on a whole BraTS volume (155 slices) in one pass
    net_cfg = variant_unet_config(cfg, "gem3d", slice_axis=True)
    rows["gem3d_whole"] = [Network(
        "GEM-3D on a whole volume (not trained so)", "stage 2", f"{batch} x 155 slices of {lat}x{lat}x{c}",
        lambda: UNet(net_cfg), window_batch(2 * c, 155, False), diffusion_loss, lambda m: m.slice_axis_parameters(),
        **switches(cfg.volume_model.stage2))]

    p_cfg = pix2pix_config(cfg)
    loss = make_loss(cfg.pix2pix.l1_weight, cfg.max_label)

    def pix2pix_batch(size):
        def make():
            label = torch.zeros(batch, *size, dtype=torch.int8)  # the loop's int8 labels; the image as float
            return ({"label": label, "image": torch.randn(batch, 1, *size)},)
        return make

    def pix2pix_loss(model, b):
        return loss(model, b, None)[0]

    multiple = p_cfg.size_multiple()  # the whole 155 x 512 x 512 volume, padded to what the generator divides
    whole = (-(-155 // multiple) * multiple, 512, 512)
    for size, note in ((volume_size(cfg, p_cfg), "pix2pix.volume_size"), (whole, "whole volume")):
        rows.setdefault("pix2pix", []).append(Network(
            "3D Pix2Pix", f"{'x'.join(map(str, size))} ({note})", f"{batch} volume of {'x'.join(map(str, size))}",
            lambda: Pix2Pix3D(p_cfg), pix2pix_batch(size), pix2pix_loss, None, **switches(cfg.pix2pix.train)))

    l_cfg = ldm3d_unet_config(cfg, c)
    depth = cfg.ldm3d.depth
    rows["ldm3d"] = [Network(
        "Conditional 3D LDM", f"{depth}x{lat}x{lat} latents", f"{batch} volume of {depth}x{lat}x{lat}x{c}",
        lambda: UNet3D(l_cfg), window_batch(c, depth, False), diffusion_loss, None, **switches(cfg.ldm3d.train))]
    return rows


def measure(net: Network, checkpointing: bool | None = None) -> StepMemory:
    """The step as the config trains it; `checkpointing` overrides the config's gradient checkpointing."""
    return count_step(net.make_model, net.make_batch, net.loss_fn, net.trainable, bf16=net.bf16,
                      checkpointing=net.checkpointing if checkpointing is None else checkpointing, ema=net.ema)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config" / "brats.yaml"))
    parser.add_argument("--batch", type=int, default=1, help="windows (or volumes) per step and GPU (paper: 1)")
    parser.add_argument("--only", nargs="*", default=None, help="method keys to count (see --list)")
    parser.add_argument("--list", action="store_true", help="print the method keys and stop")
    parser.add_argument("--markdown", action="store_true", help="also print the table for docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = networks(Path(args.config), args.batch)
    if args.list:
        for key, nets in rows.items():
            print(f"{key}: " + "; ".join(f"{n.method} {n.stage}" for n in nets))
        return 0
    unknown = sorted(set(args.only or []) - set(rows))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(rows)}")
    print(f"# peak memory of one training step, counted on the meta device (torch {torch.__version__}, "
          f"{args.config}, batch {args.batch}); GiB = 2**30 bytes", flush=True)
    results = []
    for key, nets in rows.items():
        if args.only and key not in args.only:
            continue
        for net in nets:
            m = measure(net)
            # the same step without gradient checkpointing (where the config switches it on), for comparison
            off = measure(net, checkpointing=False) if net.checkpointing else None
            results.append((net, m, off))
            switches = ", ".join(s for s, on in (("bf16", net.bf16), ("checkpointing", net.checkpointing),
                                                  ("EMA", net.ema)) if on)
            print(f"{net.method}, {net.stage} [{net.shape}; {switches or 'fp32'}; {m.mode}]: {m.parameters / 1e6:.1f}M "
                  f"parameters, {m.trained / 1e6:.1f}M trained; weights {_gib(m.weights)} + grads "
                  f"{_gib(m.gradients)} + AdamW {_gib(m.adamw)} + EMA {_gib(m.ema)} = {_gib(m.state)} GiB; "
                  f"peak activations {_gib(m.peak_activations)} GiB; total {_gib(m.total)} GiB"
                  + (f" (checkpointing off: activations {_gib(off.peak_activations)}, total {_gib(off.total)})"
                     if off is not None else ""), flush=True)
    if args.markdown:
        print("\n| method | stage | one step sees | parameters (trained) | weights + grads + AdamW + EMA GiB | "
              "peak activations GiB | total GiB | total, checkpointing off GiB |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for net, m, off in results:
            print(f"| {net.method} | {net.stage} | {net.shape} | {m.parameters / 1e6:.1f}M ({m.trained / 1e6:.1f}M) | "
                  f"{_gib(m.state)} | {_gib(m.peak_activations)} | **{_gib(m.total)}** | "
                  f"{_gib(off.total) if off is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
