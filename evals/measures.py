"""
The measures that need no judge: how close a reconstruction is to its clip (PSNR and SSIM, per
clip), a tokenizer's reconstruction of a batch or of a video of any length, and a generator's
masked-code loss on held-out codes. train.py logs them while it trains (val_psnr, val_ssim,
val_loss), evaluate.py reports them, and `sample.py --reconstruct` prints the first two.

    psnr   10 log10(1 / MSE) in dB, pixels on the [0, 1] scale
    ssim   structural similarity (Wang et al. 2004): an 11 x 11 Gaussian window of sigma 1.5 over
           each frame and channel, 'valid' windows only, averaged

Legend: B batch, C channels, T frames, H W pixels, N clips, L text length.
"""

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip PSNR in dB of two videos (B, 3, T, H, W) in [-1, 1] -> (B,)."""
    # error on the [0, 1] scale
    mse = ((x - y) / 2).pow(2).flatten(1).mean(dim=1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-clip SSIM of two videos (B, 3, T, H, W) in [-1, 1] -> (B,)."""
    B, C, T, H, W = x.shape
    # every channel of every frame an image
    x = ((x + 1) / 2).transpose(1, 2).reshape(B * T * C, 1, H, W)
    y = ((y + 1) / 2).transpose(1, 2).reshape(B * T * C, 1, H, W)
    g = torch.exp(-((torch.arange(11, dtype=x.dtype) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(x.device)
    window = (g[:, None] * g[None, :])[None, None]  # (1, 1, 11, 11)

    def blur(img: torch.Tensor) -> torch.Tensor:
        # 'valid' windows only, as the reference implementation
        return F.conv2d(img, window)

    c1 = 0.01**2
    c2 = 0.03**2
    mx = blur(x)
    my = blur(y)
    vx = blur(x * x) - mx**2
    vy = blur(y * y) - my**2
    cov = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.view(B, -1).mean(dim=1)


@torch.no_grad()
def reconstruction(model: torch.nn.Module, video: torch.Tensor, autocast) -> torch.Tensor:
    """video (B, 3, T, H, W) -> its reconstruction in eval mode, clamped to [-1, 1]."""
    training = model.training
    # the quantizer neither counts codes nor runs k-means in eval mode
    model.eval()
    with autocast:
        recon = model(video).recon.float().clamp(-1, 1)  # (B, 3, T, H, W)
    model.train(training)
    return recon


@torch.no_grad()
def reconstruct(model, video: torch.Tensor, window: int) -> torch.Tensor:
    """video (3, T, H, W), any T -> its reconstruction, window by window through encode and decode.
    A tokenizer takes 1 + 2n frames: a last window of even length is padded with a copy of its last
    frame, whose reconstruction is dropped, so every frame comes back and no other is added."""
    pieces = []
    for start in range(0, video.shape[1], window):
        clip = video[None, :, start:start + window]  # (1, 3, <=window, H, W)
        n = clip.shape[2]
        if n % 2 == 0:
            clip = torch.cat([clip, clip[:, :, -1:]], dim=2)
        pieces.append(model.decode(model.encode(clip))[0, :, :n])
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def validation_loss(model, codes: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    seed: int = 0, batch_size: int = 32) -> float:
    """The generator's masked-code loss on held-out codes (N, t, h, w) and captions (N, L): every
    call draws the same masks and caption drops (from `seed`), so its changes are the model's.
    `model` is a MaskGIT."""
    device = codes.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        losses = [model(codes[i:i + batch_size], ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device))
                  * len(codes[i:i + batch_size]) for i in range(0, len(codes), batch_size)]
    return (sum(losses) / len(codes)).item()
