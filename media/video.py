"""
Real video in and out through PyAV (FFmpeg): decoding files to clips, encoding .mp4 and .gif, and the
limits on what one file may ask of a loader.

`read_video` decodes a video or an image (a path or a binary file object) to RGB frames. It
resamples by timestamp to a fixed fps, so variable frame rates work and a frame repeats when fps is
above the video's rate; resizes the short side with swscale's area filter (no aliasing) and
centre-crops; undoes phone rotation and mirroring (the display matrix) and non-square pixels; and
turns any pixel format (gray, 10-bit, alpha) into 8-bit RGB. With `rng`, a clip's start is drawn
uniformly over where a full clip fits. `write_video` writes .mp4 (H.264) and .gif, and `VideoWriter`
does so a few frames at a time; `to_uint8_frames` takes the layouts that models and scripts hand it.

read_video:       a file FFmpeg decodes (VIDEO_EXTS, IMAGE_EXTS)  ->  (T, H, W, 3) uint8 RGB
write_video:      (T, H, W, 3) uint8, or what to_uint8_frames takes  ->  .mp4 or .gif
to_uint8_frames:  (3, T, H, W) tensor in [-1, 1], or (T, H, W, 3) float in [0, 1]  ->  (T, H, W, 3)
uint8 save_output, Outputs:  what sample.py writes: .mp4 / .gif, or a .png grid of frames, scaled up
if asked

Real files break (corrupt, truncated, empty, audio only, too short): every failure of read_video is
a ValueError naming the file, so that a loader can skip it (data.py). Guards bound the time and
memory of one load: MAX_PIXELS (4096 x 4096: 4K passes, 8K is refused, from the header, before
decoding), MAX_LEAD (decoded frames before the clip's first), MAX_FRAMES (a whole-video read),
MAX_SECONDS (the duration a header may claim), MAX_BYTES (a video read into memory whole, as a
tar member is) and the pixels one read may decode: DECODE_FLOOR and DECODE_PER_BYTE of the file, what
an honest file of its size can hold (a 46 KB GIF can hold 2000 frames of 4096 x 4096).

Deviations: a video shorter than the clip asked for is refused (ValueError), rather than padded or
looped. For .mp4, odd sides are padded by repeating the last row or column (H.264's 4:2:0 chroma).
"""

import io
import math
import os
from fractions import Fraction

import av
from av.sidedata.sidedata import SideDataContainer, Type as SideDataType
import numpy as np
import torch

# Legend: T frames, H W pixels.

# swscale runs in the calling thread. PyAV (18 on) keeps one scaler a thread for the life of the
# process, with a pool of slice threads when asked for more than one; a DataLoader worker forked
# after the main process scaled a frame inherits that scaler without its threads and waits for them
# forever. One thread keeps no pool, and the workers are the parallelism anyway.
SWS_THREADS = 1

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# a bigger frame (8K) decodes too slowly for a loader, or a strip resizes too large
MAX_PIXELS = 4096 * 4096
# decoded frames before the clip's first: more means key frames too sparse to seek to
MAX_LEAD = 2000
# a whole-video read: a timestamp jump would otherwise repeat one frame without end
MAX_FRAMES = 10_000
# the longest duration a header may claim; a longer one reads as unknown
MAX_SECONDS = 24 * 3600
# the largest video read into memory whole (a tar shard's member)
MAX_BYTES = 1 << 30
# The pixels one read may decode: this many, plus DECODE_PER_BYTE for each byte of the file. H.264
# of a still 4K scene spends about 2 KB a frame (4000 pixels a byte); a crafted GIF, 23 bytes for
# each frame of 4096 x 4096 (700 000 pixels a byte), which takes 46 ms to decode
DECODE_FLOOR = 1 << 28
DECODE_PER_BYTE = 1 << 13


def to_uint8_frames(video) -> np.ndarray:
    """Accept (T, H, W, 3) uint8 or float in [0, 1], or a (3, T, H, W) tensor in [-1, 1]."""
    if isinstance(video, torch.Tensor):
        video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8:
        video = np.clip(np.round(video * 255), 0, 255).astype(np.uint8)
    return video  # (T, H, W, 3)


# how a frame becomes a square: cut the long side's ends, or letterbox the whole
CROPS = ("center", "pad")


