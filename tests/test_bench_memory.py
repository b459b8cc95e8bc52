"""scripts/bench_memory.py: the meta-device memory counter against answers known by hand and against the CPU
allocator, the emulated CUDA autocast policy, the step's accounting, the FakeTensorMode fallback, and the paper
rows read from config/brats.yaml."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from gem3d.models import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "scripts" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    spec.loader.exec_module(module)
    return module


bm = _load_script()

WIDTHS = [16, 32, 64, 48, 8]  # an MLP 16 -> 32 -> 64 -> 48 -> 8, batch 8
BATCH = 8


class MLP(nn.Module):
    def __init__(self, widths=WIDTHS, checkpointed: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.checkpointed = checkpointed

    @staticmethod
    def block(x, layer, last: bool):
        x = layer(x)
        return x if last else F.relu(x)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if self.checkpointed and not last:  # no RNG state kept: the CPU's 5 KB state is no device memory
                x = checkpoint(self.block, x, layer, last, use_reentrant=False, preserve_rng_state=False)
            else:
                x = self.block(x, layer, last)
        return x


def mlp_loss(model, x, y):
    # a loss whose CPU kernels keep nothing but their outputs (mse_loss's CPU kernel keeps its elementwise buffer)
    return (model(x).float() * y).sum()


def tiny_unet_config(**kw) -> UNetConfig:
    """Convolutions, GroupNorm, SiLU, nearest upsampling, skips: the UNet's ops without attention."""
    return UNetConfig(4, 4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(),
                      mid_attention=False, head_dim=16, norm_groups=8, **kw)


def unet_loss(model, x, t, y):
    return (model(x, t).float() * y).sum()


# ---------------------------------------------------------------------------------------------
# helpers: the counter on meta, the CPU allocator's timeline


def meta_count(make_model, make_batch, loss_fn, bf16: bool = False) -> tuple[bm.MemoryCounter, nn.Module]:
    """The counter after one step on meta, and the model (whose gradients the counter still holds)."""
    with torch.device("meta"):
        model = make_model()
        batch = make_batch()
    counter = bm.MemoryCounter()
    autocast = bm.CudaAutocast() if bf16 else None
    with counter, (bm.recompute_under(autocast) if bf16 else contextlib.nullcontext()), \
            (autocast if bf16 else contextlib.nullcontext()):
        with (autocast.forward() if bf16 else contextlib.nullcontext()):
            loss = loss_fn(model, *batch)
        loss.backward()
        del loss
    return counter, model


