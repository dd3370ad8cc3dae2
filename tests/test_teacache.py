"""TeaCache (ospfn.sched.teacache): exactness when nothing is skipped, what a skipped call computes, the
accumulator against numbers worked out here by hand, per-branch state, agreement of sequence-parallel ranks,
and input checks.

Independent references: the uncached ``forward`` / ``sample``; for a skipped call, a forward whose blocks are
replaced through ``RunOptions(block_fn=...)`` by "block 0 input + residual" (the residual taken from an
uncached call with ``block_fn`` / ``block_hook``); the time modulation e / e0 recomputed in float64 from the
parameters by the test's own formula.
"""

import math

import pytest
import torch

import ospfn.model as M
from ospfn.model.dit import block_params, dit_block
from ospfn.sched import sample
from ospfn.sched.teacache import PRESETS, TeaCache, TeaCacheConfig, rescale

TINY = dict(dim=32, ffn_dim=64)  # 8 blocks: 0-1 and 6-7 "full", 2-5 token / group (the first input, last output "full")


def _model(seed=0, **kw):
    cfg = M.DiTConfig.preset("tiny", **{**TINY, **kw})
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}  # the head is 0 at init
    return cfg, params, g


def _inputs(cfg, g, batch=1, T=2, H=6, W=8):
    x = torch.randn(batch, cfg.in_dim, T, H, W, generator=g)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, ctx


def _manual(params, cfg, x, t, ctx, res=None):
    """(forward output, block-0 input, last-block output); with ``res`` block 0 returns its input + res and the
    other blocks pass their input through: the head then reads block-0 input + res."""
    per = block_params(params, cfg.num_layers)
    cap = {}

    def block_fn(i, h, bc, lay):
        if i == 0:
            cap["in"] = h
        if res is None:
            return dit_block(h, per[i], bc, lay)
        return h + res if i == 0 else h

    def hook(i, kind, h):
        if i == cfg.num_layers - 1:
            assert kind == "full"
            cap["out"] = h

    out = M.forward(params, cfg, x, t, ctx, run=M.RunOptions(block_fn=block_fn, block_hook=hook))
    return out, cap["in"], cap["out"]


def _e_e0(params, cfg, t: float):
    """The time embedding e [dim] and modulation e0 [6 * dim] of one timestep, float64, from the formulas:
    sinusoid [cos | sin](t * 10000^(-i/half)) -> Linear -> SiLU -> Linear = e;  SiLU -> Linear = e0."""
    P = {k: v.double() for k, v in params.items()}
    half = cfg.freq_dim // 2
    arg = t * torch.tensor([10000.0 ** (-i / half) for i in range(half)], dtype=torch.float64)
    emb = torch.cat([arg.cos(), arg.sin()])
    h = P["time_embedding.0.weight"] @ emb + P["time_embedding.0.bias"]
    e = P["time_embedding.2.weight"] @ (h * torch.sigmoid(h)) + P["time_embedding.2.bias"]
    e0 = P["time_projection.1.weight"] @ (e * torch.sigmoid(e)) + P["time_projection.1.bias"]
    return e, e0


def _rel_l1(a, b) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


# ----------------------------------------------------------------------------------------------------------
# nothing skipped: exactly the uncached result


@pytest.mark.parametrize("coefficients", ["wan2.1-t2v-1.3b", (1.0, -1.0), "identity"])
@pytest.mark.parametrize("guided", [False, True])
def test_threshold_zero_never_skips_and_is_exact(coefficients, guided):
    # (1.0, -1.0): p(d) = d - 1 < 0 here; a negative estimate counts as 0, so threshold 0 still never skips
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    neg = torch.randn(1, 5, cfg.text_dim, generator=g) if guided else None
    kw = dict(noise=x, context=ctx, neg_context=neg, guidance=4.0, steps=8, shift=3.0)
    ref = sample(params, cfg, **kw)
    tc = TeaCache(TeaCacheConfig(0.0, warmup_steps=0, coefficients=coefficients), branches=2 if guided else 1)
    out = sample(params, cfg, **kw, forward_fn=tc.wrap(M.forward))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    st = tc.stats()
    assert tc.skipped == 0 and st["calls"] == 8 and st["branch_calls"] == 8 * (2 if guided else 1)


