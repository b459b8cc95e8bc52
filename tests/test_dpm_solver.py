"""DPM-Solver++(2M): its grid, its order on a closed-form case, exact pinning, per-volume noise."""

import math

import numpy as np
import pytest
import torch

from gem3d.diffusion import CLEAN, DDIMSampler, DPMSolverPP, NoiseSchedule, build_solver, randn_tensor


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


# ---- closed form: Gaussian data --------------------------------------------------------------
class Gaussian:
    """Data x0 ~ N(mu, s^2) independently per dimension. At timestep t, x_t ~ N(a mu, a^2 s^2 + sig^2)
    (a = sqrt(ab_t), sig = sqrt(1 - ab_t)), so the exact epsilon is E[eps | x_t] = sig (x - a mu) / var_t,
    and the probability-flow ODE keeps (x_t - a mu) / sqrt(var_t) constant: its end point from any x_T
    is known in closed form."""

    def __init__(self, schedule, n=4096, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.mu = torch.linspace(-1, 1, n, dtype=torch.float64)
        self.s = torch.linspace(0.05, 1.0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        self.x_T = torch.randn(1, n, generator=g, dtype=torch.float64)

    def var(self, t):
        ab = self.schedule.alpha_bar(t)
        return ab * self.s**2 + (1 - ab)

    def eps(self, x, t):
        ab = self.schedule.alpha_bar(t)
        return (1 - ab) ** 0.5 * (x - ab**0.5 * self.mu) / self.var(t)

    def end_point(self, t_start):
        """The ODE solution from x_T at t_start to t = 0, then the solvers' final step (x0 prediction at 0)."""
        a_start, a0 = self.schedule.alpha_bar(t_start) ** 0.5, self.schedule.alpha_bar(0) ** 0.5
        x_0 = a0 * self.mu + (self.var(0) / self.var(t_start)).sqrt() * (self.x_T - a_start * self.mu)
        return self.mu + a0 * self.s**2 * (x_0 - a0 * self.mu) / self.var(0)

    def error(self, sampler):
        out = sampler.sample(self.eps, self.x_T.clone())
        return (out - self.end_point(sampler.timesteps[0])).pow(2).mean().sqrt().item()


def slope(steps, errors):
    return float(np.polyfit(np.log(steps), np.log(errors), 1)[0])


def test_closed_form_error_falls_at_the_solvers_order(schedule):
    """log error vs log steps: slope about -2 for DPM-Solver++(2M), about -1 for DDIM (eta 0)."""
    data = Gaussian(schedule)
    steps = [15, 20, 30, 40, 60, 80]
    dpm = [data.error(DPMSolverPP(schedule, s)) for s in steps]
    ddim = [data.error(DDIMSampler(schedule, s, eta=0.0)) for s in steps]
    assert all(a > b for a, b in zip(dpm, dpm[1:]))
    assert -2.3 < slope(steps, dpm) < -1.7
    assert -1.2 < slope(steps, ddim) < -0.7
    # at the step counts the issue targets, far closer to the ODE's end point than DDIM
    for s in (10, 15, 25):
        assert data.error(DPMSolverPP(schedule, s)) < data.error(DDIMSampler(schedule, s, eta=0.0)) / 5


def test_step_keeps_the_path_of_a_known_point(schedule):
    """With the history at the known latent, one step maps add_noise(known, z, t) to add_noise(known, z, s)."""
    sampler = DPMSolverPP(schedule, 10)
    g = torch.Generator().manual_seed(0)
    known, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t0, t1 = sampler.timesteps[:2]
    t2 = sampler.prev_timestep(t1)
    first = sampler.step(schedule.add_noise(known, z, t0), t0, known)
    assert torch.allclose(first, schedule.add_noise(known, z, t1), atol=1e-5)
    second = sampler.step(schedule.add_noise(known, z, t1), t1, known, prev=(t0, known))
    assert torch.allclose(second, schedule.add_noise(known, z, t2), atol=1e-5)
    assert torch.equal(sampler.step(z, 0, known, prev=(1, z)), known)  # the final step returns x0


# ---- grid and API ----------------------------------------------------------------------------
def test_logsnr_grid(schedule):
    ab = schedule.alphas_cumprod
    lam = 0.5 * torch.log(ab / (1 - ab))
    for steps in (1, 2, 10, 15, 25, 200, 999, 1000):
        ts = DPMSolverPP(schedule, steps).timesteps
        assert len(ts) == len(set(ts)) == steps and ts == sorted(ts, reverse=True)
        assert ts[0] == 999 and (steps == 1 or ts[-1] == 0)
    assert DPMSolverPP(schedule, 1000).timesteps == list(range(999, -1, -1))
    ts = DPMSolverPP(schedule, 10).timesteps
    gaps = [float(lam[b] - lam[a]) for a, b in zip(ts, ts[1:])]
    assert max(gaps) < 1.25 * min(gaps)  # equal steps in lambda (up to integer timesteps)
    s = DPMSolverPP(schedule, 10)
    assert s.prev_timestep(0) == CLEAN and s.lam(CLEAN) == math.inf
    with pytest.raises(ValueError, match="num_inference_steps"):
        DPMSolverPP(schedule, 1001)


def test_config_selects_the_solver_and_refuses_eta(schedule):
    from conftest import TINY_CONFIG

    from gem3d.config import config_from_dict
    from gem3d.io import InputError
    from gem3d.sampling.generate import build_sampler

    def config(**sampling):
        return config_from_dict({**TINY_CONFIG, "sampling": {**TINY_CONFIG["sampling"], **sampling}},
                                source="tiny.yaml", check_paths=False)

    assert isinstance(build_sampler(config(), {}), DDIMSampler)  # the default: the paper's DDIM
    dpm = build_sampler(config(solver="dpmpp_2m", eta=0, steps=15), {"schedule": schedule.to_config()})
    assert isinstance(dpm, DPMSolverPP) and len(dpm.timesteps) == 15
    sde = build_sampler(config(solver="dpmpp_2m", eta=1.0, steps=15), {"schedule": schedule.to_config()})
    assert isinstance(sde, DPMSolverPP) and sde.eta == 1.0  # the SDE form
    with pytest.raises(InputError, match=r"^tiny.yaml: config key sampling.eta: 1.5 is greater than the maximum of 1"):
        config(solver="dpmpp_2m", eta=1.5)
    with pytest.raises(InputError, match="config key sampling.solver"):
        config(solver="unipc")


def test_build_solver_and_eta(schedule):
    assert isinstance(build_solver("ddim", schedule, 5, 1.0), DDIMSampler)
    dpm = build_solver("dpmpp_2m", schedule, 5, 0.0)
    assert isinstance(dpm, DPMSolverPP) and dpm.name == "dpmpp_2m" and dpm.eta == 0.0
    assert build_solver("dpmpp_2m", schedule, 5, 1.0).eta == 1.0
    for name, eta in (("dpmpp_2m", 1.5), ("ddim", 50.0), ("ddim", -0.1)):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            build_solver(name, schedule, 5, eta)
    with pytest.raises(ValueError, match="not one of"):
        build_solver("unipc", schedule, 5, 0.0)


# ---- pinning ---------------------------------------------------------------------------------
def pinned_case(seed=5):
    g = torch.Generator().manual_seed(seed)
    b, c, f, h, w = 3, 4, 5, 8, 8
    known = torch.randn(b, c, f, h, w, generator=g)
    mask = torch.zeros(b, f, dtype=torch.bool)
    mask[0, 0] = mask[1, -1] = True
    mask[2, 1:3] = True
    return known, mask


def coupled_eps(x, t):
    """A model whose prediction at a slice depends on the other slices (like slice-axis attention)."""
    return 0.3 * torch.tanh(x) + 0.2 * x.mean(dim=2, keepdim=True) + 1e-4 * t


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_pinned_slices_come_out_equal_to_the_known_latents(schedule, eta):
    known, mask = pinned_case()
    sampler = DPMSolverPP(schedule, 8, eta=eta)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x_T = randn_tensor(known.shape, gens, "cpu", torch.float32)
    out = sampler.sample(coupled_eps, x_T, gens, known_x0=known, known_mask=mask)
    m = mask[:, None, :, None, None].expand_as(out)
    assert torch.equal(out[m], known[m])
    assert not torch.allclose(out[~m], known[~m])


def test_every_step_sees_the_known_slice_at_its_timesteps_noise_level(schedule):
    """The network's input at a known (zero) slice has std sqrt(1 - ab_t) at every call, the first one
    included, and is exactly add_noise(known, z, t) with ONE noise z drawn from the volume's generator."""
    sampler = DPMSolverPP(schedule, 10)
    b, c, f, h, w = 1, 4, 3, 64, 64
    known = torch.zeros(b, c, f, h, w)
    mask = torch.tensor([[True, False, False]])
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(b, c, f, h, w, generator=g)
    z = torch.randn(b, c, h, w, generator=torch.Generator().set_state(g.get_state()))  # the pin's draw
    seen = []

    def eps_fn(x, t):
        seen.append((t, x[:, :, 0].clone()))
        return coupled_eps(x, t)

    history = []
    sampler.sample(eps_fn, x_T, g, known, mask, callback=lambda i, t, tp, x, x0: history.append(x0[:, :, 0]))
    assert [t for t, _ in seen] == sampler.timesteps
    for t, slice_in in seen:
        assert slice_in.std().item() == pytest.approx(math.sqrt(1 - schedule.alpha_bar(t)), rel=0.05)
        assert torch.equal(slice_in, schedule.add_noise(known[:, :, 0], z, t))
    assert all(torch.equal(x0, torch.zeros_like(x0)) for x0 in history)  # history holds the known latent


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_predictions_at_known_slices_do_not_reach_the_others(schedule, eta):
    """Whatever the network says at a known slice, no other slice changes: the history holds the known
    latent there and the pin rewrites the slice."""
    known, mask = pinned_case()
    sampler = DPMSolverPP(schedule, 6, eta=eta)
    m = mask[:, None, :, None, None]

    def run(eps_fn):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        x_T = randn_tensor(known.shape, gens, "cpu", torch.float32)
        return sampler.sample(eps_fn, x_T, gens, known_x0=known, known_mask=mask)

    a = run(coupled_eps)
    b = run(lambda x, t: torch.where(m, 100.0 * torch.randn_like(x), coupled_eps(x, t)))
    assert torch.equal(a, b)


# ---- noise and determinism -------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_per_volume_generators_and_determinism(schedule, eta):
    known, mask = pinned_case()
    sampler = DPMSolverPP(schedule, 5, eta=eta)

    def run(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        x_T = randn_tensor((len(rows), *known.shape[1:]), gens, "cpu", torch.float32)
        return sampler.sample(coupled_eps, x_T, gens, known_x0=known[rows], known_mask=mask[rows])

    together = run([0, 1, 2], [10, 11, 12])
    assert torch.equal(together, run([0, 1, 2], [10, 11, 12]))
    assert torch.equal(together[2], run([2], [12])[0])
    assert torch.equal(together[0], run([0, 2], [10, 12])[0])
    assert not torch.allclose(together[1], run([1], [13])[0])
    # without known slices the ODE (eta 0) uses the generator no more after x_T; the SDE draws every step
    x_T = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = sampler.sample(coupled_eps, x_T, torch.Generator().manual_seed(1))
    b = sampler.sample(coupled_eps, x_T, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) == (eta == 0)


# ---- the SDE form (eta > 0) ------------------------------------------------------------------
def test_sde_step_keeps_a_known_point_on_its_noised_path(schedule):
    """eta 1: add_noise(known, z, t) goes to add_noise(known, z', s) with the carried noise z' of unit variance."""
    sampler = DPMSolverPP(schedule, 10, eta=1.0)
    g = torch.Generator().manual_seed(0)
    known, z, n = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    t0, t1 = sampler.timesteps[:2]
    out = sampler.step(schedule.add_noise(known, z, t0), t0, known, noise=n)
    carried = sampler.carried_noise(z, n, t0)
    assert torch.allclose(out, schedule.add_noise(known, carried, t1), atol=1e-5)
    assert carried.std().item() == pytest.approx(1.0, abs=0.03)
    with pytest.raises(ValueError, match="needs the step's noise"):
        sampler.step(z, t0, known)


@pytest.mark.parametrize("steps", [25, 50])
def test_sde_samples_have_the_data_distribution(schedule, steps):
    """On Gaussian data the SDE's end points, standardised by their exact distribution N(mu, (a0 s^2)^2 /
    var_0) (the final step returns E[x0 | x_0]), are N(0, 1): a wrong noise or drift coefficient moves the
    variance (the ODE with eta 0 matches it too, from x_T alone; here the noise of every step is in it)."""
    data = Gaussian(schedule, n=8192, seed=1)
    sampler = DPMSolverPP(schedule, steps, eta=1.0)
    a0 = schedule.alpha_bar(0) ** 0.5
    sd = a0 * data.s**2 / data.var(0).sqrt()
    x = sampler.sample(data.eps, data.x_T.clone(), torch.Generator().manual_seed(3))
    z = ((x - data.mu) / sd).flatten()
    assert abs(z.mean().item()) < 0.05 and z.var().item() == pytest.approx(1.0, abs=0.08)
    wrong = DPMSolverPP(schedule, steps, eta=1.0)
    wrong.carried_noise = sampler.carried_noise
    wrong.step = lambda x_t, t, x0, prev=None, noise=None: DPMSolverPP.step(
        sampler, x_t, t, x0, prev, None if noise is None else 1.5 * noise)
    z = ((wrong.sample(data.eps, data.x_T.clone(), torch.Generator().manual_seed(3)) - data.mu) / sd).flatten()
    assert z.var().item() > 1.2  # the test sees a noise term 1.5x too large
