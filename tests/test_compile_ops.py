"""torch.compile over the ops: no graph breaks, inductor output equal to eager, and ``torch.library.opcheck``.

* Every public op of ``ospfn.ops`` that computes on tensors, with every backend that runs here (``ref``,
  ``cpp``, ``torch``; ``triton`` under the interpreter on CPU, on CUDA on a GPU machine): ``torch._dynamo.explain``
  finds one graph and no graph break.
* ``torch.compile(fullgraph=True)`` with inductor gives what eager gives: bit for bit for the HiF8 ops, within
  fp32 rounding for attention / Fourier / RoPE; forward and backward for the autograd ops (hif8_linear,
  hif8_fake_quant, attention, hif8_matmul w.r.t. x and bias).  Inductor compiles are the expensive part (C++
  codegen on CPU), so the ops of one family share one compiled function per backend; each output is compared
  separately.  The ``triton`` versions of these compile tests need a GPU (``cuda`` marker).
* The compiled ops themselves: ``torch.ops.ospfn.*`` (C++, Meta and Autograd kernels in csrc/ops/hif8_ops.cpp)
  and ``torch.ops.ospfn_triton.*`` (``torch.library.custom_op`` in kernels/) pass ``torch.library.opcheck``:
  schema, fake (meta) implementation against the real one, autograd registration, and AOT dispatch with
  dynamic shapes.  The Triton ones run under the interpreter on CPU (fp32 / fp16 only: its bf16 ``tl.dot`` is
  wrong, so bf16 never reaches a dot here).

Backend dispatch loads triton implementations lazily (``importlib`` inside ``ospfn.backends``), which dynamo
cannot trace: each case runs once eagerly before it is traced, as any first call of a model would.
"""

import functools
import math

import pytest
import torch
import torch._inductor.config
from conftest import backend_device

import ospfn
from ospfn import ops
from ospfn.backends import implementations, info

# dynamo traces through functools.lru_cache-wrapped helpers (cached tables, backend probes) and says so once
# per function; the tables are rebuilt inside the graph, which is correct (and cheap at these sizes)
pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call to a:UserWarning")

CPU_BACKENDS = ("ref", "cpp", "torch")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _runs_here(backend: str) -> bool:
    if not info(backend).available:
        return False
    return backend in CPU_BACKENDS or (backend == "triton" and ospfn.backends.interpreting())


def _backends(op: str) -> list[str]:
    return [b for b in implementations(op) if _runs_here(b)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32, dev="cpu", grad=False) -> torch.Tensor:
    t = (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype).to(dev)
    return t.requires_grad_() if grad else t


def _special(dev="cpu") -> torch.Tensor:
    """fp32 [5, 12]: random values over many binades plus zeros, a tie, a tiny and an overflowing value."""
    x = torch.randn(5, 12, generator=_gen(1)) * torch.logspace(-6, 4, 12)
    x[0, :6] = torch.tensor([0.0, -0.0, 1.125, 3e-8, 50000.0, -2.0**-23])
    return x.to(dev)


# ----------------------------------------------------------------------------------------------------------
# one call per public op: fn(*args), for one backend (None where the op has no backend argument)

GRID, RATIO = (2, 5, 6), 2  # Skiparse grid (T, H, W) padded to (8, 8) by ratio 2