def _fit(width: int, height: int, size: int | None, crop: str = "center") -> tuple[int, int]:
    """(w, h) with the short side resized to `size` (crop "center") or the long side ("pad");
    ValueError if the frame, before or after, is too big."""
    w = width
    h = height
    if size is not None and crop == "pad":
        scale = size / max(width, height, 1)
        w = max(1, min(size, round(width * scale)))
        h = max(1, min(size, round(height * scale)))
    elif size is not None:
        # a header may not know the size yet: 0 x 0
        scale = size / max(min(width, height), 1)
        w = max(size, round(width * scale))
        h = max(size, round(height * scale))
    if max(width * height, w * h) > MAX_PIXELS:
        raise ValueError(f"{width} x {height} frames (resized {w} x {h}) are above MAX_PIXELS = {MAX_PIXELS}")
    return w, h


def _orientation(frame: av.VideoFrame) -> tuple[bool, int]:
    """How a frame is shown -> (mirrored left to right first, then clockwise quarter turns), from
    its display matrix [[a, b], [c, d]], which maps a stored pixel (x, y) to (a x + c y, b x + d y)
    on screen. Phones store a rotation there; a mirror (a d - b c < 0) is a left-right flip followed
    by a rotation."""
    # Not frame.side_data: the frame caches that container, which points back at the frame, and the
    # cycle leaves the frame to the garbage collector; collected after a fork, it crashed DataLoader
    # workers. A container of our own is freed with the frame, by reference counting.
    matrix = SideDataContainer(frame).get(SideDataType.DISPLAYMATRIX)
    if matrix is None or matrix.buffer_size != 36:
        return False, 0
    # 16.16 fixed point: the scale cancels
    a, b, _, c, d = np.frombuffer(bytes(matrix), "=i4")[:5].astype(float)
    mirrored = a * d - b * c < 0
    if mirrored:  # (x, y) -> (-x, y) first: what is left is a rotation
        a = -a
        b = -b
    return bool(mirrored), round(math.degrees(math.atan2(b, a)) / 90) % 4


def _rgb(frame: av.VideoFrame, size: int | None, crop: str = "center",
         aspect: float = 1.0) -> np.ndarray:
    """One decoded frame as (H, W, 3) uint8, upright, made a `size` square: short side resized and
    the centre cut out (crop "center"), or long side resized and black bars added (crop "pad").
    `aspect` is the pixels' width over their height (the sample aspect ratio): non-square pixels are
    resized to the picture's displayed proportions."""
    # read before reformat, whose new frame lacks the side data
    mirrored, turns = _orientation(frame)
    # the displayed width
    shown = round(frame.width * aspect) if size is not None else frame.width
    # the size can change mid-stream
    w, h = _fit(shown, frame.height, size, crop)
    if size is not None:
        # swscale's area filter averages the pixels it drops, so downscaling does not alias; it also
        # drops alpha and converts gray, 10-bit and any other pixel format to 8-bit RGB
        frame = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA",
                               threads=SWS_THREADS)
    # (H, W, 3) from any pixel format
    img = frame.to_ndarray(format="rgb24", threads=SWS_THREADS)
    # upright
    img = np.rot90(img[:, ::-1] if mirrored else img, k=-turns)
    if size is not None and crop == "pad":
        canvas = np.zeros((size, size, 3), np.uint8)
        top = (size - img.shape[0]) // 2
        left = (size - img.shape[1]) // 2
        canvas[top:top + img.shape[0], left:left + img.shape[1]] = img
        return canvas
    if size is not None:
        top = (img.shape[0] - size) // 2
        left = (img.shape[1] - size) // 2
        img = img[top:top + size, left:left + size]  # (size, size, 3)
    return np.ascontiguousarray(img)