def cpu_allocator_peak(make_model, make_batch, loss_fn, bf16: bool = False) -> tuple[int, int]:
    """(peak, end) of the CPU allocator's bytes over one real step (torch.profiler's allocation events), less the
    allocations an operator frees before it returns (kernel workspaces, which the counter does not see)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover
        pytest.skip("torch.profiler without the event tree")
    torch.manual_seed(0)
    model = make_model()
    batch = make_batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with autocast:
            loss = loss_fn(model, *batch)
        loss.backward()
        del loss
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append(node)
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort(key=lambda e: e.start_time_ns)

    def outermost_op(node):
        found, parent = None, node.parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                found = parent
            parent = parent.parent
        return found

    live, inside = {}, set()
    for e in events:
        if e.extra_fields.alloc_size > 0:
            live[e.extra_fields.ptr] = e
            continue
        alloc = live.pop(e.extra_fields.ptr, None)
        if alloc is not None:
            op = outermost_op(alloc)
            if op is not None and op is outermost_op(e):
                inside.update((id(alloc), id(e)))
    current = peak = 0
    for e in events:
        if id(e) not in inside:
            current += e.extra_fields.alloc_size
            peak = max(peak, current)
    return peak, current


# ---------------------------------------------------------------------------------------------
# the counter


def test_linear_chain_activations_by_hand():
    """After the forward, autograd keeps each ReLU's output (the next Linear's input, and ReLU's own saved result)
    and the output; while a ReLU runs, its input is still alive beside its result."""
    with torch.device("meta"):
        model = MLP()
        x = torch.randn(BATCH, WIDTHS[0])
    counter = bm.MemoryCounter()
    with counter:
        out = model(x)
        after_forward = counter.total
    d1, d2, d3, d4 = WIDTHS[1:]
    assert after_forward == 4 * BATCH * (d1 + d2 + d3 + d4)
    # the largest moment: relu(h3) with h3 still alive = r1 + r2 + h3 + r3 (32 + 64 + 48 + 48 > the output's 152)
    assert counter.peak == 4 * BATCH * (d1 + d2 + 2 * d3)
    del out
    assert counter.total == 0  # everything released with the graph


def test_views_share_their_storage_and_release_on_collection():
    x = torch.empty(10, 10, device="meta")  # before the counter: not counted
    counter = bm.MemoryCounter()
    with counter:
        a = x + 1  # add: fresh 400 bytes
        v = a.view(100)[:50]  # views: nothing new
        assert counter.total == 400
        del a
        assert counter.total == 400  # the view keeps the storage
        del v
        assert counter.total == 0
    assert counter.peak == 400


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_mlp_step_peak_equals_the_cpu_allocator(bf16, checkpointed):
    """A whole step (forward, backward, gradients) counted on meta equals the real CPU allocator's peak, byte for
    byte, in fp32 and under bf16 autocast (the CPU and CUDA policies agree for Linear/ReLU), with and without
    checkpointing (the counter's recomputation runs under the emulated autocast too)."""

    def make_batch():
        return torch.randn(BATCH, WIDTHS[0]), torch.randn(BATCH, WIDTHS[-1])

    counter, _model = meta_count(lambda: MLP(checkpointed=checkpointed), make_batch, mlp_loss, bf16=bf16)
    peak, end = cpu_allocator_peak(lambda: MLP(checkpointed=checkpointed), make_batch, mlp_loss, bf16=bf16)
    grads = 4 * sum(a * b + b for a, b in zip(WIDTHS[:-1], WIDTHS[1:]))
    assert end == counter.total == grads  # only the gradients stay
    assert counter.peak == peak


def test_unet_step_peak_equals_the_cpu_allocator():
    """The UNet's ops (Conv2d, GroupNorm, SiLU, nearest upsampling, concatenated skips, the timestep MLP) in fp32."""

    def make_batch():
        return torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.randn(2, 4, 16, 16)

    counter, _model = meta_count(lambda: UNet(tiny_unet_config()), make_batch, unet_loss)
    peak, end = cpu_allocator_peak(lambda: UNet(tiny_unet_config()), make_batch, unet_loss)
    assert counter.total == end
    assert counter.peak == peak


# ---------------------------------------------------------------------------------------------
# CUDA's autocast policy on meta tensors


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_cuda_autocast_policy_on_meta():
    autocast = bm.CudaAutocast()
    with torch.device("meta"):
        conv = nn.Conv2d(8, 8, 3, padding=1)
        norm = nn.GroupNorm(4, 8)
        x = torch.randn(2, 8, 8, 8)
        q = torch.randn(2, 4, 32, 16)
    log = OpLog()
    with log, autocast, autocast.forward():
        h = conv(x)
        assert h.dtype == torch.bfloat16
        assert norm(h).dtype == torch.float32  # CUDA: group_norm in fp32 (the CPU's policy keeps bf16)
        assert F.interpolate(h, scale_factor=2.0, mode="nearest").dtype == torch.float32
        assert h.sum().dtype == torch.float32 and h.softmax(-1).dtype == torch.float32
        assert F.mse_loss(h, x).dtype == torch.float32
        assert torch.cat([h, x]).dtype == torch.float32  # promotion, as everywhere
        assert F.silu(h).dtype == torch.bfloat16  # no policy: the input's dtype
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
        # the trained weight is cast once in the forward (autocast's cache), an input every time
        assert autocast._cast(conv.weight, torch.bfloat16) is autocast._cast(conv.weight, torch.bfloat16)
        assert autocast._cast(x, torch.bfloat16) is not autocast._cast(x, torch.bfloat16)
    assert "aten._scaled_dot_product_flash_attention.default" in log.ops  # O(tokens) saved, not the matrix
    assert not any("bmm" in op for op in log.ops)
    assert autocast.cache is None  # dropped at the end of the forward


def test_checkpointed_recompute_keeps_the_autocast_policy():
    """Without recompute_under, checkpoint's recomputation would run in fp32 and fail its metadata check."""
    with torch.device("meta"):
        model = UNet(tiny_unet_config())
        batch = torch.randn(1, 4, 16, 16), torch.tensor([1]), torch.randn(1, 4, 16, 16)
    model.set_grad_checkpointing(True)
    counter = bm.MemoryCounter()
    autocast = bm.CudaAutocast()
    with counter, bm.recompute_under(autocast), autocast:
        with autocast.forward():
            loss = unet_loss(model, *batch)
        loss.backward()
    import gem3d.models.unet as unet_module
    import torch.utils.checkpoint as ckpt

    assert unet_module.checkpoint is ckpt.checkpoint  # restored
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# one step's accounting, the fallback


def test_count_step_accounting_and_checkpointing():
    cfg = tiny_unet_config(slice_axis=True)

    def make_batch():
        return torch.randn(1, 4, 4, 16, 16), torch.tensor([7]), torch.randn(1, 4, 4, 16, 16)

    def count(checkpointing):
        return bm.count_step(lambda: UNet(cfg), make_batch, unet_loss, lambda m: m.slice_axis_parameters(),
                             bf16=True, checkpointing=checkpointing, ema=True)

    m, off = count(True), count(False)
    model = UNet(cfg)
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.slice_axis_parameters())
    assert (m.parameters, m.trained, m.mode) == (n_all, n_trained, "meta")
    assert (m.weights, m.gradients, m.adamw, m.ema) == (4 * n_all, 4 * n_trained, 8 * n_trained, 4 * n_trained)
    assert m.total == m.weights + m.adamw + m.ema + m.peak_step
    assert m.peak_activations <= m.peak_step <= m.peak_activations + m.gradients
    assert m.peak_activations < off.peak_activations  # checkpointing keeps less
    assert (off.weights, off.gradients) == (m.weights, m.gradients)