def _case(name: str, be, dev):
    x = _special(dev)
    if name == "hif8_encode":
        return lambda x: ops.hif8_encode(x, backend=be), (x.double(),)
    if name == "hif8_decode":
        return lambda c: ops.hif8_decode(c, torch.bfloat16, backend=be), (torch.arange(256, dtype=torch.uint8, device=dev),)
    if name == "hif8_round":
        return lambda x: ops.hif8_round(x, backend=be), (x.to(torch.bfloat16),)
    if name == "hif8_quantize":
        return (lambda x, a: (ops.hif8_quantize(x, 15.0, backend=be),
                              ops.hif8_quantize(x, 224.0, granularity="row", backend=be),
                              ops.hif8_quantize(x, amax=a, backend=be)), (x, x.abs().amax()))  # fmt: skip
    if name == "hif8_amax":
        return lambda x: (ops.hif8_amax(x), ops.hif8_amax(x, "row")), (x,)
    if name == "hif8_fake_quant":
        return lambda x: ops.hif8_fake_quant(x, backend=be), (_rand(4, 8, dev=dev, grad=True),)
    if name == "hif8_linear":
        return (lambda x, w, b: ops.hif8_linear(x, w, b, backend=be),
                (_rand(2, 3, 8, seed=2, dev=dev, grad=True), _rand(4, 8, seed=3, dev=dev, grad=True),
                 _rand(4, seed=4, dev=dev, grad=True)))  # fmt: skip
    if name == "hif8_pack":
        def pack(w):
            p = ops.hif8_pack(w, granularity="row", backend=be)
            return p.codes, p.scale

        return pack, (_rand(4, 8, seed=5, dev=dev),)
    if name == "hif8_unpack":
        p = ops.hif8_pack(_rand(4, 8, seed=5, dev=dev), granularity="row")
        return lambda c, s: ops.hif8_unpack(ops.HiF8Tensor(c, s, "row", torch.float32), torch.float16), (p.codes, p.scale)
    if name == "hif8_matmul":
        p = ops.hif8_pack(_rand(4, 8, seed=5, dev=dev))
        return (lambda x, b, c, s: ops.hif8_matmul(x, ops.HiF8Tensor(c, s, "tensor", torch.float32), b, backend=be),
                (_rand(2, 3, 8, seed=6, dev=dev, grad=True), _rand(4, seed=7, dev=dev, grad=True), p.codes, p.scale))  # fmt: skip
    if name == "attention":
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[0, 5:] = False
        mask[1] = False  # an entry without any real key: zeros, not NaN
        return (lambda q, k, v, m: ops.attention(q, k, v, key_mask=m, backend=be),
                (_rand(2, 5, 2, 16, seed=8, dev=dev, grad=True), _rand(2, 7, 2, 16, seed=9, dev=dev, grad=True),
                 _rand(2, 7, 2, 16, seed=10, dev=dev, grad=True), mask.to(dev)))  # fmt: skip
    if name == "fourier_high_freq":
        return (lambda s, r: (ops.fourier_high_freq(s, 0.3, backend=be),
                              ops.fourier_high_freq(s, r, return_abs=False, backend=be)),
                (_rand(2, 3, 6, 8, seed=11, dev=dev), torch.tensor([0.1, 0.6], device=dev)))  # fmt: skip
    if name == "fourier_cutoff":
        return lambda s, r: ops.fourier_cutoff(s, r, backend=be), (_rand(2, 3, 6, 8, seed=11, dev=dev), torch.tensor([0.1, 0.6], device=dev))
    pos = ops.skiparse_positions((1, 2, 3), 1, None, device=dev)
    if name == "rope_3d":
        return lambda x, p: ops.rope_3d(x, p, backend=be), (_rand(1, 6, 2, 12, seed=12, dev=dev), pos)
    if name == "rope_cos_sin":
        return lambda p: ops.rope_cos_sin(p, 12), (pos,)
    if name == "apply_rope":
        return lambda x, c, s: ops.apply_rope(x, c, s), (_rand(1, 6, 2, 12, seed=12, dev=dev), *ops.rope_cos_sin(pos, 12))
    xs = _rand(2, math.prod(GRID), 4, seed=13, dev=dev)
    if name == "skiparse_fold":
        return lambda x: ops.skiparse_fold(x, GRID, RATIO, "group", backend=be), (xs,)
    if name == "skiparse_unfold":
        return lambda y: ops.skiparse_unfold(y, GRID, RATIO, "token", backend=be), (ops.skiparse_fold(xs, GRID, RATIO, "token"),)
    if name == "skiparse_switch":
        return lambda y: ops.skiparse_switch(y, GRID, RATIO, backend=be), (ops.skiparse_fold(xs, GRID, RATIO, "token"),)
    # key mask and positions are (cached) tables built from Python ints: traced inside a graph that uses them
    if name == "skiparse_key_mask":
        return (lambda y: y * ops.skiparse_key_mask(GRID, RATIO, "group", 2, device=y.device)[..., None],
                (ops.skiparse_fold(xs, GRID, RATIO, "group"),))  # fmt: skip
    if name == "skiparse_positions":
        return (lambda y: y + ops.skiparse_positions(GRID, RATIO, "token", device=y.device)[..., :1],
                (torch.zeros(4, 32, 1, device=dev),))  # fmt: skip
    raise KeyError(name)


