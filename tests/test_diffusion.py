"""Noise schedule and DDIM sampler (with known-slice pinning)."""

import math

import pytest
import torch

from gem3d.diffusion import CLEAN, DDIMSampler, NoiseSchedule, randn_tensor, scaled_linear_betas


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


def oracle(schedule, x0):
    """eps-model that returns the true noise of x_t for a known x0."""
    def eps_fn(x_t, t):
        ab = schedule.alpha_bar(t)
        return (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    return eps_fn


# ---- schedules ------------------------------------------------------------------------------
def test_scaled_linear_betas_formula():
    betas = scaled_linear_betas(1000, 0.00085, 0.012)
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    mid = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * 500 / 999) ** 2
    assert betas[500].item() == pytest.approx(mid, rel=1e-6)
    assert torch.all(betas[1:] > betas[:-1])


def test_schedule_config_roundtrip_and_validation(schedule):
    again = NoiseSchedule.from_config(schedule.to_config())
    assert again == schedule
    assert torch.equal(again.alphas_cumprod, schedule.alphas_cumprod)
    with pytest.raises(ValueError, match="unknown"):
        NoiseSchedule.from_config({"num_train_timesteps": 10, "bogus": 1})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
    assert schedule.alpha_bar(CLEAN) == 1.0
    with pytest.raises(ValueError, match="timesteps"):
        schedule.alpha_bar(1000)


