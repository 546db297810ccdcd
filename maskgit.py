"""
Phenaki's generator (§2.2): a bidirectional transformer that fills in masked video codes, conditioned on
a caption, trained and sampled as MaskGIT (Chang et al. 2022).

The video tokenizer turns a clip into codes (B, t, h, w) with t = 1 + n latent frames. Flattened,
that is N = t·h·w positions. Each position gets a code embedding (or the embedding of the extra
[MASK] id K) plus factorised learned position embeddings for its time, row and column. The stack
self-attends over all N positions and cross-attends to the text states; a linear head gives logits
over the K codes. With `position="rotary"` every self-attention also rotates its queries and keys by
their (t, h, w) position (a 3D rotary embedding, transformer.rotate), so that a logit depends on the
offset (Δt, Δh, Δw) between two positions: in a video the code that predicts a moving one sits at a
fixed offset (one latent frame back, one place along), and a head can look there whatever the
absolute position.

Training (`forward`, the loss): for each sample draw r ~ U(0, 1) and mask ⌈γ(r)·N⌉ random positions, with the
cosine schedule γ(r) = cos(πr/2) (MaskGIT §3.2). The cross-entropy counts only the masked positions:
the visible ones are copied from the input and would teach nothing. A share `prefix` of the samples
keeps its first k latent frames visible (k uniform in 1..t-1) and masks ⌈γ(r)·N_rest⌉ of the later
positions: the task every window after the first is sampled with (Phenaki §2.3; MAGVIT trains frame
prediction so). A caption is replaced by the empty one 10% of the time, so the same network also
predicts without text (classifier-free guidance, Ho & Salimans 2022). An image is a one-latent-frame
video: its later frames are padding that is neither attended to nor scored, so only its first-frame
codes are masked (Phenaki §3, joint image-video training).

Decoding (`generate`), MaskGIT §3.2: start with every unknown position masked. At step s of S,
  1. predict logits for all positions (guided: uncond + scale·(cond − uncond));
  2. sample a code at each masked position;
  3. score each sampled code by its log-probability plus Gumbel noise of temperature τ·(1 −
     (s+1)/S), noise that anneals to zero so that late steps pick the truly confident codes;
  4. keep masked the ⌊γ((s+1)/S)·N_unknown⌋ least confident; the rest are decided for good.
After S steps nothing is masked. Codes given by the caller (the first frames in a continuation) are
never masked, so they never change.

Any length and stories (`stream_video`, `make_video`, Phenaki §2.3): generate one window of t latent
frames, decode it, then again and again re-encode the last 1 + 2(k − 1) frames with the causal
tokenizer, give their k latent frames as known codes, and generate the remaining t − k under the
current prompt. Each shift adds 2(t − k) frames, so the length has no bound, and a new prompt per
segment tells a story.

Deviations: the paper does not say how it encodes positions; rotary positions and prefix masks are
options, measured in the README's motion study (the shipped Animals generator uses rotary positions;
neither shipped generator uses prefix masks). Sizes are far below the paper's 1.8B, and the text
encoder is our own.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from text_encoder import BOS, PAD, TextEncoder, TextEncoderConfig
from transformer import Transformer

# Legend: B batch, t h w latent grid, N = t·h·w positions, K codebook size, D width, L text length.


@dataclass
class MaskGITConfig:
    # K; must equal the tokenizer's codebook size
    codebook_size: int = 1024
    # t = 1 + n for the 1 + 2n frame clips it is trained on (the window)
    latent_frames: int = 6
    # h = w = image size / 8
    grid: int = 8
    # D
    dim: int = 256
    # transformer blocks
    depth: int = 4
    # attention heads
    heads: int = 8
    # width of a head; None = dim / heads
    head_dim: int | None = None
    # hidden width of the feed-forward
    mlp: int = 1024
    # share of captions replaced by the empty one in training (for guidance)
    text_drop: float = 0.1
    # "absolute": factorised tables; "rotary": also 3D rotary angles in self-attention
    position: str = "absolute"
    # the caption encoder
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)


# How positions enter: "absolute" tables only (the shipped Shapes generator), or "rotary": the
# tables and 3D rotary angles in every self-attention (the shipped Animals generator)
POSITIONS = ("absolute", "rotary")

# Sampling defaults, chosen with the oracle on 100 prompts the reported evaluation never draws (the
# tiny generator behind the folded VQGAN): guidance 3 gave colour 0.95 / shape 0.82 / one object
# 0.93, guidance 1.5 gave 1.00 / 0.92 / 1.00, and 24 steps instead of 12 took shape to 0.96.
STEPS = 24
CFG = 1.5
TEMPERATURE = 4.5
# A window that continues frames is mostly decided by them: it takes less noise on the confidence.
# Chosen on ten 101-frame Shapes videos "moving right" of a seed the evaluation never draws (the
# edge-trained generator), the frames showing part of an object (fragments at the edge once the
# object had left, besides its way out) were 19% at 4.5, 11% at 2.5 and 8% at 1.0. The first window
# keeps TEMPERATURE: at 1.0 it drew nothing at all in 3 videos of 10.
CONTEXT_TEMPERATURE = 1.0


def mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """MaskGIT's cosine schedule γ(r) = cos(πr/2): the share of positions still masked at
    progress r."""
    return torch.cos(math.pi / 2 * r)


def gumbel(shape: tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1.0)
    return -torch.log(-torch.log(u) + 1e-20)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One code from each row of probs (M, K) -> (M, 1), by inverse CDF: the first code whose
    cumulative share passes a uniform u. The same distribution as torch.multinomial, several times
    faster on a CPU."""
    cdf = probs.cumsum(-1)  # (M, K)
    # total may be 1 - ε
    u = torch.rand(len(cdf), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)