def test_threshold_zero_is_exact_for_flashi2v():
    cfg, params, g = _model(i2v="flashi2v")
    x, ctx = _inputs(cfg, g)
    s = torch.randn(1, cfg.in_dim, 1, 6, 8, generator=g)
    kw = dict(noise=x, context=ctx, neg_context=torch.zeros(1, 3, cfg.text_dim), guidance=3.0, steps=8, cond_image_latent=s)
    tc = TeaCache(0.0, branches=2)
    torch.testing.assert_close(sample(params, cfg, **kw, forward_fn=tc.wrap(M.forward)), sample(params, cfg, **kw), rtol=0, atol=0)
    assert tc.skipped == 0


# ----------------------------------------------------------------------------------------------------------
# a huge threshold: every step after warm-up is skipped, and a skip is input + residual through the head


@pytest.mark.parametrize("steps_known", [False, True])
def test_huge_threshold_skips_every_step_after_warmup(steps_known):
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    neg = torch.randn(1, 4, cfg.text_dim, generator=g)
    tc = TeaCache(TeaCacheConfig(1e9, warmup_steps=3), branches=2, steps=10 if steps_known else None)
    sample(params, cfg, noise=x, context=ctx, neg_context=neg, guidance=5.0, steps=10, forward_fn=tc.wrap(M.forward))
    want = list(range(3, 9 if steps_known else 10))  # with steps known the last step (9) always runs
    st = tc.stats()
    assert st["skipped_steps"] == [want, want] and tc.skipped == 2 * len(want)
    assert st["step"] == [9, 9] and st["skip_fraction"] == pytest.approx(len(want) / 10)


def test_skipped_call_is_input_plus_cached_residual_through_the_head():
    cfg, params, g = _model()
    x0, ctx_c = _inputs(cfg, g)
    ctx_u = torch.randn_like(ctx_c)
    ctx = torch.cat([ctx_u, ctx_c])  # CFG batch: chunk 0 unconditional, chunk 1 conditional
    tc = TeaCache(TeaCacheConfig(1e9, warmup_steps=1, coefficients="identity"), branches=2)
    f = tc.wrap(M.forward)

    x = torch.cat([x0, x0])
    t = torch.tensor([900.0, 900.0])
    ref, b_in, b_out = _manual(params, cfg, x, t, ctx)
    torch.testing.assert_close(f(params, cfg, x, t, ctx), ref, rtol=0, atol=0)  # warm-up: the blocks run
    res = b_out - b_in
    assert (res[0] - res[1]).abs().max() > 1e-3  # the branches' residuals differ: a swap would be seen

    for step, tv in enumerate([700.0, 450.0], start=1):
        xk = torch.randn(x.shape, generator=g)
        tk = torch.tensor([tv, tv])
        out = f(params, cfg, xk, tk, ctx)
        assert tc.skipped == 2 * step
        want, _, _ = _manual(params, cfg, xk, tk, ctx, res=res)  # block-0 input of this call + the stored residual
        torch.testing.assert_close(out, want, rtol=0, atol=0)
        swapped, _, _ = _manual(params, cfg, xk, tk, ctx, res=res.flip(0))
        assert (out - swapped).abs().max() > 1e-4
        uncached, _, _ = _manual(params, cfg, xk, tk, ctx)
        assert (out - uncached).abs().max() > 1e-4  # really skipped