def test_add_noise_shapes_and_t0(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 5, 5, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    near = schedule.add_noise(x0, noise, torch.zeros(2, dtype=torch.long))
    assert near.shape == x0.shape
    # alpha_bar_0 = 1 - 0.00085: x_0 plus noise of std sqrt(0.00085) ~ 0.029
    assert (near - x0).std().item() == pytest.approx(math.sqrt(0.00085), rel=0.15)
    assert torch.equal(schedule.add_noise(x0, noise, CLEAN), x0)
    # (b,) timesteps: one per sample
    t = torch.tensor([10, 900])
    out = schedule.add_noise(x0, noise, t)
    for i in range(2):
        ab = schedule.alpha_bar(int(t[i]))
        ref = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        assert torch.allclose(out[i], ref, atol=1e-6)
    # (b, f) timesteps: one per slice, for b c f h w
    tf = torch.tensor([[0, 500, 999], [999, 1, 250]])
    out = schedule.add_noise(x0, noise, tf)
    assert out.shape == x0.shape
    for i in range(2):
        for k in range(3):
            ab = schedule.alpha_bar(int(tf[i, k]))
            ref = math.sqrt(ab) * x0[i, :, k] + math.sqrt(1 - ab) * noise[i, :, k]
            assert torch.allclose(out[i, :, k], ref, atol=1e-6)
    # 4-D slices with (b,) timesteps
    assert schedule.add_noise(x0[:, :, 0], noise[:, :, 0], t).shape == (2, 4, 5, 5)
    with pytest.raises(ValueError, match="do not fit"):
        schedule.add_noise(x0, noise, torch.zeros(3, dtype=torch.long))
    # A Python int (the sampler's case) gives what a 0-d tensor gives; both are range-checked
    assert torch.allclose(schedule.add_noise(x0, noise, 321), schedule.add_noise(x0, noise, torch.tensor(321)),
                          atol=1e-6)
    for bad in (1000, -2, torch.tensor([5, 1000])):
        with pytest.raises(ValueError, match="timesteps must lie"):
            schedule.add_noise(x0, noise, bad)


def test_sample_timesteps_modes(schedule):
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_timesteps(4, g)
    assert t.shape == (4,) and t.dtype == torch.long
    t = schedule.sample_timesteps(3, g, frames=5)
    assert t.shape == (3, 5)
    many = schedule.sample_timesteps(20000, g, mode="linear_decay")
    assert many.min() >= 0 and many.max() < 1000
    # weight (2T - t): P(t < 500) / P(t >= 500) = (sum 2000-t, t<500) / (sum, t>=500) = 1.4
    ratio = (many < 500).sum().item() / (many >= 500).sum().item()
    assert ratio == pytest.approx(1.4, rel=0.06)
    w = schedule.timestep_weights("linear_decay")
    assert w[0] / w[-1] == pytest.approx(2000 / 1001)
    with pytest.raises(ValueError, match="mode"):
        schedule.sample_timesteps(2, g, mode="bogus")


# ---- DDIM -----------------------------------------------------------------------------------
def test_ddim_timesteps_leading(schedule):
    s = DDIMSampler(schedule, num_inference_steps=200)
    assert s.timesteps[0] == 995 and s.timesteps[-1] == 0 and len(s.timesteps) == 200
    assert s.prev_timestep(995) == 990 and s.prev_timestep(0) == CLEAN
    assert DDIMSampler(schedule, 3).timesteps == [666, 333, 0]
    assert s.sigma(0) == 0.0
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMSampler(schedule, 0)
    # Step counts that do not divide T still start next to pure noise (not at 3 * 299 = 897)
    for steps in (300, 400, 600, 7):
        ts = DDIMSampler(schedule, steps).timesteps
        assert len(ts) == len(set(ts)) == steps and ts[-1] == 0 and ts == sorted(ts, reverse=True)
        assert ts[0] >= 1000 - math.ceil(1000 / steps)
    s300 = DDIMSampler(schedule, 300)
    assert s300.timesteps[:4] == [996, 993, 990, 986] and s300.prev_timestep(996) == 993
    with pytest.raises(ValueError, match="not one of"):
        s300.prev_timestep(995)


def test_ddim_per_row_generators(schedule):
    """With one generator per row, a row's samples do not depend on the other rows."""
    sampler = DDIMSampler(schedule, num_inference_steps=5, eta=1.0)
    known = torch.randn(3, 2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[2, 3] = True

    def run(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x_T = randn_tensor((len(rows), 2, 4, 3, 3), gens, "cpu", torch.float32)
        return sampler.sample(lambda x, t: 0.1 * x, x_T, gens, known_x0=known[rows], known_mask=mask[rows])

    together = run([0, 1, 2], [10, 11, 12])
    assert torch.equal(together[2], run([2], [12])[0])
    assert torch.equal(together[0], run([0, 2], [10, 12])[0])
    assert not torch.allclose(together[1], run([1], [13])[0])
    with pytest.raises(ValueError, match="generator index per row"):
        randn_tensor((2, 3), [torch.Generator()], "cpu", torch.float32)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_oracle_recovers_x0(schedule, eta):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 3, 6, 6, generator=g)
    sampler = DDIMSampler(schedule, num_inference_steps=5, eta=eta)
    x_T = torch.randn(x0.shape, generator=g)
    out = sampler.sample(oracle(schedule, x0), x_T, generator=g)
    assert torch.allclose(out, x0, atol=1e-4)


def test_ddim_final_step_returns_x0_pred(schedule):
    sampler = DDIMSampler(schedule, 4, eta=1.0)
    x = torch.randn(1, 2, 3, 3)
    eps = torch.randn(1, 2, 3, 3)
    prev, x0_pred = sampler.step(eps, 0, x)
    assert torch.equal(prev, x0_pred)


def test_ddim_determinism_and_generator_dependence(schedule):
    sampler = DDIMSampler(schedule, num_inference_steps=4, eta=1.0)

    def eps_fn(x, t):
        return 0.5 * x

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(1, 2, 2, 4, 4, generator=g)
        return sampler.sample(eps_fn, x_T, generator=g)

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    # eta=0 is deterministic given x_T, whatever the generator
    det = DDIMSampler(schedule, 4, eta=0.0)
    x_T = torch.randn(1, 2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = det.sample(eps_fn, x_T, torch.Generator().manual_seed(1))
    b = det.sample(eps_fn, x_T, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


# ---- pinning --------------------------------------------------------------------------------
def test_pinned_positions_equal_known_after_sampling(schedule):
    g = torch.Generator().manual_seed(5)
    b, c, f, h, w = 3, 4, 5, 4, 4
    known = torch.randn(b, c, f, h, w, generator=g)
    mask = torch.zeros(b, f, dtype=torch.bool)
    mask[0, 0] = True
    mask[1, -1] = True
    mask[2, 1:3] = True
    sampler = DDIMSampler(schedule, num_inference_steps=6, eta=1.0)
    model_g = torch.Generator().manual_seed(9)

    def random_eps(x, t):
        return torch.randn(x.shape, generator=model_g)

    x_T = torch.randn(b, c, f, h, w, generator=g)
    out = sampler.sample(random_eps, x_T, g, known_x0=known, known_mask=mask)
    m = mask[:, None, :, None, None].expand_as(out)
    assert torch.equal(out[m], known[m])
    assert not torch.allclose(out[~m], known[~m])


def test_pinning_noise_level_is_the_timestep(schedule):
    """Right after pinning at timestep t, a zero known_x0 has std sqrt(1 - alpha_bar_t).

    The authors' code used the step INDEX (0..S-1) as the timestep: with S=10 steps the index at
    the second step is 1, giving std ~0.03 instead of ~0.99 for t=800 -- this test catches it.
    """
    sampler = DDIMSampler(schedule, num_inference_steps=10, eta=1.0)
    b, c, f, h, w = 1, 4, 3, 64, 64
    known = torch.zeros(b, c, f, h, w)
    mask = torch.tensor([[True, False, False]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, f, h, w, generator=g)
    for t in (sampler.timesteps[0], 400, 50, 0):
        pinned = sampler.pin_known(x, known, mask, t, g)
        assert pinned[:, :, 0].std().item() == pytest.approx(
            math.sqrt(1 - schedule.alpha_bar(t)), rel=0.05)
        assert torch.equal(pinned[:, :, 1:], x[:, :, 1:])

    seen = []

    def record(i, t, t_prev, x, x0_pred):
        expected = math.sqrt(1 - schedule.alpha_bar(t_prev))
        seen.append((x[:, :, 0].std().item(), expected))

    sampler.sample(lambda x, t: torch.zeros_like(x), x, g, known, mask, callback=record)
    assert len(seen) == 10
    for got, expected in seen[:-1]:
        assert got == pytest.approx(expected, rel=0.05)
    assert seen[-1][0] == 0.0  # clean after the final step


def test_ddim_eta0_pins_with_one_noise_carried_through_the_steps(schedule):
    """Issue #24.5: DDIM pinned the known slices with FRESH noise at every step, so at eta < 1 they jumped between
    noise draws while the rest of the window followed a deterministic path. Now, as DPM-Solver++ does, one noise
    per window is carried through the steps: at eta 0 with a zero-noise network the implied noise of a pinned
    slice, (x - sqrt(ab) known) / sqrt(1 - ab), is the same tensor at every step, the one drawn at the start."""
    sampler = DDIMSampler(schedule, num_inference_steps=8, eta=0.0)
    b, c, f, h, w = 2, 4, 3, 8, 8
    g = torch.Generator().manual_seed(3)
    known = torch.randn(b, c, f, h, w, generator=g)
    mask = torch.tensor([[True, False, False], [False, True, True]])
    x_T = torch.randn(b, c, f, h, w, generator=g)
    implied = []

    def record(i, t, t_prev, x, x0_pred):
        if t_prev != CLEAN:
            ab = schedule.alpha_bar(t_prev)
            implied.append((x - math.sqrt(ab) * known)[mask.nonzero(as_tuple=True)[0], :,
                                                         mask.nonzero(as_tuple=True)[1]] / math.sqrt(1 - ab))

    out = sampler.sample(lambda x, t: torch.zeros_like(x), x_T, g, known, mask, callback=record)
    assert len(implied) == 7
    for z in implied[1:]:
        torch.testing.assert_close(z, implied[0], rtol=0, atol=1e-4)
    assert implied[0].std().item() == pytest.approx(1.0, abs=0.2)  # a standard normal draw, not zeros
    m = mask[:, None, :, None, None].expand_as(out)
    assert torch.equal(out[m], known[m])


def test_ddim_eta1_carried_pinning_noise_stays_standard_normal(schedule):
    """At eta 1 the carried noise mixes the step's own noise in: it stays N(0, 1) at every step (the known slice
    sits at its timestep's noise level) and changes from step to step."""
    sampler = DDIMSampler(schedule, num_inference_steps=10, eta=1.0)
    known = torch.zeros(1, 4, 3, 64, 64)
    mask = torch.tensor([[True, False, False]])
    g = torch.Generator().manual_seed(0)
    implied = []

    def record(i, t, t_prev, x, x0_pred):
        if t_prev != CLEAN:
            implied.append(x[:, :, 0] / math.sqrt(1 - schedule.alpha_bar(t_prev)))

    sampler.sample(lambda x, t: torch.zeros_like(x), torch.randn(1, 4, 3, 64, 64, generator=g), g, known, mask,
                   callback=record)
    assert all(z.std().item() == pytest.approx(1.0, rel=0.05) for z in implied)
    assert not torch.allclose(implied[0], implied[-1], atol=0.1)


def test_pin_known_validates(schedule):
    sampler = DDIMSampler(schedule, 4)
    x = torch.zeros(1, 2, 3, 2, 2)
    with pytest.raises(ValueError, match="positions_mask"):
        sampler.pin_known(x, x, torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="same shape"):
        sampler.pin_known(x, x[:, :1], torch.zeros(1, 3, dtype=torch.bool), 0)