# public op -> the registry op whose backends it takes (None: the op has no backend argument)
OPS = {
    "hif8_encode": "hif8_encode",
    "hif8_decode": "hif8_decode",
    "hif8_round": "hif8_round",
    "hif8_quantize": "hif8_quantize",
    "hif8_amax": None,
    "hif8_fake_quant": "hif8_quantize",
    "hif8_linear": "hif8_quantize",
    "hif8_pack": "hif8_encode",
    "hif8_unpack": None,
    "hif8_matmul": "hif8_matmul",
    "attention": "attention",
    "fourier_high_freq": "fourier_high_freq",
    "fourier_cutoff": "fourier_cutoff",
    "rope_3d": "rope_3d",
    "rope_cos_sin": None,
    "apply_rope": None,
    "skiparse_fold": "skiparse_fold",
    "skiparse_unfold": "skiparse_unfold",
    "skiparse_switch": "skiparse_switch",
    "skiparse_key_mask": None,
    "skiparse_positions": None,
}
# not computing on tensors: classes and layout arithmetic
NOT_TENSOR_OPS = {"HiF8Tensor", "SkiparseLayout", "skiparse_layout", "rope_split"}


def test_every_public_op_is_covered():
    assert set(ops.__all__) == set(OPS) | NOT_TENSOR_OPS


EXPLAIN_CASES = [
    pytest.param(name, be, id=f"{name}-{be}")
    for name, reg in OPS.items()
    for be in (_backends(reg) if reg is not None else [None])
]


@pytest.mark.parametrize("name,backend", EXPLAIN_CASES)
def test_no_graph_break(name, backend):
    dev = backend_device(backend) if backend is not None else torch.device("cpu")
    fn, args = _case(name, backend, dev)
    fn(*args)  # eager first: loads a lazily registered backend outside the trace
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args)
    reasons = [f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}" for r in e.break_reasons]
    assert e.graph_break_count == 0, f"{name} ({backend}): graph breaks: {reasons}"
    assert e.graph_count == 1, f"{name} ({backend}): {e.graph_count} graphs"


@pytest.mark.parametrize("backend", [b for b in ("ref", "cpp") if _runs_here(b)])
def test_autograd_ops_trace_with_a_cold_registry(backend):
    """The first call of a process may be a traced one: the registry's first lookups (which it caches) must not
    happen inside an autograd Function's traced forward / backward.  A second size recompiles with dynamic
    shapes (automatic dynamic)."""
    p = ops.hif8_pack(_rand(4, 8, seed=5))

    def fn(x, w, b, xm):
        return (ops.hif8_linear(x, w, b, backend=backend), ops.hif8_fake_quant(x, backend=backend),
                ops.hif8_matmul(xm, p, b, backend=backend))  # fmt: skip

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    ospfn.backends.refresh()  # forget cached probes and plans: the compiled call makes the first lookups
    for n in (3, 5):
        args = [_rand(n, 8, seed=n, grad=True), _rand(4, 8, seed=20, grad=True), _rand(4, seed=21, grad=True),
                _rand(n, 8, seed=n + 1, grad=True)]  # fmt: skip
        got_out, got_grad = _run(compiled, args)
        want_out, want_grad = _run(fn, args)
        _compare(got_out, want_out, True, f"{backend} n={n} output")
        _compare(got_grad, want_grad, True, f"{backend} n={n} gradient")


# ----------------------------------------------------------------------------------------------------------
# inductor == eager, forward and backward; the ops of a family in one compiled function per backend

FAMILIES = {
    # family: (ops in it, registry op whose backends it runs with, exact?)
    "hif8": (["hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize", "hif8_amax", "hif8_pack", "hif8_unpack",
              "hif8_fake_quant", "hif8_linear", "hif8_matmul"], "hif8_matmul", True),
    "attention": (["attention"], "attention", False),
    "fourier": (["fourier_high_freq", "fourier_cutoff"], "fourier_high_freq", False),
    "layout": (["rope_3d", "rope_cos_sin", "apply_rope", "skiparse_fold", "skiparse_unfold", "skiparse_switch",
                "skiparse_key_mask", "skiparse_positions"], "skiparse_fold", False),
}  # fmt: skip


def _family(family: str, backend: str, dev):
    """(fn, args): fn(*args) returns the flat tuple of every member's outputs; args are all members' inputs."""
    names = FAMILIES[family][0]
    fns, argss = [], []
    for name in names:
        # members without this backend (rope_3d: ref only; no-backend ops) run with their default
        reg = OPS[name]
        be = backend if reg is None or backend in implementations(reg) else None
        fn, args = _case(name, None if reg is None else be, dev)
        fns.append(fn)
        argss.append(args)
    bounds = [0]
    for args in argss:
        bounds.append(bounds[-1] + len(args))

    def fn(*flat):
        outs = []
        for f, lo, hi in zip(fns, bounds, bounds[1:]):
            o = f(*flat[lo:hi])
            outs.extend(o if isinstance(o, tuple) else (o,))
        return tuple(outs)

    return fn, [a for args in argss for a in args]


