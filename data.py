"""
Data for both stages: the procedural Shapes world, real video through PyAV, and one sharded stream.

The Shapes world is the embedded default, so that everything trains and is measured on a fresh
machine with no download. Each clip shows one object (circle, square or triangle; seven colours;
small or large) moving left, right, up or down, or standing still, on a black 64 x 64 canvas, with a
caption such as "a red circle moving right". Its oracle reads colour, shape, size and direction back
from pixels, which turns "does the video match the text?" into a number (evaluate.py).

Every source answers one question: "give me clip number k". A `ClipStream` turns that into batches:
the global sample index of the j-th clip that rank r sees is k = j * world + r, so ranks never see
the same clip, and batch b of a rank goes to DataLoader worker b % workers, so the stream is the same
whatever the worker count. A video folder maps k to (epoch, position) through a permutation seeded
by (seed, epoch): every epoch is shuffled differently, and a resumed run that starts at clip j
continues exactly where it stopped instead of repeating the data order.

Real data has the same interface (`make_source` reads a --data spec): a folder of videos captioned by
a captions.csv of `path,caption` rows or by label sub-folders (`a video of {label}`, as for Moments in
Time), webdataset tar shards (key.mp4 + key.txt), and folders of images as one-frame videos. PyAV
decodes (`read_video`: resampled by timestamp to a fixed fps, short side resized, centre-cropped,
phone rotation undone) and writes .mp4 (H.264) and .gif (`write_video`).

Source:  video (T, H, W, 3) uint8  ->  batch {"video": (B, 3, T, H, W) float in [-1, 1], "caption": [B str]}

Stage 2 trains from a token cache: `build_token_cache` encodes the clips once with the frozen
tokenizer, each rank its share, into safetensors shards of codes (N, t, h, w) int16 with the captions
in the metadata; `load_token_cache` reads all shards back. A generator step then costs no decoding.

Real files break (corrupt, truncated, empty, audio only, too short): read_video raises ValueError, and
the stream skips the file with one stderr line, counts it in the batch's "skipped" and substitutes a
clip. Guards bound a load: MAX_PIXELS (4096 x 4096: 4K passes, 8K is refused), MAX_LEAD, MAX_FRAMES.
Data with nothing usable (no files, 20 failed loads in a row) raises UnusableData at once.

Deviations: the paper trains on licensed web video; here the Shapes world stands in by default.
Object edges are anti-aliased by 4x supersampling so that positions between pixels are visible.
A video shorter than one clip counts as a bad file (skipped), rather than being padded or looped.
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
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset, get_worker_info

# Legend: B batch, T frames, H W pixels, k global clip index, j clip index within one rank.

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 10, "large": 18}  # pixels across on the 64 x 64 canvas
DIRECTIONS = ("left", "right", "up", "down", "still")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass
class ShapeSpec:
    color: str  # a key of COLORS
    shape: str  # one of SHAPES
    size: str  # "small" or "large"
    direction: str  # one of DIRECTIONS


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                     str(rng.choice(list(SIZES))), str(rng.choice(DIRECTIONS)))


def caption(spec: ShapeSpec, with_size: bool = True) -> str:
    """The canonical caption: 'a large red circle moving right' or 'a red circle standing still'."""
    size = f"{spec.size} " if with_size else ""
    if spec.direction == "still":
        return f"a {size}{spec.color} {spec.shape} standing still"
    return f"a {size}{spec.color} {spec.shape} moving {spec.direction}"


def paraphrase(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A training caption: canonical most of the time, otherwise one of a few rewordings, so the text
    encoder has to read the words rather than memorise one template."""
    size = f"{spec.size} " if rng.random() < 0.5 else ""
    obj, d = f"{size}{spec.color} {spec.shape}", spec.direction
    if rng.random() < 0.6:
        return caption(spec, with_size=bool(size))
    if d == "still":
        forms = [f"a {obj} that does not move", f"{obj}, not moving", f"a {obj} staying in place"]
    else:
        adverb = {"left": "to the left", "right": "to the right", "up": "upwards", "down": "downwards"}[d]
        forms = [f"a {obj} goes {d}", f"{obj}, moving {adverb}", f"a {obj} sliding {adverb}"]
    return forms[int(rng.integers(len(forms)))]


