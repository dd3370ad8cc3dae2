"""SDE window schedules of Mix-GRPO (docs/rl.md#sde-window-strategies): positions over many iterations against
hand-written lists and against a step-by-step simulation of the sliding rule."""

import pytest

from ospfn.rl import STRATEGIES, WindowSchedule, mix_seed


def simulate_sliding(steps, size, start, iters_per_window, stride, last_start, roll_back, iterations):
    """The sliding window as a stateful loop (the way Mix-GRPO's trainer advances it): each iteration uses the
    current window, then counts; after iters_per_window iterations the start moves by stride; a start past
    last_start rolls back to the first start, or (no roll back) is clamped to last_start."""
    cur, count, out = start, 0, []
    for _ in range(iterations):
        out.append(list(range(cur, min(cur + size, last_start + 1))))
        count += 1
        if count >= iters_per_window:
            count = 0
            cur += stride
            if cur > last_start:
                cur = start if roll_back else last_start
    return out


def windows(ws, n):
    return [list(ws.window(i)) for i in range(n)]


def test_sliding_hand_written_overlap_off():
    # 8 steps, windows of 3, move by 3 (no overlap) every 2 iterations; last start N - 3 = 5
    ws = WindowSchedule("sliding", steps=8, size=3, iters_per_window=2, overlap=False)
    a, b = [0, 1, 2], [3, 4, 5]
    assert windows(ws, 10) == [a, a, b, b, a, a, b, b, a, a]


def test_sliding_hand_written_overlap_on():
    # stride 2: starts 0, 2, 4, then roll back; the window is cut at the last start (5 = N - 3)
    ws = WindowSchedule("sliding", steps=8, size=3, iters_per_window=1, overlap=True, shift_step=2)
    assert windows(ws, 7) == [[0, 1, 2], [2, 3, 4], [4, 5], [0, 1, 2], [2, 3, 4], [4, 5], [0, 1, 2]]


def test_sliding_hand_written_no_roll_back_and_start():
    ws = WindowSchedule("sliding", steps=8, size=2, start=1, iters_per_window=1, shift_step=3, roll_back=False)
    assert windows(ws, 5) == [[1, 2], [4, 5], [5], [5], [5]]
    ws = WindowSchedule("sliding", steps=8, size=2, start=1, iters_per_window=1, shift_step=2, roll_back=False)
    assert windows(ws, 4) == [[1, 2], [3, 4], [5], [5]]


def test_mix_grpo_default_never_reaches_the_last_two_steps_and_rolls_back():
    ws = WindowSchedule()  # 25 steps, w = 4, every 25 iterations by 1, overlap, roll back
    assert list(ws.window(0)) == [0, 1, 2, 3]
    assert list(ws.window(24)) == [0, 1, 2, 3] and list(ws.window(25)) == [1, 2, 3, 4]
    assert list(ws.window(19 * 25)) == [19, 20, 21, 22]
    assert list(ws.window(20 * 25)) == [20, 21, 22]
    assert list(ws.window(22 * 25 + 24)) == [22]
    assert list(ws.window(23 * 25)) == [0, 1, 2, 3]  # 23 starts (0 .. 22), then back to 0
    assert all(max(ws.window(i)) <= 22 for i in range(0, 3 * 23 * 25, 7))  # never step N - 2 = 23 or N - 1 = 24


@pytest.mark.parametrize(
    "steps,size,start,ipw,shift_step,overlap,max_start,roll_back",
    [
        (25, 4, 0, 25, 1, True, None, True),
        (25, 4, 0, 20, 1, True, None, False),
        (25, 4, 0, 3, 1, False, None, True),
        (25, 4, 2, 2, 3, True, 15, True),
        (10, 1, 0, 1, 1, True, None, True),
        (10, 5, 3, 4, 2, False, 7, False),
        (12, 3, 0, 5, 0, True, None, True),  # shift_step 0 (Mix-GRPO-Flash*): the window never moves
        (3, 1, 0, 1, 1, True, None, True),
    ],
)
def test_sliding_equals_a_step_by_step_simulation(steps, size, start, ipw, shift_step, overlap, max_start, roll_back):
    ws = WindowSchedule("sliding", steps=steps, size=size, start=start, iters_per_window=ipw, shift_step=shift_step,
                        overlap=overlap, max_start=max_start, roll_back=roll_back)
    last = steps - 3 if max_start is None else max_start
    last = max(last, 0)
    stride = shift_step if overlap else size
    n = 4 * (steps * ipw + 3)
    expect = simulate_sliding(steps, size, start, ipw, stride, last, roll_back, n)
    assert windows(ws, n) == expect
    assert all(w and w[-1] <= last for w in expect)


def test_window_is_a_pure_function_of_the_iteration():
    ws = WindowSchedule("sliding", steps=25, size=4, iters_per_window=3)
    order = [97, 3, 50, 3, 0, 1000]
    assert [list(ws.window(i)) for i in order] == [list(WindowSchedule("sliding", steps=25, size=4, iters_per_window=3).window(i))
                                                   for i in order]


