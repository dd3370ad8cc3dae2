"""Flow-matching schedule, samplers and loss (docs/training.md#noise-schedules, docs/training.md#mix-grpo-sde-step)."""

import math

import pytest
import torch

import ospfn.model as M
from ospfn.sched import (
    cfg_combine,
    dynamic_shift,
    euler_sample,
    flow_matching_loss,
    gaussian_log_prob,
    inference_sigmas,
    sample,
    sde_step,
    shift_sigmas,
    training_sigmas,
)


def test_shift_formulas_at_reference_points():
    assert dynamic_shift((60, 104)) == pytest.approx(2.056, abs=1e-3)  # 480 x 832
    assert dynamic_shift((90, 160)) == pytest.approx(2.9, abs=0.01)  # 720p
    # mu is linear in L through (256, 0.5) and (4096, 1.15)
    assert math.log(dynamic_shift((32, 32))) == pytest.approx(0.5)
    assert math.log(dynamic_shift((128, 128))) == pytest.approx(1.15)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 7.0), 7 * s / (1 + 6 * s))
    sig = inference_sigmas(50, 7.0)
    assert len(sig) == 51 and sig[0] == 1.0 and sig[-1] == 0.0 and bool((sig[1:] < sig[:-1]).all())
    assert sig[25] == pytest.approx(7 * 0.5 / (1 + 6 * 0.5))


def test_training_sigmas():
    g = torch.Generator().manual_seed(0)
    s = training_sigmas(100_000, generator=g)
    assert 0 < float(s.min()) and float(s.max()) <= 1
    assert float(s.mean()) == pytest.approx(0.5, abs=0.01)  # sigmoid of a centred normal
    g = torch.Generator().manual_seed(0)
    shifted = training_sigmas(100_000, generator=g, shift=3.0)
    torch.testing.assert_close(shifted, shift_sigmas(s.double(), 3.0).float(), rtol=1e-6, atol=1e-6)
    u = training_sigmas(100_000, generator=torch.Generator().manual_seed(1), logit_normal=False)
    assert float(u.std()) == pytest.approx(1 / math.sqrt(12), abs=0.01)


def test_euler_reaches_analytic_endpoint_as_steps_grow():
    """Data x0 ~ N(m, s^2): the exact flow maps eps to m + s * eps; Euler on the exact velocity converges."""
    m, s = 2.0, 0.3
    eps = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def v(x, sigma, i):  # E[eps - x0 | x_sigma] for Gaussian data
        var = sigma**2 + (1 - sigma) ** 2 * s**2
        centred = x.double() - (1 - sigma) * m
        return (sigma / var - (1 - sigma) * s**2 / var) * centred - m

    errs = []
    for steps in (5, 20, 80, 320):
        x = euler_sample(v, eps.float(), torch.linspace(1, 0, steps + 1))
        errs.append(float((x.double() - (m + s * eps)).abs().max()))
    # first-order convergence: 4x the steps cuts the error by about 4
    assert all(a / b > 3 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-2


def test_unipc_schedule_is_the_flow_unipc_of_wan():
    """diffusers' UniPC in flow mode, as ospfn configures it: sigma_i = S s / (1 + (S - 1) s) on
    s = linspace(1, 1/1000, N + 1)[:-1] (the first lowered by 1e-6), a final 0; timesteps = floor(1000 sigma)."""
    pytest.importorskip("diffusers", reason="the UniPC sampler is diffusers' scheduler")
    from ospfn.sched import unipc_schedule

    for steps, shift in ((5, 3.0), (50, 5.0), (1, 1.0)):
        ts, sig = unipc_schedule(steps, shift)
        s = [1 - (1 - 1 / 1000) * i / steps for i in range(steps)]
        want = [shift * v / (1 + (shift - 1) * v) for v in s]
        want[0] -= 1e-6
        assert sig.tolist()[:-1] == pytest.approx(want, rel=1e-6) and sig[-1] == 0
        assert ts.dtype == torch.int64 and ts.tolist() == [int(v * 1000) for v in want]


def test_unipc_converges_faster_than_euler_on_the_analytic_flow():
    """The loop that drives diffusers' UniPC (model at the scheduler's steps, velocity fed to step): on Gaussian
    data, whose exact velocity is known, UniPC's error falls with the steps, by at least 4x per doubling once
    the steps are many (second order; Euler's halves), and ends far below Euler's on the same sigmas."""
    pytest.importorskip("diffusers", reason="the UniPC sampler is diffusers' scheduler")
    from ospfn.sched import unipc_sample, unipc_schedule

    m, sd = 2.0, 0.3
    eps = torch.randn(8, 125, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # [B, C]: the scheduler's layout

    def v(x, sigma):
        var = sigma**2 + (1 - sigma) ** 2 * sd**2
        return (sigma / var - (1 - sigma) * sd**2 / var) * (x.double() - (1 - sigma) * m) - m

    target = m + sd * eps
    errs, euler_errs = [], []
    for steps in (10, 20, 40, 80):
        sig = unipc_schedule(steps, 3.0)[1].tolist()
        seen = []

        def model(z, t, i):
            seen.append((t, i))
            return v(z, sig[i]).float()

        x = unipc_sample(model, eps.float(), steps=steps, shift=3.0)
        assert [i for _, i in seen] == list(range(steps)) and seen[0][0] == 999.0
        errs.append(float((x.double() - target).abs().max()))
        xe = euler_sample(lambda z, s, i: v(z, s).float(), eps.float(), sig)
        euler_errs.append(float((xe.double() - target).abs().max()))
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-2] / errs[-1] > 4, errs
    assert all(u < e / 5 for u, e in zip(errs[2:], euler_errs[2:])), (errs, euler_errs)
    assert errs[-1] < 5e-3


def test_sample_scheduler_argument():
    cfg = M.DiTConfig.preset("tiny", num_layers=2, num_full_blocks=0)
    params = M.init_params(cfg)
    noise = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"sample: scheduler must be one of \['euler', 'unipc'\], got 'ddim'"):
        sample(params, cfg, noise=noise, context=ctx, steps=2, scheduler="ddim")
    with pytest.raises(ValueError, match=r"sample: sigmas= is an explicit schedule for the Euler sampler"):
        sample(params, cfg, noise=noise, context=ctx, sigmas=[1.0, 0.0], scheduler="unipc")
    a = sample(params, cfg, noise=noise, context=ctx, steps=2, shift=3.0)
    assert torch.equal(a, sample(params, cfg, noise=noise, context=ctx, sigmas=inference_sigmas(2, 3.0)))


