"""
What a run watches while it trains, at every `image_every` steps. Stage 1 (`watch_tokenizer`):
PSNR and SSIM of a fixed held-out batch and its reconstruction (val_psnr, val_ssim, recon.png).
Stage 2 (`watch_generator`): the masked-code loss on held-out clips (val_loss), one clip for each of
eight prompts (samples.png; in a world each clip is read back by the world's judge,
val_<attribute>), and the motion probe (motion.watch_motion).

The eight prompts are fixed for the run (watch_list): in a world, eight random specs of a seed no
training clip uses, so that a judge can say whether a clip shows what its prompt says; on real
data the lines of --watch-prompts, or the first different held-out captions.

Legend: B batch, T frames, H W pixels, t h w latent grid, N clips, L text length.
"""

from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from evals.measures import psnr, reconstruction, ssim, validation_loss
from evals.motion import watch_motion
from evals.stories import sample_and_judge, shares
from kit.faults import UsageError
from worlds import WORLDS


class Watched(NamedTuple):
    """The prompts a run samples at each image_every, and what judges them."""
    # the world whose judge reads the clips; None on real data
    world: ModuleType | None
    # what each clip should show, in a world
    specs: list
    prompts: list[str]


class HeldOut(NamedTuple):
    """Held-out clips, encoded once: their codes (N, t, h, w), caption ids and mask (N, L)."""
    codes: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


def watch_list(data: str, captions: list[str], path: str | None = None, n: int = 8,
               seed: int = 0) -> Watched:
    """What a run watches: in a world, n random specs (judged); on real data the lines of `path`
    (--watch-prompts), or else the first n different held-out captions."""
    if data in WORLDS:
        rng = np.random.default_rng([seed, 424242])
        specs = [WORLDS[data].random_spec(rng) for _ in range(n)]
        return Watched(WORLDS[data], specs, [WORLDS[data].caption(s) for s in specs])
    if path:
        with open(path, encoding="utf-8", errors="replace") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UsageError(f"--watch-prompts {path} has no prompts: write one caption a line")
    else:
        prompts = list(dict.fromkeys(c for c in captions if c)) or [""]
    return Watched(None, [], prompts[:n])


@torch.no_grad()
def watch(model, text, tokenizer, watched: Watched, device: torch.device,
          **sampling) -> tuple[torch.Tensor, dict]:
    """One clip per prompt of watch_list -> (videos (B, 3, T, H, W), the judge's shares; {} on
    real data)."""
    if watched.world is not None:
        videos, verdicts = sample_and_judge(model, text, tokenizer, watched.world, watched.specs,
                                            device, watched.prompts, **sampling)
        return videos, shares(verdicts)
    ids, mask = text.encode(watched.prompts, model.config.text.max_len)
    codes = model.generate(ids.to(device), mask.to(device), **sampling)
    return tokenizer.decode(codes).float().cpu(), {}


def watch_tokenizer(model, video: torch.Tensor, autocast, log) -> dict[str, float]:
    """The held-out batch video (8, 3, T, H, W) reconstructed -> {val_psnr, val_ssim}, each the mean
    over the clips in dB or as a share; recon.png shows 4 clips above their reconstructions."""
    recon = reconstruction(model, video, autocast)  # (8, 3, T, H, W)
    pairs = torch.stack([video[:4], recon[:4]], dim=1).flatten(0, 1)  # (8, 3, T, H, W)
    log.grid(pairs, "recon.png")
    return {"val_psnr": psnr(recon, video).mean().item(), "val_ssim": ssim(recon, video).mean().item()}


@torch.no_grad()
def watch_generator(model, text, tokenizer, watched: Watched, held: HeldOut | None, data: str,
                    device: torch.device, seed: int, steps: int) -> tuple[torch.Tensor, dict]:
    """Everything a stage-2 run measures at an image_every step, in eval mode -> (the watched clips
    (B, 3, T, H, W), {val_loss, val_<attribute>, val_<probe figure>}). Each sampling draws from a
    generator seeded by `seed`, so that two steps differ only by the model."""
    training = model.training
    model.eval()
    figures = {}
    if held is not None:
        figures["val_loss"] = validation_loss(model, held.codes, held.ids, held.mask, seed)
    videos, verdicts = watch(model, text, tokenizer, watched, device, steps=steps,
                             generator=torch.Generator(device).manual_seed(seed))
    if held is not None:
        clips = (held.codes, held.ids.to(device), held.mask.to(device))
        verdicts |= watch_motion(model, text, tokenizer, clips, data, device, seed, steps=steps,
                                 generator=torch.Generator(device).manual_seed(seed))
    model.train(training)
    return videos, figures | {f"val_{k}": v for k, v in verdicts.items()}