def render_shapes(spec: ShapeSpec, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one clip (T, H, W, 3) uint8. The object stays on the canvas for the whole clip: the
    speed is 2 to 3 pixels a frame (at 64 x 64), reduced where a long clip would run out of room."""
    scale = size / 64
    extent = SIZES[spec.size] * scale
    r = extent / 2
    dx, dy = _STEP[spec.direction]
    room = size - extent - 2 * scale  # free travel along the axis of motion, with a 1-pixel margin
    speed = rng.uniform(2, 3) * scale if spec.direction != "still" else 0.0
    if frames > 1:
        speed = min(speed, room / (frames - 1))
    travel = speed * (frames - 1)
    # pick the start so that the whole path fits: along the motion axis only `room - travel` is free
    lo, hi = r + scale, size - r - scale
    cx0, cy0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if dx:
        cx0 = rng.uniform(lo, hi - travel) if dx > 0 else rng.uniform(lo + travel, hi)
    if dy:
        cy0 = rng.uniform(lo, hi - travel) if dy > 0 else rng.uniform(lo + travel, hi)
    t = np.arange(frames, dtype=np.float32)
    cx = (cx0 + dx * speed * t)[:, None, None]  # (T, 1, 1)
    cy = (cy0 + dy * speed * t)[:, None, None]
    ss = 4  # supersampling factor for anti-aliased edges
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    x, y = coords[None, None, :], coords[None, :, None]  # (1, 1, W*ss), (1, H*ss, 1)
    if spec.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif spec.shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:  # an upright triangle: apex at the top, base at the bottom, as wide as it is tall
        rel = (y - (cy - r)) / (2 * r)  # 0 at the apex, 1 at the base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= r * rel)
    cover = inside.reshape(frames, size, ss, size, ss).mean(axis=(2, 4))  # (T, H, W) in [0, 1]
    color = np.array(COLORS[spec.color], dtype=np.float32)
    return np.round(cover[..., None] * color).astype(np.uint8)  # (T, H, W, 3)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a 2-D bool mask, as arrays of flat pixel indices."""
    h, w = mask.shape
    seen = ~mask.ravel().copy()
    out = []
    for start in np.flatnonzero(mask.ravel()):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            p = stack.pop()
            comp.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - 1, x > 0), (p + 1, x < w - 1), (p - w, y > 0), (p + w, y < h - 1)):
                if ok and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        out.append(np.array(comp))
    return out


def to_uint8_frames(video) -> np.ndarray:
    """Accept (T, H, W, 3) uint8 or float in [0, 1], or a (3, T, H, W) tensor in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = np.clip(np.round(video * 255), 0, 255).astype(np.uint8)
    return video  # (T, H, W, 3)


def oracle(video) -> dict:
    """Read colour, shape, size and direction back from a Shapes clip, and whether exactly one object
    is visible in every frame. `video` is an array, a tensor (see to_uint8_frames) or a file path."""
    if isinstance(video, str):
        video = read_video(video)
    frames = to_uint8_frames(video)
    T, H, W, _ = frames.shape
    scale = W / 64
    min_area = 8 * scale * scale  # smaller blobs are noise, not objects
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    one_object, centres, colours, extents, fills, tops = True, [], [], [], [], []
    for f in frames:
        lit = f.max(axis=-1) >= 96  # anything clearly brighter than the black background
        blobs = [c for c in _components(lit) if len(c) >= min_area]
        one_object &= len(blobs) == 1
        if not blobs:
            continue
        blob = max(blobs, key=len)
        ys, xs = np.divmod(blob, W)
        centres.append((xs.mean(), ys.mean()))
        rgb = f.reshape(-1, 3)[blob].astype(np.float32).mean(axis=0)
        # compare hues, not brightness: scale the mean colour so its largest channel is 255
        rgb = rgb * (255 / max(rgb.max(), 1))
        colours.append(names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))])
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        extents.append(max(bw, bh) / scale)
        fills.append(len(blob) / (bw * bh))
        upper = (ys < (ys.min() + ys.max()) / 2).sum()  # a triangle has most of its pixels low down
        tops.append(upper / max(len(blob) - upper, 1))
    if not centres:
        return {"color": None, "shape": None, "size": None, "direction": None, "one_object": False,
                "start": None, "end": None}
    color = max(set(colours), key=colours.count)
    # an upright triangle fills half its box and is top-light; a square fills it; a circle fills pi/4
    if np.median(tops) < 0.6:
        shape = "triangle"
    else:
        shape = "square" if np.median(fills) > 0.9 else "circle"
    size = "small" if np.median(extents) < 14 else "large"
    (x0, y0), (x1, y1) = centres[0], centres[-1]
    dx, dy = (x1 - x0) / scale, (y1 - y0) / scale
    moved = max(abs(dx), abs(dy)) / max(len(centres) - 1, 1)  # pixels a frame at 64 x 64
    if moved < 0.7:
        direction = "still"
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return {"color": color, "shape": shape, "size": size, "direction": direction, "one_object": one_object,
            "start": (x0 / scale, y0 / scale), "end": (x1 / scale, y1 / scale)}  # centres, 64 x 64 pixels



def agreement(video, spec: ShapeSpec) -> dict[str, bool]:
    """Does the video show what `spec` says? One verdict per attribute, by the oracle."""
    seen = oracle(video)
    return {k: seen[k] == getattr(spec, k) for k in ("color", "shape", "size", "direction")} | {
        "one_object": seen["one_object"]}


class ShapesSource:
    """Clip k of the Shapes world, rendered from a generator seeded by (seed, k): the same k always
    gives the same clip, so a resumed run can start anywhere. The world has no end."""

    def __init__(self, frames: int = 11, size: int = 64, seed: int = 0, paraphrases: bool = True):
        self.frames, self.size, self.seed, self.paraphrases = frames, size, seed, paraphrases
        self.name = "shapes"

    def __len__(self) -> int:
        return 2 ** 62

    def load(self, k: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([self.seed, k])
        spec = random_spec(rng)
        video = render_shapes(spec, self.frames, self.size, rng)
        text = paraphrase(spec, rng) if self.paraphrases else caption(spec)
        return video, text


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

    def clip(self, j: int) -> tuple[np.ndarray, str]:
        """Clip number j of this rank, with substitutes for files that fail to decode."""
        n = len(self.source)
        k = j * self.world + self.rank
        for attempt in range(20):
            try:
                return self.source.load(k)
            except (OSError, ValueError, RuntimeError) as err:  # PyAV's errors derive from these
                self.skipped, last = self.skipped + 1, err
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


VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


MAX_PIXELS = 4096 * 4096  # a bigger frame (8K) decodes too slowly for a loader, or a strip resizes too large
MAX_LEAD = 2000  # decoded frames before the clip's first: more means key frames too sparse to seek to
MAX_FRAMES = 10_000  # a whole-video read: a timestamp jump would otherwise repeat one frame without end


def _fit(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(w, h) with the short side resized to `size`; ValueError if the frame, before or after, is too big."""
    w, h = width, height
    if size is not None:
        scale = size / max(min(width, height), 1)  # a header may not know the size yet: 0 x 0
        w, h = max(size, round(width * scale)), max(size, round(height * scale))
    if max(width * height, w * h) > MAX_PIXELS:
        raise ValueError(f"{width} x {height} frames (resized {w} x {h}) are above MAX_PIXELS = {MAX_PIXELS}")
    return w, h


