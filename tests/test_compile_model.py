"""torch.compile of the functional DiT: one graph, no graph breaks, compiled == eager, forward and backward.

Every model mode is traced by dynamo end to end (``torch._dynamo.explain``: exactly one graph, zero breaks)
and compiled with ``fullgraph=True`` (which raises on any break) by dynamo's ``aot_eager`` backend: the
traced graph (forward and AOT-autograd backward) run by eager kernels, which must equal eager bit for bit.
Inductor (the default backend, code generation) is exercised on one Skiparse FlashI2V forward: it may fuse
and reorder fp32 arithmetic, so it agrees to fp32 rounding.  (Inductor compiles C++ per kernel, tens of
seconds per model graph on 2 cores, so the suite runs it once; per-block inductor compilation in training
is covered by tests/test_train_compile.py.)
"""

import pytest
import torch
import torch._dynamo

import ospfn.model as M
from ospfn.nn import DiT

MODES = {
    "full": dict(skiparse_model_type="full"),
    "dual_end": {},
    "flashi2v": dict(i2v="flashi2v"),
    "hif8": dict(quant="hif8"),
    "hif8_attn": dict(quant="hif8", quant_attn="hif8"),
}


def _setup(mode, seed=0):
    cfg = M.DiTConfig.preset("tiny", num_layers=2, num_full_blocks=0, **MODES[mode])  # token, group
    g = torch.Generator().manual_seed(seed)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in M.init_params(cfg).items()}
    x = torch.randn(2, cfg.in_dim, 2, 10, 14, generator=g)  # token grid 2 x 5 x 7: Skiparse pads it
    t = torch.tensor([937.0, 241.5])
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    kw = {}
    if cfg.i2v == "flashi2v":
        kw = dict(image=M.ImageCond(latent=torch.randn(2, cfg.in_dim, 1, 10, 14, generator=g), fourier_ratio=0.3))
    return cfg, params, (x, t, ctx), kw


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_is_one_graph_and_compiles(mode):
    cfg, params, args, kw = _setup(mode)
    fn = lambda p, x, t, c: M.forward(p, cfg, x, t, c, **kw)  # noqa: E731
    ex = torch._dynamo.explain(fn)(params, *args)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    eager = fn(params, *args)
    exact = torch.compile(fn, backend="aot_eager", fullgraph=True)(params, *args)
    torch.testing.assert_close(exact, eager, rtol=0, atol=0)
    if mode == "flashi2v":
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)(params, *args)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["dual_end", "hif8_attn"])
def test_training_step_backward_compiles(mode):
    """Loss and gradients of a training step through the compiled forward equal eager ones."""
    cfg, params, (x, t, ctx), kw = _setup(mode)
    target = torch.randn_like(x)

    def loss_fn(p):
        return (M.forward(p, cfg, x, t, ctx, **kw) - target).square().mean()

    def grads(fn):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = fn(p)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in p.items()}

    ex = torch._dynamo.explain(loss_fn)({k: v.clone().requires_grad_() for k, v in params.items()})
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    loss0, g0 = grads(loss_fn)
    loss1, g1 = grads(torch.compile(loss_fn, backend="aot_eager", fullgraph=True))
    assert torch.equal(loss1, loss0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=0, atol=0, msg=k)


def test_module_block_compiles_alone():
    """``model.blocks[i].compile()``: the compiled region is one block (re-layouts stay outside), one graph."""
    cfg, params, args, _ = _setup("dual_end")
    net = DiT(cfg, params)
    eager = net(*args)
    for block in net.blocks_list:
        block.compile(backend="aot_eager", fullgraph=True)
    assert torch.equal(net(*args), eager)
    # one block on its own is one graph without breaks
    import ospfn.model.dit as dit

    seen = []
    real = dit.dit_block

    def capture(x, p, bc, lay):
        seen.append((x, bc, lay))
        return real(x, p, bc, lay)

    dit.dit_block = capture
    try:
        M.forward(params, cfg, *args)
    finally:
        dit.dit_block = real
    x, bc, lay = seen[1]  # a Skiparse (group) block
    block = DiT(cfg, params).blocks_list[1]
    ex = torch._dynamo.explain(block)(x, bc, lay)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["dual_end", "flashi2v"])
def test_triton_backend_compiles_on_cuda(mode):
    cfg, params, args, kw = _setup(mode)
    params = {k: v.cuda() for k, v in params.items()}
    args = tuple(a.cuda() for a in args)
    if "image" in kw:
        kw = dict(image=M.ImageCond(latent=kw["image"].latent.cuda(), fourier_ratio=0.3))
    fn = lambda p, x, t, c: M.forward(p, cfg, x, t, c, run=M.RunOptions(attn_backend="triton"), **kw)  # noqa: E731
    eager = fn(params, *args)
    compiled = torch.compile(fn, fullgraph=True)(params, *args)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)
