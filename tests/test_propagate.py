"""Window plan and batched bi-directional propagation."""

import logging

import pytest
import torch

from gem3d.diffusion import NoiseSchedule, build_solver
from gem3d.sampling.propagate import plan_independent_windows, plan_windows, propagate_volumes


# ---- plan -----------------------------------------------------------------------------------
def check_plan(depth, n, p, overlap):
    rounds = plan_windows(depth, n, p, overlap)
    generated = {}
    first = rounds[0].windows
    assert len(first) == 1 and first[0].direction == "first" and p in first[0].slices
    assert first[0].informed_slice == p
    for r, rnd in enumerate(rounds):
        assert rnd.index == r
        assert r == 0 or 1 <= len(rnd.windows) <= 2
        assert len({w.direction for w in rnd.windows}) == len(rnd.windows)
        round_new = {}
        for w in rnd.windows:
            assert 0 <= w.start and w.stop <= depth and w.n == n
            # pinned = exactly the window slices generated in earlier rounds, at true positions
            assert set(w.pinned_slices) == {s for s in w.slices if s in generated}
            assert all(pos == s - w.start for s, pos in zip(w.pinned_slices, w.pinned_positions))
            assert set(w.new_slices) == set(w.slices) - set(w.pinned_slices)
            if r > 0:
                assert len(w.pinned_slices) >= overlap
                assert w.informed_slice in generated
                if overlap >= 1:
                    assert w.informed_slice in w.pinned_slices
                    # the boundary slice, next to the new ones
                    nearest = max(w.pinned_slices) if w.direction == "up" else min(w.pinned_slices)
                    assert w.informed_slice == nearest
                if overlap == 1 and w.start not in (0, depth - n):
                    assert w.pinned_positions == ((0,) if w.direction == "up" else (n - 1,))
            for s in w.new_slices:
                assert s not in generated and s not in round_new  # generated once
                round_new[s] = w
        generated.update(round_new)
    assert sorted(generated) == list(range(depth))
    return rounds


def test_plan_coverage_property():
    for depth in range(16, 61):
        for n in (4, 8, 16):
            for p in range(depth):
                for overlap in (1, 2):
                    check_plan(depth, n, p, overlap)


def test_plan_small_and_edge_cases():
    for depth in range(1, 10):
        for n in range(1, depth + 1):
            for p in range(depth):
                for overlap in range(n):
                    check_plan(depth, n, p, overlap)
    assert len(plan_windows(16, 16, 5)) == 1


def test_plan_example_and_snapping():
    rounds = plan_windows(40, 16, 10)
    assert [[(w.direction, w.start) for w in r.windows] for r in rounds] == [
        [("first", 10)], [("up", 24), ("down", 0)]]
    up, down = rounds[1].windows
    # up snapped from 25 to 24: pins 24 and 25 (true overlap), informed = 25 (boundary)
    assert up.pinned_slices == (24, 25) and up.pinned_positions == (0, 1)
    assert up.informed_slice == 25 and up.new_slices == tuple(range(26, 40))
    # down snapped from -5 to 0: pins 10..15 at positions 10..15, informed = 10
    assert down.pinned_slices == tuple(range(10, 16))
    assert down.pinned_positions == tuple(range(10, 16))
    assert down.informed_slice == 10 and down.new_slices == tuple(range(10))


def test_plan_unsnapped_mirror():
    rounds = plan_windows(100, 16, 40)
    assert [w.start for w in rounds[1].windows] == [55, 25]
    assert [w.start for w in rounds[2].windows] == [70, 10]
    up, down = rounds[1].windows
    assert up.pinned_slices == (55,) and up.pinned_positions == (0,) and up.informed_slice == 55
    assert down.pinned_slices == (40,) and down.pinned_positions == (15,)
    assert down.informed_slice == 40


def test_plan_first_window_snapped_when_p_near_end():
    rounds = plan_windows(30, 16, 25)
    assert rounds[0].windows[0].start == 14 and rounds[0].windows[0].informed_slice == 25
    assert all(w.direction == "down" for r in rounds[1:] for w in r.windows)


