"""Tests for data.py: the folder, tar and image sources, make_source, and the sharded, resumable
ClipStream. Every file is made here with PyAV; CPU only."""

import io
import re
import tarfile

import av
import numpy as np
import pytest
import torch

from data import ImageFolderSource, TarShardSource, VideoFolderSource, expand_braces, make_source
from kit.stream import ClipStream
from worlds.shapes import ShapesSource
from test_video import encode_mp4


def encode_png(path, img: np.ndarray) -> None:
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.height, stream.width, stream.pix_fmt = img.shape[0], img.shape[1], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def small_clips(folder, names, frames: int = 24) -> None:
    """Tiny 16 fps grey clips (32 x 32) at folder/name whose frame t has brightness 8 t, so a clip's
    first frame tells where in the video it starts."""
    video = np.repeat(8 * np.arange(frames, dtype=np.uint8), 32 * 32 * 3).reshape(frames, 32, 32, 3)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        encode_mp4(folder / name, video)


def test_stream_skips_corrupt_file_and_keeps_batches_full(tmp_path, capsys):
    small_clips(tmp_path, ["good.mp4"])
    (tmp_path / "bad.mp4").write_bytes(np.random.default_rng(1).bytes(3000))
    stream = ClipStream(VideoFolderSource(str(tmp_path), frames=3, size=16), batch_size=2, max_batches=2)
    batches = list(stream)
    lines = capsys.readouterr().err.splitlines()  # one line per skipped file, however often it comes up
    assert stream.skipped == sum(b["skipped"] for b in batches) > len(lines) == 1
    assert all(line.startswith("skipped clip") and "bad.mp4" in line for line in lines)
    assert [b["video"].shape for b in batches] == [(2, 3, 3, 16, 16)] * 2


def test_captions_from_csv_and_from_label_folders(tmp_path, capsys):
    csv_root, labelled = tmp_path / "csv", tmp_path / "labelled"
    small_clips(csv_root, ["a.mp4", "sub/b.mp4", "c.mp4"], frames=4)
    (csv_root / "captions.csv").write_bytes(
        b'path,caption\na.mp4,"a dog, running"\nsub/b.mp4,caf\xe9 \xff\nc.mp4,\ngone.mp4,lost\n')
    source = VideoFolderSource(str(csv_root), frames=1, size=8)
    assert "gone.mp4" in capsys.readouterr().err and source.dropped == 1
    assert sorted(text for _, text in source.items) == ["", "a dog, running", "caf\ufffd \ufffd"]
    big = "x" * 200_000  # beyond the csv module's default field limit
    (csv_root / "captions.csv").write_text(f"a.mp4,{big}\n")
    assert VideoFolderSource(str(csv_root), frames=1, size=8).load(0)[1] == "x" * 1000

    small_clips(labelled, ["playing_guitar/1.mp4", "dog-barking/2.mp4", "loose.mp4"], frames=4)
    source = VideoFolderSource(str(labelled), frames=2, size=8)
    captions = {source.load(k)[1] for k in range(len(source))}
    assert captions == {"a video of playing guitar", "a video of dog barking", ""}