def test_fixed_window():
    ws = WindowSchedule("fixed", steps=25, size=10)  # OSP-Next: the first 10 of 25 steps
    assert all(list(ws.window(i)) == list(range(10)) for i in (0, 1, 24, 25, 10_000))
    assert list(WindowSchedule("fixed", steps=25, size=3, start=21).window(5)) == [21, 22, 23]
    assert ws.train_steps(7) == tuple(range(10))


def test_random_window_is_seeded_in_bounds_and_covers_every_start():
    ws = WindowSchedule("random", steps=25, size=4, seed=7)
    starts = [ws.window_start(i) for i in range(2000)]
    assert starts == [WindowSchedule("random", steps=25, size=4, seed=7).window_start(i) for i in range(2000)]
    assert starts != [WindowSchedule("random", steps=25, size=4, seed=8).window_start(i) for i in range(2000)]
    # starts 0 .. 19: windows of 4 inside steps 0 .. 22, each start about 1/20 of the time
    counts = [starts.count(s) for s in range(20)]
    assert set(starts) == set(range(20)) and min(counts) > 60 and max(counts) < 150
    for i in range(50):
        w = list(ws.window(i))
        assert w == list(range(w[0], w[0] + 4)) and w[-1] <= 22
    # the same draw whatever was asked before (no hidden state)
    assert WindowSchedule("random", steps=25, size=4, seed=7).window_start(1234) == starts[1234]


def test_all_window_and_its_trained_subset():
    ws = WindowSchedule("all", steps=25, fraction=0.6, seed=3)
    assert list(ws.window(0)) == list(range(24)) and list(ws.window(99)) == list(range(24))
    subsets = [ws.train_steps(i) for i in range(30)]
    assert all(len(t) == 14 and list(t) == sorted(set(t)) and set(t) <= set(range(24)) for t in subsets)  # floor(24 * 0.6)
    assert len(set(subsets)) > 20  # a new draw each iteration
    assert subsets == [WindowSchedule("all", steps=25, fraction=0.6, seed=3).train_steps(i) for i in range(30)]
    assert WindowSchedule("all", steps=25, fraction=1.0).train_steps(5) == tuple(range(24))
    assert len(WindowSchedule("all", steps=3, fraction=0.1).train_steps(0)) == 1


def test_mix_seed_is_stable():
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)
    assert len({mix_seed(0, i) for i in range(1000)}) == 1000
    assert 0 <= mix_seed(-5, 2**70) < 2**63
    # a fixed value: the derivation must not change between versions (resumed runs redraw the same windows)
    assert mix_seed(0, 0) == int.from_bytes(__import__("hashlib").blake2b(b"0:0", digest_size=8).digest(), "little") >> 1


@pytest.mark.parametrize(
    "kwargs,exc,msg",
    [
        (dict(strategy="slide"), ValueError, r"strategy must be one of \('sliding', 'fixed', 'random', 'all'\), got 'slide'"),
        (dict(steps=1), ValueError, r"steps must be an int >= 2"),
        (dict(steps=2.0), TypeError, r"steps must be an int"),
        (dict(size=0), ValueError, r"size must be an int \[1, 24\].*got 0"),
        (dict(size=25), ValueError, r"size must be an int \[1, 24\]"),
        (dict(strategy="fixed", size=10, start=15), ValueError, r"start must be an int \[0, 14\].*got 15"),
        (dict(max_start=23), ValueError, r"max_start must be an int \[0, 23\]"),
        (dict(max_start=24), ValueError, r"max_start must be an int \[0, 23\].*got 24"),
        (dict(start=23), ValueError, r"start must be an int \[0, 22\].*max_start=22"),
        (dict(iters_per_window=0), ValueError, r"iters_per_window must be an int >= 1, got 0"),
        (dict(shift_step=-1), ValueError, r"shift_step must be an int >= 0, got -1"),
        (dict(overlap=1), TypeError, r"overlap must be a bool"),
        (dict(strategy="random", size=10, max_start=5), ValueError, r"size must be an int \[1, 6\].*max_start=5"),
        (dict(strategy="all", fraction=0.0), ValueError, r"fraction must be a number in \(0, 1\], got 0.0"),
        (dict(strategy="all", fraction=True), ValueError, r"fraction must be a number in \(0, 1\]"),
        (dict(strategy="random", seed="x"), TypeError, r"seed must be an int"),
    ],
)
def test_bad_schedules(kwargs, exc, msg):
    if kwargs.get("max_start") == 23:  # 23 = N - 2 is allowed (a window of one step ending before the last two)
        assert list(WindowSchedule(**kwargs).window(0)) == [0, 1, 2, 3]
        return
    with pytest.raises(exc, match=msg):
        WindowSchedule(**kwargs)


def test_bad_iterations():
    ws = WindowSchedule()
    with pytest.raises(ValueError, match="iteration must be an int >= 0, got -1"):
        ws.window(-1)
    with pytest.raises(TypeError, match="iteration must be an int >= 0, got float"):
        ws.window(1.0)
    assert set(STRATEGIES) == {"sliding", "fixed", "random", "all"}
