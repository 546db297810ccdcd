import math

import pytest
import torch

from transformer import Attention, Transformer


def naive_attention(attn: Attention, x, context=None, mask=None):
    """softmax(q k^T / sqrt(hd) + bias) v, written out by hand from the module's own weights."""
    context = x if context is None else context
    B, N, D = x.shape
    L, nh = context.shape[1], attn.heads
    q = attn.to_q(x).view(B, N, nh, -1).transpose(1, 2)
    k, v = attn.to_kv(context).chunk(2, dim=-1)
    k, v = k.view(B, L, nh, -1).transpose(1, 2), v.view(B, L, nh, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // nh)  # (B, nh, N, L)
    allowed = torch.ones(B, 1, N, L, dtype=torch.bool)
    if attn.causal:
        allowed = allowed & torch.ones(N, L, dtype=torch.bool).tril()
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, N, D))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_matches_naive_softmax(causal, masked):
    torch.manual_seed(0)
    attn = Attention(32, 4, causal=causal)
    x = torch.randn(2, 7, 32)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]) if masked else None
    torch.testing.assert_close(attn(x, mask=mask), naive_attention(attn, x, mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("context_dim", [None, 48])
def test_cross_attention_with_padding_matches_naive_softmax(context_dim):
    """Also when the context keeps its own width (text states wider or narrower than the generator)."""
    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=context_dim)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 6, context_dim or 32)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    torch.testing.assert_close(attn(x, context, mask), naive_attention(attn, x, context, mask), atol=1e-5, rtol=1e-5)


def test_padding_is_ignored_in_cross_attention():
    """What sits at padded context positions must not change the output."""
    torch.manual_seed(0)
    net = Transformer(32, 2, 4, 64, cross=True)
    x, context = torch.randn(1, 5, 32), torch.randn(1, 6, 32)
    mask = torch.tensor([[True, True, True, False, False, False]])
    noisy = context.clone()
    noisy[:, 3:] = torch.randn(1, 3, 32) * 100
    torch.testing.assert_close(net(x, context, mask), net(x, noisy, mask))


def test_causal_stack_does_not_see_the_future():
    torch.manual_seed(0)
    net = Transformer(32, 3, 4, 64, causal=True)
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 32)
    torch.testing.assert_close(net(x)[:, :5], net(y)[:, :5])
    assert not torch.allclose(net(x)[:, 5:], net(y)[:, 5:])


def test_rotary_logits_depend_on_the_offset_alone():
    """3D rotary positions: q·k of two positions is the same wherever the pair sits, if their offset
    (Δt, Δh, Δw) is; a different offset gives another logit."""
    from maskgit import rotary_angles
    from transformer import rotate
    t, h, w, hd = 4, 5, 5, 32
    angles = rotary_angles(t, h, w, hd, torch.device("cpu"))  # (N, hd / 2)
    index = torch.arange(t * h * w).view(t, h, w)
    q, k = torch.randn(hd), torch.randn(hd)

    def logit(p, r):  # q at position p, k at position r, each (t, h, w)
        i, j = index[p], index[r]
        return rotate(q[None], angles[i][None])[0] @ rotate(k[None], angles[j][None])[0]

    base = logit((1, 2, 3), (0, 2, 2))  # the key one latent frame back, one column along
    for shift in ((1, 0, 0), (2, -2, 1), (0, 2, -2), (2, 1, 1)):
        moved = [tuple(a + s for a, s in zip(p, shift)) for p in ((1, 2, 3), (0, 2, 2))]
        torch.testing.assert_close(logit(*moved), base)
    for other in ((1, 2, 2), (0, 2, 3), (0, 1, 2), (0, 3, 2)):  # one step off in each axis, or none in time
        assert not torch.isclose(logit((1, 2, 3), other), base)
    assert torch.isclose(rotate(q[None], torch.zeros(1, hd // 2))[0], q).all()  # angle 0 turns nothing
