"""Group advantages and the clipped GRPO objective (docs/rl.md#advantages, docs/rl.md#objective) against plain
Python references, finite differences (gradcheck) and the clipping rule; and the runnable example of docs/rl.md."""

import doctest
import math
import statistics
from pathlib import Path

import pytest
import torch

from ospfn.rl import (
    combine_rewards,
    group_advantages,
    grpo_loss,
    kl_penalty,
    loss_scale,
    nonzero_advantage_mask,
    ppo_loss,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def py_advantages(rewards, k, eps=1e-4, global_std=False, clip=5.0):
    out = []
    all_std = statistics.stdev(rewards)
    for g in range(len(rewards) // k):
        grp = rewards[g * k:(g + 1) * k]
        m = statistics.fmean(grp)
        sd = all_std if global_std else statistics.stdev(grp)
        for r in grp:
            a = 0.0 if len(set(grp)) == 1 else (r - m) / (sd + eps)
            out.append(a if clip is None else max(-clip, min(clip, a)))
    return out


REWARDS = [0.3, 1.7, -0.2, 0.9, 5.0, 5.0, 5.0, 5.0, 2.0, 2.5, 1.0, 100.0]


@pytest.mark.parametrize("k", [2, 4, 6, 12])
@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("clip,eps", [(5.0, 1e-4), (None, 1e-8), (1.0, 0.0)])
def test_group_advantages_against_python(k, global_std, clip, eps):
    got = group_advantages(torch.tensor(REWARDS), k, eps=eps, global_std=global_std, clip=clip).tolist()
    want = py_advantages(REWARDS, k, eps=eps, global_std=global_std, clip=clip)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_group_advantages_details():
    adv = group_advantages(torch.tensor(REWARDS), 4)
    assert adv[4:8].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards: exactly 0
    # 100 in a group (2, 2.5, 1, 100): z-score below 5, so not clipped; a clip of 1 does clip it
    assert 1.0 < float(adv[11]) < 5.0 and float(group_advantages(torch.tensor(REWARDS), 4, clip=1.0)[11]) == 1.0
    # one 1 among 29 zeros: (1 - 1/30) / sqrt(1/30) = 5.29 > 5, clipped
    assert float(group_advantages(torch.tensor([0.0] * 29 + [1.0]), 30)[29]) == 5.0
    assert group_advantages(torch.tensor([1, 2, 3, 4]), 2).dtype == torch.float32  # int rewards accepted


def test_combine_rewards_two_aggregations():
    ra = [0.3, 1.7, -0.2, 0.9, 5.0, 5.0, 4.0, 5.5]
    rb = [10.0, 9.0, 8.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    rewards = {"a": torch.tensor(ra), "b": torch.tensor(rb)}
    wa, wb = 2.0, 1.0
    na, nb = wa / 3, wb / 3  # weights normalised to sum 1
    adv = combine_rewards(rewards, {"a": wa, "b": wb}, group_size=4).tolist()
    aa, ab = py_advantages(ra, 4, clip=None), py_advantages(rb, 4, clip=None)
    assert adv == pytest.approx([max(-5, min(5, na * x + nb * y)) for x, y in zip(aa, ab)], rel=1e-5, abs=1e-6)
    adv_r = combine_rewards(rewards, {"a": wa, "b": wb}, group_size=4, mode="reward_aggr").tolist()
    assert adv_r == pytest.approx(py_advantages([na * x + nb * y for x, y in zip(ra, rb)], 4), rel=1e-5, abs=1e-6)
    assert adv != pytest.approx(adv_r, rel=1e-3)  # the two modes differ
    raw = combine_rewards(rewards, {"a": wa, "b": wb}, group_size=4, normalize_weights=False, clip=None).tolist()
    assert raw == pytest.approx([wa * x + wb * y for x, y in zip(aa, ab)], rel=1e-5, abs=1e-6)
    # no weights: equal weights; one reward: plain group advantages
    assert combine_rewards(rewards, None, group_size=4).tolist() == pytest.approx(
        combine_rewards(rewards, {"a": 1.0, "b": 1.0}, group_size=4).tolist())
    assert torch.equal(combine_rewards({"a": rewards["a"]}, group_size=2), group_advantages(rewards["a"], 2))


def test_zero_advantage_mask():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.5, 2.0, 3.0, 3.0]), 2)
    assert nonzero_advantage_mask(adv).tolist() == [False, False, True, True, False, False]


# ----------------------------------------------------------------------------------------------------------
# the PPO objective


