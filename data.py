"""
Data for both stages: sources of captioned clips, one sharded and resumable stream, and the token cache.

Every source answers one question: "give me clip number k". A `ClipStream` turns that into batches:
the global sample index of the j-th clip that rank r sees is k = j * world + r, so ranks never see
the same clip, and batch b of a rank goes to DataLoader worker b % workers, so the stream is the same
whatever the worker count. A video folder maps k to (epoch, position) through a permutation seeded
by (seed, epoch): every epoch is shuffled differently, and a resumed run that starts at clip j
continues exactly where it stopped instead of repeating the data order.

`make_source` reads a --data spec: a procedural world (the Shapes world of shapes.py, the default, or
the Animals world of animals.py), a folder of videos captioned by a captions.csv of `path,caption` rows
or by label sub-folders (`a video of {label}`, as for Moments in Time), webdataset tar shards (key.mp4 +
key.txt), or folders of images as one-frame videos. Files decode through `read_video` (video.py).

Source:  video (T, H, W, 3) uint8  ->  batch {"video": (B, 3, T, H, W) float in [-1, 1], "caption": [B str]}

Stage 2 trains from a token cache: `build_token_cache` encodes the clips once with the frozen
tokenizer, each rank its share, into safetensors shards of codes (N, t, h, w) int16 with the captions
in the metadata; `load_token_cache` reads all shards back. A generator step then costs no decoding.

Real files break (corrupt, truncated, empty, audio only, too short): read_video raises ValueError, and
the stream skips the file with one stderr line, counts it in the batch's "skipped" and substitutes a
clip. Data with nothing usable (no files, 20 failed loads in a row) raises UnusableData at once.

Deviations: a video shorter than one clip counts as a bad file (skipped), rather than being padded or looped.
"""

import csv
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset, get_worker_info

from animals import AnimalsSource
from shapes import ShapesSource
from video import IMAGE_EXTS, VIDEO_EXTS, read_video

# Legend: B batch, T frames, H W pixels, k global clip index, j clip index within one rank.

class UnusableData(ValueError):
    """The data set has nothing to train on: no files, or only files that fail to load. One line."""


def say_skipped(what: str, why: object) -> None:
    """One stderr line for one skipped file (warnings.warn prints two; FFmpeg messages may hold newlines)."""
    print(f"skipped {what}: {' '.join(str(why).split())}", file=sys.stderr, flush=True)


class ClipStream(IterableDataset):
    """Batches of clips from a source, sharded by rank and DataLoader worker (see the module docstring).
    Start at `start_batch` to resume. A clip that fails to load is skipped with one stderr line and
    counted, and a deterministic substitute takes its place, so the batch size and the order stay fixed."""

    def __init__(self, source, batch_size: int, rank: int = 0, world: int = 1, start_batch: int = 0,
                 max_batches: int | None = None):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.start_batch, self.max_batches = start_batch, max_batches
        self.skipped = 0  # per process; each DataLoader worker counts its own
        self.said: set[str] = set()  # the failures already reported: a bad file is named once, not every epoch

    def clip(self, j: int) -> tuple[np.ndarray, str]:
        """Clip number j of this rank, with substitutes for files that fail to decode."""
        n = len(self.source)
        k = j * self.world + self.rank
        for attempt in range(20):
            try:
                return self.source.load(k)
            except (OSError, ValueError, RuntimeError) as err:  # PyAV's errors derive from these
                self.skipped, last = self.skipped + 1, err
                if str(err) not in self.said:
                    self.said.add(str(err))
                    say_skipped(f"clip {k} of {self.source.name}", err)
                k = int(np.random.default_rng([k, attempt, 7]).integers(n))
        last = " ".join(str(last).split())
        raise UnusableData(f"{self.source.name}: 20 loads in a row failed, the last with: {last}")

    def batch(self, b: int) -> dict:
        """{"video": (B, 3, T, H, W) in [-1, 1], "caption": [B str], "skipped": files skipped for it}."""
        before = self.skipped
        clips = [self.clip(j) for j in range(b * self.batch_size, (b + 1) * self.batch_size)]
        video = torch.from_numpy(np.stack([v for v, _ in clips]))  # (B, T, H, W, 3) uint8
        video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, H, W) in [-1, 1]
        return {"video": video, "caption": [c for _, c in clips], "skipped": self.skipped - before}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        b = self.start_batch + worker
        end = math.inf if self.max_batches is None else self.start_batch + self.max_batches
        while b < end:
            yield self.batch(b)
            b += workers