def _rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    """One decoded frame as (H, W, 3) uint8, upright, short side resized to `size` and centre-cropped."""
    # phones store "rotate this many degrees counter-clockwise" in the display matrix; read it before
    # reformat, whose new frame lacks that side data
    turns = round(frame.rotation / 90) % 4
    w, h = _fit(frame.width, frame.height, size)  # the size can change mid-stream
    if size is not None:
        # swscale's area filter averages the pixels it drops, so downscaling does not alias; it also
        # drops alpha and converts gray, 10-bit and any other pixel format to 8-bit RGB
        frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA")
    img = np.rot90(frame.to_ndarray(format="rgb24"), k=turns)  # (H, W, 3) from any pixel format
    if size is not None:
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        img = img[top:top + size, left:left + size]  # (size, size, 3)
    return np.ascontiguousarray(img)


def _pick(container, stream, fps: float | None, start: float):
    """Yield the frames on screen at start + i / fps, i = 0, 1, ... (every frame from `start` if fps is
    None). Picking by timestamp rather than index is what makes variable frame rates work; a frame
    comes twice when fps is above the video's rate."""
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if start > 0:  # jump to the key frame before `start` instead of decoding everything up to it
        container.seek(int((t0 + start) / stream.time_base), stream=stream)
    rate = float(stream.average_rate or 25)
    eps = 0.1 / fps if fps else 1e-6  # GIF times are in 1/100 s: 0.125 s reads back as 0.13 s
    prev, prev_t, gap, i = None, 0.0, 1 / (fps or rate), 0  # i: frames yielded so far
    for n, frame in enumerate(container.decode(stream)):
        if n == MAX_LEAD and i == 0:  # bound the time a load takes, whatever the file
            raise ValueError(f"no frame at {start:.2f} s within {MAX_LEAD} decoded frames (MAX_LEAD)")
        t = (frame.time if frame.time is not None else n / rate) - t0 - start  # seconds into the clip
        if fps is None:
            if t >= -eps:
                i += 1
                yield frame
            continue
        while prev is not None and t > i / fps + eps:  # prev is the last frame at or before i / fps
            yield prev
            i += 1
        gap = t - prev_t if prev is not None and t > prev_t else gap
        prev, prev_t = frame, t
    while prev is not None and fps and i / fps < prev_t + gap - eps:  # the last frame lasts one gap
        yield prev
        i += 1


