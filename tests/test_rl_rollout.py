"""GRPO rollouts (docs/rl.md#rollouts): the SDE step of both formulations against an independent Gaussian, the
recorded log-probabilities, determinism of the per-step noise, the initial noise of prompt groups, and
DPM-Solver++(2M) on the compressed grid (exact on straight flows, 2nd-order convergence)."""

import math

import pytest
import torch

from ospfn.rl import (
    initial_noise,
    rollout,
    sde_log_prob,
    sde_noise_level,
    step_generator,
)
from ospfn.sched.dpm_solver import compressed_tail, dpmpp_2m_sample, dpmpp_2m_step, unshift_sigma
from ospfn.sched.flow import euler_sample, inference_sigmas, shift_sigmas

torch.set_num_threads(1)


def field(z, sigma, i):
    """A smooth, nonlinear, batch-dependent velocity field."""
    return torch.sin(z * 1.3 + sigma) - 0.4 * z + 0.1 * i


def gaussian_mean_log_density(x, mean, std):
    """Mean over the elements of log N(x; mean, std^2), per batch row, in Python floats (float64)."""
    out = []
    for xr, mr in zip(x.double().flatten(1).tolist(), mean.double().flatten(1).tolist()):
        terms = [-((a - m) ** 2) / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi) for a, m in zip(xr, mr)]
        out.append(sum(terms) / len(terms))
    return out


def spec_mean(x, v, sigma, sigma_next, s):
    """mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt, elementwise in float64."""
    dt = sigma_next - sigma
    return x.double() * (1 + s * s * dt / (2 * sigma)) + v.double() * (1 + s * s * (1 - sigma) / (2 * sigma)) * dt


# ----------------------------------------------------------------------------------------------------------
# the SDE step


@pytest.mark.parametrize("sde,noise_level,sigma,sigma_next", [
    ("osp", None, 0.9, 0.8), ("osp", 0.3, 0.5, 0.45), ("flow_grpo", None, 0.9, 0.8), ("flow_grpo", 0.4, 0.3, 0.1),
    ("flow_grpo", None, 1.0, 0.97),
])
def test_sde_mean_and_log_prob_against_an_independent_gaussian(sde, noise_level, sigma, sigma_next):
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    sigma_max = 0.97
    if sde == "osp":
        s = sigma if noise_level is None else noise_level
    else:  # Flow-GRPO: a sqrt(sigma / (1 - sigma)), sigma = 1 replaced by sigmas[1] in the denominator
        a = 0.7 if noise_level is None else noise_level
        s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1.0 else sigma)))
    assert sde_noise_level(sde, sigma, noise_level=noise_level, sigma_max=sigma_max) == pytest.approx(s, rel=1e-12)
    lp, mean, std = sde_log_prob(x, v, sigma, sigma_next, x_next, sde=sde, noise_level=noise_level, sigma_max=sigma_max)
    want_std = s * math.sqrt(sigma - sigma_next)
    want_mean = spec_mean(x, v, sigma, sigma_next, s)
    assert std == pytest.approx(want_std, rel=1e-12)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-6)
    want = torch.tensor(gaussian_mean_log_density(x_next, want_mean, want_std), dtype=torch.float64)
    torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-4)
    assert lp.shape == (3,) and lp.dtype == torch.float32


def test_log_prob_is_differentiable_in_v_and_peaks_at_the_mean():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    _, mean, _ = sde_log_prob(x, v, 0.7, 0.6, x)
    v_req = v.clone().requires_grad_(True)
    lp, _, std = sde_log_prob(x, v_req, 0.7, 0.6, mean)  # x_next = the mean itself: the maximum over x_next
    lp.sum().backward()
    assert v_req.grad is not None and v_req.grad.abs().max() < 1e-5  # stationary at x_next = mean
    lp_max = -math.log(std) - 0.5 * math.log(2 * math.pi)
    assert lp.tolist() == pytest.approx([lp_max, lp_max], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# rollouts


def test_empty_window_equals_euler_sample():
    sig = inference_sigmas(12, 5.0)
    z = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2))
    ro = rollout(field, z, sig, [], seed=0)
    assert torch.equal(ro.z, euler_sample(field, z, sig))
    assert ro.steps == [] and ro.window == () and ro.log_probs.shape == (0, 3)
    # compress is ignored without SDE steps (nothing to compress after)
    assert torch.equal(rollout(field, z, sig, [], seed=0, compress=0.4, shift=5.0).z, ro.z)


