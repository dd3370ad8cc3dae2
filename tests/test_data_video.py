"""ospfn.data.video: the decord-backed VideoDataset, its buckets and the load -> filter -> dataset pipeline.

The test clips (video_clips.py) tell which source frame and which crop window were used.
"""

import doctest
import json

import numpy as np
import pytest
import torch
from video_clips import entry, frame_ids, make_videos

from ospfn.data import buckets
from ospfn.data import video as vid
from ospfn.data.buckets import choose_bucket
from ospfn.data.index import ClipEntry, filter_clips, load_index
from ospfn.data.video import VideoDataset


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_videos(tmp_path_factory.mktemp("videos"))


def test_dataset_resamples_24_to_16_fps(videos):
    e = entry(videos / "land.mp4")
    ds = VideoDataset([e] * 6, num_frames=9, train_fps=16, buckets=[(48, 64)], seed=0)
    offsets = [0, 2, 3, 5, 6, 8, 9, 11, 12]  # round-half-up of k * 1.5
    starts = set()
    for i in range(6):
        it = ds[i]
        ids = frame_ids(it["video"])
        start = ids[0]
        assert ids == [start + o for o in offsets], ids
        assert it["frame_indices"].tolist() == ids
        assert 0 <= start <= 40 - 13
        starts.add(start)
    assert len(starts) > 1  # the start frame varies with the item index
    # same rate: consecutive frames; the meta fps wins over the container's (32 "fps" -> every other frame)
    it = VideoDataset([entry(videos / "land.mp4", fps=16.0)], num_frames=5, train_fps=16, buckets=[(48, 64)])[0]
    assert np.diff(frame_ids(it["video"])).tolist() == [1, 1, 1, 1]
    it = VideoDataset([entry(videos / "land.mp4", fps=32.0)], num_frames=5, train_fps=16, buckets=[(48, 64)])[0]
    assert np.diff(frame_ids(it["video"])).tolist() == [2, 2, 2, 2]
    # fps unknown in the meta: the container's 24 fps is used
    it = VideoDataset([ClipEntry(str(videos / "land.mp4"), ("c",))], num_frames=3, buckets=[(48, 64)])[0]
    assert np.diff(frame_ids(it["video"])).tolist() == [2, 1]


def test_dataset_respects_cut(videos):
    e = entry(videos / "land.mp4", cut=(10, 24))  # 14 frames, 9 @ 16 from 24 fps need 13
    ds = VideoDataset([e] * 8, num_frames=9, buckets=[(48, 64)], seed=1)
    for i in range(8):
        ids = frame_ids(ds[i]["video"])
        assert 10 <= ids[0] <= 11 and ids[-1] <= 23
    with pytest.raises(ValueError, match=r"has 12 frames in range \[10, 22\).*need 13"):
        VideoDataset([entry(videos / "land.mp4", cut=(10, 22))], num_frames=9, buckets=[(48, 64)])[0]
    with pytest.raises(ValueError, match=r"cut \(30, 50\) .* ends after the file's 40 frames"):
        VideoDataset([entry(videos / "land.mp4", cut=(30, 50))], num_frames=3, buckets=[(48, 64)])[0]


def test_bucket_choice_crop_and_value_range(videos):
    buckets = [(32, 48), (48, 32), (40, 40)]
    ds = VideoDataset([entry(videos / "land.mp4"), entry(videos / "port.mp4", height=96, width=64)],
                      num_frames=5, buckets=buckets)
    a, b = ds[0], ds[1]
    assert a["bucket"] == (32, 48) and a["video"].shape == (3, 5, 32, 48)
    assert b["bucket"] == (48, 32) and b["video"].shape == (3, 5, 48, 32)
    for it in (a, b):
        assert it["video"].dtype == torch.float32
        assert float(it["video"].min()) >= -1 and float(it["video"].max()) <= 1
        assert it["caption"] == "a clip" and it["path"].endswith(".mp4")
    assert choose_bucket(48, 64, buckets) == (32, 48) and choose_bucket(50, 50, buckets) == (40, 40)
    assert choose_bucket(10, 10, [(20, 10), (10, 20)]) == (20, 10)  # tie: first listed
    # full range: the last frame of a time video is grey 234, frame 0 is black (-1)
    full = VideoDataset([entry(videos / "land.mp4", cut=(0, 1))], num_frames=1, buckets=[(48, 64)])[0]["video"]
    assert abs(float(full.mean()) + 1) < 0.02


