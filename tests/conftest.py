"""Test configuration.

Without a CUDA device the Triton kernels run in the Triton interpreter on CPU tensors: TRITON_INTERPRET must
be set before triton is first imported, hence at the top of this file.  With a CUDA device the same tests
run the compiled kernels on the GPU (the ``device_of`` fixture moves inputs there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ospfn  # noqa: E402

COMPILED_BACKENDS = ("cpp", "triton")
ALL_BACKENDS = ("ref",) + COMPILED_BACKENDS


def backend_device(name: str) -> torch.device:
    """The device a backend's kernels run on in this test session."""
    if name == "triton" and torch.cuda.is_available() and not ospfn.backends.interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


def require(name: str) -> None:
    """A backend the test suite is meant to cover must be present: fail loudly, never skip silently."""
    st = ospfn.backends.info(name)
    if not st.available:
        pytest.fail(f"backend {name!r} is not available here: {st.reason}")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    require(request.param)
    return request.param


@pytest.fixture(params=COMPILED_BACKENDS)
def fast_backend(request):
    require(request.param)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def config_with(base: dict, out_dir, **changes) -> dict:
    """A deep copy of the config dict ``base`` with ``out_dir`` set and dotted keys (``"train.steps"``) changed."""
    import json

    cfg = json.loads(json.dumps(base))
    cfg["out_dir"] = str(out_dir)
    for path, value in changes.items():
        *keys, last = path.split(".")
        node = cfg
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg


# A tiny FlashI2V SFT config (4 steps on 16 synthetic 3-frame clips) for recipe tests; change it with config_with.
TINY_SFT = {
    "model": {"preset": "tiny", "overrides": {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "num_full_blocks": 0, "text_dim": 16, "freq_dim": 16}},
    "text": {"text_len": 12, "vocab": 128},
    "vae": {"kind": "pixel", "spatial": 4},
    "data": {"kind": "synthetic", "num_samples": 16, "frames": 3, "size": [16, 16], "seed": 0},
    "optim": {"lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.9},
    "train": {"task": "flashi2v", "steps": 4, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "keep": 10, "seed": 3},
    "sample": {"steps": 2},
}
