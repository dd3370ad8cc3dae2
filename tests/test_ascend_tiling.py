"""Tiling of the Ascend C kernels (csrc/ascend/tiling.h, docs/npu.md#tiling), checked on every size class.

The C++ tiling is reached through ``ospfn._ascend_sim`` (built with ``ospfn._C``); the checks here are written
from the rules in docs/npu.md, not from the C++: every element (row) is covered exactly once by non-empty
blocks, no more blocks than cores, block starts and tiles are whole 32-byte units of every tensor, the
buffers fit the UB budget, the tile is the largest that fits (or the block's whole range), the split is
balanced.
"""

import itertools

import pytest

try:
    from ospfn import _ascend_sim as sim
except ImportError as e:  # the suite covers the simulator: fail loudly, never skip
    pytest.fail(f"ospfn._ascend_sim is not built ({e}): pip install --no-build-isolation -e .", pytrace=False)

BUFFER_NUM = sim.BUILD_INFO["buffer_num"]
DEFAULT_UB = sim.BUILD_INFO["default_ub_bytes"] - sim.BUILD_INFO["ub_reserve"]  # what the NPU launcher uses on 910B

# (in, out, scratch, fixed) bytes: every kernel's own cost, plus odd generic ones
KERNEL_COSTS = {
    f"{op}-{esize}": sim.kernel_cost(op, esize, 40)
    for op, esize in itertools.product(["encode", "decode", "round", "quantize_tensor", "quantize_rows"], [4, 2])
}
KERNEL_COSTS["skiparse"] = sim.kernel_cost("skiparse", 1, 40)
COSTS = dict(KERNEL_COSTS, odd=(3, 5, 7, 100), wide=(8, 8, 0, 0))
UBS = [DEFAULT_UB, 256 * 1024, 4096, 1000]
CORES = [1, 3, 40, 48]


def unit_bytes_ok(unit: int, cost) -> bool:
    return all((unit * b) % 32 == 0 for b in cost[:3] if b)


def per_elem(cost) -> int:
    i, o, s, _ = cost
    return BUFFER_NUM * (i + o) + s


def fits(tile: int, cost, ub: int) -> bool:
    return tile * per_elem(cost) + cost[3] <= ub


def ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def check_elem(t: dict, n: int, cost, ub: int, cores: int) -> None:
    unit, tile, blocks = t["unit"], t["tile"], t["blocks"]
    assert t["n"] == n
    assert unit_bytes_ok(unit, cost) and unit & (unit - 1) == 0
    if n == 0:
        assert t["block_num"] == 0 and blocks == [] and tile == 0
        return
    assert 1 <= t["block_num"] == len(blocks) <= cores
    assert t["block_num"] == min(cores, -(-n // unit)), "never more blocks than units, never fewer than cores allow"
    assert tile > 0 and tile % unit == 0
    assert t["ub_bytes"] == tile * per_elem(cost) + cost[3] <= ub
    largest = max(b[1] for b in blocks)
    assert tile <= ceil_to(largest, unit)
    assert tile == ceil_to(largest, unit) or not fits(tile + unit, cost, ub), "the tile is the largest that fits"
    pos = 0
    for i, (start, length, full, tail) in enumerate(blocks):
        assert start == pos and length > 0, "blocks cover [0, n) in order, none empty"
        assert start % unit == 0, "every block starts on a 32-byte unit of every tensor"
        assert full * tile + tail == length and 0 <= tail < tile
        if i < len(blocks) - 1:
            assert length % unit == 0, "only the last block may end inside a unit"
        pos += length
    assert pos == n, "every element exactly once"
    units = [-(-b[1] // unit) for b in blocks]
    assert max(units) - min(units) <= 1, "balanced: block lengths differ by at most one unit"
    assert units == sorted(units, reverse=True), "the remainder goes to the first blocks"


def size_classes(cost, ub, cores) -> list[int]:
    unit = sim.elem_tiling(1, *cost, ub, cores)["unit"]
    tile = sim.elem_tiling(2**40, *cost, ub, cores)["tile"]  # the UB-limited tile
    ns = {0, 1, 2, unit - 1, unit, unit + 1, tile - 1, tile, tile + 1, 2 * tile, cores * tile - 1, cores * tile,
          cores * tile + 1, cores * unit, cores * unit + 1, 3 * cores * tile + 17, 2**20 + 3, 2**31 - 1, 2**32 + 5,
          2**33, 2**33 + 1, 2**40 + 123}  # fmt: skip
    return sorted(n for n in ns if n >= 0)


# every (cost, UB budget) pair where one 32-element unit fits (the others are refused: own test)
COST_UB = [(name, ub) for name in sorted(COSTS) for ub in UBS if per_elem(COSTS[name]) * 32 + COSTS[name][3] <= ub]


@pytest.mark.parametrize("cost_name,ub", COST_UB)
@pytest.mark.parametrize("cores", CORES)
def test_elementwise_tiling_every_size_class(cost_name, ub, cores):
    cost = COSTS[cost_name]
    for n in size_classes(cost, ub, cores):
        check_elem(sim.elem_tiling(n, *cost, ub, cores), n, cost, ub, cores)


def test_exact_multiples_have_no_tail():
    cost = KERNEL_COSTS["encode-4"]
    cores = 40
    tile = sim.elem_tiling(2**40, *cost, DEFAULT_UB, cores)["tile"]
    t = sim.elem_tiling(cores * tile, *cost, DEFAULT_UB, cores)
    assert t["tile"] == tile and all(b[1] == tile and b[2] == 1 and b[3] == 0 for b in t["blocks"])
    t = sim.elem_tiling(7 * cores * tile, *cost, DEFAULT_UB, cores)
    assert all(b[2] == 7 and b[3] == 0 for b in t["blocks"])
    t = sim.elem_tiling(cores * tile + 1, *cost, DEFAULT_UB, cores)  # one extra element: a one-element global tail
    assert t["blocks"][-1][3] != 0 and sum(b[1] for b in t["blocks"]) == cores * tile + 1


def test_small_inputs_use_few_blocks():
    # the HiFloat8 reference kernel launches a fixed 40 blocks; here a 100-element fp32 -> uint8 encode (units of
    # 32 elements) uses 4 blocks, a 1-element one a single block
    cost = KERNEL_COSTS["encode-4"]
    assert sim.elem_tiling(100, *cost, DEFAULT_UB, 40)["block_num"] == 4
    assert sim.elem_tiling(1, *cost, DEFAULT_UB, 40)["block_num"] == 1
    assert sim.elem_tiling(0, *cost, DEFAULT_UB, 40)["block_num"] == 0


def test_default_tiles_on_910b():
    # 184 KiB usable UB, double-buffered fp32 in + uint8 out: 10 bytes per element -> 18816 elements per tile
    t = sim.elem_tiling(2**30, *KERNEL_COSTS["encode-4"], DEFAULT_UB, 40)
    assert t["tile"] == 18816 and t["ub_bytes"] <= DEFAULT_UB
    t = sim.elem_tiling(2**30, *KERNEL_COSTS["round-2"], DEFAULT_UB, 40)  # bf16 in + out: 8 bytes per element
    assert t["tile"] == DEFAULT_UB // 8 // 16 * 16


def test_ub_too_small_or_no_cores_is_refused():
    with pytest.raises(ValueError, match="cannot hold one 32-byte unit"):
        sim.elem_tiling(10, *KERNEL_COSTS["encode-4"], 32 * 9, 40)
    with pytest.raises(ValueError, match="cores must be >= 1"):
        sim.elem_tiling(10, *KERNEL_COSTS["encode-4"], DEFAULT_UB, 0)
    with pytest.raises(ValueError, match="cannot hold one 32-byte unit"):
        sim.row_tiling(4, 4, *KERNEL_COSTS["quantize_rows-4"], 64, 40)
    # exactly one unit fits: tile == unit
    cost = KERNEL_COSTS["encode-4"]
    ub = 32 * per_elem(cost) + cost[3]
    t = sim.elem_tiling(1000, *cost, ub, 3)
    assert t["tile"] == 32 and t["ub_bytes"] == ub
    check_elem(t, 1000, cost, ub, 3)


# ----------------------------------------------------------------------------------------------------------
# row tiling


def check_rows(t: dict, rows: int, cols: int, cost, ub: int, cores: int) -> None:
    unit, tile, blocks = t["unit"], t["tile"], t["blocks"]
    assert unit_bytes_ok(unit, cost)
    if rows == 0 or cols == 0:
        assert t["block_num"] == 0 and blocks == []
        return
    assert t["block_num"] == len(blocks) == min(rows, cores)
    assert tile > 0 and tile % unit == 0 and tile <= ceil_to(cols, unit)
    assert tile == ceil_to(cols, unit) or not fits(tile + unit, cost, ub)
    assert t["ub_bytes"] == tile * per_elem(cost) + cost[3] <= ub
    assert t["col_full_tiles"] * tile + t["col_tail"] == cols and 0 <= t["col_tail"] < tile
    pos = 0
    for start, count in blocks:
        assert start == pos and count > 0, "blocks own whole rows, in order, none empty"
        pos += count
    assert pos == rows, "every row exactly once"
    counts = [c for _, c in blocks]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("cost_name", ["quantize_rows-4", "quantize_rows-2", "skiparse", "odd"])
@pytest.mark.parametrize("ub", [DEFAULT_UB, 4096])
@pytest.mark.parametrize("cores", [1, 3, 40])
def test_row_tiling_every_size_class(cost_name, ub, cores):
    cost = COSTS[cost_name]
    unit = sim.row_tiling(1, 1, *cost, ub, cores)["unit"]
    tile = sim.row_tiling(1, 2**40, *cost, ub, cores)["tile"]  # the UB-limited column tile
    rows_list = [0, 1, 2, cores - 1, cores, cores + 1, 3 * cores + 2, 10**6 + 7, 2**33]
    cols_list = [0, 1, 7, unit - 1, unit, unit + 1, tile - 1, tile, tile + 1, 3 * tile + 5, 2**31 + 1]
    for rows, cols in itertools.product(rows_list, cols_list):
        if rows < 0 or cols < 0:
            continue
        check_rows(sim.row_tiling(rows, cols, *cost, ub, cores), rows, cols, cost, ub, cores)


def test_row_longer_than_a_tile_is_tiled_along_columns():
    cost = KERNEL_COSTS["quantize_rows-4"]
    tile = sim.row_tiling(1, 2**40, *cost, DEFAULT_UB, 40)["tile"]
    t = sim.row_tiling(8, 3 * tile + 5, *cost, DEFAULT_UB, 40)
    assert t["tile"] == tile and t["col_full_tiles"] == 3 and t["col_tail"] == 5
    t = sim.row_tiling(8, 100, *cost, DEFAULT_UB, 40)  # a short row: one tile, no wasted UB
    assert t["tile"] == 104 and t["col_full_tiles"] == 0 and t["col_tail"] == 100