def _fresh_leaves(args):
    return [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args]


def _run(fn, args, seed=99):
    """Outputs and the gradients of the inputs that require grad, for upstream gradients drawn from ``seed``."""
    args = _fresh_leaves(args)
    outs = fn(*args)
    diff = [o for o in outs if o.requires_grad]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    if diff:
        g = _gen(seed)
        ups = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o in diff]
        grads = list(torch.autograd.grad(diff, leaves, ups))
    return [o.detach() for o in outs], grads


def _compare(got, want, exact, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} #{i}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}"
        if exact or not w.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what} #{i}: {m}")
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, equal_nan=True, msg=lambda m: f"{what} #{i}: {m}")


# Inductor inlines chains of pointwise ops into their consumers until a node holds realize_opcount_threshold
# (default 30) ops; the ref HiF8 codec (deep torch.where chains on shared integer intermediates) then costs
# minutes of lowering per graph on 2 CPU cores.  Realizing intermediates sooner cuts that ~4x; the generated
# code computes the same values (integer ops and IEEE fp32 division, compared bit for bit below).
INDUCTOR_TEST_CONFIG = {"realize_opcount_threshold": 4}


def _check_inductor(family: str, backend: str, dev):
    fn, args = _family(family, backend, dev)
    want_out, want_grad = _run(fn, args)  # eager (also loads lazily registered backends)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    with torch._inductor.config.patch(INDUCTOR_TEST_CONFIG):
        got_out, got_grad = _run(compiled, args)
    exact = FAMILIES[family][2]
    _compare(got_out, want_out, exact, f"{family} ({backend}) forward output")
    _compare(got_grad, want_grad, exact, f"{family} ({backend}) gradient")
    return want_grad


INDUCTOR_CASES = [
    pytest.param(family, be, id=f"{family}-{be}")
    for family, (_, reg, _) in FAMILIES.items()
    for be in _backends(reg)
    if be in CPU_BACKENDS
]


@pytest.mark.parametrize("family,backend", INDUCTOR_CASES)
def test_inductor_matches_eager(family, backend):
    grads = _check_inductor(family, backend, torch.device("cpu"))
    if family in ("hif8", "attention"):
        assert grads and all(g.abs().sum() > 0 for g in grads), "the autograd ops must have been differentiated"


TRITON_CASES = [pytest.param(family, id=family) for family, (_, reg, _) in FAMILIES.items() if "triton" in implementations(reg)]


@pytest.mark.cuda
@pytest.mark.parametrize("family", TRITON_CASES)
def test_inductor_matches_eager_triton_cuda(family):
    """The triton custom ops inside inductor graphs on a GPU: the same results as eager, forward and backward."""
    _check_inductor(family, "triton", torch.device("cuda"))


# ----------------------------------------------------------------------------------------------------------
# opcheck: the compiled ops themselves


def _cpp_opcheck_cases():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, generator=g, requires_grad=True)  # requires_grad: the autograd registration is tested

    def like(dtype):
        return x.detach().to(dtype).requires_grad_()

    o = torch.ops.ospfn
    codes = torch.arange(256, dtype=torch.uint8)
    return {
        "encode": (o.hif8_encode.default, (x,)),
        "encode_f64": (o.hif8_encode.default, (like(torch.float64),)),
        "encode_arith": (o._hif8_encode_arith.default, (like(torch.float16),)),
        # every code but NaN (opcheck compares outputs without equal_nan)
        "decode": (o.hif8_decode.default, (codes.where(codes != 0x80, 0).view(16, 16), torch.bfloat16)),
        "round": (o.hif8_round.default, (like(torch.bfloat16),)),
        "quantize_tensor": (o.hif8_quantize.default, (x, 15.0, False)),
        "quantize_row_amax": (o.hif8_quantize.default, (x, 224.0, True, torch.full((3, 1), 2.0))),
    }


CPP_OPCHECK_IDS = ["encode", "encode_f64", "encode_arith", "decode", "round", "quantize_tensor", "quantize_row_amax"]


@pytest.mark.parametrize("case", CPP_OPCHECK_IDS)
def test_cpp_ops_opcheck(case):
    """Schema, Meta kernel against the CPU kernel, Autograd registration (non-differentiable: the outputs never
    require grad), AOT dispatch with dynamic shapes."""
    if not info("cpp").available:
        pytest.skip(info("cpp").reason)
    cases = _cpp_opcheck_cases()
    assert list(cases) == CPP_OPCHECK_IDS
    op, args = cases[case]
    torch.library.opcheck(op, args)
    assert torch.Tag.pt2_compliant_tag in op.tags
    assert not op(*args).requires_grad


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """Import the kernel modules (registering torch.ops.ospfn_triton.*)."""
    import ospfn.kernels.attention  # noqa: F401
    import ospfn.kernels.fourier  # noqa: F401
    import ospfn.kernels.hif8  # noqa: F401
    import ospfn.kernels.hif8_matmul  # noqa: F401
    import ospfn.kernels.skiparse  # noqa: F401

    return torch.ops.ospfn_triton