class MaskGIT(nn.Module):
    def __init__(self, config: MaskGITConfig):
        super().__init__()
        self.config = config
        D = config.dim
        K = config.codebook_size
        # one extra embedding row for [MASK]
        self.mask_id = K
        self.tok_emb = nn.Embedding(K + 1, D)
        # factorised positions: time, row and column tables summed (t + h + w rows, not t·h·w)
        self.pos_t = nn.Parameter(torch.randn(config.latent_frames, D) * 0.02)
        self.pos_h = nn.Parameter(torch.randn(config.grid, D) * 0.02)
        self.pos_w = nn.Parameter(torch.randn(config.grid, D) * 0.02)
        if config.position not in POSITIONS:
            raise ValueError(f"unknown position scheme {config.position!r}; choose one of {', '.join(POSITIONS)}")
        self.text = TextEncoder(config.text)
        # cross attention reads the text states at their own width, as Phenaki reads T5's
        self.transformer = Transformer(D, config.depth, config.heads, config.mlp, cross=True,
                                       head_dim=config.head_dim, context_dim=config.text.dim)
        self.head = nn.Linear(D, K)
        self.head_dim = config.head_dim or D // config.heads

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> text states (B, L, Dt)."""
        return self.text(ids, mask)

    def logits(self, tokens: torch.Tensor, states: torch.Tensor, text_mask: torch.Tensor,
               frames: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, t, h, w) in [0, K] (K = [MASK]) -> logits (B, t, h, w, K). `frames` (B,) is
        the number of real latent frames of each sample (1 for an image); the rest is padding."""
        B, t, h, w = tokens.shape
        # (t, h, w, D)
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]
        x = (self.tok_emb(tokens) + pos).view(B, t * h * w, -1)  # (B, N, D)
        mask = None
        if frames is not None:
            mask = self.real_positions(frames, tokens.shape)  # (B, N), padding is never attended to
        angles = rotary_angles(t, h, w, self.head_dim,
                               x.device) if self.config.position == "rotary" else None
        x = self.transformer(x, states, text_mask, mask, angles)  # (B, N, D)
        return self.head(x).view(B, t, h, w, -1)  # (B, t, h, w, K)

    def predict(self, tokens: torch.Tensor, ids: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """Logits for tokens (B, t, h, w) under captions ids, text_mask (B, L) -> (B, t, h, w, K)."""
        return self.logits(tokens, self.encode_text(ids, text_mask), text_mask)

    @staticmethod
    def real_positions(frames: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        B, t, h, w = shape
        # (N,) time index of each position
        time = torch.arange(t, device=frames.device).repeat_interleave(h * w)
        return time[None] < frames[:, None]  # (B, N)

    def drop_captions(self, ids: torch.Tensor, mask: torch.Tensor,
                      generator: torch.Generator | None = None):
        """Replace a `text_drop` share of the captions with the empty caption ([BOS] alone)."""
        # (B,)
        drop = torch.rand(ids.shape[0], generator=generator, device=ids.device) < self.config.text_drop
        # keep only [BOS] in dropped rows
        mask = mask & ~(drop[:, None] & (ids != BOS))
        return torch.where(mask, ids, PAD), mask

    def mask_positions(self, codes: torch.Tensor, frames: torch.Tensor | None = None,
                       prefix: float = 0.0, prefix_frames: int = 0):
        """Draw the training mask: codes (B, t, h, w) -> tokens (B, t, h, w) with [MASK] where
        hidden, and masked (B, N), the positions to score. Each sample hides ⌈γ(r)·N_open⌉ of its
        open positions, r ~ U(0, 1). Open are the real ones, less, in a `prefix` share of the
        samples, their first k latent frames (k uniform in 1..t-1, or `prefix_frames` where set),
        which stay visible and are never scored. An image's padding frames are [MASK] too but are
        not scored."""
        B, t, h, w = codes.shape
        N = t * h * w
        real = torch.ones(B, N, dtype=torch.bool, device=codes.device) if frames is None else self.real_positions(frames, codes.shape)
        open_ = real
        if prefix > 0:
            # continuation: the first k latent frames are given, as when a window is shifted
            # (B,)
            real_frames = torch.full((B,), t, device=codes.device) if frames is None else frames
            # (B,) in 1..t-1: prefix_frames, or a uniform draw
            if prefix_frames:
                keep = (real_frames - 1).clamp(max=prefix_frames)
            else:
                keep = (torch.rand(B, device=codes.device) * (real_frames - 1)).floor().long() + 1
            keep = torch.where((torch.rand(B, device=codes.device) < prefix) & (real_frames > 1), keep, 0)
            open_ = real & ~self.real_positions(keep, codes.shape)  # (B, N)
        # (B,) share to mask, cosine schedule
        ratio = mask_ratio(torch.rand(B, device=codes.device))
        # at least one masked position per sample
        n_mask = (ratio * open_.sum(1)).ceil().clamp(min=1)
        # a random order of the open positions; the first n_mask of each row are masked
        # padding and kept frames sort last
        scores = torch.rand(B, N, device=codes.device).masked_fill(~open_, 2.0)
        masked = scores.argsort(1).argsort(1) < n_mask[:, None]  # (B, N)
        tokens = codes.reshape(B, N).masked_fill(masked | ~real, self.mask_id)
        return tokens.view(B, t, h, w), masked

    def forward(self, codes: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor,
                frames: torch.Tensor | None = None, motion_weight: float = 1.0,
                prefix: float = 0.0, prefix_frames: int = 0) -> torch.Tensor:
        """The training loss, so that DDP and FSDP see a training step through forward: codes
        (B, t, h, w) long; ids, text_mask (B, L); frames (B,) real latent frames or None (all);
        prefix, prefix_frames: the share of samples masked as continuations and the latent frames
        they keep (mask_positions). Returns the mean cross-entropy over the masked positions only.
        With motion_weight > 1 a code that differs from the one at its place in the latent frame
        before counts that many times: in a video most codes repeat the frame before, and a plain
        mean lets them outvote the few that move."""
        tokens, masked = self.mask_positions(codes, frames, prefix, prefix_frames)
        ids, text_mask = self.drop_captions(ids, text_mask)
        # (B, t, h, w, K)
        logits = self.logits(tokens, self.encode_text(ids, text_mask), text_mask, frames)
        K = logits.shape[-1]
        scored = masked.flatten()  # (B·N,) only the masked positions are scored
        ce = F.cross_entropy(logits.view(-1, K)[scored].float(), codes.flatten()[scored],
                             reduction="none")
        if motion_weight == 1.0:
            return ce.mean()
        # (B, t, h, w), False in frame 0
        moved = F.pad(codes[:, 1:] != codes[:, :-1], (0, 0, 0, 0, 1, 0))
        weight = 1 + (motion_weight - 1) * moved.flatten()[scored].float()
        return (ce * weight).sum() / weight.sum()

    def guided_logits(self, tokens: torch.Tensor, cond: tuple, uncond: tuple,
                      scale: float) -> torch.Tensor:
        """Classifier-free guidance: uncond + scale·(cond − uncond). 1 is plain conditional, 0
        ignores the text. cond and uncond are (states, mask) pairs; both halves run as one batch."""
        if scale == 1.0:
            return self.logits(tokens, *cond)
        # pad the empty caption to the prompts' length
        B = len(tokens)
        pad = cond[0].shape[1] - uncond[0].shape[1]
        # (2B, L, D)
        states = torch.cat([cond[0], F.pad(uncond[0], (0, 0, 0, pad)).expand(B, -1, -1)])
        mask = torch.cat([cond[1], F.pad(uncond[1], (0, pad)).expand(B, -1)])  # (2B, L)
        c, u = self.logits(torch.cat([tokens, tokens]), states, mask).float().chunk(2)
        return u + scale * (c - u)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, text_mask: torch.Tensor,
                 given: torch.Tensor | None = None, steps: int = STEPS, cfg: float = CFG,
                 temperature: float = TEMPERATURE, generator: torch.Generator | None = None,
                 on_step: Callable[[int, int], None] | None = None,
                 code_temperature: float = 1.0) -> torch.Tensor:
        """Captions ids, text_mask (B, L) -> codes (B, t, h, w). `given` (B, t', h, w) holds known
        codes and -1 where a code is to be generated; t' may be shorter than the window. None:
        generate all. `steps` is for a whole window; one with known codes takes proportionally fewer
        (window_steps). `temperature` is the noise on the confidence that picks which codes to keep;
        `code_temperature` sharpens (< 1) the draw of each code."""
        c = self.config
        B = ids.shape[0]
        device = ids.device
        if given is None:
            given = torch.full((B, c.latent_frames, c.grid, c.grid), -1, dtype=torch.long,
                               device=device)
        shape = given.shape
        tokens = given.reshape(B, -1).masked_fill(given.reshape(B, -1) < 0, self.mask_id)  # (B, N)
        n_unknown = (tokens == self.mask_id).sum(1)  # (B,)
        cond = (self.encode_text(ids, text_mask), text_mask)
        empty_ids = torch.full((1, 1), BOS, dtype=torch.long, device=device)
        empty_mask = torch.ones(1, 1, dtype=torch.bool, device=device)
        uncond = (self.encode_text(empty_ids, empty_mask), empty_mask)
        steps = window_steps(steps, int(n_unknown.max()), tokens.shape[1])
        for s in range(steps):
            # (B, N, K)
            logits = self.guided_logits(tokens.view(shape), cond, uncond, cfg).view(B, tokens.shape[1], -1)
            # positions still to decide
            open_ = tokens == self.mask_id
            # (M, K): only where a code is still to be chosen
            probs = (logits[open_].float() / code_temperature).softmax(-1)
            pick = draw(probs, generator)  # (M, 1)
            sampled = tokens.masked_scatter(open_, pick.squeeze(1))  # (B, N)
            logp = torch.zeros(B, tokens.shape[1], device=device).masked_scatter(
                # (B, N), 0 where decided
                open_, probs.gather(1, pick).squeeze(1).clamp_min(1e-30).log())
            noise = temperature * (1 - (s + 1) / steps) * gumbel(logp.shape, generator, device)
            # decided codes are never re-masked
            confidence = (logp + noise).masked_fill(~open_, math.inf)
            progress = torch.tensor((s + 1) / steps, device=device)
            n_mask = (mask_ratio(progress) * n_unknown).floor().long()  # (B,)
            # unmask at least one per step
            n_mask = torch.minimum(n_mask, open_.sum(1) - 1).clamp(min=0)
            # 0 = least confident
            rank = confidence.argsort(1).argsort(1)
            tokens = sampled.masked_fill(rank < n_mask[:, None], self.mask_id)
            if on_step is not None:
                on_step(s + 1, steps)
        return tokens.view(shape)


def rotary_angles(t: int, h: int, w: int, head_dim: int, device: torch.device) -> torch.Tensor:
    """3D rotary angles for the positions of a (t, h, w) grid -> (N, hd/2). The hd/2 rotated pairs
    of a head are shared out in three equal groups, for time, row and column (any left over stay
    unturned); within a group pair k turns by π·2^-(k+1/2) radians a step, from fast (2.2:
    neighbours differ clearly) to slow (an offset across the whole grid still differs from none), as
    a binary code of the offset."""
    # pairs per axis
    n = head_dim // 2 // 3
    freq = math.pi * 2.0 ** (-torch.arange(n, device=device) - 0.5)  # (n,) radians a step
    grid = torch.meshgrid(*(torch.arange(m, device=device) for m in (t, h, w)), indexing="ij")
    # 3 x (N, n)
    parts = [g.flatten()[:, None] * freq for g in grid]
    angles = torch.cat(parts, dim=1)  # (N, 3n)
    return F.pad(angles, (0, head_dim // 2 - 3 * n))  # (N, hd/2)


def window_steps(steps: int, unknown: int, positions: int) -> int:
    """Decoding steps for a window with `unknown` of its `positions` codes to generate: `steps`
    for a whole window, proportionally fewer for a continuation (the same number of codes decided
    per step)."""
    return max(1, math.ceil(steps * unknown / positions))


def plan_windows(t: int, keep: int | None, frames: list[int], have: int = 0,
                 keep_at_cut: int | None = None) -> Iterator[tuple[int, int, int]]:
    """The windows make_video decodes, one at a time as it needs them, so that a plan of any length
    takes no memory -> (segment, context frames, new frames), in order: segment i adds frames[i] new
    frames after the `have` frames before it. Context 0 starts a fresh window; otherwise the last
    `context` frames (1 + 2(k - 1), k = `keep` latent frames) are re-encoded and given. At a cut to
    the next prompt `keep_at_cut` latent frames are given (None: `keep`, as in the paper). One, the
    last frame alone, tells where things are and how they look but not how they moved, and the new
    prompt's motion starts from there. That suits a generator whose training clips never change
    their motion (Shapes: shapes.KEEP_AT_CUT): given the old motion it has to turn it around within
    one latent frame, and draws two objects at most cuts. One trained on such changes (Animals'
    story clips) does better with the whole context."""
    if t < 2:
        # a one-latent-frame window has no room for context and a new frame: it would never end
        raise ValueError(f"a window of {t} latent frame cannot be shifted; it needs at least 2")
    # default half the window; at least one new latent frame
    keep = max(1, min(keep or t // 2, t - 1))
    cut = max(1, min(keep_at_cut or keep, t - 1))
    window = 1 + 2 * (t - 1)
    for segment, wanted in enumerate(frames):
        made = 0
        while made < wanted:
            k = cut if made == 0 and segment > 0 else keep
            # odd: 1 + 2(k - 1)
            context = 0 if have == 0 else min(1 + 2 * (k - 1), have - (1 - have % 2))
            new = min(window - context, wanted - made)
            yield segment, context, new
            made += new
            have += new


@torch.no_grad()
def stream_video(model: MaskGIT, tokenizer: nn.Module,
                 prompts: list[tuple[torch.Tensor, torch.Tensor]], frames: list[int],
                 init: torch.Tensor | None = None, keep: int | None = None,
                 keep_at_cut: int | None = None,
                 context_temperature: float | None = CONTEXT_TEMPERATURE,
                 **sampling) -> Iterator[torch.Tensor]:
    """A video of any length, a window at a time: segment i has `frames[i]` new frames under prompt
    i (ids, mask each (B, L)). `init` (B, 3, T0, H, W) is an image or video to continue (not yielded
    again). `keep` latent frames (default half the window) are re-encoded and given at each shift,
    `keep_at_cut` at a change of prompt (plan_windows); such a window samples at
    `context_temperature` (None: as the first window, `sampling`'s temperature). Yields the new
    frames of each window (B, 3, new, H, W) in order. Only the last window of frames is held: the
    memory of a video does not grow with its length, and nothing is copied more than once."""
    t = model.config.latent_frames
    window = 1 + 2 * (t - 1)
    # the latest frames, at most one window: where the next context comes from
    tail = init
    for segment, context, new in plan_windows(t, keep, frames, 0 if init is None else init.shape[2],
                                              keep_at_cut):
        ids, mask = prompts[segment]
        # nothing to continue: a fresh window
        given = None
        settings = sampling
        if context:
            # (B, k, h, w), causal: no future needed
            known = tokenizer.encode(tail[:, :, -context:])
            # (B, t, h, w), -1 = generate
            given = F.pad(known, (0, 0, 0, 0, 0, t - known.shape[1]), value=-1)
            if context_temperature is not None:
                settings = sampling | {"temperature": context_temperature}
        piece = tokenizer.decode(model.generate(ids, mask, given=given, **settings))[:, :, context:context + new]
        # bounded: one window
        tail = piece if tail is None else torch.cat([tail, piece], dim=2)[:, :, -window:]
        yield piece  # (B, 3, new, H, W) after the context


def make_video(model: MaskGIT, tokenizer: nn.Module,
               prompts: list[tuple[torch.Tensor, torch.Tensor]], frames: list[int],
               init: torch.Tensor | None = None, keep: int | None = None,
               keep_at_cut: int | None = None,
               context_temperature: float | None = CONTEXT_TEMPERATURE, **sampling) -> torch.Tensor:
    """stream_video, gathered: -> video (B, 3, T0 + sum(frames), H, W), `init` first."""
    pieces = list(stream_video(model, tokenizer, prompts, frames, init, keep, keep_at_cut,
                               context_temperature, **sampling))
    return torch.cat(([] if init is None else [init]) + pieces, dim=2)