def test_block_hook_is_not_called_on_a_skipped_call():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    seen = []
    run = M.RunOptions(block_hook=lambda i, kind, h: seen.append(i))
    f = TeaCache(TeaCacheConfig(1e9, warmup_steps=1), branches=1).wrap(M.forward)
    f(params, cfg, x, torch.tensor([800.0]), ctx, run=run)
    assert seen == list(range(cfg.num_layers))
    f(params, cfg, x, torch.tensor([600.0]), ctx, run=run)
    assert seen == list(range(cfg.num_layers))


# ----------------------------------------------------------------------------------------------------------
# the accumulator: worked out by hand; each branch its own


@pytest.mark.parametrize("signal", ["e0", "e"])
def test_accumulator_follows_the_polynomial_per_branch(signal):
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g, batch=2)
    coeffs = (3.0, -2.0, 0.5, 0.01)
    tc = TeaCache(TeaCacheConfig(1e9, warmup_steps=2, coefficients=coeffs, signal=signal), branches=2)
    f = tc.wrap(M.forward)
    ts = [(950.0, 990.0), (900.0, 700.0), (820.0, 690.0), (600.0, 420.0), (590.0, 100.0)]  # (uncond, cond) per call
    for tu, tcnd in ts:
        f(params, cfg, x, torch.tensor([tu, tcnd]), ctx)
    st = tc.stats()
    for b in range(2):
        sig = [_e_e0(params, cfg, pair[b])[0 if signal == "e" else 1] for pair in ts]
        d = [_rel_l1(sig[k], sig[k - 1]) for k in range(1, len(ts))]
        poly = [sum(c * dk ** (len(coeffs) - 1 - j) for j, c in enumerate(coeffs)) for dk in d]
        acc = sum(max(0.0, p) for p in poly[1:])  # d of steps 1..4; steps 0-1 are warm-up
        assert st["accumulated"][b] == pytest.approx(acc, rel=1e-5)
        assert st["skipped_steps"][b] == [2, 3, 4]
    assert st["accumulated"][0] != pytest.approx(st["accumulated"][1], rel=1e-3)


def test_reset_when_the_accumulator_reaches_the_threshold():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    ts = [999.0, 950.0, 900.0, 850.0, 800.0, 750.0, 700.0, 650.0]
    e0 = [_e_e0(params, cfg, t)[1] for t in ts]
    d = [_rel_l1(e0[k], e0[k - 1]) for k in range(1, len(ts))]
    thr = 2.5 * sum(d) / len(d)  # about every third step runs
    tc = TeaCache(TeaCacheConfig(thr, warmup_steps=1, coefficients="identity"), branches=1)
    f = tc.wrap(M.forward)
    for t in ts:
        f(params, cfg, x, torch.tensor([t]), ctx)
    acc, want = 0.0, []  # the rule by hand
    for k in range(1, len(ts)):
        acc += d[k - 1]
        if acc < thr:
            want.append(k)
        else:
            acc = 0.0
    assert 0 < len(want) < len(ts) - 1
    assert tc.stats()["skipped_steps"] == [want]
    assert tc.stats()["accumulated"][0] == pytest.approx(acc, rel=1e-5, abs=1e-12)


def test_mixed_decision_runs_the_blocks_for_every_branch():
    """Branches whose timesteps differ may disagree; the blocks then run for the whole batch (exact result) and
    both branches restart their accumulators."""
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g, batch=2)
    tc = TeaCache(TeaCacheConfig(0.05, warmup_steps=1, coefficients="identity"), branches=2)
    f = tc.wrap(M.forward)
    f(params, cfg, x, torch.tensor([900.0, 900.0]), ctx)
    t = torch.tensor([300.0, 899.9])  # branch 0 moves far, branch 1 hardly at all
    out = f(params, cfg, x, t, ctx)
    torch.testing.assert_close(out, M.forward(params, cfg, x, t, ctx), rtol=0, atol=0)
    st = tc.stats()
    assert tc.skipped == 0 and st["accumulated"] == [0.0, 0.0]


