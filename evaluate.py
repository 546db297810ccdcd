"""
Measure a trained stage: how well a tokenizer reconstructs held-out clips.

    python evaluate.py runs/stage1-vqgan-tiny/model.safetensors [--data SPEC] [--clips 256] [--json out.json]

Stage 1 (a tokenizer checkpoint) reports, on clips it never trained on:
  psnr        peak signal-to-noise ratio in dB, 10 log10(1 / MSE) with pixels in [0, 1], averaged over clips
  ssim        structural similarity (Wang et al. 2004): 11 x 11 Gaussian window, sigma 1.5, per frame and
              channel, averaged
  codebook_use  the share of the K codes that occur at least once in the held-out codes
  perplexity    exp of the entropy of the code histogram: the number of codes in effective use

On the Shapes world the held-out clips come from a seed no training run uses (EVAL_SEED), so the
figures measure generalisation. For real data pass a held-out folder with --data.
Figures are printed as `name: value` lines and, with --json, written to a file.
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from data import ClipStream, make_source
from train import UsageError, load_tokenizer

# Legend: B batch, C channels, T frames, H W pixels, K codebook size.

EVAL_SEED = 1_000_003  # Shapes clips from this seed are never trained on


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB of two videos (B, 3, T, H, W) in [-1, 1] -> (B,)."""
    mse = ((x - y) / 2).pow(2).flatten(1).mean(dim=1)  # error on the [0, 1] scale
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip SSIM of two videos (B, 3, T, H, W) in [-1, 1] -> (B,)."""
    B, C, T, H, W = x.shape
    x = ((x + 1) / 2).transpose(1, 2).reshape(B * T * C, 1, H, W)  # every channel of every frame an image
    y = ((y + 1) / 2).transpose(1, 2).reshape(B * T * C, 1, H, W)
    g = torch.exp(-((torch.arange(11, dtype=x.dtype) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(x.device)
    window = (g[:, None] * g[None, :])[None, None]  # (1, 1, 11, 11)

    def blur(img: torch.Tensor) -> torch.Tensor:
        return F.conv2d(img, window)  # 'valid' windows only, as the reference implementation

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.view(B, -1).mean(dim=1)


@torch.no_grad()
def evaluate_tokenizer(model, data: str, clips: int, frames: int, size: int, batch_size: int = 16) -> dict:
    """Reconstruct `clips` held-out clips and return the stage-1 figures."""
    source = make_source(data, frames, size, seed=EVAL_SEED, fps=8.0)
    stream = ClipStream(source, batch_size)
    K = model.quantizer.codebook.shape[0]
    counts = torch.zeros(K)
    psnrs, ssims = [], []
    for b in range((clips + batch_size - 1) // batch_size):
        video = stream.batch(b)["video"]  # (B, 3, T, H, W)
        codes = model.encode(video)
        recon = model.decode(codes)
        psnrs.append(psnr(recon, video))
        ssims.append(ssim(recon, video))
        counts += torch.bincount(codes.flatten(), minlength=K).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": torch.cat(psnrs)[:clips].mean().item(), "ssim": torch.cat(ssims)[:clips].mean().item(),
            "codebook_use": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item(),
            "clips": clips}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a phenaki checkpoint on held-out clips.")
    p.add_argument("checkpoint", help="a stage-1 model.safetensors")
    p.add_argument("--data", help="held-out data (default: the Shapes world at an unseen seed)")
    p.add_argument("--clips", type=int, default=256, help="how many held-out clips")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        model, meta = load_tokenizer(args.checkpoint)
        train_cfg = json.loads(meta.get("train_config", "{}"))
        data = args.data or train_cfg.get("data", "shapes")
        results = evaluate_tokenizer(model, data, args.clips, train_cfg.get("frames", 11), train_cfg.get("image_size", 64))
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    results = {"tokenizer": meta["kind"], "step": int(meta["step"])} | results
    for k, v in results.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