def _folder_items(root: Path, exts: tuple[str, ...]) -> tuple[list[tuple[Path, str]], int]:
    """(file, caption) pairs of a folder and the number of captions.csv rows dropped: root/captions.csv
    (`path,caption` rows, paths relative to root) if there is one, else `a video of {label}` from each
    file's sub-folder, else "". Captions are cut to 1000 characters; bytes that are not UTF-8 become U+FFFD."""
    table = root / "captions.csv"
    if not table.is_file():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
        if not files:
            why = f"no {' '.join(exts)} files in it" if root.is_dir() else "no such folder"
            raise UnusableData(f"no videos found in {root}: {why}")
        labels = [re.sub("[_-]", " ", p.parent.name) if p.parent != root else "" for p in files]
        return [(p, f"a video of {label}" if label else "") for p, label in zip(files, labels)], 0
    # lift the csv module's 128 KiB field limit (process-wide), so a huge caption is cut, not fatal
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as f:
        rows = [row for row in csv.reader(f) if row and row[:2] != ["path", "caption"]]
    found = []
    for row in rows:
        if os.path.isfile(root / row[0]):  # False for a name too long or with a NUL byte, too
            found.append((root / row[0], (row[1] if len(row) > 1 else "").strip()[:1000]))
        else:
            say_skipped(f"row {row[0][:200]!r} of {table}", "no such file")
    if not found:
        raise UnusableData(f"no videos found in {root}: none of the {len(rows)} files named in {table} exists")
    return found, len(rows) - len(found)


class VideoFolderSource:
    """A folder of videos, searched recursively; captions from captions.csv or label sub-folders
    (root/label/clip.mp4, the Moments in Time layout). Clip k is position k % len of epoch k // len,
    and each epoch visits every file once, shuffled by (seed, epoch); the clip's start time is drawn
    from (seed, k), so the same k gives the same clip in any worker and after any resume."""
    exts = VIDEO_EXTS

    def __init__(self, root: str, frames: int = 11, size: int = 128, fps: float | None = 8.0, seed: int = 0):
        self.name, self.frames, self.size, self.fps, self.seed = str(root), frames, size, fps, seed
        # [(file, caption)], and how many entries indexing dropped (each said on one stderr line);
        # UnusableData if nothing is left
        self.items, self.dropped = self.index_files(root)
        self._epoch, self._order = -1, np.arange(0)

    def index_files(self, root: str) -> tuple[list, int]:
        """[(file, caption)] of the data set and the entries dropped; subclasses index other containers."""
        return _folder_items(Path(root), self.exts)

    def __len__(self) -> int:
        return len(self.items)

    def item(self, k: int) -> tuple:
        """The entry of self.items that clip k reads."""
        epoch, position = divmod(k, len(self.items))
        if epoch != self._epoch:  # one permutation per epoch, cached while the stream is in it
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return self.items[self._order[position]]

    def fetch(self, path: Path) -> Path:
        """What read_video decodes for one entry of self.items (TarShardSource reads bytes)."""
        return path

    def load(self, k: int) -> tuple[np.ndarray, str]:
        entry, text = self.item(k)
        rng = np.random.default_rng([self.seed, k])  # the clip's start time
        return read_video(self.fetch(entry), self.frames, self.size, self.fps, rng=rng), text


class ImageFolderSource(VideoFolderSource):
    """A folder of images read as one-frame videos (1, size, size, 3), for joint image-video training
    (Phenaki §3.2: an image is a video with T = 1). Captions as for VideoFolderSource."""
    exts = IMAGE_EXTS

    def __init__(self, root: str, size: int = 128, seed: int = 0):
        super().__init__(root, 1, size, None, seed)


