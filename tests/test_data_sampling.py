"""ospfn.data.sampling: frame resampling, and the checks of its arguments that the filter and the dataset share."""

import doctest

import pytest

from ospfn.data import VideoDataset, _checks, filter_clips, sampling


def test_resample_offsets_nearest_in_time_halves_up():
    # 24 -> 16 fps: times k * 1.5 = 0, 1.5, 3, 4.5, 6, 7.5, 9 -> 0, 2, 3, 5, 6, 8, 9
    assert sampling.resample_offsets(7, 24, 16) == [0, 2, 3, 5, 6, 8, 9]
    assert sampling.resample_offsets(4, 16, 16) == [0, 1, 2, 3]
    assert sampling.resample_offsets(4, 8, 16) == [0, 1, 1, 2]  # 0, 0.5 -> 1, 1, 1.5 -> 2
    assert sampling.resample_offsets(5, 29.97, 16) == [0, 2, 4, 6, 7]  # 1.873, 3.746, 5.619, 7.493
    assert sampling.source_frames_needed(49, 24, 16) == 73
    assert sampling.source_frames_needed(81, 30, 16) == 151  # 80 * 1.875 = 150
    with pytest.raises(ValueError, match="fps=0"):
        sampling.resample_offsets(3, 0, 16)
    with pytest.raises(ValueError, match="num_frames=0"):
        sampling.resample_offsets(0, 24, 16)


def test_sampling_arguments_are_checked_alike_everywhere():
    for bad in (0, -1.5, float("nan"), True, "16"):
        with pytest.raises(ValueError, match=r"^resample_offsets: train_fps=.* must be a positive number$"):
            sampling.resample_offsets(3, 24, bad)
        with pytest.raises(ValueError, match=r"^filter_clips: train_fps=.* must be a positive number$"):
            filter_clips([], train_fps=bad)
        with pytest.raises(ValueError, match=r"^VideoDataset: train_fps=.* must be a positive number$"):
            VideoDataset([], train_fps=bad)
    with pytest.raises(ValueError, match=r"^filter_clips: sample_num_frames=0 must be a positive int$"):
        filter_clips([], sample_num_frames=0)
    with pytest.raises(ValueError, match=r"^VideoDataset: num_frames=2\.0 must be a positive int$"):
        VideoDataset([], num_frames=2.0)


def test_docstring_examples():
    for mod, least in ((sampling, 4), (_checks, 2)):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted >= least and res.failed == 0, mod.__name__