def _pick(container, stream, fps: float | None, start: float, budget: int):
    """Yield the frames on screen at start + i / fps, i = 0, 1, ... (every frame from `start` if fps
    is None). Picking by timestamp rather than index is what makes variable frame rates work; a
    frame comes twice when fps is above the video's rate. ValueError once the frames decoded hold
    more than `budget` pixels."""
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if start > 0:
        # jump to the key frame before `start` instead of decoding everything up to it
        container.seek(int((t0 + start) / stream.time_base), stream=stream)
    rate = float(stream.average_rate or 25)
    # GIF times are in 1/100 s: 0.125 s reads back as 0.13 s
    eps = 0.1 / fps if fps else 1e-6
    # i: frames yielded so far
    prev = None
    prev_t = 0.0
    gap = 1 / (fps or rate)
    i = 0
    for n, frame in enumerate(container.decode(stream)):
        budget -= frame.width * frame.height
        if budget < 0:
            raise ValueError(f"it decodes to more pixels than a file of its size honestly holds "
                             f"(DECODE_PER_BYTE) by frame {n}")
        if n == MAX_LEAD and i == 0:
            # bound the time a load takes, whatever the file
            raise ValueError(f"no frame at {start:.2f} s within {MAX_LEAD} decoded frames (MAX_LEAD)")
        # seconds into the clip
        t = (frame.time if frame.time is not None else n / rate) - t0 - start
        if fps is None:
            if t >= -eps:
                i += 1
                yield frame
            continue
        while prev is not None and t > i / fps + eps:
            # prev is the last frame at or before i / fps
            yield prev
            i += 1
        gap = t - prev_t if prev is not None and t > prev_t else gap
        prev = frame
        prev_t = t
    while prev is not None and fps and i / fps < prev_t + gap - eps:
        # the last frame lasts one gap
        yield prev
        i += 1


def _seconds(container, stream) -> float:
    """The video stream's duration in seconds: its header's, else where its last frame ends (MKV and
    WebM give no stream duration, and the container's counts the audio too, which may run on for
    longer). The packets after a seek near the end are read, none decoded, and the container is
    rewound. 0: unknown."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if not container.duration:
        # an image, or a stream that says nothing
        return 0.0
    start = stream.start_time or 0
    end = None
    try:
        # the key frame before the end, then the packets after it
        container.seek(container.duration, backward=True)
        for packet in container.demux(stream):
            if packet.pts is not None:
                end = max(end or 0, packet.pts + (packet.duration or 0))
        # read_video decodes from the start next
        container.seek(0)
    except av.error.FFmpegError:
        # container.duration is in microseconds
        return (container.duration or 0) / 1e6
    return float((end - start) * stream.time_base) if end is not None else 0.0


def video_seconds(src: str | os.PathLike | io.IOBase) -> float:
    """The duration of a video file from its header alone (nothing is decoded); 0 when unknown or
    unreadable, and when the header claims more than MAX_SECONDS (a crafted 2^32 frames)."""
    try:
        with av.open(src) as container:
            seconds = 0.0
            if container.streams.video:
                seconds = _seconds(container, container.streams.video[0])
        return seconds if 0 < seconds <= MAX_SECONDS else 0.0
    except (av.error.FFmpegError, ValueError, OSError):
        return 0.0


def _bytes(src: str | os.PathLike | io.IOBase) -> int:
    """The size of a file, given by its path or as a binary file object (whose position stays)."""
    if isinstance(src, (str, os.PathLike)):
        return os.path.getsize(src)
    here = src.tell()
    size = src.seek(0, os.SEEK_END)
    src.seek(here)
    return size


def read_video(src: str | os.PathLike | io.IOBase, frames: int | None = None,
               size: int | None = None, fps: float | None = None, start: float = 0.0,
               rng: np.random.Generator | None = None, crop: str = "center",
               upto: int | None = None) -> np.ndarray:
    """Decode a video or image (a path or a binary file object) to (T, H, W, 3) uint8 RGB.

    frames: exactly this many (ValueError if the video is shorter), else all, up to
    MAX_FRAMES, or the first `upto` of them. size: made a size x size square, by `crop`
    ("center": short side resized, the centre cut out; "pad": long side resized, black bars
    above and below or at the sides). fps: resample by timestamp. start: seconds to skip; with
    `rng`, the start is drawn uniformly over where a full clip fits. Every failure is a
    ValueError naming the file (a file object by its `name`, if it has one): unreadable,
    truncated, empty, video-less or too short files, frames above MAX_PIXELS, a first frame
    beyond MAX_LEAD, more decoding than DECODE_PER_BYTE allows. PyAV's errors are converted,
    since not all derive from OSError or ValueError."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "a file object")
    limit = frames or upto or MAX_FRAMES + 1
    try:
        budget = DECODE_FLOOR + DECODE_PER_BYTE * _bytes(src)
        with av.open(src) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            # before decoding a clip
            _fit(stream.codec_context.width, stream.codec_context.height, size, crop)
            if rng is not None and frames is not None:
                duration = _seconds(container, stream)
                clip = frames / (fps or float(stream.average_rate or 25))
                start = float(rng.uniform(0, duration - clip)) if duration > clip else 0.0
            out = []
            last = None
            img = None
            aspect = float(stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio or 1) or 1.0
            for frame in _pick(container, stream, fps, start, budget):
                if frame is not last:
                    # convert a repeated frame once
                    last = frame
                    img = _rgb(frame, size, crop, aspect)
                out.append(img)
                if len(out) == limit:
                    break
    except (av.error.FFmpegError, ValueError, OSError) as err:
        # FFmpeg's message without the path again
        raise ValueError(f"cannot decode {name}: {getattr(err, 'strerror', None) or err}") from err
    if len(out) > MAX_FRAMES:
        raise ValueError(f"{name} has more than MAX_FRAMES = {MAX_FRAMES} frames: read clips with `frames`")
    if not out or (frames is not None and len(out) < frames):
        raise ValueError(f"{name} is too short: {len(out)} frames from {start:.2f} s, {frames or 1} needed")
    return np.stack(out)  # (T, H, W, 3)