def test_cfg():
    a, b = torch.randn(3), torch.randn(3)
    assert torch.equal(cfg_combine(a, b, 1.0), b)
    torch.testing.assert_close(cfg_combine(a, b, 5.0), a + 5 * (b - a))


def test_sde_step_log_prob_and_mean():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    sig, nxt = 0.6, 0.5
    out, mu, std, lp = sde_step(x, v, sig, nxt, generator=torch.Generator().manual_seed(1))
    dt = nxt - sig
    want_mu = x * (1 + sig**2 * dt / (2 * sig)) + v * (1 + sig**2 * (1 - sig) / (2 * sig)) * dt
    torch.testing.assert_close(mu, want_mu)
    assert std == pytest.approx(sig * math.sqrt(-dt))
    ref = torch.distributions.Normal(mu, std).log_prob(out).flatten(1).mean(1)
    torch.testing.assert_close(lp, ref)
    _, _, _, lp2 = sde_step(x, v, sig, nxt, prev=out)  # re-evaluating a given sample
    torch.testing.assert_close(lp2, lp)
    # zero noise level is the Euler step
    out0, *_ = sde_step(x, v, sig, nxt, noise_level=0.0)
    torch.testing.assert_close(out0, x + v * dt)
    last, *_rest = sde_step(x, v, 0.1, 0.0)
    torch.testing.assert_close(last, x - 0.1 * v * (1 + 0.1**2 * 0.9 / 0.2) + 0.1**2 * (-0.1) / 0.2 * x)
    torch.testing.assert_close(gaussian_log_prob(mu, mu, 1.0), torch.full((2,), -0.5 * math.log(2 * math.pi)))


def _tiny_i2v(seed=0):
    cfg = M.DiTConfig.preset("tiny", i2v="flashi2v", num_layers=4, num_full_blocks=0)
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    return cfg, params


def test_integrating_z_equals_integrating_the_shifted_state():
    cfg, params = _tiny_i2v()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    s = torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx, neg = torch.randn(1, 16, 32, generator=g), torch.zeros(1, 16, 32)
    z = sample(params, cfg, noise=noise, context=ctx, neg_context=neg, guidance=3.0, steps=6, cond_image_latent=s, fourier_ratio=0.1)
    # the other formulation, written out: integrate z' = z - p from eps - p, add p back at the end
    p = M.flashi2v_shift(params, cfg, s)
    assert p.abs().max() > 1e-3
    f = M.fourier_features(s, 0.1)
    zs = noise - p
    sig = inference_sigmas(6, 7.0)
    for i in range(6):
        t = torch.full((1,), 1000.0 * float(sig[i]))
        vu = M.forward(params, cfg, zs, t, neg, image=M.ImageCond(fourier_feats=f))
        vc = M.forward(params, cfg, zs, t, ctx, image=M.ImageCond(fourier_feats=f))
        zs = zs + (vu + 3.0 * (vc - vu)) * float(sig[i + 1] - sig[i])
    torch.testing.assert_close(z, zs + p, rtol=1e-5, atol=1e-5)