def py_ppo(lp_new, lp_old, adv, eps):
    terms = []
    for n, o, a in zip(lp_new, lp_old, adv):
        r = math.exp(n - o)
        terms.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
    return sum(terms) / len(terms)


def test_ppo_loss_value_and_stats():
    # inside the clip range, on the unclipped sides, and on the clipped sides (the last two)
    lp_old = [0.1, -0.3, 0.25, 0.0, 0.7, 0.2, -0.1]
    lp_new = [0.1002, -0.31, 0.25, 0.05, 0.69995, 0.25, -0.15]
    adv = [1.0, -2.0, 0.5, -1.0, 3.0, 1.0, -2.0]
    eps = 1e-3
    loss, st = ppo_loss(torch.tensor(lp_new, dtype=torch.float64), torch.tensor(lp_old, dtype=torch.float64),
                        torch.tensor(adv, dtype=torch.float64), eps, scale=0.25)
    assert float(loss) == pytest.approx(0.25 * py_ppo(lp_new, lp_old, adv, eps), rel=1e-12)
    ratios = [math.exp(n - o) for n, o in zip(lp_new, lp_old)]
    assert float(st["clip_frac"]) == pytest.approx(sum(abs(r - 1) > eps for r in ratios) / 7) == 4 / 7
    assert float(st["ratio_mean"]) == pytest.approx(sum(ratios) / 7, rel=1e-12)
    assert float(st["approx_kl"]) == pytest.approx(0.5 * sum((n - o) ** 2 for n, o in zip(lp_new, lp_old)) / 7, rel=1e-9)
    assert all(not t.requires_grad for t in st.values())