@pytest.mark.parametrize("sde", ["osp", "flow_grpo"])
def test_recorded_transitions(sde):
    sig = inference_sigmas(10, 3.0)
    z = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(3))
    seen = []
    ro = rollout(field, z, sig, range(0, 4), sde=sde, seed=11, iteration=5, callback=lambda i, zz: seen.append((i, zz)))
    assert ro.window == (0, 1, 2, 3) and [st.index for st in ro.steps] == [0, 1, 2, 3]
    assert [i for i, _ in seen] == list(range(10))
    states = [z.float()] + [zz for _, zz in seen]
    for st in ro.steps:
        i = st.index
        assert (st.sigma, st.sigma_next) == (float(sig[i]), float(sig[i + 1]))
        assert torch.equal(st.x, states[i]) and torch.equal(st.x_next, states[i + 1])
        # the recorded log-prob equals the recomputed one for the same velocity: ratio exactly 1
        lp, mean, std = st.log_prob_of(field(st.x, st.sigma, i))
        assert torch.equal(lp, st.log_prob) and torch.equal(mean, st.mean) and std == st.std
        assert torch.equal(torch.exp(lp - st.log_prob), torch.ones(4))
        # x_next = mean + std * eps with eps the step's own generator (seed, iteration, step)
        eps = torch.randn(st.x.shape, generator=step_generator(11, 5, i))
        torch.testing.assert_close(st.x_next, st.mean + st.std * eps, rtol=0, atol=1e-6)
        s = sde_noise_level(sde, st.sigma, sigma_max=float(sig[1]))
        assert st.std == pytest.approx(s * math.sqrt(st.sigma - st.sigma_next))
    assert ro.log_probs.shape == (4, 4)
    # after the window: plain Euler from the last SDE state
    assert torch.equal(ro.z, euler_sample(lambda zz, s_, j: field(zz, s_, j + 4), ro.steps[-1].x_next, sig[4:]))


def test_steps_before_the_window_are_euler():
    sig = inference_sigmas(8, 3.0)
    z = torch.randn(2, 6, generator=torch.Generator().manual_seed(4))
    ro = rollout(field, z, sig, [3, 4], seed=0)
    x3 = euler_sample(field, z, sig[:4])
    assert torch.equal(ro.step(3).x, x3)
    with pytest.raises(KeyError, match=r"step 2 is not in the SDE window \(3, 4\)"):
        ro.step(2)