def read_video(src: str | os.PathLike | io.IOBase, frames: int | None = None, size: int | None = None,
               fps: float | None = None, start: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Decode a video or image (a path or a binary file object) to (T, H, W, 3) uint8 RGB.

    frames: exactly this many (ValueError if the video is shorter), else all, up to MAX_FRAMES.
    size: short side resized to `size`, centre-cropped to size x size.  fps: resample by timestamp.
    start: seconds to skip; with `rng`, the start is drawn uniformly over where a full clip fits.
    Every failure is a ValueError naming the file (a file object by its `name`, if it has one):
    unreadable, truncated, empty, video-less or too short files, frames above MAX_PIXELS, a first frame
    beyond MAX_LEAD. PyAV's errors are converted, since not all derive from OSError or ValueError."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "a file object")
    limit = frames or MAX_FRAMES + 1
    try:
        with av.open(src) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            _fit(stream.codec_context.width, stream.codec_context.height, size)  # before decoding a clip
            if rng is not None and frames is not None:
                # container.duration is in microseconds; both are None when the header does not say
                duration = (float(stream.duration * stream.time_base) if stream.duration
                            else (container.duration or 0) / 1e6)
                clip = frames / (fps or float(stream.average_rate or 25))
                start = float(rng.uniform(0, duration - clip)) if duration > clip else 0.0
            out, last, img = [], None, None
            for frame in _pick(container, stream, fps, start):
                if frame is not last:  # convert a repeated frame once
                    last, img = frame, _rgb(frame, size)
                out.append(img)
                if len(out) == limit:
                    break
    except (av.error.FFmpegError, ValueError) as err:  # FFmpeg's message without the path again
        raise ValueError(f"cannot decode {name}: {getattr(err, 'strerror', None) or err}") from err
    if len(out) > MAX_FRAMES:
        raise ValueError(f"{name} has more than MAX_FRAMES = {MAX_FRAMES} frames: read clips with `frames`")
    if not out or (frames is not None and len(out) < frames):
        raise ValueError(f"{name} is too short: {len(out)} frames from {start:.2f} s, {frames or 1} needed")
    return np.stack(out)  # (T, H, W, 3)


def write_video(path: str, video: np.ndarray | torch.Tensor, fps: float = 8) -> None:
    """Write (T, H, W, 3) uint8 frames (or what to_uint8_frames takes) to .mp4 (H.264) or .gif."""
    video, ext = to_uint8_frames(video), os.path.splitext(path)[1].lower()
    if ext not in (".mp4", ".gif"):  # .png frame grids are drawn elsewhere, with matplotlib
        raise ValueError(f"write_video writes .mp4 or .gif, not {ext or 'no extension'!r} ({path})")
    mp4 = ext == ".mp4"
    if mp4:  # 4:2:0 halves the chroma grid, so H.264 needs even sides: repeat the last row / column
        video = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264" if mp4 else "gif", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = video.shape[1:3]
        # the GIF encoder wants 8-bit colour: rgb8 is a fixed 3-3-2 palette that keeps the Shapes
        # colours exact, where pal8 would need a palette computed first
        stream.pix_fmt = "yuv420p" if mp4 else "rgb8"
        stream.options = {"crf": "18"} if mp4 else {}  # near lossless; the default 23 smears small clips
        for img in video:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=stream.pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the frames the encoder still holds


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
                fps: float = 8.0) -> ShapesSource | VideoFolderSource:
    """The source for a --data spec: 'shapes', tar shards (a '.tar' path, braces or a glob), a folder
    of videos, or a folder of images (one with no videos, or any folder as 'images:FOLDER')."""
    if spec == "shapes":
        return ShapesSource(frames, size, seed)
    if spec.startswith("images:"):
        return ImageFolderSource(spec[len("images:"):], size, seed)
    if ".tar" in spec or any(c in spec for c in "{*?["):
        return TarShardSource(spec, frames, size, fps, seed)
    if os.path.isdir(spec):  # an empty folder raises UnusableData in ImageFolderSource
        if any(p.suffix.lower() in VIDEO_EXTS for p in Path(spec).rglob("*")):
            return VideoFolderSource(spec, frames, size, fps, seed)
        return ImageFolderSource(spec, size, seed)
    raise ValueError(f"unknown data {spec!r}: expected 'shapes', a folder, 'images:FOLDER' or tar shards")


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
