"""
Data for both stages: sources of captioned clips, and the held-out split of real data.

Every source answers one question: "give me clip number k" (`load(k)` -> video (T, H, W, 3) uint8
and its caption); stream.py turns that into batches for every rank and into stage 2's token cache. A
video folder maps k to (epoch, position) through a permutation seeded by (seed, epoch): every epoch
is shuffled differently, and the clip's start time is drawn from (seed, k), so the same k gives the
same clip in any worker and after any resume.

`make_source` reads a --data spec: a procedural world (the Shapes world of shapes.py, the default,
or the Animals world of animals.py), a folder of videos captioned by a captions.csv of
`path,caption` rows or by label sub-folders (`a video of {label}`, as for Moments in Time),
webdataset tar shards (key.mp4 + key.txt), or folders of images as one-frame videos. Files decode
through `read_video` (video.py), made square by `crop` ("center" or "pad").

Held out: a VAL_SHARE of a folder's files (or a shard's videos), chosen by a hash of each name, is
kept for validation and never trained on (`held_out`; split "train" or "val" of a source), unless
--val-data names held-out data of its own; `train_and_val` makes both sources and the one-line data
summary. For stage 2's token cache a real source gives fixed windows, CLIPS_PER_SECOND of each file
spread over its length (`windows`), so a long file gives more than a short one and no window is
encoded twice.

How a folder's files and captions are listed (captions.csv, label folders) is folders.py's. Real
files break (corrupt, truncated, empty, audio only, too short): read_video raises ValueError, and
the stream skips the file with one stderr line (`say_skipped`). Data with nothing usable (no files,
no listed file that exists) raises UnusableData at once.

Deviations: a video shorter than one clip counts as a bad file (skipped), rather than being padded
or looped.
"""

import glob
import hashlib
import io
import math
import os
import tarfile
from pathlib import Path

import numpy as np

from media.folders import (CAPTION_CHARS, UnusableData, expand_braces, folder_items, holds_videos,
                           say_skipped)
from media.video import CROPS, IMAGE_EXTS, MAX_BYTES, VIDEO_EXTS, read_video, video_seconds
from worlds import SOURCES

# Legend: T frames, H W pixels, k global clip index.

# the share of a folder's files (or a shard's videos) held out for validation, by name hash
VAL_SHARE = 0.1
# stage 2's token cache: windows of a real video per second of it
CLIPS_PER_SECOND = 2


