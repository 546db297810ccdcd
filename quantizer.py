"""
The vector quantizer both tokenizers share (vqgan.py's VQGAN and cvivit.py's C-ViViT): stage 1's
discrete bottleneck (Phenaki §2.1; Yu et al. 2022, "Vector-quantized Image Modeling with Improved
VQGAN", for the factorised, l2-normalised lookup).

The quantizer snaps each encoder vector to its nearest entry of a learned codebook of K codes. As in
ViT-VQGAN and Phenaki, lookup happens in a low-dimensional factorised space: project D -> c (c = 16
or 32), l2-normalise both sides, pick the nearest code by cosine, project back c -> D. The gradient
skips the non-differentiable lookup (straight-through). Two fixes keep the codebook alive: k-means
initialisation from the first batch, and restarting codes nobody used from recent encoder outputs.
Restarts leave a finished book full of near-copies of its commonest content (on the Shapes world,
black); `merge_near_duplicates` folds each group into one code, so that stage 2 sees one word per
thing.

Under DDP every rank holds the same book: the k-means init is rank 0's, broadcast; dead codes are
found from all ranks' summed usage counts and their restarts broadcast from rank 0. The lookups
that decide a code run in true fp32 (`exact_fp32`): TF32 swaps assignments between near-duplicate
codes.
"""

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# Legend: D width, K codebook size, c code dim, N vectors.


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls inside are true fp32, whatever train.py set for the rest: TF32 keeps 10 bits of
    mantissa, and on an H200 that swapped 1.4% of code assignments between near-duplicate codes."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class Quantized(NamedTuple):
    z: torch.Tensor  # (..., D) quantized vectors, straight-through to the encoder
    codes: torch.Tensor  # (...) long in [0, K)
    # scalar: codebook loss + beta * commitment loss
    loss: torch.Tensor


