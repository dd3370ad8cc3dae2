"""ospfn.data.video: index / meta JSON parsing, the clip filter and the decord-backed VideoDataset.

The tests write their own small mp4 files with PyAV (libx264, lossless luma): in the "time" videos every pixel of
frame i has grey level 6 * i, so the decoded content tells which source frame was picked; in the "ramp" videos
the grey level grows by 4 per column (or row), so the crop window can be read back from the pixels.
"""

import dataclasses
import doctest
import json
import os

import av
import numpy as np
import pytest
import torch

from ospfn.data import video as vid
from ospfn.data.video import ClipEntry, VideoDataset, filter_clips, load_index

STEP = 6  # grey level per frame index in the "time" videos


def write_mp4(path, frames, fps=24):
    """uint8 [N, H, W, 3] -> an H.264 mp4 (qp 0, yuv420p) at ``fps``."""
    n, h, w, _ = frames.shape
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"qp": "0"}
        for f in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def time_frames(n, h, w):
    return np.repeat((np.arange(n, dtype=np.uint8) * STEP)[:, None, None, None], h * w * 3, 1).reshape(n, h, w, 3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_mp4(root / "land.mp4", time_frames(40, 48, 64))  # h/w = 0.75
    # portrait: h/w = 1.5 (decord 0.6.0 cannot decode frames narrower than 64 px unless the width is a multiple
    # of 32, so no 64 x 48 clip here)
    write_mp4(root / "port.mp4", time_frames(40, 96, 64))
    ramp = np.zeros((4, 48, 64, 3), np.uint8)
    ramp[:] = (np.arange(64, dtype=np.uint8) * 4)[None, None, :, None]
    write_mp4(root / "ramp_x.mp4", ramp)
    vramp = np.zeros((4, 96, 64, 3), np.uint8)
    vramp[:] = (np.arange(96, dtype=np.uint8) * 2)[None, :, None, None]
    write_mp4(root / "ramp_y.mp4", vramp)
    return root


def frame_ids(video):
    """Source frame index encoded in each frame of a "time" clip [3, F, H, W] in [-1, 1]."""
    grey = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [int(round(float(g) / STEP)) for g in grey]


def entry(path, **kw):
    base = dict(path=str(path), captions=("a clip",), height=48, width=64, fps=24.0, num_frames=40)
    base.update(kw)
    return ClipEntry(**base)


# ------------------------------------------------------------------------------------------------------------
# index + meta


def test_load_index_parses_comments_relative_paths_and_fields(tmp_path):
    (tmp_path / "metas").mkdir()
    meta_a = [
        {"path": "x/a.mp4", "cap": "a cat", "resolution": {"height": 480, "width": 640}, "fps": 30,
         "num_frames": 300, "cut": [10, 200], "motion": 0.7, "aes": 5.1},
        {"path": "/abs/b.mp4", "cap": ["first caption", "second caption"], "fps": None},
    ]
    meta_b = [{"path": "c.mp4", "cap": "a dog", "num_frames": 50}]
    (tmp_path / "metas" / "a.json").write_text(json.dumps(meta_a))
    other = tmp_path.parent / f"{tmp_path.name}_other"
    other.mkdir()
    (other / "b.json").write_text(json.dumps(meta_b))
    (tmp_path / "index.txt").write_text(
        "# corpora\n\n"
        "  vids_a , metas/a.json  \n"
        "   # indented comment\n"
        f"/data/vids_b,{other / 'b.json'}\n"
        "clips, 2024,metas/a.json\n"  # split at the last comma: the root may hold commas
    )
    es = load_index(tmp_path / "index.txt")
    assert len(es) == 5
    a, b, c = es[:3]
    assert es[3].path == os.path.join(str(tmp_path), "clips, 2024", "x", "a.mp4") and es[3].cut == (10, 200)
    assert a.path == os.path.join(str(tmp_path), "vids_a", "x", "a.mp4")
    assert a.captions == ("a cat",) and a.caption == "a cat"
    assert (a.height, a.width, a.fps, a.num_frames, a.cut) == (480, 640, 30.0, 300, (10, 200))
    assert a.extra == {"motion": 0.7, "aes": 5.1}
    assert a.source == os.path.join(str(tmp_path), "metas", "a.json")
    assert a.frame_range() == (10, 200) and a.available_frames() == 190
    assert b.path == "/abs/b.mp4" and b.captions == ("first caption", "second caption")
    assert (b.height, b.width, b.fps, b.num_frames, b.cut) == (None, None, None, None, None)
    assert b.frame_range() is None and b.frame_range(total=12) == (0, 12)
    assert c.path == "/data/vids_b/c.mp4" and c.num_frames == 50 and c.frame_range() == (0, 50)


@pytest.mark.parametrize(
    "bad_entry,pattern",
    [
        ({"cap": "x"}, r"entry 1 of meta file '.*bad\.json'.*'path'"),
        ({"path": "", "cap": "x"}, r"'path' must be a non-empty string"),
        ({"path": "a.mp4"}, r"entry 1 .*'cap'.*None"),
        ({"path": "a.mp4", "cap": 3}, r"'cap' must be a string or a non-empty list of strings, got 3"),
        ({"path": "a.mp4", "cap": []}, r"'cap'"),
        ({"path": "a.mp4", "cap": "x", "resolution": {"height": 10}}, r"'resolution\.width'.*None"),
        ({"path": "a.mp4", "cap": "x", "resolution": [1, 2]}, r"'resolution'"),
        ({"path": "a.mp4", "cap": "x", "fps": -3}, r"'fps'.*-3"),
        ({"path": "a.mp4", "cap": "x", "num_frames": 2.5}, r"'num_frames'.*2\.5"),
        ({"path": "a.mp4", "cap": "x", "cut": [5, 3]}, r"'cut'.*\[5, 3\]"),
        ({"path": "a.mp4", "cap": "x", "cut": [5]}, r"'cut'"),
        ("just a string", r"entry 1 .*must be a JSON object"),
    ],
)
def test_malformed_meta_entry_names_key_and_file(tmp_path, bad_entry, pattern):
    (tmp_path / "bad.json").write_text(json.dumps([{"path": "ok.mp4", "cap": "fine"}, bad_entry]))
    (tmp_path / "index.txt").write_text("v,bad.json\n")
    with pytest.raises(ValueError, match=pattern):
        load_index(tmp_path / "index.txt")


def test_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"index file '.*nope\.txt' does not exist"):
        load_index(tmp_path / "nope.txt")
    (tmp_path / "m.json").write_text("[]")
    (tmp_path / "i1.txt").write_text("# ok\nv,m.json\nv m.json\n")
    with pytest.raises(ValueError, match=r"line 3 of index file '.*i1\.txt' is 'v m\.json', which has no comma"):
        load_index(tmp_path / "i1.txt")
    (tmp_path / "i2.txt").write_text("v,missing.json\n")
    with pytest.raises(FileNotFoundError, match=r"meta file '.*missing\.json' \(line 1 of index file"):
        load_index(tmp_path / "i2.txt")
    (tmp_path / "i3.txt").write_text("v,\n")
    with pytest.raises(ValueError, match="must be non-empty"):
        load_index(tmp_path / "i3.txt")
    (tmp_path / "obj.json").write_text('{"path": "a.mp4"}')
    (tmp_path / "i4.txt").write_text("v,obj.json\n")
    with pytest.raises(ValueError, match=r"'.*obj\.json' must hold a JSON list"):
        load_index(tmp_path / "i4.txt")
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "i5.txt").write_text("v,broken.json\n")
    with pytest.raises(ValueError, match=r"'.*broken\.json' is not valid JSON"):
        load_index(tmp_path / "i5.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    assert load_index(tmp_path / "empty.txt") == []


# ------------------------------------------------------------------------------------------------------------
# resampling + filter


def test_resample_offsets_nearest_in_time_halves_up():
    # 24 -> 16 fps: times k * 1.5 = 0, 1.5, 3, 4.5, 6, 7.5, 9 -> 0, 2, 3, 5, 6, 8, 9
    assert vid.resample_offsets(7, 24, 16) == [0, 2, 3, 5, 6, 8, 9]
    assert vid.resample_offsets(4, 16, 16) == [0, 1, 2, 3]
    assert vid.resample_offsets(4, 8, 16) == [0, 1, 1, 2]  # 0, 0.5 -> 1, 1, 1.5 -> 2
    assert vid.resample_offsets(5, 29.97, 16) == [0, 2, 4, 6, 7]  # 1.873, 3.746, 5.619, 7.493
    assert vid.source_frames_needed(49, 24, 16) == 73
    assert vid.source_frames_needed(81, 30, 16) == 151  # 80 * 1.875 = 150
    with pytest.raises(ValueError, match="fps=0"):
        vid.resample_offsets(3, 0, 16)
    with pytest.raises(ValueError, match="num_frames=0"):
        vid.resample_offsets(0, 24, 16)


def test_filter_reasons_each_counted():
    p = "/nowhere/x.mp4"  # metadata complete: the file is never opened
    clips = {
        "kept": entry(p, height=480, width=832, fps=24.0, num_frames=100),  # needs 73 frames
        "kept_square": entry(p, height=600, width=600, fps=30.0, num_frames=100, cut=(5, 100)),  # 95, needs 91
        "kept_16fps": entry(p, height=480, width=832, fps=16.0, num_frames=60),  # needs 49
        "bad_cut": entry(p, height=480, width=832, num_frames=100, cut=(10, 120)),
        "small_area": entry(p, height=200, width=300, num_frames=100),  # 60000 < 65536
        "aspect_low": entry(p, height=300, width=800, num_frames=100),  # 0.375
        "aspect_high": entry(p, height=800, width=640, num_frames=100),  # 1.25
        "too_few_frames": entry(p, height=480, width=832, num_frames=300, cut=(0, 45)),  # 45 < 50
        "low_fps": entry(p, height=480, width=832, fps=12.0, num_frames=300),
        "too_short": entry(p, height=480, width=832, fps=24.0, num_frames=72),  # needs 73
        "missing_motion": entry(p, height=480, width=832, num_frames=100),
        "motion": entry(p, height=480, width=832, num_frames=100),
    }
    motions = {"kept": 0.5, "kept_square": 1.0, "kept_16fps": 0.1, "motion": 1.5, "too_short": 0.5,
               "too_few_frames": 0.5, "low_fps": 0.5}
    es = [dataclasses.replace(e, extra={"m": motions[k]} if k in motions else {}) for k, e in clips.items()]
    kept, rep = filter_clips(es, min_hw=256 * 256, min_frames=50, train_fps=16, sample_num_frames=49,
                             motion_key="m", motion_range=(0.1, 1.0))
    assert kept == es[:3]  # motion bounds are inclusive
    expect = {"total": 12, "kept": 3, "probed": 0, "bad_cut": 1, "small_area": 1, "aspect": 2,
              "too_few_frames": 1, "low_fps": 1, "too_short": 1, "missing_motion": 1, "motion": 1}
    assert rep == expect
    # defaults (no area / frame / motion bound): the 45-frame clip is now too short, motion is not looked at
    kept, rep = filter_clips(es)
    assert rep["too_short"] == 2 and rep["too_few_frames"] == 0 and rep["small_area"] == 0
    assert rep["missing_motion"] == 0 and rep["motion"] == 0 and rep["kept"] == 6
    # aspect bounds are inclusive (0.4 and 1.2)
    _, rep = filter_clips([entry(p, height=400, width=1000, num_frames=100),
                           entry(p, height=120, width=100, num_frames=100)])
    assert rep["kept"] == 2


def test_filter_keeps_too_few_frames_semantics():
    p = "/nowhere/x.mp4"
    e = entry(p, height=480, width=832, fps=24.0, num_frames=300, cut=(0, 90))
    assert filter_clips([e])[1]["kept"] == 1  # 90 >= 73 needed
    assert filter_clips([e], min_frames=91)[1]["too_few_frames"] == 1
    assert filter_clips([e], sample_num_frames=81)[1]["too_short"] == 1  # needs 121


def test_filter_probes_missing_metadata_with_decord(videos):
    bare = ClipEntry(str(videos / "port.mp4"), ("c",))
    kept, rep = filter_clips([bare], sample_num_frames=9, aspect_range=(0.4, 1.6))
    assert rep["probed"] == 1 and rep["kept"] == 1
    (k,) = kept
    assert (k.height, k.width, k.num_frames) == (96, 64, 40) and abs(k.fps - 24.0) < 1e-6
    # partial metadata: only the missing fields are filled
    part = ClipEntry(str(videos / "land.mp4"), ("c",), fps=48.0)
    (k,), rep = filter_clips([part], sample_num_frames=9)
    assert (k.height, k.width, k.num_frames, k.fps) == (48, 64, 40, 48.0)
    # with the default aspect range the portrait clip (1.5) is dropped
    assert filter_clips([bare], sample_num_frames=9)[1]["aspect"] == 1
    with pytest.raises(FileNotFoundError, match=r"filter_clips: video file '.*gone\.mp4' does not exist"):
        filter_clips([ClipEntry(str(videos / "gone.mp4"), ("c",))])


def test_filter_argument_errors():
    with pytest.raises(ValueError, match="motion_key='m' and motion_range=None"):
        filter_clips([], motion_key="m")
    with pytest.raises(ValueError, match=r"aspect_range=\(1.2, 0.4\)"):
        filter_clips([], aspect_range=(1.2, 0.4))
    with pytest.raises(ValueError, match="min_hw=-1"):
        filter_clips([], min_hw=-1)
    with pytest.raises(TypeError, match="ClipEntry"):
        filter_clips([{"path": "a"}])


# ------------------------------------------------------------------------------------------------------------
# dataset


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
    assert vid.choose_bucket(48, 64, buckets) == (32, 48) and vid.choose_bucket(50, 50, buckets) == (40, 40)
    assert vid.choose_bucket(10, 10, [(20, 10), (10, 20)]) == (20, 10)  # tie: first listed
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
    res = doctest.testmod(vid, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0
