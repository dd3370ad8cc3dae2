"""Turn pytest-benchmark JSON files into a markdown table (for the README and bench/results/).

    python bench/report.py bench/results/hif8-cpu.json [more.json ...]
"""

from __future__ import annotations

import json
import sys


def rows(path: str):
    with open(path) as f:
        data = json.load(f)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        yield {
            "group": b.get("group") or "",
            "name": b["name"],
            "median_ms": b["stats"]["median"] * 1e3,
            **info,
        }


def main(paths: list[str]) -> None:
    all_rows = [r for p in paths for r in rows(p)]
    extra = sorted({k for r in all_rows for k in r} - {"group", "name", "median_ms", "device"})
    head = ["benchmark", "device", "median (ms)"] + extra
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in all_rows:
        cells = [r["name"], str(r.get("device", "")), f"{r['median_ms']:.2f}"]
        for k in extra:
            v = r.get(k, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
