"""
Stage 1, part one: a causal 3D-convolutional VQGAN, and the adversarial and perceptual losses
(Esser et al. 2021, "Taming Transformers"; Yu et al. 2022, "Vector-quantized Image Modeling with
Improved VQGAN"; Phenaki §2.1 and appendix).

The quantizer (quantizer.py) snaps each encoder vector to its nearest code of a learned book.

The VQGAN compresses a video (B, 3, T, H, W), T = 1 + 2n, to codes (B, 1 + n, H/8, W/8):
  prepend a learned frame -> (B, 3, 2 + 2n, H, W)   so that the first real frame is encoded alone
  fold 2x2x2 cubes into channels, convs, /2 twice  -> (B, D, 1 + n, H/8, W/8)
  quantize                                           -> codes (B, 1 + n, H/8, W/8) in [0, K)
and the decoder mirrors it, turning each latent frame into two and dropping the learned frame's
twin. Above the latent grid the convs are spatial only (1 x 3 x 3, each latent frame on its own); on
the H/8 grid they are full 3 x 3 x 3 and mix a latent frame with its two predecessors. Every
temporal kernel pads on the past side only and every norm is per frame, so the codes of the first k
latent frames depend on the first 1 + 2(k - 1) frames alone: an image is a one-frame video, and long
videos can be made a window at a time (tests/test_tokenizers.py checks this).

Why temporal mixing only on the latent grid: with 3 x 3 x 3 kernels at every resolution, the tiny
VQGAN on the Shapes world reconstructs colourless grey objects for its first ~2000 steps (at
learning rates 3e-4 and 1e-3 alike), while the same network with spatial kernels above the latent
grid has the right colour within 400 steps and runs twice as fast. The temporal taps on the fine
grids are where the slow start comes from; we measured it, we did not explain it.

Deviations: the 3D-conv VQGAN is the seed's tokenizer, kept beside the paper's C-ViViT (cvivit.py),
and it is the one that ships: its local codes, folded, are what the tiny generator learns best from
(README, Results). The paper's perceptual losses use ImageNet VGG and Kinetics I3D weights, which we
cannot download at run time: `VGGPerceptual` is a hand-written VGG16 feature net that loads such
weights from a local safetensors file when the user provides one, and is off otherwise. No I3D loss.
"""

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from quantizer import VectorQuantizer

# Legend: B batch, C channels, T frames, H W pixels, t h w latent grid, D width, K codebook size,
# c code dim, N tokens.


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # (B, 3, T, H, W) reconstruction in about [-1, 1]
    codes: torch.Tensor  # (B, t, h, w) long
    # scalar
    vq_loss: torch.Tensor


@dataclass
class VQGANConfig:
    # channels at H/2, H/4 and H/8 (the latent grid)
    widths: tuple[int, ...] = (64, 128, 256)
    # residual blocks per resolution, in the encoder and the decoder
    res_blocks: int = 1
    # K, the generator's vocabulary
    codebook_size: int = 1024
    # c, the factorised lookup space
    code_dim: int = 16
    # commitment weight (VQ-VAE eq. 3)
    beta: float = 0.25
    # "frame": GroupNorm over each frame; "position": LayerNorm over the channels at each pixel
    norm: str = "frame"


# FrameNorm's kinds; "frame" is what the files shipped so far hold
NORMS = ("frame", "position")


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the past side only, so output frame i sees input frames <= i."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        # (W, W, H, H, T_past, T_future)
        self.pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt - stride[0], 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride)
        # streaming only: the last input frames of the previous chunk
        self.past: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # past frames the kernel reaches back to
        n = self.pad[4]
        if self.past is None or n == 0:
            return self.conv(F.pad(x, self.pad))
        # streaming: the previous chunk's last n frames stand where a full pass has them, and zeros
        # before the first chunk
        past = self.past if self.past.numel() else torch.zeros_like(x[:, :, :1]).expand(-1, -1, n, -1, -1)
        x = torch.cat([past, x], dim=2)  # (B, C, n + T, H, W)
        self.past = x[:, :, -n:]
        return self.conv(F.pad(x, self.pad[:4]))


class FrameNorm(nn.Module):
    """A norm that never mixes frames (over time it would leak the future). "frame": GroupNorm over
    each frame, whose statistics tie each code to the whole frame (motion.code_following);
    "position": LayerNorm per pixel, local codes."""

    def __init__(self, channels: int, kind: str = "frame"):
        super().__init__()
        self.kind = kind
        self.norm = nn.GroupNorm(min(32, channels // 4),
                                 channels) if kind == "frame" else nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "position":
            # over C at each (B, T, H, W)
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        B, C, T, H, W = x.shape
        y = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))  # (BT, C, H, W)
        return y.view(B, T, C, H, W).transpose(1, 2)  # (B, C, T, H, W)


