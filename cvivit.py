"""
Stage 1, part two: C-ViViT, the causal video tokenizer that Phenaki proposes (Villegas et al. 2023, §2.1).

A ViViT-style encoder that treats the first frame differently from the rest, so that a video of any
length 1 + 2n becomes 1 + n latent frames and an image is simply a video of one frame:

  video (B, 3, T, H, W), T = 1 + 2n
  first frame as 8 x 8 patches      -> (B, 1, h, w, 3*8*8)   -> linear -> (B, 1, h, w, D)
  later frames as 2 x 8 x 8 tubelets -> (B, n, h, w, 3*2*8*8) -> linear -> (B, n, h, w, D)
  + learned position embeddings for (row, column) and for time
  spatial transformer: each latent frame's h*w patches attend to each other   (B*t, h*w, D)
  causal temporal transformer: each patch position attends to its own past     (B*h*w, t, D)
  vector quantizer (quantizer.VectorQuantizer)              -> codes (B, t, h, w) in [0, K)

The decoder mirrors it: code vectors, causal temporal transformer, spatial transformer, and a linear
layer from each token back to its 8 x 8 patch (first frame) or 2 x 8 x 8 tubelet of pixels. Because
time attention is causal and every other operation is per frame, the codes of the first k latent
frames depend on the first 1 + 2(k - 1) frames alone (tests/test_tokenizers.py checks this).

Deviations: the paper trains on 128 x 128 and uses 4 + 4 layers of width 512 (the `paper` preset in
train.py); the tiny preset is far smaller. The temporal position embedding is learned for up to
`max_latent_frames` latent frames; longer videos are tokenized a window at a time.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from quantizer import VectorQuantizer
from transformer import Transformer
from vqgan import VQGAN

# Legend: B batch, T frames, H W pixels, t h w latent grid, p patch size, D width, K codebook size.


@dataclass
class CViViTConfig:
    # D, transformer width
    dim: int = 512
    # spatial transformer layers, in the encoder and again in the decoder
    spatial_depth: int = 4
    # causal temporal transformer layers, likewise
    temporal_depth: int = 4
    # attention heads
    heads: int = 8
    # feed-forward hidden width
    mlp: int = 2048
    # p: spatial patch size (the f8 compression)
    patch: int = 8
    # H = W; sets the grid of spatial position embeddings
    image_size: int = 64
    # the longest latent window the temporal embedding covers
    max_latent_frames: int = 32
    # K
    codebook_size: int = 8192
    # c, the factorised lookup space
    code_dim: int = 32
    # commitment weight
    beta: float = 0.25


def patchify(video: torch.Tensor, tt: int, p: int) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, T/tt, H/p, W/p, 3*tt*p*p): non-overlapping tt x p x p cubes
    as vectors."""
    B, C, T, H, W = video.shape
    x = video.reshape(B, C, T // tt, tt, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, t, h, w, C, tt, p, p)
    return x.reshape(B, T // tt, H // p, W // p, C * tt * p * p)


def unpatchify(x: torch.Tensor, tt: int, p: int) -> torch.Tensor:
    """The inverse of patchify: (B, t, h, w, 3*tt*p*p) -> (B, 3, t*tt, h*p, w*p)."""
    B, t, h, w, _ = x.shape
    x = x.view(B, t, h, w, 3, tt, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, 3, t, tt, h, p, w, p)
    return x.reshape(B, 3, t * tt, h * p, w * p)


class CViViT(nn.Module):
    """Causal ViViT VQ autoencoder: video (B, 3, T, H, W) <-> codes (B, 1 + (T-1)/2, H/p, W/p)."""

    def __init__(self, config: CViViTConfig):
        super().__init__()
        self.config = config
        D = config.dim
        p = config.patch
        g = config.image_size // config.patch
        # the first frame alone, as an image
        self.embed_first = nn.Linear(3 * p * p, D)
        # later frames in pairs (tubelets)
        self.embed_rest = nn.Linear(3 * 2 * p * p, D)
        self.pos_space = nn.Parameter(torch.randn(1, 1, g, g, D) * 0.02)
        self.pos_time = nn.Parameter(torch.randn(1, config.max_latent_frames, 1, 1, D) * 0.02)
        heads = config.heads
        mlp = config.mlp
        self.enc_space = Transformer(D, config.spatial_depth, heads, mlp)
        self.enc_time = Transformer(D, config.temporal_depth, heads, mlp, causal=True)
        self.quantizer = VectorQuantizer(D, config.codebook_size, config.code_dim, config.beta)
        self.dec_pos_space = nn.Parameter(torch.randn(1, 1, g, g, D) * 0.02)
        self.dec_pos_time = nn.Parameter(torch.randn(1, config.max_latent_frames, 1, 1, D) * 0.02)
        self.dec_time = Transformer(D, config.temporal_depth, heads, mlp, causal=True)
        self.dec_space = Transformer(D, config.spatial_depth, heads, mlp)
        self.to_first = nn.Linear(D, 3 * p * p)
        self.to_rest = nn.Linear(D, 3 * 2 * p * p)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight that makes most pixels: the adaptive GAN weight compares gradient norms here."""
        return self.to_rest.weight

    def space_then_time(self, x: torch.Tensor, space: Transformer,
                        time: Transformer) -> torch.Tensor:
        """Factorised attention over (B, t, h, w, D): first within frames, then causally
        across them."""
        B, t, h, w, D = x.shape
        # patches of one frame
        x = space(x.reshape(B * t, h * w, D)).view(B, t, h, w, D)
        # one patch position across time
        x = x.permute(0, 2, 3, 1, 4).reshape(B * h * w, t, D)
        x = time(x).view(B, h, w, t, D)
        return x.permute(0, 3, 1, 2, 4)  # (B, t, h, w, D)

    def time_then_space(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's order, the mirror of the encoder's."""
        B, t, h, w, D = x.shape
        x = x.permute(0, 2, 3, 1, 4).reshape(B * h * w, t, D)
        x = self.dec_time(x).view(B, h, w, t, D).permute(0, 3, 1, 2, 4)  # (B, t, h, w, D)
        return self.dec_space(x.reshape(B * t, h * w, D)).view(B, t, h, w, D)

    def encode_latent(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, 3, T, H, W) -> continuous latent (B, t, h, w, D) before quantization."""
        T = video.shape[2]
        p = self.config.patch
        assert T % 2 == 1, f"a clip has 1 + 2n frames, got {T}"
        first = self.embed_first(patchify(video[:, :, :1], 1, p))  # (B, 1, h, w, D)
        rest = self.embed_rest(patchify(video[:, :, 1:], 2, p))  # (B, n, h, w, D)
        x = torch.cat([first, rest], dim=1)  # (B, t, h, w, D)
        x = x + self.pos_space + self.pos_time[:, : x.shape[1]]
        return self.space_then_time(x, self.enc_space, self.enc_time)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, t, h, w, D) -> video (B, 3, 2t - 1, H, W)."""
        p = self.config.patch
        x = self.time_then_space(z + self.dec_pos_space + self.dec_pos_time[:, : z.shape[1]])
        first = unpatchify(self.to_first(x[:, :1]), 1, p)  # (B, 3, 1, H, W)
        rest = unpatchify(self.to_rest(x[:, 1:]), 2, p)  # (B, 3, 2(t-1), H, W)
        return torch.cat([first, rest], dim=2)

    # around its own encode_latent and decode_latent, C-ViViT tokenizes exactly as the VQGAN does:
    # forward (training: reconstruction, codes, VQ loss), encode (video -> codes) and decode
    # (codes -> video)
    forward = VQGAN.forward
    encode = VQGAN.encode
    decode = VQGAN.decode
