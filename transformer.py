"""
The one transformer every part of Phenaki is built from (Vaswani et al. 2017, pre-norm as in GPT-2).

C-ViViT uses it twice per direction: a spatial transformer over the patches of one frame, then a
causal temporal transformer over the frames at one patch position (Phenaki §2.1). The text encoder
is a plain bidirectional stack. The MaskGIT generator is a bidirectional stack whose blocks also
cross-attend to the text states (Phenaki §2.2). So there is one `Attention` with three uses:

    self attention    x (B, N, D) attends to itself
    causal attention  position i attends to positions <= i only (time in C-ViViT)
    cross attention   x (B, N, D) attends to a context (B, L, Dc) with a padding mask (B, L), True = real;
                      the context keeps its own width Dc (the text encoder's), projected to keys and values

Self attention takes a padding mask (B, N) too: the text encoder pads captions to one length, and
the generator pads an image (one latent frame) to the length of a video when both share a batch. It
also takes rotary angles (N, hd/2) for its queries and keys (RoFormer, Su et al. 2021): rotating
both by their position's angles makes each logit q·k depend on the two positions through their
offset alone. The generator gives angles for (t, h, w), a 3D rotary embedding
(maskgit.rotary_angles).

Attention runs on `F.scaled_dot_product_attention`, which picks fused flash / memory-efficient
kernels on CUDA and a fused C++ kernel on the CPU; nothing here materialises the (N, N) matrix
itself.

A `Block` is  x + attn(ln(x)),  [x + cross(ln(x), context)],  x + mlp(ln(x)).
A `Transformer` is a stack of blocks and a final LayerNorm:  (B, N, D) -> (B, N, D).

Deviations: none in substance; the paper does not say pre- or post-norm, and pre-norm trains stably
without warm-up tricks at small sizes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# Legend: B batch, N query tokens, L context tokens, D width, Dc context width, nh heads,
# hd head dim.


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: x (..., N, hd) with its halves taken as hd/2 pairs
    (x_i, x_{i + hd/2}), each turned by its angle (N, hd/2). A pair turned by a at one position and
    by b at another has the same dot product as one turned by a - b against one not turned: the
    logit sees only the offset."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., N, hd/2) each
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., N, hd)


class Attention(nn.Module):
    """Multi-head attention. Keys and values come from `context` when given (cross attention)."""

    def __init__(self, dim: int, heads: int, causal: bool = False, head_dim: int | None = None,
                 context_dim: int | None = None):
        super().__init__()
        if head_dim is None:
            # usually nh * hd = D; a model may widen its heads instead
            assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
            head_dim = dim // heads
        self.heads = heads
        self.causal = causal
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, inner = x.shape
        return x.view(B, N, self.heads, inner // self.heads).transpose(1, 2)  # (B, nh, N, hd)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None,
                angles: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D); context (B, L, Dc) or None for self attention; mask (B, L) bool, True =
        attend; angles (N, hd/2): rotary positions of x, for self attention."""
        B, N, D = x.shape
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))  # (B, nh, N, hd)
        # 2 x (B, L, nh * hd)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = self.split_heads(k)
        v = self.split_heads(v)  # (B, nh, L, hd)
        if angles is not None:
            # relative positions: q_i·k_j then depends on positions i and j through i - j
            q = rotate(q, angles)
            k = rotate(k, angles)
        attn_mask = None
        if mask is not None:
            attn_mask = mask[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        if self.causal and mask is not None:
            # SDPA takes either is_causal or a mask, so fold the triangle into the mask ourselves
            tri = torch.ones(N, k.shape[2], dtype=torch.bool, device=x.device).tril()
            attn_mask = attn_mask & tri
            causal = False
        else:
            causal = self.causal
        # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        # re-join heads: (B, N, nh * hd)
        y = y.transpose(1, 2).reshape(B, N, -1)
        return self.proj(y)


class FeedForward(nn.Module):
    """The position-wise MLP: D -> hidden -> D with a GELU between."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One pre-norm transformer block: self (or causal) attention, optional cross attention, MLP."""

    def __init__(self, dim: int, heads: int, mlp: int, causal: bool = False, cross: bool = False,
                 head_dim: int | None = None, context_dim: int | None = None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal, head_dim)
        self.ln_cross = nn.LayerNorm(dim) if cross else None
        self.cross = Attention(dim, heads, head_dim=head_dim,
                               context_dim=context_dim) if cross else None
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                angles: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); mask (B, N) marks the real tokens of x (None: all are); angles
        (N, hd/2) rotary positions for self attention; context (B, L, Dc) and context_mask (B, L)
        for cross attention."""
        x = x + self.attn(self.ln_attn(x), mask=mask, angles=angles)
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), context, context_mask)
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nn.Module):
    """A stack of `depth` blocks and a final LayerNorm: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp: int, causal: bool = False,
                 cross: bool = False, head_dim: int | None = None, context_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, causal, cross, head_dim,
                                          context_dim) for _ in range(depth))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                angles: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, context, context_mask, mask, angles)
        return self.ln_out(x)