def test_plan_errors():
    with pytest.raises(ValueError, match="depth 10 is smaller than the window size n=16"):
        plan_windows(10, 16, 0)
    with pytest.raises(ValueError, match="p=40"):
        plan_windows(40, 16, 40)
    with pytest.raises(ValueError, match="p=-1"):
        plan_windows(40, 16, -1)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(40, 16, 0, overlap=16)


def test_independent_plan():
    for depth in range(4, 30):
        (rnd,) = plan_independent_windows(depth, 4)
        new = [s for w in rnd.windows for s in w.new_slices]
        assert sorted(new) == list(range(depth)) and len(new) == depth
        assert all(not w.pinned_slices and w.informed_slice is None for w in rnd.windows)
        assert rnd.windows[-1].stop == depth


# ---- propagation ----------------------------------------------------------------------------
C, CM, H, W, N = 2, 2, 4, 4, 4


class FakeModel:
    """Deterministic eps-model that depends on x, t and cond; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        assert x.ndim == 5 and t.shape == (x.shape[0],) and cond.shape[0] == x.shape[0]
        self.calls.append(x.shape[0])
        return 0.3 * x + 0.1 * cond[:, :C] + 0.05 * cond[:, -C:] + 1e-4 * t[:, None, None, None,
                                                                              None]


def make_inputs(depths, seed=0):
    g = torch.Generator().manual_seed(seed)
    conds = [torch.randn(CM, d, H, W, generator=g) for d in depths]
    informed = [torch.randn(C, H, W, generator=g) for _ in depths]
    return conds, informed


@pytest.fixture(scope="module", params=[("ddim", 1.0), ("dpmpp_2m", 0.0)], ids=["ddim", "dpmpp_2m"])
def sampler(request):
    """Propagation does not know which solver runs: every test below runs with each."""
    name, eta = request.param
    return build_solver(name, NoiseSchedule(), 3, eta)


def run(sampler, depths, starts, seed=0, model=None, **kw):
    model = model or FakeModel()
    conds, informed = make_inputs(depths)
    kw.setdefault("overlap", 1)
    out = propagate_volumes(model, sampler, conds, informed, starts, N,
                            latent_channels=C, generators=generators(len(depths), seed), **kw)
    return out, model


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed * 1000 + v) for v in range(n)]


def test_two_volumes_batched(sampler, caplog):
    depths, starts = [11, 7], [3, 6]
    with caplog.at_level(logging.INFO, logger="gem3d.sampling"):
        out, model = run(sampler, depths, starts)
    assert [o.shape for o in out] == [(C, 11, H, W), (C, 7, H, W)]
    assert all(torch.isfinite(o).all() for o in out)
    plans = [plan_windows(d, N, p) for d, p in zip(depths, starts)]
    n_rounds = max(len(p) for p in plans)
    # one model call per DDIM step per round, all windows of the round in one batch
    assert len(model.calls) == n_rounds * len(sampler.timesteps)
    expected = [sum(len(p[r].windows) for p in plans if r < len(p)) for r in range(n_rounds)]
    assert model.calls == [b for b in expected for _ in sampler.timesteps]
    assert sum("round" in rec.getMessage() for rec in caplog.records) == n_rounds


def test_chunking_matches_and_counts(sampler):
    depths, starts = [11, 7], [3, 6]
    full, _ = run(sampler, depths, starts, seed=1)
    chunked, model = run(sampler, depths, starts, seed=1, max_batch_windows=1)
    assert max(model.calls) == 1
    for a, b in zip(full, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_overlapped_slices_equal_and_informed_is_boundary(sampler):
    """Record every window's output: pinned slices equal the earlier value exactly."""
    depths, starts = [13], [5]
    windows_out = []

    class Recorder(FakeModel):
        def __call__(self, x, t, cond):
            if int(t[0]) == sampler.timesteps[0]:
                windows_out.append({"cond": cond.clone()})
            return super().__call__(x, t, cond)

    def capture(i, t, t_prev, x, x0_pred):
        if t_prev == -1:
            windows_out[-1]["x0"] = x.clone()

    orig = sampler.sample

    def sample(*a, **kw):
        return orig(*a, callback=capture, **kw)

    sampler.sample = sample
    try:
        (out,), _ = run(sampler, depths, starts, model=Recorder())
    finally:
        del sampler.sample
    plan = plan_windows(13, N, 5)
    assert len(windows_out) == len(plan)
    for rnd, rec in zip(plan, windows_out):
        for i, w in enumerate(rnd.windows):
            win_out = rec["x0"][i]  # (c, f, h, w)
            # every slice of every window equals the assembled volume (new and pinned alike)
            assert torch.equal(win_out, out[:, w.start:w.stop])
            if rnd.index > 0:
                # informed condition = clean generated boundary slice, repeated over f
                inf = rec["cond"][i, CM:]
                assert torch.equal(inf, out[:, w.informed_slice, None].expand_as(inf))