class MetaLess(nn.Module):
    """A network with an operator that has no meta kernel (raises NotImplementedError on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        if x.is_meta:
            raise NotImplementedError("no meta kernel for this op")
        return self.mlp(x)


def test_fallback_to_fake_tensor_mode():
    def make_batch():
        return torch.randn(BATCH, WIDTHS[0]), torch.randn(BATCH, WIDTHS[-1])

    fake = bm.count_step(MetaLess, make_batch, mlp_loss, bf16=True)
    meta = bm.count_step(MLP, make_batch, mlp_loss, bf16=True)
    assert (fake.mode, meta.mode) == ("fake", "meta")
    assert (fake.peak_step, fake.peak_activations, fake.weights) == (meta.peak_step, meta.peak_activations,
                                                                       meta.weights)


# ---------------------------------------------------------------------------------------------
# the paper rows


def test_paper_rows_follow_the_config(capsys):
    rows = bm.networks(REPO / "config" / "brats.yaml")
    assert set(rows) >= {"gem3d", "baseline", "controlnet", "crossattn", "pix2pix", "ldm3d"}
    stage2 = rows["gem3d"][1]
    assert (stage2.bf16, stage2.checkpointing, stage2.ema) == (True, True, True)  # brats.yaml's stage2
    m = bm.measure(stage2)
    assert (round(m.parameters / 1e6, 1), round(m.trained / 1e6, 1)) == (367.8, 93.8)  # docs/benchmarks.md
    assert m.mode == "meta" and 0 < m.peak_activations < m.total
    # the whole 155-slice volume padded to what a 7-level generator divides (128): 256 slices
    assert [n.stage.split(" ")[0] for n in rows["pix2pix"]] == ["128x256x256", "256x512x512"]
    assert bm.main(["--only", "ldm3d", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "Conditional 3D LDM, 160x64x64 latents" in out  # the whole depth, padded (config/brats.yaml) and "| Conditional 3D LDM |" in out