def test_decision_ignores_the_latents():
    """The decision depends on t (through e0) only: different noise, same skipped steps (what keeps SP ranks,
    which hold different rows of the stream, in agreement)."""
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    got = []
    for seed in (1, 2):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        tc = TeaCache(TeaCacheConfig(0.3, warmup_steps=2, coefficients="wan2.1-t2v-14b"), branches=1, steps=16)
        sample(params, cfg, noise=noise, context=ctx, steps=16, forward_fn=tc.wrap(M.forward))
        got.append(tc.stats()["skipped_steps"])
    assert got[0] == got[1] and got[0] != [[]]


def test_a_rising_timestep_starts_a_new_trajectory():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    tc = TeaCache(TeaCacheConfig(0.4, warmup_steps=2, coefficients="identity"), branches=1, steps=10)
    f = tc.wrap(M.forward)
    a = sample(params, cfg, noise=x, context=ctx, steps=10, forward_fn=f)
    first = tc.stats()["skipped_steps"][0]
    b = sample(params, cfg, noise=x, context=ctx, steps=10, forward_fn=f)
    assert first and tc.stats()["skipped_steps"][0] == first + first
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    tc.reset()
    assert tc.stats()["calls"] == 0 and tc.skipped == 0 and tc.stats()["step"] == [-1]


def test_a_repeated_timestep_is_the_same_step():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    tc = TeaCache(TeaCacheConfig(1e9, warmup_steps=2), branches=1)
    f = tc.wrap(M.forward)
    for t in (900.0, 900.0, 800.0, 800.0, 700.0):
        f(params, cfg, x, torch.tensor([t]), ctx)
    st = tc.stats()
    assert st["step"] == [2] and st["calls"] == 5 and st["skipped_steps"] == [[2]]


def _sp_setup():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g, T=2, H=10, W=12)  # token grid 2 x 5 x 6 (Skiparse pads it), split over the ranks
    neg = torch.randn(1, 3, cfg.text_dim, generator=g)
    kw = dict(noise=x, context=ctx, neg_context=neg, guidance=4.0, steps=12)
    return cfg, params, kw, TeaCacheConfig(0.6, warmup_steps=2, coefficients="identity")


def _ranks_sample(rank, world, S, U):
    from ospfn.parallel import ParallelConfig, init_parallel

    cfg, params, kw, tcfg = _sp_setup()
    st = init_parallel(ParallelConfig(skiparse_sp=S, ulysses_sp=U))
    tc = TeaCache(tcfg, branches=2, steps=12)
    out = sample(params, cfg, **kw, run=M.RunOptions(parallel=st), forward_fn=tc.wrap(M.forward))
    return out, tc.stats()["skipped_steps"]


@pytest.mark.parametrize("S, U", [(2, 1)])
def test_sequence_parallel_ranks_skip_alike_and_match_one_process(S, U):
    from dist_harness import run_ranks

    cfg, params, kw, tcfg = _sp_setup()
    tc = TeaCache(tcfg, branches=2, steps=12)
    ref = sample(params, cfg, **kw, forward_fn=tc.wrap(M.forward))
    want = tc.stats()["skipped_steps"]
    assert want[0] and want[0] == want[1]
    for out, skipped in run_ranks(_ranks_sample, 2, S, U):
        assert skipped == want
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# presets and input checks