def test_ppo_loss_gradient_by_finite_differences():
    torch.manual_seed(0)
    lp_old = torch.randn(6, dtype=torch.float64)
    adv = torch.tensor([1.5, -0.7, 2.0, -3.0, 0.2, -1.0], dtype=torch.float64)
    # inside the clip range (|ratio - 1| < eps) and on both unclipped sides: no kinks near these points
    offsets = torch.tensor([0.02, 0.03, -0.04, -0.05, 0.0, 0.01], dtype=torch.float64)
    for eps in (0.1, 0.3):
        lp_new = (lp_old + offsets).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: ppo_loss(x, lp_old, adv, eps, scale=0.5)[0], (lp_new,))
    lp_new = (lp_old + torch.tensor([-0.5, 0.5, -0.6, 0.4, 0.3, 0.45], dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ppo_loss(x, lp_old, adv, 0.1)[0], (lp_new,))


def test_ppo_clipping_zeroes_the_gradient_on_the_clipped_side():
    eps = 1e-4
    lp_old = torch.zeros(4, dtype=torch.float64)
    # ratio above 1 + eps with A > 0, below 1 - eps with A < 0: clipped (no gradient)
    # ratio below 1 - eps with A > 0, above 1 + eps with A < 0: unclipped (gradient -A * ratio / B)
    d = torch.tensor([0.01, -0.01, -0.01, 0.01], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    lp_new = d.clone().requires_grad_(True)
    loss, st = ppo_loss(lp_new, lp_old, adv, eps)
    loss.backward()
    g = lp_new.grad.tolist()
    assert g[0] == 0.0 and g[1] == 0.0
    assert g[2] == pytest.approx(-1.0 * math.exp(-0.01) / 4) and g[3] == pytest.approx(1.0 * math.exp(0.01) / 4)
    assert float(st["clip_frac"]) == 1.0
    # no gradient to the old log-probs or the advantages (constants)
    lo, a = torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)
    ln = torch.zeros(2, requires_grad=True)
    ppo_loss(ln, lo, a)[0].backward()
    assert lo.grad is None and a.grad is None and ln.grad is not None


def test_kl_penalty():
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(3, 4, 5, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    assert kl_penalty(m, m.clone(), 0.3).tolist() == [0.0, 0.0, 0.0]
    want = [sum((a - b) ** 2 for a, b in zip(x, y)) / 20 / (2 * 0.3**2) for x, y in zip(m.flatten(1).tolist(), r.flatten(1).tolist())]
    assert kl_penalty(m, r, 0.3).tolist() == pytest.approx(want, rel=1e-12)
    std = torch.tensor([0.3, 0.6, 1.0], dtype=torch.float64)
    assert kl_penalty(m, r, std).tolist() == pytest.approx([w * 0.09 / s**2 for w, s in zip(want, [0.3, 0.6, 1.0])], rel=1e-12)
    # its gradient in mean_new by finite differences
    mu = m.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kl_penalty(x, r, 0.3), (mu,))


def test_loss_scale_and_grpo_loss():
    assert loss_scale(3, 4) == 1 / 12 and loss_scale(1, 1) == 1.0
    lp_old = torch.tensor([0.0, 0.1, -0.2], dtype=torch.float64)
    lp_new = lp_old + torch.tensor([1e-5, -3e-4, 2e-4], dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    m = torch.randn(3, 8, dtype=torch.float64)
    mr = m + 0.01
    loss, st = grpo_loss(lp_new, lp_old, adv, mean_new=m, mean_ref=mr, std=0.2, beta=0.004, scale=loss_scale(2, 5))
    policy, _ = ppo_loss(lp_new, lp_old, adv)
    kl = float(kl_penalty(m, mr, 0.2).mean())
    assert kl == pytest.approx(0.01**2 / (2 * 0.04))
    assert float(loss) == pytest.approx((float(policy) + 0.004 * kl) / 10, rel=1e-12)
    assert float(st["kl"]) == pytest.approx(kl) and float(st["policy_loss"]) == pytest.approx(float(policy))
    loss0, st0 = grpo_loss(lp_new, lp_old, adv)
    assert float(loss0) == pytest.approx(float(policy)) and float(st0["kl"]) == 0.0


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: group_advantages(torch.ones(6), 4), ValueError, r"group_size must be an int >= 2 that divides the batch \(6\), got 4"),
        (lambda: group_advantages(torch.ones(6), 1), ValueError, r"group_size must be an int >= 2"),
        (lambda: group_advantages(torch.ones(2, 2), 2), TypeError, r"rewards must be a 1-D real tensor \[B\]"),
        (lambda: group_advantages(torch.tensor([1.0, float("nan")]), 2), ValueError, r"rewards must be finite"),
        (lambda: group_advantages(torch.ones(4), 2, eps=-1.0), ValueError, r"eps must be a finite number in \[0, inf\), got -1.0"),
        (lambda: group_advantages(torch.ones(4), 2, clip=0.0), ValueError, r"clip must be a finite number in \(0, inf\)"),
        (lambda: combine_rewards({}, group_size=2), TypeError, r"rewards must be a non-empty mapping"),
        (lambda: combine_rewards({"a": torch.ones(4)}, {"b": 1.0}, group_size=2), ValueError, r"weights must name exactly the rewards \['a'\]"),
        (lambda: combine_rewards({"a": torch.ones(4)}, {"a": -1.0}, group_size=2), ValueError, r"weights\['a'\] must be a finite number in \[0, inf\)"),
        (lambda: combine_rewards({"a": torch.ones(4)}, {"a": 0.0}, group_size=2), ValueError, r"the weights must not all be 0"),
        (lambda: combine_rewards({"a": torch.ones(4), "b": torch.ones(2)}, group_size=2), ValueError, r"the same batch size"),
        (lambda: combine_rewards({"a": torch.ones(4)}, group_size=2, mode="sum"), ValueError, r"mode must be one of \('advantage_aggr', 'reward_aggr'\), got 'sum'"),
        (lambda: ppo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3)), ValueError, r"must have one batch size"),
        (lambda: ppo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.0), ValueError, r"clip_range must be a finite number in \(0, 1\), got 0.0"),
        (lambda: ppo_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0)), ValueError, r"the batch is empty"),
        (lambda: kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), 0.0), ValueError, r"std must be a finite number in \(0, inf\), got 0.0"),
        (lambda: kl_penalty(torch.zeros(2, 3), torch.zeros(2, 4), 1.0), ValueError, r"mean_new and mean_ref must have one shape"),
        (lambda: loss_scale(0, 3), ValueError, r"grad_accum must be an int >= 1, got 0"),
        (lambda: grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), mean_ref=torch.zeros(2, 3)), ValueError, r"the KL term needs mean_new"),
    ],
)
def test_bad_inputs(call, exc, msg):
    with pytest.raises(exc, match=msg):
        call()


def test_docs_rl_example_runs():
    """The >>> examples of docs/rl.md (an end-to-end window -> rollout -> advantages -> loss example)."""
    text = (ROOT / "docs" / "rl.md").read_text(encoding="utf-8")
    examples = doctest.DocTestParser().get_examples(text)
    assert len(examples) >= 5
    test = doctest.DocTest(examples, {}, "docs/rl.md", str(ROOT / "docs" / "rl.md"), 0, None)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    out = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
