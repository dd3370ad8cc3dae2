"""ospfn.data.index: index / meta JSON parsing and the clip filter (test clips: video_clips.py)."""

import dataclasses
import doctest
import json
import os

import pytest
from video_clips import entry, make_videos

from ospfn.data import index
from ospfn.data.index import ClipEntry, filter_clips, load_index


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return make_videos(tmp_path_factory.mktemp("videos"))


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
# filter


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
              "too_few_frames": 1, "low_fps": 1, "too_short": 1, "missing_motion": 1, "motion": 1,
              "missing_style": 0, "style": 0, "styles": {}}
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


def test_docstring_examples():
    res = doctest.testmod(index, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 10 and res.failed == 0