# a kernel that sees one latent frame only
SPATIAL = (1, 3, 3)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 norm: str = "frame"):
        super().__init__()
        self.norm1 = FrameNorm(cin, norm)
        self.conv1 = CausalConv3d(cin, cout, kernel)
        self.norm2 = FrameNorm(cout, norm)
        self.conv2 = CausalConv3d(cout, cout, kernel)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a spatial conv (avoids transposed-conv
    checkerboards)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, SPATIAL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C', T, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))


def to_depth(x: torch.Tensor) -> torch.Tensor:
    """Fold each 2 x 2 x 2 (time, row, column) cube into channels: (B, C, T, H, W) ->
    (B, 8C, T/2, H/2, W/2). Frames pair as (0, 1), (2, 3), ...: a latent frame sees its own two
    frames and nothing later."""
    B, C, T, H, W = x.shape
    # (B, C, 2, 2, 2, t, h, w)
    x = x.view(B, C, T // 2, 2, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, 8 * C, T // 2, H // 2, W // 2)


def from_depth(x: torch.Tensor) -> torch.Tensor:
    """The inverse of to_depth: (B, 8C, t, h, w) -> (B, C, 2t, 2h, 2w)."""
    B, C8, t, h, w = x.shape
    # (B, C, t, 2, h, 2, w, 2)
    x = x.view(B, C8 // 8, 2, 2, 2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, C8 // 8, 2 * t, 2 * h, 2 * w)


class VQGAN(nn.Module):
    """Causal 3D-conv VQ autoencoder: video (B, 3, T, H, W) <-> codes (B, 1 + (T-1)/2, H/8, W/8)."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        w = config.widths
        n = config.res_blocks
        assert len(w) == 3, "widths at H/2, H/4 and H/8 give the f8 spatial compression"
        # the learned frame, as one colour
        self.first_frame = nn.Parameter(torch.zeros(1, 3, 1, 1, 1))
        # at H/2, H/4, H/8: time is mixed on the latent grid only
        kernels = (SPATIAL, SPATIAL, (3, 3, 3))
        # encoder: fold 2 x 2 x 2 cubes into channels (f2 in time, the first /2 in space), then two
        # strided convs for /4 and /8
        self.stem = CausalConv3d(24, w[0], SPATIAL)
        self.enc_blocks = nn.ModuleList(nn.Sequential(*[ResBlock(c, c, k, config.norm) for _ in range(n)]) for c, k in zip(w, kernels))
        self.downs = nn.ModuleList(CausalConv3d(w[i], w[i + 1], SPATIAL,
                                                (1, 2, 2)) for i in range(2))
        self.enc_out = nn.Sequential(FrameNorm(w[2], config.norm), nn.SiLU(),
                                     nn.Conv3d(w[2], w[2], 1))
        self.quantizer = VectorQuantizer(w[2], config.codebook_size, config.code_dim, config.beta)
        # decoder: the mirror image, ending in a conv to 2 x 2 x 2 cubes of pixels
        self.dec_in = CausalConv3d(w[2], w[2])
        self.dec_blocks = nn.ModuleList(nn.Sequential(*[ResBlock(c, c, k, config.norm) for _ in range(n)])
                                        for c, k in zip(reversed(w), reversed(kernels)))
        self.ups = nn.ModuleList(Upsample(w[i + 1], w[i]) for i in reversed(range(2)))
        self.dec_norm = FrameNorm(w[0], config.norm)
        self.dec_out = CausalConv3d(w[0], 24, SPATIAL)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: the adaptive GAN weight compares gradient norms here."""
        return self.dec_out.conv.weight

    def encode_latent(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) -> continuous latent (B, t, h, w, D) before quantization."""
        B, _, T, H, W = video.shape
        assert T % 2 == 1, f"a clip has 1 + 2n frames, got {T}"
        x = torch.cat([self.first_frame.expand(B, 3, 1, H, W), video], dim=2)  # (B, 3, T+1, H, W)
        x = self.stem(to_depth(x))  # (B, w0, t, H/2, W/2)
        for i, blocks in enumerate(self.enc_blocks):
            x = blocks(x)
            if i < 2:
                # halves H and W
                x = self.downs[i](x)
        x = self.enc_out(x)  # (B, D, t, h, w)
        return x.permute(0, 2, 3, 4, 1)  # (B, t, h, w, D)

    def decode_pairs(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, t, h, w, D) -> two frames per latent frame (B, 3, 2t, 8h, 8w)."""
        x = self.dec_in(z.permute(0, 4, 1, 2, 3))  # (B, D, t, h, w)
        for i, blocks in enumerate(self.dec_blocks):
            x = blocks(x)
            if i < 2:
                # doubles H and W
                x = self.ups[i](x)
        return from_depth(self.dec_out(F.silu(self.dec_norm(x))))  # (B, 3, 2t, H, W)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, t, h, w, D) -> video (B, 3, 2t - 1, 8h, 8w)."""
        # drop the twin of the learned frame
        return self.decode_pairs(z)[:, :, 1:]

    def forward(self, video: torch.Tensor) -> TokenizerOutput:
        # codes (B, t, h, w)
        q = self.quantizer(self.encode_latent(video))
        return TokenizerOutput(self.decode_latent(q.z), q.codes, q.loss)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) -> codes (B, t, h, w)."""
        return self.quantizer(self.encode_latent(video)).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, t, h, w) -> video (B, 3, 2t - 1, 8h, 8w), clamped to [-1, 1]."""
        return self.decode_latent(self.quantizer.code_vectors(codes)).clamp(-1, 1)

    @torch.no_grad()
    def decode_stream(self, codes: torch.Tensor, chunk: int = 6) -> Iterator[torch.Tensor]:
        """codes (B, t, h, w) of any length -> the frames of decode(codes), `chunk` latent frames at
        a time. Every causal conv keeps the last input frames it saw and starts the next chunk from
        them, so nothing is computed twice: the cost grows linearly with t and memory stays that of
        one chunk."""
        convs = [m for m in self.modules() if isinstance(m, CausalConv3d)]
        for conv in convs:
            # streaming on, nothing seen yet
            conv.past = torch.empty(0)
        try:
            for start in range(0, codes.shape[1], chunk):
                video = self.decode_pairs(self.quantizer.code_vectors(codes[:, start:start + chunk])).clamp(-1, 1)
                yield video[:, :, 1:] if start == 0 else video  # (B, 3, 2c or 2c - 1, H, W)
        finally:
            for conv in convs:
                conv.past = None


class Discriminator(nn.Module):
    """A 3D-conv patch discriminator: video (B, 3, T, H, W) -> real/fake logits (B, 1, t', h', w').
    No BatchNorm: batch statistics differ between ranks under DDP and mix real with fake; plain
    LeakyReLU convs with a residual path (as in StyleGAN's discriminator) train stably here."""

    def __init__(self, width: int = 32, levels: int = 3):
        super().__init__()
        self.stem = nn.Conv3d(3, width, 3, padding=1)
        self.convs = nn.ModuleList()
        self.skips = nn.ModuleList()
        c = width
        for _ in range(levels):
            self.convs.append(nn.Conv3d(c, 2 * c, (3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)))
            self.skips.append(nn.Conv3d(c, 2 * c, 1, stride=(1, 2, 2)))
            c *= 2
        self.head = nn.Conv3d(c, 1, 3, padding=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.stem(video), 0.2)
        for conv, skip in zip(self.convs, self.skips):
            # halves H and W
            x = (F.leaky_relu(conv(x), 0.2) + skip(x)) / math.sqrt(2)
        return self.head(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake ones below -1."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor,
                        last_layer: torch.Tensor) -> torch.Tensor:
    """Taming Transformers eq. 7: scale the GAN loss so its gradient at the decoder's last layer is
    as large as the reconstruction loss's there; neither loss then drowns the other."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# ReLU outputs relu1_2 ... relu5_3, as indices into `features`
VGG16_TAPS = (3, 8, 15, 22, 29)


class VGGPerceptual(nn.Module):
    """Image perceptual loss from VGG16 features (the LPIPS idea with uniform layer weights). The
    weights are not downloaded: load ImageNet VGG16 weights from a safetensors file whose keys
    follow the common layout `features.{i}.weight` / `features.{i}.bias` (index i into VGG16_LAYERS
    with a ReLU after each conv). Applied to each frame: video (B, 3, T, H, W) pairs -> scalar."""

    def __init__(self):
        super().__init__()
        layers = []
        c = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.ModuleList(layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        # frames as images
        both = torch.cat([x, y]).transpose(1, 2).reshape(2 * B * T, C, H, W)
        h = ((both + 1) / 2 - self.mean) / self.std
        loss = both.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                # unit length over channels at each position, as LPIPS
                f = F.normalize(h, dim=1)
                loss = loss + (f[: B * T] - f[B * T:]).pow(2).sum(1).mean()
            if i == VGG16_TAPS[-1]:
                break
        return loss
