"""Backend selection rules (docs/backends.md)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ospfn
from ospfn import backends


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("OSPFN_BACKEND", "TRITON_INTERPRET")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e, timeout=120)


def test_available_lists_what_runs_here():
    av = backends.available()
    assert av[0] == "ref"
    assert "cpp" in av, backends.info("cpp").reason  # the suite runs on a built package
    assert "triton" in av, backends.info("triton").reason  # interpreter (or CUDA) in tests
    for name in backends.BACKENDS:
        st = backends.info(name)
        assert st.available == (name in av)
        assert st.reason


def test_every_hif8_op_has_ref_cpp_triton():
    for op in ("hif8_encode", "hif8_decode", "hif8_round", "hif8_quantize"):
        assert set(backends.implementations(op)) >= {"ref", "cpp", "triton"}


def test_auto_on_cpu_prefers_cpp():
    assert backends.resolve("hif8_encode", None, "cpu") == "cpp"


def test_explicit_unavailable_raises_with_reason():
    with pytest.raises(RuntimeError, match=r"backend 'npu' is unavailable: torch_npu is not installed"):
        ospfn.ops.hif8_encode(torch.ones(2), backend="npu")


def test_explicit_wrong_device_raises():
    if torch.cuda.is_available():
        pytest.skip("CUDA machine: covered by test_cpp_rejects_cuda")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' runs on cpu tensors, got a meta tensor"):
        backends.resolve("hif8_encode", "cpp", "meta")


@pytest.mark.parametrize("bad", ["cuda", "Ref", "", 3])
def test_unknown_backend_name(bad):
    with pytest.raises(ValueError, match=r"backend must be one of \('ref', 'cpp', 'triton', 'npu', 'torch'\)"):
        ospfn.ops.hif8_encode(torch.ones(2), backend=bad)


@pytest.fixture
def env_backend(monkeypatch):
    """Set OSPFN_BACKEND for one test; the variable is read at import and by refresh(), not per call."""

    def set_(value):
        monkeypatch.setenv("OSPFN_BACKEND", value)
        backends.refresh()

    yield set_
    monkeypatch.delenv("OSPFN_BACKEND", raising=False)
    backends.refresh()


def test_env_is_not_read_per_call(monkeypatch, env_backend):
    env_backend("ref")
    calls = []
    real_get = os.environ.get
    monkeypatch.setattr(os.environ, "get", lambda *a: calls.append(a) or real_get(*a))
    for _ in range(3):
        ospfn.ops.hif8_encode(torch.ones(4))
        ospfn.ops.attention(*(torch.ones(1, 2, 1, 4) for _ in range(3)))
    assert calls == []
    monkeypatch.setenv("OSPFN_BACKEND", "triton")  # not seen until refresh()
    assert backends.resolve("hif8_encode", None, "cpu") == "ref"
    backends.refresh()
    assert backends.resolve("hif8_encode", None, "cpu") == "triton"


def test_set_default():
    try:
        backends.set_default("ref")
        assert backends.default() == "ref" and backends.resolve("hif8_encode", None, "cpu") == "ref"
    finally:
        backends.set_default(None)
    assert backends.resolve("hif8_encode", None, "cpu") == "cpp"


def test_env_override(env_backend):
    env_backend("ref")
    assert backends.resolve("hif8_encode", None, "cpu") == "ref"
    env_backend("triton")
    assert backends.resolve("hif8_quantize", None, "cpu") == "triton"  # interpreter in tests
    # the argument beats the variable
    assert backends.resolve("hif8_quantize", "cpp", "cpu") == "cpp"
    env_backend("npu")
    with pytest.raises(RuntimeError, match=r"OSPFN_BACKEND=npu but backend 'npu' is unavailable"):
        ospfn.ops.hif8_encode(torch.ones(2))
    env_backend("fastest")
    with pytest.raises(ValueError, match=r"OSPFN_BACKEND must be one of"):
        ospfn.ops.hif8_encode(torch.ones(2))


def test_env_override_falls_back_for_ops_without_that_backend(env_backend):
    backends.register("_test_only_op", "ref", lambda x: x + 1)
    env_backend("cpp")
    assert backends.resolve("_test_only_op", None, "cpu") == "ref"
    with pytest.raises(RuntimeError, match=r"backend 'cpp' has no implementation of this op"):
        backends.resolve("_test_only_op", "cpp", "cpu")


def test_constraints_skip_in_auto_and_raise_when_explicit(caplog):
    small = backends.Constraint("n <= 4", lambda x: None if x.numel() <= 4 else f"n = {x.numel()}")
    backends.register("_test_constrained", "cpp", lambda x: x + 1, constraints=(small,))
    backends.register("_test_constrained", "ref", lambda x: x + 2)
    assert backends.constraints("_test_constrained", "cpp") == (small,)
    with caplog.at_level("WARNING", logger="ospfn"):
        assert backends.dispatch("_test_constrained", None, torch.zeros(3)).tolist() == [1.0] * 3
        for _ in range(2):  # too large for cpp: auto goes on to ref, with one log line per process
            assert backends.dispatch("_test_constrained", None, torch.zeros(5)).tolist() == [2.0] * 5
    notes = [r.message for r in caplog.records if "_test_constrained" in r.message]
    assert notes == ["ospfn: _test_constrained: backend 'cpp' skipped (needs n <= 4, got n = 5); trying the next one"]
    with pytest.raises(ValueError, match=r"_test_constrained: backend 'cpp' needs n <= 4, got n = 5"):
        backends.dispatch("_test_constrained", "cpp", torch.zeros(5))
    with pytest.raises(TypeError, match="register: constraints must be Constraint objects"):
        backends.register("_test_constrained", "cpp", lambda x: x, constraints=("n <= 4",))


def test_attention_head_dim_256_skips_triton(env_backend, caplog):
    """Triton attention keeps the head dim in one register tile (<= 128): D = 256 goes to the next backend
    when triton is the default (as on CUDA), and an explicit request names the limit."""
    q = torch.randn(1, 3, 1, 256)
    env_backend("triton")  # the interpreter stands in for the GPU here
    with caplog.at_level("WARNING", logger="ospfn"):
        out = ospfn.ops.attention(q, q, q)
    torch.testing.assert_close(out, ospfn.ops.attention(q, q, q, backend="ref"))
    assert any("backend 'triton' skipped (needs head dim <= 128, got head dim 256)" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match=r"attention: backend 'triton' needs head dim <= 128, got head dim 256"):
        ospfn.ops.attention(q, q, q, backend="triton")


def test_missing_extension_falls_back_to_ref_with_one_log_line():
    """Simulate a machine where ospfn._C was not built: import works, cpp reports why, auto uses ref."""
    r = run_python(
        """
        import sys
        sys.modules["ospfn._C"] = None          # makes `from ospfn import _C` raise ImportError
        import torch, ospfn
        print("AVAILABLE", ospfn.backends.available())
        x = torch.randn(1000)
        a = ospfn.ops.hif8_encode(x)
        b = ospfn.ops.hif8_quantize(x)
        print("SAME", torch.equal(a, ospfn.ops.hif8_encode(x, backend="ref")))
        try:
            ospfn.ops.hif8_encode(x, backend="cpp")
        except RuntimeError as e:
            print("ERR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "AVAILABLE ['ref', 'torch']" in r.stdout
    assert "SAME True" in r.stdout
    assert "ERR hif8_encode: backend 'cpp' is unavailable: the C++ extension ospfn._C is not built" in r.stdout
    log_lines = [ln for ln in r.stderr.splitlines() if "falling back" in ln]
    assert len(log_lines) == 1, r.stderr
    assert "'cpp' unavailable" in log_lines[0]


def test_triton_without_interpreter_or_gpu_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes triton available")
    r = run_python("import ospfn; print(ospfn.backends.info('triton'))")
    assert r.returncode == 0, r.stderr
    assert "triton: unavailable (no CUDA device, and TRITON_INTERPRET=1 is not set)" in r.stdout


def test_importing_ospfn_does_not_import_triton():
    r = run_python("import sys, ospfn, torch; ospfn.ops.hif8_encode(torch.ones(3)); print('triton' in sys.modules)")
    assert r.stdout.strip() == "False", r.stderr


def test_extension_built_against_installed_torch():
    from ospfn import _C

    info = _C.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] is not None, "at::parallel_for would run single-threaded without OpenMP"


def test_preload_imports_lazy_implementations():
    """Triton implementations are imported on first use; preload() does it up front (before torch.compile)."""
    loaded = backends.preload("triton")  # the interpreter makes triton available in the tests
    assert {"attention:triton", "hif8_matmul:triton", "skiparse_fold:triton", "fourier_high_freq:triton"} <= set(loaded)
    assert all(backends._lazy_cache[tuple(x.split(":"))] for x in loaded)
    assert backends.preload("ref") == []  # ref implementations are plain functions