def test_determinism_and_per_step_noise():
    sig = inference_sigmas(10, 7.0)
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5))
    a = rollout(field, z, sig, [1, 2, 3], seed=9, iteration=2)
    b = rollout(field, z, sig, [1, 2, 3], seed=9, iteration=2)
    assert torch.equal(a.z, b.z) and all(torch.equal(p.x_next, q.x_next) for p, q in zip(a.steps, b.steps))
    for other in (rollout(field, z, sig, [1, 2, 3], seed=10, iteration=2), rollout(field, z, sig, [1, 2, 3], seed=9, iteration=3)):
        assert not torch.equal(a.z, other.z)
    # the noise of a step depends on (seed, iteration, step) only, not on which steps came before
    c = rollout(field, z, sig, [3], seed=9, iteration=2)
    eps_a = (a.step(3).x_next - a.step(3).mean) / a.step(3).std
    eps_c = (c.step(3).x_next - c.step(3).mean) / c.step(3).std
    torch.testing.assert_close(eps_a, eps_c, rtol=0, atol=1e-4)
    # a generator: the steps draw from it in order
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(rollout(field, z, sig, [0, 5], generator=g1).z, rollout(field, z, sig, [0, 5], generator=g2).z)
    e = torch.Generator().manual_seed(1)
    first = torch.randn(z.shape, generator=e)
    r = rollout(field, z, sig, [0], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(r.steps[0].x_next, r.steps[0].mean + r.steps[0].std * first, rtol=0, atol=1e-6)


def test_shares_of_a_global_batch_sample_what_the_whole_batch_samples():
    """Data-parallel replicas: each rolls out its share (batch_offset, global_batch) and together they give the
    whole batch's rollout, transitions and log-probabilities included, bit for bit."""
    sig = inference_sigmas(8, 5.0)
    z = torch.randn(6, 3, 4, generator=torch.Generator().manual_seed(2))
    whole = rollout(field, z, sig, [1, 2, 4], seed=3, iteration=7)
    assert torch.equal(rollout(field, z, sig, [1, 2, 4], seed=3, iteration=7, global_batch=6).z, whole.z)
    parts = [rollout(field, z[lo : lo + 2], sig, [1, 2, 4], seed=3, iteration=7, batch_offset=lo, global_batch=6) for lo in (0, 2, 4)]
    assert torch.equal(torch.cat([p.z for p in parts]), whole.z)
    for j in (1, 2, 4):
        assert torch.equal(torch.cat([p.step(j).x_next for p in parts]), whole.step(j).x_next)
        assert torch.equal(torch.cat([p.step(j).log_prob for p in parts]), whole.step(j).log_prob)
    # without the offsets every share would draw the first samples' noise
    alone = rollout(field, z[2:4], sig, [1, 2, 4], seed=3, iteration=7)
    assert not torch.equal(alone.z, whole.z[2:4])
    with pytest.raises(ValueError, match=r"batch_offset \+ batch \(5 \+ 2\) exceeds global_batch 6"):
        rollout(field, z[:2], sig, [1], seed=3, batch_offset=5, global_batch=6)
    with pytest.raises(ValueError, match="batch_offset=2 needs global_batch"):
        rollout(field, z[:2], sig, [1], seed=3, batch_offset=2)


def test_initial_noise_groups():
    g = initial_noise((2, 3), groups=3, k=4, shared=True, seed=5)
    ref = torch.randn((3, 2, 3), generator=torch.Generator().manual_seed(5))
    assert g.shape == (12, 2, 3)
    for b in range(12):
        assert torch.equal(g[b], ref[b // 4])
    u = initial_noise((2, 3), groups=3, k=4, seed=5)
    assert torch.equal(u, torch.randn((12, 2, 3), generator=torch.Generator().manual_seed(5)))
    assert len({tuple(row.flatten().tolist()) for row in u}) == 12
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(initial_noise((2, 3), 3, 4, shared=True, generator=gen), g)
    assert initial_noise((1,), 1, 2, dtype=torch.bfloat16, seed=0).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# the compressed ODE after the window (DPM-Solver++ 2M)


def test_compressed_tail_grid():
    sig = inference_sigmas(25, 3.0)
    for ratio, points in ((0.4, 8), (0.2, 4)):  # floor((25 - 3) * 0.4) = 8, floor(22 * 0.2) = 4
        run = compressed_tail(sig, 3, ratio, shift=3.0)
        assert run[:5] == [float(x) for x in sig[:5]]
        t0 = 1 - 4 / 25  # unshifted time of sigmas[4]
        want = [float(shift_sigmas(torch.tensor(t0 * (1 - k / (points - 1)), dtype=torch.float64), 3.0)) for k in range(points)]
        assert run[4:] == pytest.approx(want, abs=1e-12) and run[-1] == 0.0 and len(run) == 4 + points
    # never fewer than one step after the window; a window ending at N - 2 leaves the single last step
    assert compressed_tail(sig, 20, 0.2, shift=3.0)[21:] == [float(sig[21]), 0.0]
    assert compressed_tail(sig, 23, 0.4, shift=3.0) == [float(x) for x in sig]
    assert unshift_sigma(float(shift_sigmas(torch.tensor(0.3, dtype=torch.float64), 7.0)), 7.0) == pytest.approx(0.3, abs=1e-15)


def test_dpm_first_order_is_euler():
    z, v = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(dpmpp_2m_step(z, z - 0.6 * v, 0.6, 0.35), z + (0.35 - 0.6) * v)
    torch.testing.assert_close(dpmpp_2m_step(z, z - 0.6 * v, 0.6, 0.0, prev_x0=torch.randn(5), prev_sigma=0.8), z - 0.6 * v)


def test_dpm_exact_on_straight_flows():
    # v = (z - c) / sigma: every trajectory is the straight line z(sigma) = c + (z0 - c) sigma / sigma0 (the data
    # prediction z - sigma v = c is constant), which DPM-Solver++ integrates exactly at any step size
    c = torch.tensor([0.3, -1.2, 2.0])
    z0 = torch.tensor([1.5, 0.4, -0.7])
    grid = [0.9, 0.7, 0.62, 0.4, 0.33, 0.1, 0.05]
    seen = []
    dpmpp_2m_sample(lambda z, s, i: (z - c) / s, z0, grid, callback=lambda i, z: seen.append(z))
    for s, z in zip(grid[1:], seen):
        torch.testing.assert_close(z, c + (z0 - c) * s / 0.9, rtol=1e-5, atol=1e-6)


def _curved(a, b):
    """v = (z - g(sigma)) / sigma with data prediction g = a + b sigma: z(t) = t (z_s / s + a (1/t - 1/s) - b ln(t / s))."""
    def vel(z, s, i):
        return (z - (a + b * s)) / s

    def exact(z_s, s, t):
        return t * (z_s / s + a * (1 / t - 1 / s) - b * math.log(t / s))

    return vel, exact


def test_dpm_converges_at_second_order():
    vel, exact = _curved(0.5, 3.0)
    z0, s0, s1 = 1.2, 0.9, 0.3
    want = exact(z0, s0, s1)
    errs, euler_errs = [], []
    for n in (8, 16, 32):
        grid = [s0 + (s1 - s0) * k / n for k in range(n + 1)]
        errs.append(abs(float(dpmpp_2m_sample(vel, torch.tensor([z0], dtype=torch.float64), grid)[0]) - want))
        euler_errs.append(abs(float(euler_sample(vel, torch.tensor([z0], dtype=torch.float64), grid)[0]) - want))
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 3.6 < r1 < 4.5 and 3.6 < r2 < 4.5, errs  # 2nd order: halving h quarters the error
    assert 1.6 < euler_errs[0] / euler_errs[1] < 2.4  # (Euler: 1st order)
    assert errs[2] < euler_errs[2] / 20


def test_rollout_with_compression():
    sig = inference_sigmas(25, 3.0)
    c = torch.tensor([[0.3, -1.0, 0.5], [2.0, 0.1, -0.4]])
    calls, seen = [], []

    def straight(z, s, i):
        calls.append((i, s))
        return (z - c) / s

    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))
    ro = rollout(straight, z, sig, [0, 1, 2, 3], sde="flow_grpo", seed=0, compress=0.4, shift=3.0,
                 callback=lambda i, zz: seen.append(zz))
    run = compressed_tail(sig, 3, 0.4, shift=3.0)
    assert ro.sigmas == tuple(run) and len(run) - 1 == 4 + 7  # 4 SDE steps + 7 compressed ODE steps (was 21)
    assert calls == [(i, run[i]) for i in range(11)]
    x4 = ro.steps[-1].x_next
    for j in range(4, 11):  # the straight flow is integrated exactly after the window
        torch.testing.assert_close(seen[j], c + (x4 - c) * run[j + 1] / run[4], rtol=1e-5, atol=1e-5)
    # the first compressed step is second order, continuing from the last SDE step's data prediction
    vel, _ = _curved(0.2, -1.0)
    ro2 = rollout(vel, z, sig, [2, 3], seed=1, compress=0.4, shift=3.0)
    x3, x4 = ro2.step(3).x, ro2.step(3).x_next
    run2 = list(ro2.sigmas)
    step1 = dpmpp_2m_step(x4, x4 - run2[4] * vel(x4, run2[4], 4), run2[4], run2[5], prev_x0=x3 - run2[3] * vel(x3, run2[3], 3),
                          prev_sigma=run2[3])
    rest = dpmpp_2m_sample(vel, step1, run2[5:], prev_x0=x4 - run2[4] * vel(x4, run2[4], 4), prev_sigma=run2[4], index_offset=5)
    torch.testing.assert_close(ro2.z, rest, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(window=[8]), ValueError, r"window steps must be ints in \[0, 7\] \(the last of 9 steps.*got 8"),
        (dict(window=[1, 1]), ValueError, r"window has repeated steps"),
        (dict(window=3), TypeError, r"window must be an iterable"),
        (dict(sde="dance"), ValueError, r"sde must be one of \('osp', 'flow_grpo'\), got 'dance'"),
        (dict(noise_level=0.0), ValueError, r"noise_level must be a finite number in \(0, inf\), got 0.0"),
        (dict(seed=1, generator=torch.Generator()), ValueError, r"pass generator or seed, not both"),
        (dict(generator=1), TypeError, r"generator must be a torch.Generator or None, got int"),
        (dict(compress=0.4), ValueError, r"compress=0.4 needs shift"),
        (dict(compress=1.5, shift=3.0), ValueError, r"compress must be a finite number in \(0, 1\], got 1.5"),
        (dict(iteration=-1), ValueError, r"iteration must be an int >= 0, got -1"),
        (dict(velocity=lambda z, s, i: z[:1]), ValueError, r"velocity\(z, sigma, 0\) must return a tensor of z's shape \(2, 3\)"),
        (dict(velocity=None), TypeError, r"velocity must be callable"),
        (dict(z=torch.zeros(2, 3, dtype=torch.int64)), TypeError, r"z must be a floating-point tensor"),
        (dict(sigmas=[1.0, 0.5, 0.7]), ValueError, r"sigmas must be strictly decreasing"),
    ],
)
def test_rollout_bad_inputs(kwargs, exc, msg):
    args = dict(velocity=field, z=torch.zeros(2, 3), sigmas=inference_sigmas(9, 3.0), window=[0, 1])
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        rollout(args.pop("velocity"), args.pop("z"), args.pop("sigmas"), args.pop("window"), **args)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"at sigma = 1 needs sigma_max"):
        sde_noise_level("flow_grpo", 1.0)
    with pytest.raises(ValueError, match=r"sigma_max must be a finite number in \(0, 1\), got 1.0"):
        sde_noise_level("flow_grpo", 1.0, sigma_max=1.0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sigma_next must be a finite number in \(0, 1\], got 0.0"):
        sde_log_prob(x, x, 0.5, 0.0, x)
    with pytest.raises(ValueError, match=r"x, v and x_next must have one shape"):
        sde_log_prob(x, x[:1], 0.5, 0.4, x)
    with pytest.raises(ValueError, match=r"shape must be a sequence of positive ints"):
        initial_noise((2, 0), 1, 2)
    with pytest.raises(ValueError, match=r"k must be an int >= 1, got 0"):
        initial_noise((2,), 1, 0)
    with pytest.raises(ValueError, match=r"last_sde must be an int step index in \[0, 7\]"):
        compressed_tail(inference_sigmas(9, 3.0), 8, 0.4, shift=3.0)
    with pytest.raises(ValueError, match=r"pass prev_x0 and prev_sigma together"):
        dpmpp_2m_step(x, x, 0.5, 0.4, prev_x0=x)
    with pytest.raises(ValueError, match=r"prev_sigma \(0.3\) must be above sigma \(0.5\)"):
        dpmpp_2m_step(x, x, 0.5, 0.4, prev_x0=x, prev_sigma=0.3)
