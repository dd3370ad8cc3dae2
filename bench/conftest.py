"""Shared helpers for the pytest-benchmark suites in bench/.

Benchmarks are not tests: run them explicitly, e.g.
    python -m pytest bench/bench_hif8.py --benchmark-json=bench/results/hif8-cpu.json
and turn the JSON into a table with ``python bench/report.py bench/results/hif8-cpu.json``.
"""

import platform
import time

import pytest
import torch

import ospfn


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_device(backend: str) -> torch.device | None:
    """Where a backend runs for benchmarking, or None if it cannot run here (the interpreter never counts)."""
    st = ospfn.backends.info(backend)
    if not st.available or ospfn.backends.interpreting():
        return None if backend != "ref" else torch.device("cpu")
    if "cuda" in st.devices:
        return torch.device("cuda")
    if "cpu" in st.devices or "*" in st.devices:
        return torch.device("cpu")
    return None


def median_time(fn, device: torch.device, repeat: int = 5) -> float:
    """Median wall time of fn() (used for a baseline that pytest-benchmark did not already measure)."""
    fn()
    sync(device)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@pytest.fixture(scope="session")
def baseline_times():
    """(group, device) -> median seconds of the baseline measured earlier in this run."""
    return {}


# Nominal DRAM bandwidth (GB/s) of devices seen here, for "fraction of memory bandwidth" figures.
_PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100": 3350.0, "H200": 4800.0}


def peak_bandwidth_gbps(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, v in _PEAK_GBPS.items():
        if key in name:
            return v
    return None