class VectorQuantizer(nn.Module):
    """Factorised, l2-normalised vector quantizer with k-means init and dead-code restarts."""

    def __init__(self, dim: int, codebook_size: int, code_dim: int, beta: float,
                 pool_size: int = 4096):
        super().__init__()
        self.beta = beta
        self.proj_in = nn.Linear(dim, code_dim)
        self.proj_out = nn.Linear(code_dim, dim)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.register_buffer("initialised", torch.tensor(False))
        # uses since the last restart
        self.register_buffer("counts", torch.zeros(codebook_size))
        # recent encoder outputs
        self.register_buffer("pool", torch.zeros(pool_size, code_dim))
        self.register_buffer("pool_filled", torch.tensor(0))
        # the code each index stands for (see merge)
        self.register_buffer("alias", torch.arange(codebook_size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint without the alias buffer (an unfolded book from an older phenaki): each code
        # stands for itself
        state_dict.setdefault(prefix + "alias", torch.arange(self.codebook.shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code for each unit vector z (N, c) -> (N,). Distances in true fp32, even under
        autocast and where TF32 is on for the rest of the model."""
        codebook = F.normalize(self.codebook.float(), dim=-1)  # (K, c)
        with exact_fp32():
            # max cosine = min l2 distance between unit vectors
            return self.alias[(z @ codebook.t()).argmax(dim=-1)]

    def forward(self, x: torch.Tensor) -> Quantized:
        """x (..., D), e.g. a latent grid (B, t, h, w, D) -> Quantized(z (..., D), codes
        (...), loss)."""
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            # (N, c)
            z = F.normalize(self.proj_in(x.float()), dim=-1).reshape(-1, self.codebook.shape[1])
            if self.training and not self.initialised:
                self.kmeans_init(z.detach())
            codes = self.lookup(z)  # (N,)
            q = F.normalize(self.codebook.float(), dim=-1)[codes]  # (N, c)
            # VQ-VAE eq. 3: the codebook term pulls codes to the encoder, beta * the commitment term
            # pulls the encoder to its code; stop-gradients decide which side each term moves
            loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
            # straight-through: forward uses q, backward copies the gradient to z
            q = z + (q - z).detach()
            if self.training:
                self.remember(z.detach(), codes)
            out = self.proj_out(q).view(*lead, -1)  # (..., D)
        return Quantized(out, codes.view(lead), loss)

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) -> (..., D): what the decoder sees for given codes."""
        return self.proj_out(F.normalize(self.codebook.float(), dim=-1)[codes])

    @torch.no_grad()
    def remember(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """Count code uses and keep a ring of recent encoder outputs to restart dead codes from."""
        self.counts += torch.bincount(codes, minlength=self.counts.numel()).float()
        P = self.pool.shape[0]
        # a random slice of this batch
        take = z[torch.randperm(z.shape[0], device=z.device)[: P // 4]]
        start = int(self.pool_filled) % P
        idx = (start + torch.arange(take.shape[0], device=z.device)) % P
        self.pool[idx] = take
        self.pool_filled += take.shape[0]

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 10) -> None:
        """Spherical k-means on the first batch (N, c); rank 0 decides, every rank receives it."""
        K = self.codebook.shape[0]
        pick = torch.randint(z.shape[0], (K,), device=z.device)
        centres = F.normalize(z[pick] + 0.01 * torch.randn_like(z[pick]), dim=-1)  # (K, c)
        for _ in range(iters):
            with exact_fp32():
                assign = (z @ centres.t()).argmax(dim=-1)  # (N,)
            sums = torch.zeros_like(centres).index_add_(0, assign, z)
            used = torch.bincount(assign, minlength=K) > 0
            # empty clusters keep their sample
            centres[used] = F.normalize(sums[used], dim=-1)
        self.codebook.data.copy_(centres)
        if distributed():
            dist.broadcast(self.codebook.data, src=0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def merge_near_duplicates(self, usage: torch.Tensor, threshold: float) -> int:
        """Fold every code within cosine `threshold` of a more used code into that code; -> codes
        left.

        Dead-code restarts refill the book from recent encoder outputs, and most of those are
        background: on the Shapes world 878 of the tiny VQGAN's 1024 codes turned up at black
        positions (the 50 commonest at mean cosine 0.995 to each other). They decode alike, but to
        the generator they are different words for one thing, and it would spend its capacity
        guessing between them. After the merge a folded code keeps its index, takes its owner's
        vector (so it still decodes the same) and `lookup` returns the owner in its place. usage
        (K,) decides who owns a group."""
        unit = F.normalize(self.codebook.float(), dim=-1)  # (K, c)
        owner = torch.full_like(self.alias, -1)
        for k in usage.argsort(descending=True).tolist():
            # the most used code of a group owns it
            if owner[k] < 0:
                owner[((unit @ unit[k] >= threshold) & (owner < 0)).nonzero().squeeze(1)] = k
        self.codebook.data.copy_(self.codebook.data[owner])
        self.alias.copy_(owner)
        return int(owner.unique().numel())

    @torch.no_grad()
    def restart_dead_codes(self, min_uses: float = 1.0) -> torch.Tensor:
        """Move codes used fewer than `min_uses` times since the last call onto recent encoder
        outputs. All ranks agree: counts are summed, rank 0 draws, the codebook is broadcast.
        Returns the indices of the restarted codes."""
        if distributed():
            dist.all_reduce(self.counts)
        dead = torch.nonzero(self.counts < min_uses).squeeze(1)
        filled = min(int(self.pool_filled), self.pool.shape[0])
        if len(dead) and filled:
            src = self.pool[torch.randint(filled, (len(dead),), device=dead.device)]
            self.codebook.data[dead] = F.normalize(src + 0.01 * torch.randn_like(src), dim=-1)
            # a restarted code stands for itself again
            self.alias[dead] = dead
            if distributed():
                dist.broadcast(self.codebook.data, src=0)
        self.counts.zero_()
        return dead if filled else dead[:0]