def test_centre_crop_window_without_and_with_resize(videos):
    # 48 x 64, bucket 48 x 48: no resize, columns 8..55 kept -> grey 4 * (j + 8)
    x = VideoDataset([entry(videos / "ramp_x.mp4", num_frames=4)], num_frames=1, buckets=[(48, 48)])[0]["video"]
    grey = (x[:, 0].mean(dim=(0, 1)) + 1) * 127.5  # per column
    assert torch.allclose(grey, 4 * (torch.arange(48.0) + 8), atol=2.0)
    # bucket 24 x 24: scale 0.5 -> 24 x 32, crop columns 4..27 -> source columns 2(j+4), 2(j+4)+1 -> 8 j + 34
    x = VideoDataset([entry(videos / "ramp_x.mp4", num_frames=4)], num_frames=1, buckets=[(24, 24)])[0]["video"]
    grey = (x[:, 0].mean(dim=(0, 1)) + 1) * 127.5
    assert torch.allclose(grey[1:-1], 8 * torch.arange(1.0, 23.0) + 34, atol=2.5)
    # portrait 96 x 64, grey 2 * row; bucket 40 x 40: scale 0.625 -> 60 x 40, crop rows 10..49
    y = VideoDataset([entry(videos / "ramp_y.mp4", height=96, width=64, num_frames=4)], num_frames=1,
                     buckets=[(40, 40)])[0]["video"]
    grey = (y[:, 0].mean(dim=(0, 2)) + 1) * 127.5  # per row
    rows = (torch.arange(40.0) + 10 + 0.5) / 0.625 - 0.5  # source row at each output row's centre
    assert torch.allclose(grey, 2 * rows, atol=2.5)
    # upscaling: bucket 128 x 64 from 96 x 64: scale 4/3 -> 128 x 85, crop columns 10..73, rows all kept
    y = VideoDataset([entry(videos / "ramp_y.mp4", height=96, width=64, num_frames=4)], num_frames=1,
                     buckets=[(128, 64)])[0]["video"]
    assert y.shape == (3, 1, 128, 64)
    grey = (y[:, 0].mean(dim=(0, 2)) + 1) * 127.5
    rows = (torch.arange(128.0) + 0.5) * 0.75 - 0.5
    assert torch.allclose(grey[1:-1], 2 * rows[1:-1], atol=2.5)


def test_dataset_determinism_epochs_and_captions(videos):
    caps = ("one", "two", "three")
    es = [entry(videos / "land.mp4", captions=caps) for _ in range(5)]
    ds = VideoDataset(es, num_frames=5, buckets=[(32, 48)], seed=7)
    first = [ds[i] for i in range(5)]
    again = VideoDataset(es, num_frames=5, buckets=[(32, 48)], seed=7)
    for i in range(5):
        assert torch.equal(first[i]["video"], ds[i]["video"]) and first[i]["caption"] == ds[i]["caption"]
        assert torch.equal(first[i]["video"], again[i]["video"])
        assert first[i]["caption"] in caps
    seen_caps, seen_starts = set(), set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(5):
            it = ds[i]
            seen_caps.add(it["caption"])
            seen_starts.add((i, int(it["frame_indices"][0])))
    assert seen_caps == set(caps)
    assert len(seen_starts) > 5  # epochs move the start frames
    ds.set_epoch(0)
    assert all(torch.equal(first[i]["frame_indices"], ds[i]["frame_indices"]) for i in range(5))
    other = VideoDataset(es, num_frames=5, buckets=[(32, 48)], seed=8)
    assert [int(other[i]["frame_indices"][0]) for i in range(5)] != [int(f["frame_indices"][0]) for f in first]
    # DataLoader workers give the same items (seeded per (seed, epoch, index), not per process)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    got = [b["frame_indices"][0] for b in loader]
    assert all(torch.equal(g, f["frame_indices"]) for g, f in zip(got, first))


def test_dataset_errors(videos, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video file '.*missing\.mp4' \(item 0, from 'm\.json'\)"):
        VideoDataset([entry(tmp_path / "missing.mp4", source="m.json")], num_frames=3)[0]
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(RuntimeError, match=r"cannot read video file '.*junk\.mp4'"):
        VideoDataset([entry(tmp_path / "junk.mp4")], num_frames=3)[0]
    with pytest.raises(ValueError, match=r"buckets=\[\(480, 0\)\]"):
        VideoDataset([], buckets=[(480, 0)])
    with pytest.raises(ValueError, match="buckets"):
        VideoDataset([], buckets=(480, 832))
    with pytest.raises(ValueError, match="num_frames=0"):
        VideoDataset([], num_frames=0)
    with pytest.raises(TypeError, match="ClipEntry"):
        VideoDataset(["a.mp4"])
    ds = VideoDataset([entry(videos / "land.mp4")], num_frames=3, buckets=[(48, 64)])
    with pytest.raises(IndexError, match="index=1"):
        ds[1]
    with pytest.raises(ValueError, match="epoch=-1"):
        ds.set_epoch(-1)


def test_load_filter_dataset_end_to_end(videos, tmp_path):
    meta = [
        {"path": "land.mp4", "cap": ["a grey clip", "a fading clip"], "motion": 0.4},
        {"path": "port.mp4", "cap": "a tall clip", "resolution": {"height": 96, "width": 64}, "fps": 24,
         "num_frames": 40, "motion": 0.5},
        {"path": "land.mp4", "cap": "too short", "fps": 24, "num_frames": 40, "cut": [0, 12],
         "resolution": {"height": 48, "width": 64}, "motion": 0.4},
    ]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "index.txt").write_text(f"# test corpus\n{videos},meta.json\n")
    es = load_index(tmp_path / "index.txt")
    kept, rep = filter_clips(es, min_hw=48 * 48, aspect_range=(0.4, 1.6), sample_num_frames=9,
                             motion_key="motion", motion_range=(0.0, 1.0))
    assert rep["kept"] == 2 and rep["too_short"] == 1 and rep["probed"] == 1
    ds = VideoDataset(kept, num_frames=9, buckets=[(32, 48), (48, 32)])
    shapes = [tuple(ds[i]["video"].shape) for i in range(2)]
    assert shapes == [(3, 9, 32, 48), (3, 9, 48, 32)]


def test_docstring_examples():
    for mod, least in ((vid, 5), (buckets, 3)):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted >= least and res.failed == 0, mod.__name__
