"""``python -m ospfn``: what this installation can run, and a HiF8 round trip on each backend."""

from __future__ import annotations

import torch

import ospfn
from ospfn import backends


def main() -> None:
    print(f"ospfn {ospfn.__version__} on torch {torch.__version__}")
    for name in backends.BACKENDS:
        print(f"  {backends.info(name)}")
    x = torch.tensor([3.3, -0.7, 15.0, 40000.0, 1e-7])
    print(f"hif8_round({x.tolist()}):")
    for name in backends.available():
        dev = "cuda" if "cuda" in backends.info(name).devices else "cpu"
        try:
            r = ospfn.ops.hif8_round(x.to(dev), backend=name).cpu()
        except RuntimeError as e:  # pragma: no cover - e.g. a device that vanished
            print(f"  {name:>6}: {e}")
            continue
        print(f"  {name:>6}: {r.tolist()}")


if __name__ == "__main__":
    main()