def test_tar_shards_from_a_brace_pattern(tmp_path):
    assert expand_braces("s-{008..010}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar"]
    small_clips(tmp_path, ["clip.mp4"], frames=4)
    data = (tmp_path / "clip.mp4").read_bytes()
    for shard, keys in (("shard-000.tar", ["k0", "k1"]), ("shard-001.tar", ["k2"])):
        with tarfile.open(tmp_path / shard, "w") as tar:
            for key in keys:
                for name, payload in ((f"{key}.mp4", data), (f"{key}.txt", f"caption {key}\n".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    source = make_source(str(tmp_path / "shard-{000..001}.tar"), frames=2, size=16)
    assert isinstance(source, TarShardSource) and len(source) == 3
    loaded = [source.load(k) for k in range(3)]
    assert sorted(text for _, text in loaded) == ["caption k0", "caption k1", "caption k2"]
    assert all(video.shape == (2, 16, 16, 3) for video, _ in loaded)


def test_image_folder_gives_one_frame_videos(tmp_path):
    (tmp_path / "cats").mkdir()
    encode_png(tmp_path / "cats" / "a.png", np.full((20, 30, 3), 200, dtype=np.uint8))
    encode_png(tmp_path / "b.png", np.zeros((40, 24, 3), dtype=np.uint8))
    source = make_source(str(tmp_path), frames=11, size=16)
    assert isinstance(source, ImageFolderSource) and len(source) == 2
    loaded = dict((text, video) for video, text in (source.load(k) for k in range(2)))
    assert loaded["a video of cats"].shape == (1, 16, 16, 3) and loaded["a video of cats"].min() == 200
    assert loaded[""].shape == (1, 16, 16, 3)
    assert isinstance(make_source(f"images:{tmp_path}", 11, 16), ImageFolderSource)


def test_folder_order_is_a_new_permutation_each_epoch_and_clips_are_reproducible(tmp_path):
    names = [f"{i}.mp4" for i in range(6)]
    small_clips(tmp_path, names, frames=24)
    (tmp_path / "captions.csv").write_text("".join(f"{n},clip {n}\n" for n in names))
    source = VideoFolderSource(str(tmp_path), frames=3, size=16, seed=3)
    epochs = [[source.load(k)[1] for k in range(e * 6, e * 6 + 6)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(f"clip {n}" for n in names)
    assert epochs[0] != epochs[1]
    again = VideoFolderSource(str(tmp_path), frames=3, size=16, seed=3)
    np.testing.assert_array_equal(source.load(9)[0], again.load(9)[0])
    # one file read as clips 0..7: each clip starts at its own time, drawn from (seed, k)
    small_clips(tmp_path / "one", ["only.mp4"])
    one = VideoFolderSource(str(tmp_path / "one"), frames=3, size=16)
    brightness = [round(float(one.load(k)[0][0].mean()) / 8) for k in range(8)]
    assert len(set(brightness)) > 3 and max(brightness) <= 24 - 6  # a 3-frame clip at 8 fps spans 6 frames


def test_clip_stream_ranks_are_disjoint_and_resume_continues():
    source = ShapesSource(frames=3, size=16)
    seen = [ClipStream(source, 4, rank=r, world=2, max_batches=2) for r in range(2)]
    clips = [{b["video"][i].numpy().tobytes() for b in stream for i in range(4)} for stream in seen]
    assert len(clips[0]) == len(clips[1]) == 8 and not clips[0] & clips[1]
    whole = list(ClipStream(source, 4, max_batches=4))
    resumed = next(iter(ClipStream(source, 4, start=3 * 4, max_batches=1)))  # after 3 batches of 4
    assert torch.equal(resumed["video"], whole[3]["video"]) and resumed["caption"] == whole[3]["caption"]


def test_a_resume_on_another_number_of_ranks_neither_repeats_nor_skips_clips():
    """3 steps on 4 ranks, then 3 on 2: the global clip indices are 0..17, each seen once."""
    class Numbers:  # clip k is the number k
        name = "numbers"

        def __len__(self):
            return 1000

        def load(self, k):
            return np.full((1, 2, 2, 3), k % 256, np.uint8), str(k)
    seen = [int(c) for r in range(4) for b in ClipStream(Numbers(), 1, r, 4, max_batches=3) for c in b["caption"]]
    seen += [int(c) for r in range(2) for b in ClipStream(Numbers(), 1, r, 2, start=3 * 4, max_batches=3)
             for c in b["caption"]]
    assert sorted(seen) == list(range(18))


def test_batches_do_not_depend_on_the_worker_count():
    stream = ClipStream(ShapesSource(frames=3, size=16), batch_size=2, max_batches=4)
    runs = [list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=n)) for n in (0, 2)]
    assert len(runs[0]) == len(runs[1]) == 4
    for a, b in zip(*runs):
        assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]


def test_empty_folder_or_pattern_names_itself(tmp_path):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    for spec in (str(empty), str(tmp_path / "none-{0..3}.tar")):
        with pytest.raises(ValueError, match=re.escape(f"no videos found in {spec}")):
            make_source(spec, 3, 16)
    with pytest.raises(ValueError, match="nothing_here"):
        VideoFolderSource(str(empty))
    with pytest.raises(ValueError, match="not-a-spec"):
        make_source("not-a-spec", 3, 16)
    assert isinstance(make_source("shapes", 3, 16), ShapesSource)
    small_clips(tmp_path / "ok", ["x.mp4"], frames=4)
    assert isinstance(make_source(str(tmp_path / "ok"), 2, 8), VideoFolderSource)


def test_a_world_cache_key_follows_its_rendering_code_not_where_its_imports_live(tmp_path):
    """The token cache of a world is keyed by the world's code less its imports: moving the modules
    it draws with keeps the cache; an edit to what it renders does not."""
    from kit.stream import rendering_code
    first, moved, edited = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    first.write_text("import os\nfrom video import (A,\n                   B)\nEDGES = 3\n")
    moved.write_text("import os\nfrom media.video import A, B\nEDGES = 3\n")
    edited.write_text("import os\nfrom video import (A,\n                   B)\nEDGES = 4\n")
    assert rendering_code(str(first)) == rendering_code(str(moved))
    assert rendering_code(str(first)) != rendering_code(str(edited))