def test_determinism(sampler):
    a, _ = run(sampler, [9, 12], [0, 11], seed=7)
    b, _ = run(sampler, [9, 12], [0, 11], seed=7)
    c, _ = run(sampler, [9, 12], [0, 11], seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_volume_does_not_depend_on_its_batch(sampler):
    """Each volume's noise comes from its own generator: the same volume comes out whether it is
    sampled alone or beside others (the manifest's seed reproduces it)."""
    conds, informed = make_inputs([11, 9, 7])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = propagate_volumes(FakeModel(), sampler, conds, informed, [3, 0, 6], N, 1, C, gens([5, 6, 7]))
    alone = propagate_volumes(FakeModel(), sampler, conds[1:2], informed[1:2], [0], N, 1, C, gens([6]))
    reordered = propagate_volumes(FakeModel(), sampler, conds[::-1], informed[::-1], [6, 0, 3], N, 1, C,
                                  gens([7, 6, 5]))
    assert torch.equal(together[1], alone[0])
    assert all(torch.equal(a, b) for a, b in zip(together, reordered[::-1]))
    other_seed = propagate_volumes(FakeModel(), sampler, conds[1:2], informed[1:2], [0], N, 1, C, gens([8]))
    assert not torch.allclose(alone[0], other_seed[0])


def test_no_pin_ablation_keeps_earlier_values(sampler):
    out, model = run(sampler, [10], [2], pin=False)
    assert out[0].shape == (C, 10, H, W)
    assert len(model.calls) == len(plan_windows(10, N, 2)) * len(sampler.timesteps)


def test_independent_windows_baseline(sampler):
    model = FakeModel()
    conds, _ = make_inputs([10, 6])
    out = propagate_volumes(model, sampler, conds, [None, None], [0, 0], N, overlap=1,
                            latent_channels=C, generators=generators(2),
                            use_informed=False, independent_windows=True)
    assert [o.shape for o in out] == [(C, 10, H, W), (C, 6, H, W)]
    # one round: 3 tiles + 2 tiles in one batch, mask-only condition
    assert model.calls == [5] * len(sampler.timesteps)
    assert all((o.abs().sum(dim=(0, 2, 3)) > 0).all() for o in out)  # every slice written


def test_propagate_validation(sampler):
    conds, informed = make_inputs([8])
    g = generators(1)
    with pytest.raises(ValueError, match="one per volume"):
        propagate_volumes(FakeModel(), sampler, conds, informed, [0], N, 1, C, generators(2))
    with pytest.raises(ValueError, match="informed latent"):
        propagate_volumes(FakeModel(), sampler, conds, [None], [0], N, 1, C, g)
    with pytest.raises(ValueError, match="must match"):
        propagate_volumes(FakeModel(), sampler, conds, informed, [0, 1], N, 1, C, g)
    with pytest.raises(ValueError, match="smaller than the window"):
        propagate_volumes(FakeModel(), sampler, conds, informed, [0], 16, 1, C, g)