def test_presets_and_rescale():
    assert rescale((2.0, -1.0, 0.5), 0.1) == pytest.approx(0.42)
    assert rescale(PRESETS["identity"][0], 0.37) == 0.37
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-480p", "wan2.1-i2v-720p"):
        assert PRESETS[name][1] == "e0" and PRESETS[name + "-temb"][1] == "e"
        assert len(PRESETS[name][0]) == 5 and all(math.isfinite(c) for c in PRESETS[name][0])
    c = TeaCacheConfig(0.1)
    assert c.coefficients == "wan2.1-t2v-1.3b" and c.warmup_steps == 5 and c.resolved_signal == "e0"
    assert TeaCacheConfig(0.1, coefficients="wan2.1-i2v-720p-temb").resolved_signal == "e"
    assert TeaCacheConfig(0.1, coefficients=[1, 0]).polynomial == (1.0, 0.0)


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(threshold=-0.1), ValueError, "threshold"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(threshold=True), ValueError, "threshold"),
        (dict(threshold=0.1, warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(threshold=0.1, warmup_steps=2.0), ValueError, "warmup_steps"),
        (dict(threshold=0.1, coefficients="wan2.2"), ValueError, "unknown coefficients preset"),
        (dict(threshold=0.1, coefficients=()), ValueError, "non-empty"),
        (dict(threshold=0.1, coefficients=(1.0, float("inf"))), ValueError, "finite"),
        (dict(threshold=0.1, coefficients=1.0), TypeError, "coefficients"),
        (dict(threshold=0.1, signal="x"), ValueError, "signal"),
        (dict(threshold=0.1, coefficients="wan2.1-t2v-14b", signal="e"), ValueError, "fitted on signal 'e0'"),
    ],
)
def test_config_errors(kw, err, match):
    with pytest.raises(err, match=match):
        TeaCacheConfig(**kw)


def test_call_errors():
    cfg, params, g = _model()
    x, ctx = _inputs(cfg, g)
    with pytest.raises(TypeError, match="config"):
        TeaCache("0.1", branches=1)
    with pytest.raises(ValueError, match="branches"):
        TeaCache(0.1, branches=0)
    with pytest.raises(ValueError, match="steps"):
        TeaCache(0.1, branches=1, steps=0)
    with pytest.raises(TypeError, match="forward_fn"):
        TeaCache(0.1, branches=1).wrap(None)
    f = TeaCache(0.1, branches=2).wrap(M.forward)
    with pytest.raises(ValueError, match="branches=2"):
        f(params, cfg, x, torch.tensor([500.0]), ctx)
    f = TeaCache(0.1, branches=1).wrap(M.forward)
    with pytest.raises(ValueError, match="already carries a cache"):
        f(params, cfg, x, torch.tensor([500.0]), ctx, run=M.RunOptions(cache=object()))
    ignoring = TeaCache(0.1, branches=1).wrap(lambda p, c, x, t, ctx, *, image=None, run=None: M.forward(p, c, x, t, ctx))
    with pytest.raises(RuntimeError, match="never consulted"):
        ignoring(params, cfg, x, torch.tensor([500.0]), ctx)
    with pytest.raises(TypeError, match="before_blocks"):
        M.forward(params, cfg, x, torch.tensor([500.0]), ctx, run=M.RunOptions(cache=object()))


def test_a_pipeline_default_teacache_applies_unless_the_call_says_otherwise():
    """defaults["teacache"] (an export's sample.teacache) is what generate uses without teacache=; 0 turns it off."""
    import dataclasses

    from ospfn.io import read_image
    from ospfn.pipeline import BUNDLED, load_pipeline

    pipe = load_pipeline()
    image = read_image(str(BUNDLED / "example.png"))
    prompt = (BUNDLED / "example.txt").read_text().strip()
    cached = dataclasses.replace(pipe, defaults={**pipe.defaults, "teacache": {"threshold": 0.5, "warmup_steps": 2, "coefficients": "identity"}})
    a = cached.generate(prompt, image, steps=8, seed=1)
    assert cached.last_info["teacache"] is not None and cached.last_info["teacache_skipped"] > 0
    from ospfn.sched.teacache import TeaCacheConfig

    b = pipe.generate(prompt, image, steps=8, seed=1, teacache=TeaCacheConfig(threshold=0.5, warmup_steps=2, coefficients="identity"))
    assert torch.equal(a, b)
    off = cached.generate(prompt, image, steps=8, seed=1, teacache=0)
    assert cached.last_info["teacache_skipped"] == 0 and torch.equal(off, pipe.generate(prompt, image, steps=8, seed=1))
