"""
Where a command writes, checked before any work: every file it writes, and the side files its atomic
writers make beside each, must be neither an input of the command nor a folder, in a folder that
exists and can be written.

A file is never written in place. video.VideoWriter grows `<file>.part` and renames it over the
file; checkpoint.save_checkpoint writes `<file>.tmp` and keeps the file it replaces as
`<file>.prev` (through `<file>.prev.tmp`). So writing `x.mp4` also replaces `x.mp4.part`, and
writing `tok.safetensors` replaces `tok.safetensors.prev`: an input with either name would be gone,
or would be the only copy of what was replaced. `check_destination` compares every input with all
of these names (by path, and by inode where both exist), for `sample.py --out`, `evaluate.py
--json`, `fold.py` and `checkpoint.py export`; runs.py compares a run's inputs with the files of
its run folder the same way (`written_by`).

A name the user did not give never replaces a file either: sample.py's default name is numbered past
the videos already in samples/ (`default_out`).

What sample.py writes: `Outputs` grows each .mp4 / .gif a window at a time, or gathers a .png grid of
the frames; `save_output` writes a whole video one of those ways.
"""

import contextlib
import os
import re

import numpy as np
import torch

from kit.faults import UsageError
from media.video import VideoWriter, scaled_frames, write_video

# the files that writing <file> makes or replaces beside it: VideoWriter's part, save_checkpoint's
# temporary and the previous version it keeps
SIDE_FILES = (".part", ".tmp", ".prev", ".prev.tmp")


def written_by(path: str) -> list[str]:
    """The files that writing `path` replaces: itself and its side files."""
    return [path] + [path + suffix for suffix in SIDE_FILES]


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: the same path, or (where both exist) the same inode."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_destination(dst: str, sources: list[str]) -> None:
    """Refuse to write `dst` when it is a folder, when it or one of its side files is one of the
    `sources` (writing would replace what was read), or when its folder is missing or read-only."""
    if os.path.isdir(dst):
        raise UsageError(f"{dst} is a folder: give the path of the file to write")
    for source in sources:
        for written in written_by(dst):
            if same_file(source, written):
                what = "is the input" if written == dst else f"writes {written}, which is the input"
                raise UsageError(f"{dst} {what} {source}: writing it would destroy it; "
                                 "choose another path")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {dst}: there is no folder {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {dst}: {folder} is not a writable folder")


def check_outputs(path: str, n: int, sources: list[str]) -> None:
    """Refuse an --out we cannot write, or one of whose n files (Outputs.named) is a folder or an
    input (check_destination), before any work. Its folder is made if it is missing."""
    if not path.lower().endswith((".mp4", ".gif", ".png")):
        raise UsageError(f"--out must end in .mp4, .gif or .png, got {path}")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror}") from None
    for out in Outputs.named(path, n):
        check_destination(out, sources)


def default_out(name: str, n: int, folder: str = "samples") -> str:
    """samples/<name as a slug>.mp4, numbered (-2, -3, ...) past any whose files (n of them,
    Outputs.named) exist: a default name never replaces another prompt's video. The slug keeps
    letters of every script ("красный круг" -> красный-круг)."""
    # \w is Unicode: letters and digits of any script; at most 60 characters
    slug = re.sub(r"[\W_]+", "-", name.lower()).strip("-")[:60].strip("-") or "video"
    path = os.path.join(folder, f"{slug}.mp4")
    number = 1
    while any(os.path.lexists(p) for p in Outputs.named(path, n)):
        number += 1
        path = os.path.join(folder, f"{slug}-{number}.mp4")
    return path


def save_grid(path: str, frames: np.ndarray, columns: int = 11) -> None:
    """(T, H, W, 3) uint8 -> a .png grid of the frames, `columns` a row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    T, H, W, _ = frames.shape
    rows = -(-T // columns)
    grid = np.zeros((rows * H, min(T, columns) * W, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, columns)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = f
    plt.imsave(path, grid)


def save_output(path: str, video: torch.Tensor, fps: float = 8, scale: int = 1) -> None:
    """Write a whole video (3, T, H, W) in [-1, 1] as .mp4 / .gif, or as a .png grid of its frames."""
    frames = scaled_frames(video, scale)
    save_grid(path, frames) if path.lower().endswith(".png") else write_video(path, frames, fps)


class Outputs:
    """Where the frames of N videos go as they are made: `out` itself for one video, <stem>-<i><ext>
    for several. Each .mp4 / .gif grows on disk (VideoWriter), so only the current window's frames
    are in memory; a .png grid needs them all, as uint8. A context manager: an error or Ctrl-C on
    the way removes the unfinished files and keeps what was there before."""

    def __init__(self, out: str, n: int, fps: float, scale: int):
        self.paths = self.named(out, n)
        self.scale = scale
        self.grid = out.lower().endswith(".png")
        self.stack = contextlib.ExitStack()
        # .png only
        self.frames = [[] for _ in self.paths]
        self.writers = [] if self.grid else [self.stack.enter_context(VideoWriter(p, fps)) for p in self.paths]

    @staticmethod
    def named(out: str, n: int) -> list[str]:
        """The files N videos go to: `out` for one, <stem>-<i><ext> for several."""
        stem, ext = os.path.splitext(out)
        return [out] if n == 1 else [f"{stem}-{i}{ext}" for i in range(n)]

    def write(self, video: torch.Tensor) -> None:
        """video (N, 3, T, H, W): the next T frames of each of the N videos."""
        for i, v in enumerate(video.float().cpu()):
            frames = scaled_frames(v, self.scale)
            self.frames[i].append(frames) if self.grid else self.writers[i].write(frames)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, kind, error, trace) -> None:
        # each VideoWriter closes, or removes its part
        self.stack.__exit__(kind, error, trace)
        for path, frames in zip(self.paths, self.frames if self.grid and kind is None else []):
            save_grid(path, np.concatenate(frames))
