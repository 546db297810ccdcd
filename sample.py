"""
Make videos with a trained Phenaki, or push a real video through the stage-1 tokenizer.

    python sample.py --reconstruct clip.mp4 --out recon.mp4     # prints psnr and ssim

Reconstruction reads the video at the tokenizer's frame rate and size, cuts it into windows of the
trained clip length (1 + 2n frames, the last one shorter), sends each window through encode and
decode, and writes the frames back to back. Output goes where --out says: .mp4 (H.264), .gif, or
.png (a grid of frames, one row per window, drawn with matplotlib).

Exit codes: 0 on success, 2 on a usage or input error (one line on stderr, no traceback), 1 otherwise.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

from data import read_video, to_uint8_frames, write_video
from evaluate import psnr, ssim
from train import UsageError, load_tokenizer

# Legend: T frames, H W pixels, t latent frames.

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tokenizer.safetensors")


def save_output(path: str, video: torch.Tensor, fps: float = 8, columns: int = 11) -> None:
    """Write a video (3, T, H, W) in [-1, 1] as .mp4 / .gif, or as a .png grid of its frames."""
    frames = to_uint8_frames(video)  # (T, H, W, 3)
    if not path.lower().endswith(".png"):
        write_video(path, frames, fps)
        return
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


@torch.no_grad()
def reconstruct(model, video: torch.Tensor, window: int) -> torch.Tensor:
    """video (3, T, H, W) -> its reconstruction, window by window through encode and decode."""
    pieces = []
    for start in range(0, video.shape[1], window):
        clip = video[None, :, start:start + window]  # (1, 3, <=window, H, W)
        pieces.append(model.decode(model.encode(clip))[0])
    return torch.cat(pieces, dim=1)


def check_out(path: str) -> None:
    """Refuse an --out we cannot write before doing any work."""
    if not path.lower().endswith((".mp4", ".gif", ".png")):
        raise UsageError(f"--out must end in .mp4, .gif or .png, got {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path}: {folder} is not a writable folder")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Reconstruct a video through the Phenaki tokenizer.")
    p.add_argument("--reconstruct", metavar="VIDEO", required=True, help="send this video through stage 1")
    p.add_argument("--out", default="samples/reconstruction.mp4", help=".mp4, .gif or .png")
    p.add_argument("--tokenizer-checkpoint", default=DEFAULT_TOKENIZER)
    p.add_argument("--frames", type=int, help="use at most this many frames of the input")
    args = p.parse_args(argv)
    try:
        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        check_out(args.out)
        model, meta = load_tokenizer(args.tokenizer_checkpoint)
        cfg = json.loads(meta.get("train_config", "{}"))
        size, fps, window = cfg.get("image_size", 64), cfg.get("fps", 8.0), cfg.get("frames", 11)
        frames = read_video(args.reconstruct, size=size, fps=fps)  # (T, H, W, 3)
        if args.frames:
            frames = frames[: args.frames]
        frames = frames[: len(frames) - (len(frames) + 1) % 2]  # a tokenizer takes 1 + 2n frames
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, T, H, W)
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    recon = reconstruct(model, video, window)
    save_output(args.out, recon, fps)
    print(f"frames: {video.shape[1]}")
    print(f"psnr: {psnr(recon[None], video[None]).item():.2f}")
    print(f"ssim: {ssim(recon[None], video[None]).item():.4f}")
    print(f"wrote: {args.out}")


if __name__ == "__main__":
    main()
