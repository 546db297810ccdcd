"""The lines the method rests on, tested by what each must do: which term a gradient reaches and how
strongly, which way a loss pushes, what share of captions guidance training drops, how the EMA and the
learning rate move, and which codes the sampler decides first. Each test fails if its line is broken
(β on the wrong VQ term, no caption dropped, hinge signs flipped, the adaptive weight inverted, the EMA
copying the model, a rising cosine, the sampler keeping its least confident codes). CPU only, seconds."""

import copy
import dataclasses

import torch
import torch.nn as nn

from kit.config import TrainConfig
from kit.steps import lr_at, update_ema
from maskgit import MaskGIT, MaskGITConfig, mask_ratio
from quantizer import VectorQuantizer
from text_encoder import BOS, PAD, TextEncoderConfig
from vqgan import adaptive_gan_weight, hinge_d_loss


def quantizer(beta: float) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(dim=8, codebook_size=16, code_dim=4, beta=beta).eval()  # eval: no k-means, no counts


def vq_grads(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the VQ loss alone -> (at the encoder's output x, at the codebook)."""
    vq, x = quantizer(beta), torch.randn(64, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    vq(x).loss.backward()
    return x.grad, vq.codebook.grad


def test_the_commitment_term_reaches_the_encoder_scaled_by_beta_and_the_codebook_term_reaches_the_codes():
    """VQ-VAE eq. 3: ||sg[z] - e||² moves the codes, β·||z - sg[e]||² moves the encoder."""
    enc_small, book_small = vq_grads(0.25)
    enc_big, book_big = vq_grads(1.0)
    assert enc_small.abs().sum() > 0 and book_small.abs().sum() > 0
    torch.testing.assert_close(enc_big, 4 * enc_small)  # the encoder's pull grows with β
    torch.testing.assert_close(book_big, book_small)  # the codes' pull does not depend on β


def test_quantized_vectors_pass_the_gradient_straight_through_to_the_encoder():
    vq, x = quantizer(0.25), torch.randn(32, 8, requires_grad=True)
    out = vq(x)
    codebook = nn.functional.normalize(vq.codebook, dim=-1)
    z = nn.functional.normalize(vq.proj_in(x), dim=-1)
    assert out.codes.equal((z @ codebook.t()).argmax(-1)), "each vector takes its nearest code"
    out.z.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "argmax has no gradient: the straight-through must carry it"


def generator(text_drop: float) -> MaskGIT:
    torch.manual_seed(0)
    text = TextEncoderConfig(vocab_size=300, dim=16, depth=1, heads=2, mlp=32, max_len=16)
    return MaskGIT(MaskGITConfig(codebook_size=16, latent_frames=3, grid=2, dim=16, depth=1, heads=2, mlp=32,
                                 text_drop=text_drop, text=text))


def test_dropped_captions_leave_only_bos_in_about_text_drop_of_the_rows():
    ids = torch.cat([torch.full((4000, 1), BOS), torch.randint(PAD + 10, 300, (4000, 7))], dim=1)  # (B, L)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::2, 5:] = False  # half the captions are shorter
    ids = ids.masked_fill(~mask, PAD)
    new_ids, new_mask = generator(0.1).drop_captions(ids, mask, torch.Generator().manual_seed(0))
    empty = new_mask.sum(1) == 1  # (B,) rows left with [BOS] alone
    assert 0.085 < empty.float().mean() < 0.115
    assert (new_ids[empty, 0] == BOS).all() and (new_ids[empty, 1:] == PAD).all() and new_mask[empty, 0].all()
    assert new_ids[~empty].equal(ids[~empty]) and new_mask[~empty].equal(mask[~empty]), "the rest are untouched"
    assert generator(0.0).drop_captions(ids, mask)[1].equal(mask)


def test_the_hinge_loss_falls_as_real_logits_rise_and_fake_ones_fall():
    real = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    fake = torch.tensor([-3.0, -0.5, 0.0, 2.0], requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert (real.grad[:3] < 0).all() and real.grad[3] == 0  # raise real logits up to the margin +1
    assert fake.grad[0] == 0 and (fake.grad[1:] > 0).all()  # lower fake logits down to the margin -1
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # both beyond the margins


def test_the_adaptive_weight_balances_the_two_gradients_at_the_last_layer():
    """Taming Transformers eq. 7: λ = ||∇L_rec|| / ||∇L_G||, so that λ·L_G pulls the last layer as hard as L_rec."""
    last = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(8, 4)
    rec = (x @ last).pow(2).mean()
    gan = -(x @ last).mean() * 0.1  # a GAN loss whose gradient is smaller
    lam = adaptive_gan_weight(rec, gan, last)
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(lam * gan, last, retain_graph=True)[0].norm()
    torch.testing.assert_close(g_gan, g_rec, rtol=5e-3, atol=1e-6)  # up to the +1e-4 that guards the division
    assert lam > 1 and not lam.requires_grad


def test_the_ema_moves_a_small_step_toward_the_model():
    model = nn.Linear(3, 3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    update_ema(ema, model, decay=0.99)
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.01))  # e = 0.99·0 + 0.01·1


def test_the_learning_rate_warms_up_then_falls_to_its_floor():
    cfg = dataclasses.replace(TrainConfig(), lr=1e-3, min_lr=1e-5, warmup=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(111)]
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and abs(lrs[9] - 1e-3) < 1e-12  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[10] == 1e-3  # then only down
    assert abs(lrs[110] - 1e-5) < 1e-12 and lrs[60] < 0.6e-3  # to min_lr at max_steps, half way down mid-cosine


def test_the_sampler_decides_its_most_confident_codes_first():
    """MaskGIT §3.2: at each step the least confident codes are masked again. With no confidence noise and
    logits that grow surer along the positions, the first step keeps the surest ones."""
    model = generator(0.1).eval()
    N, K = 12, 16
    sureness = torch.arange(N, dtype=torch.float)  # position i: code i % K with logit i, the rest 0
    logits = torch.zeros(1, N, K)
    logits[0, torch.arange(N), torch.arange(N) % K] = sureness
    seen = []

    def fixed(tokens, cond, uncond, scale):  # the guided logits, recording what each step was given
        seen.append(tokens.clone())
        return logits.view(1, 3, 2, 2, K)
    model.guided_logits = fixed
    ids, mask = torch.tensor([[BOS, 20]]), torch.ones(1, 2, dtype=torch.bool)
    codes = model.generate(ids, mask, steps=4, temperature=0.0)
    decided = seen[1].flatten() != model.mask_id  # after step 1
    n_decided = N - int(torch.floor(mask_ratio(torch.tensor(0.25)) * N))
    assert decided.sum() == n_decided and decided[-n_decided:].all(), "the surest positions are kept first"
    assert (codes.flatten()[-4:] == torch.arange(N - 4, N)).all(), "sure positions take their code (p > 0.99)"