def _triton_opcheck_cases(dev):
    """Tiny fp32 / fp16 cases (no bf16 dot: the interpreter computes it wrongly)."""
    t = _triton_ops()
    g = torch.Generator().manual_seed(4)

    def r(*shape, grad=False):
        x = torch.randn(*shape, generator=g).to(dev)
        return x.requires_grad_() if grad else x

    x = r(3, 7)
    codes = t.hif8_encode(x * 4)
    q, k, v = r(1, 5, 2, 16, grad=True), r(1, 7, 2, 16, grad=True), r(1, 7, 2, 16, grad=True)
    mask = torch.ones(1, 7, dtype=torch.bool, device=dev)
    mask[:, 5:] = False
    out, lse = t.attention_fwd(q, k, v, mask, 0.25)
    lay = (2, 5, 6, 2, 8, 8)  # T, H, W, P, Hp, Wp
    xs = r(2, 60, 4, grad=True)
    ys = r(8, 32, 4, grad=True)
    s, rho = r(2, 3, 6, 8), torch.tensor([0.1, 0.6], device=dev)
    return [
        ("hif8_encode", t.hif8_encode.default, (x.double(),)),
        ("hif8_decode", t.hif8_decode.default, (codes, torch.float16)),
        ("hif8_round", t.hif8_round.default, (x.half(),)),
        ("hif8_quantize", t.hif8_quantize.default, (x, 15.0, False, None)),
        ("hif8_quantize_row_amax", t.hif8_quantize.default, (x, 224.0, True, x.abs().amax(-1, keepdim=True))),
        ("hif8_matmul", t.hif8_matmul.default, (r(4, 7), codes, torch.tensor(2.0, device=dev), r(3))),
        ("fourier_high_freq", t.fourier_high_freq.default, (s, rho, True)),
        ("fourier_cutoff", t.fourier_cutoff.default, (s, rho)),
        ("skiparse_fold", t.skiparse_fold.default, (xs, *lay, "group")),
        ("skiparse_unfold", t.skiparse_unfold.default, (ys, *lay, "token")),
        ("skiparse_switch", t.skiparse_switch.default, (ys, *lay)),
        ("attention_fwd", t.attention_fwd.default, (q, k, v, mask, 0.25)),
        ("attention_fwd_nomask", t.attention_fwd.default, (q, k, v, None, 0.25)),
        ("attention_bwd", t.attention_bwd.default,
         (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, 0.25, True, True)),
        ("attention_bwd_dkdv_only", t.attention_bwd.default,
         (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, 0.25, False, True)),
    ]  # fmt: skip


TRITON_OPCHECK_IDS = ["hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize", "hif8_quantize_row_amax",
                      "hif8_matmul", "fourier_high_freq", "fourier_cutoff", "skiparse_fold", "skiparse_unfold",
                      "skiparse_switch", "attention_fwd", "attention_fwd_nomask", "attention_bwd",
                      "attention_bwd_dkdv_only"]  # fmt: skip


@pytest.mark.parametrize("case", TRITON_OPCHECK_IDS)
def test_triton_ops_opcheck(case):
    """Everything opcheck tests runs under the interpreter too (schema, fake vs real outputs, autograd
    registration, AOT dispatch with dynamic shapes; attention_fwd with inputs that require grad also through
    its backward op); only the inputs stay fp32 / fp16."""
    if not info("triton").available:
        pytest.skip(info("triton").reason)
    dev = backend_device("triton")
    cases = {name: (op, args) for name, op, args in _triton_opcheck_cases(dev)}
    assert list(cases) == TRITON_OPCHECK_IDS
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_kernel_constants_match_the_ops():
    """The kernels define the spec constants themselves (they never import ospfn.ops): the same values."""
    if not info("triton").available:
        pytest.skip(info("triton").reason)
    import ospfn.kernels.fourier as kf
    import ospfn.kernels.hif8 as kh
    from ospfn.ops import fourier as of
    from ospfn.ops import hif8 as oh

    assert kf.MAG_EPS == of.MAG_EPS
    assert kh.AMAX_FLOOR == oh.AMAX_FLOOR