class VideoWriter:
    """.mp4 (H.264) or .gif written a few frames at a time, so a long video never has to be held
    whole: `write` takes (T, H, W, 3) uint8 frames, or what to_uint8_frames takes. The file grows
    beside its target (`<path>.part`) and replaces it on `close`; an error or Ctrl-C on the way
    removes the part and leaves an earlier file at `path` untouched. Use it as a context manager."""

    def __init__(self, path: str, fps: float = 8):
        self.ext = os.path.splitext(path)[1].lower()
        if self.ext not in (".mp4", ".gif"):
            # .png frame grids are drawn elsewhere, with matplotlib
            raise ValueError(f"write_video writes .mp4 or .gif, not {self.ext or 'no extension'!r} ({path})")
        self.path = path
        self.part = path + ".part"
        self.fps = fps
        self.container = None
        self.stream = None

    def write(self, video) -> None:
        video = to_uint8_frames(video)
        mp4 = self.ext == ".mp4"
        if mp4:
            # 4:2:0 halves the chroma grid, so H.264 needs even sides: repeat the last row / column
            video = np.pad(video,
                           ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)),
                           mode="edge")
        if self.container is None:
            self.container = av.open(self.part, "w", format="mp4" if mp4 else "gif")
            rate = Fraction(self.fps).limit_denominator(1001)
            self.stream = self.container.add_stream("libx264" if mp4 else "gif", rate=rate)
            self.stream.height, self.stream.width = video.shape[1:3]
            # the GIF encoder wants 8-bit colour: rgb8 is a fixed 3-3-2 palette that keeps the
            # Shapes colours exact, where pal8 would need a palette computed first
            self.stream.pix_fmt = "yuv420p" if mp4 else "rgb8"
            # near lossless; the default 23 smears small clips
            self.stream.options = {"crf": "18"} if mp4 else {}
        for img in video:
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame = frame.reformat(format=self.stream.pix_fmt, threads=SWS_THREADS)
            self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        if self.container is None:
            raise ValueError(f"no frames were written to {self.path}")
        try:
            # flush the frames the encoder still holds
            self.container.mux(self.stream.encode())
            self.container.close()
        except BaseException:
            # a full disk: keep what was at `path`
            self.abort()
            raise
        self.container = None
        os.replace(self.part, self.path)

    def abort(self) -> None:
        container = self.container
        self.container = None
        if container is not None:
            try:
                container.close()
            except av.FFmpegError:
                # the part is removed either way
                pass
        if os.path.exists(self.part):
            os.remove(self.part)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close() if kind is None else self.abort()


def write_video(path: str, video: np.ndarray | torch.Tensor, fps: float = 8) -> None:
    """Write (T, H, W, 3) uint8 frames (or what to_uint8_frames takes) to .mp4 (H.264) or .gif."""
    with VideoWriter(path, fps) as writer:
        writer.write(video)


def scaled_frames(video: torch.Tensor, scale: int = 1) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, scale H, scale W, 3) uint8: each pixel a `scale` x `scale`
    block (nearest neighbour: 64 x 64 is small on a screen)."""
    return to_uint8_frames(video).repeat(scale, axis=1).repeat(scale, axis=2)


def read_clip(path: str, size: int, fps: float, upto: int | None = None) -> torch.Tensor:
    """An image or a video file (its first `upto` frames) -> (3, T, H, W) in [-1, 1] at the model's
    size and frame rate."""
    clip = read_video(path, size=size, fps=fps, upto=upto)  # (T, H, W, 3) uint8
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1
