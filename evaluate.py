"""
Measure a trained stage: how well a tokenizer reconstructs held-out clips, and how well a generator
follows its captions.

    python evaluate.py runs/stage1-vqgan-tiny/model.safetensors [--data SPEC] [--clips 256] [--json out.json]
    python evaluate.py [checkpoints/generator.safetensors] [--prompts 200] [--stories 100] [--json out.json]

Stage 1 (a tokenizer checkpoint) reports, on clips it never trained on:
  psnr        peak signal-to-noise ratio in dB, 10 log10(1 / MSE) with pixels in [0, 1], averaged over clips
  ssim        structural similarity (Wang et al. 2004): 11 x 11 Gaussian window, sigma 1.5, per frame and
              channel, averaged
  codebook_use  the share of the K codes that occur at least once in the held-out codes
  distinct_codes  how many different codes the book still has: K, or fewer once near-copies have been
                folded together at the end of training (VectorQuantizer.merge_near_duplicates)
  distinct_use  the share of those distinct codes that occur
  perplexity    exp of the entropy of the code histogram: the number of codes in effective use
On the Shapes world the held-out clips come from a seed no training run uses (EVAL_SEED). For real
data pass a held-out folder with --data.

Stage 2 (a generator checkpoint, default the shipped one) makes one clip for each of N random canonical
prompts ("a large red circle moving right") and reads it back with the Shapes oracle:
  color, shape, size, direction   the share of clips where the oracle reads what the prompt says
  one_object                      the share with exactly one object in every frame
and makes two-prompt stories (one object, a new direction after the cut):
  story_direction    the share of segments whose direction is right
  story_continuity   the share of cuts where colour and shape stay and the object moves at most 6 pixels
Figures are printed as `name: value` lines and, with --json, written to a file.

All judging in the repo lives here: train.py logs `psnr` of a fixed batch as val_psnr in stage 1, and
`sample_and_judge` (the oracle's verdicts on clips made from canonical prompts) as val_color ... in stage 2.
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import DEFAULT_GENERATOR, DEFAULT_TOKENIZER, load_checkpoint, load_generator, load_tokenizer
from config import UsageError, exit_usage
from data import ClipStream, make_source
from maskgit import CFG, STEPS, TEMPERATURE, make_video
from shapes import DIRECTIONS, ShapeSpec, agreement, caption, oracle, random_spec

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
    owners = model.quantizer.alias.unique()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": torch.cat(psnrs)[:clips].mean().item(), "ssim": torch.cat(ssims)[:clips].mean().item(),
            "codebook_use": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item(),
            "distinct_codes": len(owners), "distinct_use": (counts[owners] > 0).float().mean().item(), "clips": clips}


@torch.no_grad()
def sample_and_judge(model, text, tokenizer, specs: list[ShapeSpec], device: torch.device, **sampling):
    """One clip per spec from its canonical caption -> (videos (B, 3, T, H, W), the share of clips where
    the oracle agrees, per attribute). `model` is a MaskGIT, or distributed.Run around one."""
    ids, mask = text.encode([caption(s) for s in specs], model.config.text.max_len)  # (B, L) each
    codes = model.generate(ids.to(device), mask.to(device), **sampling)  # (B, t, h, w)
    videos = tokenizer.decode(codes).float().cpu()
    verdicts = [agreement(v, s) for v, s in zip(videos, specs)]
    return videos, {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}


@torch.no_grad()
def evaluate_generator(model, text, tokenizer, prompts: int, stories: int, batch_size: int = 20, **sampling) -> dict:
    """Oracle agreement of clips made from `prompts` random canonical prompts, and of `stories` two-prompt stories."""
    rng = np.random.default_rng(EVAL_SEED)
    specs = [random_spec(rng) for _ in range(prompts)]
    totals: dict[str, list[float]] = {}
    for i in range(0, prompts, batch_size):
        chunk = specs[i:i + batch_size]
        _, verdicts = sample_and_judge(model, text, tokenizer, chunk, torch.device("cpu"), **sampling)
        for k, v in verdicts.items():
            totals.setdefault(k, []).append(v * len(chunk))
    results = {k: sum(v) / prompts for k, v in totals.items()}
    window = 1 + 2 * (model.config.latent_frames - 1)
    right, continuous = [], []
    for i in range(0, stories, batch_size):
        first = [random_spec(rng) for _ in range(min(batch_size, stories - i))]
        second = [ShapeSpec(s.color, s.shape, s.size, str(rng.choice([d for d in DIRECTIONS if d != s.direction])))
                  for s in first]
        prompts_ = [text.encode([caption(s) for s in seg], model.config.text.max_len) for seg in (first, second)]
        videos = make_video(model, tokenizer, prompts_, [window, window], **sampling).float()  # (B, 3, 2 window, H, W)
        for video, a, b in zip(videos, first, second):
            one, two = oracle(video[:, :window]), oracle(video[:, window:])
            right += [one["direction"] == a.direction, two["direction"] == b.direction]
            jump = np.inf if one["end"] is None or two["start"] is None else np.hypot(*np.subtract(one["end"], two["start"]))
            continuous.append(jump <= 6 and two["color"] == a.color and two["shape"] == a.shape)
    if stories:
        results |= {"story_direction": float(np.mean(right)), "story_continuity": float(np.mean(continuous))}
    return results | {"prompts": prompts, "stories": stories}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Evaluate a phenaki checkpoint: a tokenizer or a generator.")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_GENERATOR, help="a stage-1 or stage-2 model.safetensors")
    p.add_argument("--data", help="stage 1: held-out data (default: the Shapes world at an unseen seed)")
    p.add_argument("--clips", type=int, default=256, help="stage 1: how many held-out clips")
    p.add_argument("--tokenizer-checkpoint", default=DEFAULT_TOKENIZER, help="stage 2: the generator's tokenizer")
    p.add_argument("--prompts", type=int, default=200, help="stage 2: random canonical prompts")
    p.add_argument("--stories", type=int, default=100, help="stage 2: two-prompt stories")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        _, meta = load_checkpoint(args.checkpoint)
        if meta.get("stage") == "2":
            model, text, tokenizer, meta = load_generator(args.checkpoint, args.tokenizer_checkpoint)
            results = {"generator": args.checkpoint, "step": int(meta["step"])} | evaluate_generator(
                model, text, tokenizer, args.prompts, args.stories, steps=args.steps, cfg=args.cfg,
                temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
        else:
            model, meta = load_tokenizer(args.checkpoint)
            train_cfg = json.loads(meta.get("train_config", "{}"))
            data = args.data or train_cfg.get("data", "shapes")
            results = {"tokenizer": meta["kind"], "step": int(meta["step"])} | evaluate_tokenizer(
                model, data, args.clips, train_cfg.get("frames", 11), train_cfg.get("image_size", 64))
    except (UsageError, ValueError) as err:
        exit_usage(err)
    for k, v in results.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