def expand_braces(pattern: str) -> list[str]:
    """'shard-{000..002}.tar' -> ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']; '{a,b}' too."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    lo, hi, options = match.groups()
    if options is None:  # a numeric range keeps the zero padding of its lower end
        options = ",".join(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for option in options.split(",") for p in expand_braces(head + option + tail)]


class TarShardSource(VideoFolderSource):
    """Webdataset tar shards ('/data/shard-{000..009}.tar' or a glob): members key.mp4 (or another
    video type) and key.txt (its caption) make one sample. Indexing reads every header and caption
    once; a load then reads the video's bytes at their offset, so the tars must be uncompressed.
    Order and clip start follow the rules of VideoFolderSource."""

    def index_files(self, pattern: str) -> tuple[list, int]:
        items, dropped, why = [], 0, "no file matches it"  # [((shard, offset, length, member), caption)]
        for shard in sorted({path for p in expand_braces(pattern) for path in glob.glob(p)}):
            videos, texts = [], {}  # [(key, entry)], {key: caption}
            try:  # a truncated shard keeps the samples before the cut
                with tarfile.open(shard, "r:") as tar:
                    for m in tar:
                        key, ext = os.path.splitext(m.name)
                        if m.isfile() and ext.lower() in VIDEO_EXTS:
                            videos.append((key, (shard, m.offset_data, m.size, m.name)))
                        elif m.isfile() and ext == ".txt":
                            texts[key] = tar.extractfile(m).read().decode("utf-8", errors="replace")
            except (tarfile.TarError, OSError) as err:
                reason = f"not a readable uncompressed tar: {err}"
                dropped, why = dropped + 1, f"{shard} is {reason}"
                say_skipped(f"the rest of {shard} (after {len(videos)} videos)", reason)
            items += [(entry, texts.get(key, "").strip()[:1000]) for key, entry in sorted(videos)]
        if not items:
            raise UnusableData(f"no videos found in {pattern}: {why}")
        return items, dropped

    def fetch(self, entry: tuple[str, int, int, str]) -> io.BytesIO:
        shard, offset, length, member = entry
        with open(shard, "rb") as f:
            f.seek(offset)
            data = io.BytesIO(f.read(length))
        data.name = f"{member} in {shard}"  # read_video names the file in its errors
        return data


def make_source(spec: str, frames: int, size: int, seed: int = 0,
                fps: float = 8.0) -> ShapesSource | AnimalsSource | VideoFolderSource:
    """The source for a --data spec: a world ('shapes' or 'animals'), tar shards (a '.tar' path, braces or a
    glob), a folder of videos, or a folder of images (one with no videos, or any folder as 'images:FOLDER')."""
    if spec == "shapes":
        return ShapesSource(frames, size, seed)
    if spec == "animals":
        return AnimalsSource(frames, size, seed)
    if spec.startswith("images:"):
        return ImageFolderSource(spec[len("images:"):], size, seed)
    if ".tar" in spec or any(c in spec for c in "{*?["):
        return TarShardSource(spec, frames, size, fps, seed)
    if not os.path.exists(spec):
        raise ValueError(f"--data {spec}: no such folder or file; expected 'shapes', 'animals', a folder of videos "
                         "or images, 'images:FOLDER', or tar shards")
    if os.path.isdir(spec) and not any(p.suffix.lower() in VIDEO_EXTS + IMAGE_EXTS for p in Path(spec).rglob("*")) \
            and any(Path(spec).glob("*.tar")):
        raise ValueError(f"--data {spec} is a folder of tar shards: pass them as '{os.path.join(spec, '*.tar')}'")
    if os.path.isdir(spec):  # an empty folder raises UnusableData in ImageFolderSource
        if any(p.suffix.lower() in VIDEO_EXTS for p in Path(spec).rglob("*")):
            return VideoFolderSource(spec, frames, size, fps, seed)
        return ImageFolderSource(spec, size, seed)
    raise ValueError(f"unknown data {spec!r}: expected 'shapes', 'animals', a folder, 'images:FOLDER' or tar shards")


# ----------------------------------------------------------------------------- the token cache

def cache_shard(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"tokens-{rank:03d}-of-{world:03d}.safetensors")


def build_token_cache(encode, source, clips: int, folder: str, batch_size: int, rank: int, world: int,
                      key: str, on_batch=None) -> None:
    """Encode this rank's share of `clips` clips with `encode` (video (B, 3, T, H, W) -> codes (B, t, h, w))
    into one shard. `key` names what made the cache (tokenizer hash, data, sizes); a shard whose key
    differs is rebuilt. Written atomically, so an interrupted build is redone, never half-read."""
    path = cache_shard(folder, rank, world)
    if os.path.exists(path):
        with safe_open(path, framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return
    os.makedirs(folder, exist_ok=True)
    stream = ClipStream(source, batch_size, rank, world)
    batches = math.ceil(clips / world / batch_size)
    codes, captions = [], []
    for b in range(batches):
        batch = stream.batch(b)
        codes.append(encode(batch["video"]).to(torch.int16).cpu())  # (B, t, h, w)
        captions += batch["caption"]
        if on_batch is not None:
            on_batch(b + 1, batches)
    meta = {"key": key, "captions": json.dumps(captions), "skipped": str(stream.skipped)}
    save_file({"codes": torch.cat(codes)}, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def load_token_cache(folder: str, world: int, key: str) -> tuple[torch.Tensor, list[str], int]:
    """All shards of a cache -> codes (N, t, h, w) long, N captions, and the files skipped building it."""
    codes, captions, skipped = [], [], 0
    for rank in range(world):
        with safe_open(cache_shard(folder, rank, world), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError(f"token cache shard {rank} in {folder} was made by another tokenizer or data")
            codes.append(f.get_tensor("codes").long())
            captions += json.loads(meta["captions"])
            skipped += int(meta.get("skipped", 0))
    return torch.cat(codes), captions, skipped