def test_guidance_one_is_the_conditional_branch():
    cfg, params = _tiny_i2v()
    g = torch.Generator().manual_seed(3)
    noise, s = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)
    ctx = torch.randn(1, 16, 32, generator=g)
    a = sample(params, cfg, noise=noise, context=ctx, neg_context=torch.randn(1, 9, 32, generator=g), guidance=1.0, steps=3, cond_image_latent=s)
    b = sample(params, cfg, noise=noise, context=ctx, steps=3, cond_image_latent=s)
    assert torch.equal(a, b)
    c = sample(params, cfg, noise=noise, context=ctx, neg_context=torch.zeros(1, 9, 32), guidance=4.0, steps=3, cond_image_latent=s)
    assert not torch.allclose(a, c)


def test_t2v_sampling_is_deterministic():
    cfg = M.DiTConfig.preset("tiny", num_layers=4, num_full_blocks=0)
    params = M.init_params(cfg)
    noise = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(5))
    a = sample(params, cfg, noise=noise, context=ctx, steps=3)
    assert torch.equal(a, sample(params, cfg, noise=noise, context=ctx, steps=3))
    with pytest.raises(ValueError, match="needs cond_image_latent"):
        sample(params, cfg.replace(i2v="flashi2v"), noise=noise, context=ctx)


def test_flashi2v_loss_target_does_not_depend_on_phi():
    cfg, params = _tiny_i2v()
    g = torch.Generator().manual_seed(6)
    z0, s = torch.randn(2, 16, 2, 8, 8, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g)
    ctx, empty = torch.randn(2, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    kw = dict(empty_context=empty, cond_image_latent=s, return_parts=True)
    loss1, parts1 = flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(7), **kw)
    other = dict(params)
    other["learnable_proj.proj.2.weight"] = other["learnable_proj.proj.2.weight"] * 3
    loss2, parts2 = flow_matching_loss(other, cfg, z0, ctx, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(parts1["target"], parts1["eps"] - z0)
    assert torch.equal(parts1["target"], parts2["target"])
    p1, p2 = M.flashi2v_shift(params, cfg, s), M.flashi2v_shift(other, cfg, s)
    torch.testing.assert_close(parts1["x_t"] - parts2["x_t"], (p2 - p1).expand_as(z0))
    sig = parts1["sigma"].view(2, 1, 1, 1, 1)
    torch.testing.assert_close(parts1["x_t"], sig * parts1["eps"] + (1 - sig) * z0 - p1)
    assert 0.05 <= float(parts1["rho"].min()) and float(parts1["rho"].max()) <= 0.95
    assert loss1 != loss2
    torch.testing.assert_close(loss1, (parts1["v_pred"] - parts1["target"]).pow(2).mean())


def test_loss_trains_phi_through_the_input_and_drops_text():
    cfg, params = _tiny_i2v()
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    g = torch.Generator().manual_seed(8)
    z0, s = torch.randn(4, 16, 2, 8, 8, generator=g), torch.randn(4, 16, 1, 8, 8, generator=g)
    ctx, empty = torch.randn(4, 16, 32, generator=g), torch.zeros(1, 3, 32)
    loss, parts = flow_matching_loss(p, cfg, z0, ctx, generator=torch.Generator().manual_seed(9), empty_context=empty,
                                     text_drop=0.5, cond_image_latent=s, return_parts=True)  # fmt: skip
    loss.backward()
    assert p["learnable_proj.proj.2.weight"].grad.abs().max() > 0
    assert 0 < int(parts["drop"].sum()) < 4  # with this seed some, not all, prompts are dropped
    a = flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(9), empty_context=empty, text_drop=0.5, cond_image_latent=s)
    assert torch.equal(a.detach(), loss.detach())  # same generator -> same loss
    with pytest.raises(ValueError, match="needs empty_context"):
        flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(0), text_drop=1.0, cond_image_latent=s)


def test_data_parallel_slices_equal_the_global_batch():
    """Two ranks with global_batch / batch_offset compute exactly the per-sample terms of one big batch."""
    cfg, params = _tiny_i2v()
    g = torch.Generator().manual_seed(10)
    z0, s = torch.randn(4, 16, 2, 8, 8, generator=g), torch.randn(4, 16, 1, 8, 8, generator=g)
    ctx, empty = torch.randn(4, 16, 32, generator=g), torch.zeros(1, 3, 32)
    kw = dict(empty_context=empty, text_drop=0.5, return_parts=True)
    whole, pw = flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(11), cond_image_latent=s, **kw)
    halves = [flow_matching_loss(params, cfg, z0[o : o + 2], ctx[o : o + 2], generator=torch.Generator().manual_seed(11),
                                 cond_image_latent=s[o : o + 2], global_batch=4, batch_offset=o, **kw) for o in (0, 2)]  # fmt: skip
    for key in ("sigma", "eps", "rho", "drop"):
        assert torch.equal(torch.cat([h[1][key] for h in halves]), pw[key]), key
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, whole)
    with pytest.raises(ValueError, match="exceeds global_batch"):
        flow_matching_loss(params, cfg, z0, ctx, generator=torch.Generator().manual_seed(0), cond_image_latent=s, global_batch=4, batch_offset=1, empty_context=empty)