def name_position(name: str) -> float:
    """A file's place in [0, 1), from the sha1 of its name: the same on every machine, rank and run."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8", "replace")).digest()[:8], "big") / 2**64


def held_out(names: list[str]) -> list[bool]:
    """Which files validation keeps: those whose name hashes below VAL_SHARE; of two or more files
    at least one is held out and at least one is trained on."""
    places = [name_position(n) for n in names]
    held = [p < VAL_SHARE for p in places]
    if len(names) >= 2 and not any(held):
        held[int(np.argmin(places))] = True
    if len(names) >= 2 and all(held):
        held[int(np.argmax(places))] = False
    return held


class VideoFolderSource:
    """A folder of videos, searched recursively; captions from captions.csv or label sub-folders
    (root/label/clip.mp4, the Moments in Time layout). Clip k is position k % len of epoch k //
    len, and each epoch visits every file once, shuffled by (seed, epoch); the clip's start time is
    drawn from (seed, k), so the same k gives the same clip in any worker and after any resume.
    split: "train" leaves out the held-out files (`held_out`), "val" keeps only them, "all" keeps
    every file."""
    exts = VIDEO_EXTS

    def __init__(self, root: str, frames: int = 11, size: int = 128, fps: float | None = 8.0,
                 seed: int = 0, split: str = "all", crop: str = "center"):
        self.name = str(root)
        self.frames = frames
        self.size = size
        self.fps = fps
        self.seed = seed
        self.crop = crop
        # `name` is what messages call the data; files are named relative to `root`
        self.root = str(root)
        # [(file, caption)], and how many entries indexing dropped (each said on one stderr line);
        # UnusableData if nothing is left
        items, self.dropped = self.index_files(root)
        held = held_out([self.entry_name(entry) for entry, _ in items])
        # never trained on when split is "train"
        self.held_out = [item for item, h in zip(items, held) if h]
        self.items = {"all": items, "val": self.held_out,
                      "train": [i for i, h in zip(items, held) if not h]}[split]
        # one file: nothing to hold out (the summary says so)
        self.items = self.items or items
        self._epoch = -1
        self._order = np.arange(0)

    def index_files(self, root: str) -> tuple[list, int]:
        """[(file, caption)] of the data set and the entries dropped; subclasses index
        other containers."""
        items, dropped, self.layout = folder_items(Path(root), self.exts)
        return items, dropped

    def entry_name(self, entry) -> str:
        """The name an entry is held out by: its path from the folder (../ or absolute rows of a
        captions.csv too)."""
        return Path(os.path.relpath(entry, self.root)).as_posix()

    def __len__(self) -> int:
        return len(self.items)

    def item(self, k: int) -> tuple:
        """The entry of self.items that clip k reads."""
        epoch, position = divmod(k, len(self.items))
        if epoch != self._epoch:
            # one permutation per epoch, cached while the stream is in it
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[self._order[position]]

    def fetch(self, path: Path) -> Path:
        """What read_video decodes for one entry of self.items (TarShardSource reads bytes)."""
        return path

    def load(self, k: int) -> tuple[np.ndarray, str]:
        entry, text = self.item(k)
        # the clip's start time
        rng = np.random.default_rng([self.seed, k])
        return read_video(self.fetch(entry), self.frames, self.size, self.fps, rng=rng,
                          crop=self.crop), text

    def seconds(self, limit: int | None = None) -> list[float]:
        """Each file's duration from its header (0 where unknown), of the first `limit` files
        or all."""
        return [video_seconds(self.fetch(entry)) for entry, _ in self.items[:limit]]

    def summary(self, split: str) -> str:
        """One line: what was found, how it is captioned, what is held out, and how long it lasts."""
        n = len(self.items)
        empty = sum(not text for _, text in self.items)
        kind = "images" if self.frames == 1 else "videos"
        line = f"data {self.name}: {n} {kind} for {split} ({self.layout}: {n - empty} captioned, {empty} empty)"
        if self.dropped:
            line += f", {self.dropped} entries skipped"
        if split == "train":
            names = ", ".join(self.entry_name(e) for e, _ in self.held_out[:3])
            names += ", ..." if len(self.held_out) > 3 else ""
            line += (f", {len(self.held_out)} held out for validation by name hash ({names})" if self.held_out else
                     ", nothing held out (one file): validation reads the training file; name one with --val-data")
        if kind == "videos":
            # headers only; a large folder is estimated from 200 files
            sample = self.seconds(limit=200)
            total = sum(sample) * n / max(len(sample), 1)
            line += f", {'~' if n > len(sample) else ''}{total:.0f} s of video"
        return line

    def windows(self, limit: int) -> "WindowSource":
        """Stage 2's token cache: CLIPS_PER_SECOND evenly spaced windows of each file (at least
        one), so a long file gives more than a short one; at most `limit` in all, drawn evenly if
        there are more. Window j of the w_i of file i starts at (d_i - clip) (j + 0.5) / w_i
        seconds; only the drawn ones are listed, however many windows the headers claim."""
        clip = self.frames / (self.fps or 8.0)
        durations = self.seconds()
        counts = [max(1, math.ceil(d * CLIPS_PER_SECOND)) for d in durations]
        counts = np.array(counts, dtype=np.int64)
        # window k belongs to the first file whose end exceeds k
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(ends) else 0
        picks = np.arange(total)
        if total > limit:
            rng = np.random.default_rng([self.seed, 5])
            picks = np.sort(rng.choice(total, limit, replace=False))
        spots = []
        for k in picks:
            i = int(np.searchsorted(ends, k, side="right"))
            j = int(k - (ends[i] - counts[i]))
            spots.append((i, max(durations[i] - clip, 0.0) * (j + 0.5) / int(counts[i])))
        return WindowSource(self, spots)


class WindowSource:
    """Fixed windows of a VideoFolderSource's files: clip k is the window spots[k % len]
    (file, start)."""

    def __init__(self, files: VideoFolderSource, spots: list[tuple[int, float]]):
        self.files = files
        self.spots = spots
        self.name = files.name
        self.dropped = files.dropped

    def __len__(self) -> int:
        return len(self.spots)

    def load(self, k: int) -> tuple[np.ndarray, str]:
        i, start = self.spots[k % len(self.spots)]
        files = self.files
        entry, text = files.items[i]
        return read_video(files.fetch(entry), files.frames, files.size, files.fps, start=start,
                          crop=files.crop), text


class ImageFolderSource(VideoFolderSource):
    """A folder of images read as one-frame videos (1, size, size, 3), for joint image-video
    training (Phenaki §3.2: an image is a video with T = 1). Captions as for VideoFolderSource."""
    exts = IMAGE_EXTS

    def __init__(self, root: str, size: int = 128, seed: int = 0, split: str = "all",
                 crop: str = "center"):
        super().__init__(root, 1, size, None, seed, split, crop)


class TarShardSource(VideoFolderSource):
    """Webdataset tar shards ('/data/shard-{000..009}.tar' or a glob): members key.mp4 (or another
    video type) and key.txt (its caption) make one sample. Indexing reads every header and caption
    once; a load then reads the video's bytes at their offset, so the tars must be uncompressed.
    Order and clip start follow the rules of VideoFolderSource."""

    def index_files(self, pattern: str) -> tuple[list, int]:
        self.layout = "tar shards"
        # [((shard, offset, length, member), caption)]
        items = []
        dropped = 0
        why = "no file matches it"
        shards = set()
        for p in expand_braces(pattern):
            shards.update(glob.glob(p))
        for shard in sorted(shards):
            # [(key, entry)], {key: caption}
            videos = []
            texts = {}
            try:
                # a truncated shard keeps the samples before the cut
                with tarfile.open(shard, "r:") as tar:
                    for m in tar:
                        key, ext = os.path.splitext(m.name)
                        if m.isfile() and ext.lower() in VIDEO_EXTS and m.size > MAX_BYTES:
                            dropped += 1
                            why = f"{m.size} bytes, above MAX_BYTES"
                            say_skipped(f"{m.name[:200]} in {shard}", why)
                        elif m.isfile() and ext.lower() in VIDEO_EXTS:
                            videos.append((key, (shard, m.offset_data, m.size, m.name)))
                        elif m.isfile() and ext == ".txt":
                            # at most what is kept: a caption's characters take up to 4 bytes each
                            text = tar.extractfile(m).read(4 * CAPTION_CHARS)
                            texts[key] = text.decode("utf-8", errors="replace")
            except (tarfile.TarError, OSError) as err:
                reason = f"not a readable uncompressed tar: {err}"
                dropped += 1
                why = f"{shard} is {reason}"
                say_skipped(f"the rest of {shard} (after {len(videos)} videos)", reason)
            for key, entry in sorted(videos):
                items.append((entry, texts.get(key, "").strip()[:CAPTION_CHARS]))
        if not items:
            raise UnusableData(f"no videos found in {pattern}: {why}")
        return items, dropped

    def entry_name(self, entry) -> str:
        # shard/member
        return f"{os.path.basename(entry[0])}/{entry[3]}"

    def fetch(self, entry: tuple[str, int, int, str]) -> io.BytesIO:
        shard, offset, length, member = entry
        with open(shard, "rb") as f:
            f.seek(offset)
            data = io.BytesIO(f.read(length))
        # read_video names the file in its errors
        data.name = f"{member} in {shard}"
        return data


def make_source(spec: str, frames: int, size: int, seed: int = 0, fps: float = 8.0,
                split: str = "all",
                crop: str = "center"):
    """The source for a --data spec: a world ('shapes' or 'animals'), tar shards (a '.tar' path,
    braces or a glob), a folder of videos, or a folder of images (one with no videos, or any folder
    as 'images:FOLDER'). split: "train", "val" or "all" of a real data set's files
    (VideoFolderSource); a world has no files, and its clips for validation come from another seed.
    crop: "center" or "pad" (read_video)."""
    if crop not in CROPS:
        raise ValueError(f"train.crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if spec in SOURCES:
        # a world: clips rendered on the fly from (seed, index)
        return SOURCES[spec](frames, size, seed)
    if spec.startswith("images:"):
        return ImageFolderSource(spec[len("images:"):], size, seed, split, crop)
    if not os.path.isdir(spec) and (".tar" in spec or any(c in spec for c in "{*?[")):
        # a folder is a folder, whatever its name holds
        return TarShardSource(spec, frames, size, fps, seed, split, crop)
    if not os.path.exists(spec):
        raise ValueError(f"--data {spec}: no such folder or file; expected 'shapes', 'animals', a folder of videos "
                         "or images, 'images:FOLDER', or tar shards")
    if os.path.isdir(spec) and not any(p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS for p in Path(spec).rglob("*")) \
            and any(Path(spec).glob("*.tar")):
        raise ValueError(f"--data {spec} is a folder of tar shards: pass them as '{os.path.join(spec, '*.tar')}'")
    if os.path.isdir(spec):
        # an empty folder raises UnusableData in ImageFolderSource
        if holds_videos(Path(spec)):
            return VideoFolderSource(spec, frames, size, fps, seed, split, crop)
        return ImageFolderSource(spec, size, seed, split, crop)
    raise ValueError(f"unknown data {spec!r}: expected 'shapes', 'animals', a folder, 'images:FOLDER' or tar shards")


def train_and_val(cfg, stage: int) -> tuple[object, object, list[str]]:
    """The training source and the held-out one of a run (cfg a TrainConfig) -> (train, val, summary
    lines). Held out: cfg.val_data if given, else a VAL_SHARE of the files by name hash, never
    trained on; a world's validation clips come from another seed. Refused in one line (ValueError):
    stage 2 on data whose captions are all empty."""
    def make(spec: str, split: str, seed: int):
        return make_source(spec, cfg.frames, cfg.image_size, seed, cfg.fps, split, cfg.crop)
    source = make(cfg.data, "all" if cfg.val_data else "train", cfg.seed)
    val = make(cfg.val_data or cfg.data, "all" if cfg.val_data else "val", cfg.seed + 1)
    if not cfg.val_data and hasattr(val, "summary"):
        # what a load failure names
        val.name = f"the held-out files of {cfg.data}"
    if not hasattr(source, "summary"):
        # a world
        return source, val, []
    lines = [source.summary("train")] + ([val.summary("validation")] if cfg.val_data else [])
    if stage == 2 and not any(text for _, text in source.items):
        raise ValueError(f"every caption of {cfg.data} is empty ({source.layout}): stage 2 learns from captions; "
                         "add a captions.csv of path,caption rows, or put the videos in folders named by their label")
    return source, val, lines
